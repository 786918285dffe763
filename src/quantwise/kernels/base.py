"""Shared pieces of the CPU kernels: activation descriptors, the Kernel protocol, exact input
quantization and the weight-scale normalisation every family uses.

Input quantization here is bit-identical to `numerics.quantize` (float32 true division, round
half to even, + zero point, saturate): the integer GEMM is then exact, and a kernel differs from
the float simulation only by float rounding in the simulation's own dot products and in the
final rescale (see `tests/test_kernels.py` for the bound that is asserted).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Protocol, Union, runtime_checkable

import torch

from quantwise.spec import Format, PerChannel, PerTensor, PerToken, QuantSpec

TINY = torch.finfo(torch.float32).tiny


@dataclass(frozen=True)
class StaticAct:
    """Calibrated quantization of the layer's input: int8 or uint8, per-tensor."""

    scale: float
    zero_point: int
    spec: QuantSpec


@dataclass(frozen=True)
class DynamicAct:
    """Symmetric int8 input quantization whose scale is computed from each input at run time
    (PerTensor: one scale; PerToken: one scale per row, i.e. per all-but-last index)."""

    spec: QuantSpec


Act = Optional[Union[StaticAct, DynamicAct]]


@runtime_checkable
class Kernel(Protocol):
    name: str
    fallback_reason: Optional[str]

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...

    def nbytes(self) -> int: ...


def tensor_bytes(*tensors: Optional[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def f32(value) -> float:
    """A Python float holding exactly the float32 value numerics would use for `value`."""
    return float(torch.as_tensor(value, dtype=torch.float32))


def static_act_problem(act: StaticAct) -> Optional[str]:
    """Why a StaticAct cannot feed an int8 kernel, or None."""
    s = act.spec
    if s.format not in (Format.INT8, Format.UINT8, Format.INT4, Format.UINT4):
        return f"{s.format.value} activations have no CPU integer kernel (int8/uint8/int4/uint4)"
    # 4-bit codes are a sub-range of the 8-bit ones: the int8 kernels compute them exactly
    if not isinstance(s.granularity, PerTensor):
        return "static activation quantization must be per-tensor for the int8 kernels"
    return None


def dynamic_act_problem(act: DynamicAct, allow_per_token: bool = True) -> Optional[str]:
    s = act.spec
    if s.format != Format.INT8 or not s.symmetric:
        return (f"dynamic activations must be symmetric int8 for the int8 kernels "
                f"(got {s.format.value}, symmetric={s.symmetric})")
    if isinstance(s.granularity, PerTensor):
        return None
    if isinstance(s.granularity, PerToken) and allow_per_token:
        return None
    return f"dynamic activation granularity {type(s.granularity).__name__} has no int8 kernel here"


def act_u8_max(act: "StaticAct | DynamicAct") -> int:
    """Largest uint8 code oneDNN receives for these activations (StaticU8Quantizer shifts
    signed codes to start at 0; dynamic symmetric int8 codes get +128)."""
    if isinstance(act, StaticAct):
        return act.spec.qmax - act.spec.qmin
    return act.spec.qmax + 128


def act_i8_max(act: "StaticAct | DynamicAct") -> int:
    """Largest code + 128 of the int8 codes _int_mm receives (StaticI8Quantizer moves unsigned
    codes down by 128): oneDNN's s8 x s8 adds 128 to the activations inside."""
    if isinstance(act, StaticAct):
        shift = 0 if act.spec.format.is_signed else -128
        return act.spec.qmax + shift + 128
    return act.spec.qmax + 128


def weight_shift(codes: torch.Tensor) -> int:
    """What uint8 weight codes are moved by to become int8: 0 when they already fit (4-bit
    codes: small codes keep the int16 pair sums of CPUs without VNNI in range), else -128."""
    if codes.dtype == torch.int8 or codes.numel() == 0 or int(codes.max()) <= 127:
        return 0
    return -128


def shifted_weight_max(codes: torch.Tensor) -> int:
    """max |weight code| as the int8 GEMMs see it (after weight_shift)."""
    if codes.numel() == 0:
        return 0
    return int((codes.to(torch.int16) + weight_shift(codes)).abs().max())


class StaticU8Quantizer:
    """x -> uint8 codes for oneDNN, equal to numerics.quantize(x) + shift (-qmin for signed).

    Vectorised passes (div, round, add, clamp, convert, bit flip); the result keeps x's memory
    format (or takes `memory_format`) so channels-last activations stay channels-last. The
    codes are built 128 lower and converted to int8, then flipped to uint8: float32 -> int8 is
    vectorised and float32 -> uint8 is not (0.055 vs 0.31 ms for 1.2M values, measured).
    """

    def __init__(self, act: StaticAct):
        spec = act.spec
        # signed codes start at 0 (int8 +128, int4 +8): small u8 codes keep the int16 pair sums
        # of CPUs without VNNI in range (kernels/probe.py)
        self.shift = -spec.qmin if spec.format.is_signed else 0
        self.scale = f32(act.scale)
        self.scale_t = torch.tensor(self.scale, dtype=torch.float32)
        self.zero_point = int(act.zero_point) + self.shift  # zero point of the uint8 codes
        self.lo = spec.qmin + self.shift
        self.hi = spec.qmax + self.shift

    def shifted_codes(self, x: torch.Tensor, memory_format=torch.preserve_format) -> torch.Tensor:
        """The uint8 codes minus 128, as float32 values (exact small integers)."""
        # The division writes in `memory_format`, so a layout change rides on the first pass.
        t = torch.div(x, self.scale_t, out=torch.empty_like(x, memory_format=memory_format)).round_()
        if self.zero_point != 128:
            t.add_(self.zero_point - 128)
        return t.clamp_(self.lo - 128, self.hi - 128)

    def __call__(self, x: torch.Tensor, memory_format=torch.preserve_format) -> torch.Tensor:
        if (memory_format is torch.channels_last and x.dim() == 4 and x.shape[1] <= 4
                and x.is_contiguous()):
            # Few channels (an image input): transposing to NHWC is a slow strided copy; quantize
            # in NCHW, then interleave the uint8 planes with one stack (0.68 vs 0.97 ms for
            # 8x3x224x224, measured).
            codes = u8_from_shifted(self.shifted_codes(x))
            planes = [codes[:, c] for c in range(codes.shape[1])]
            return torch.stack(planes, dim=-1).permute(0, 3, 1, 2)
        return u8_from_shifted(self.shifted_codes(x, memory_format), memory_format)


def u8_from_shifted(t: torch.Tensor, memory_format=torch.preserve_format) -> torch.Tensor:
    """float32 codes in [-128, 127] -> uint8 codes + 128 (int8 conversion, then a bit flip:
    v ^ 0x80 == v + 128 for int8 v)."""
    return _to_dtype(t, torch.int8, memory_format).view(torch.uint8).bitwise_xor_(128)


class StaticI8Quantizer:
    """x -> int8 codes c with c - zero_point == numerics.quantize(x) - act zero point."""

    def __init__(self, act: StaticAct):
        spec = act.spec
        self.shift = -128 if not spec.format.is_signed else 0
        self.scale = f32(act.scale)
        self.scale_t = torch.tensor(self.scale, dtype=torch.float32)
        self.zero_point = int(act.zero_point) + self.shift
        self.lo = spec.qmin + self.shift
        self.hi = spec.qmax + self.shift

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        t = torch.div(x, self.scale_t).round_()
        if self.zero_point:
            t.add_(self.zero_point)
        t.clamp_(self.lo, self.hi)
        return _to_dtype(t, torch.int8)


def _to_dtype(t: torch.Tensor, dtype: torch.dtype, memory_format=torch.preserve_format
              ) -> torch.Tensor:
    """One conversion pass; the layout change to `memory_format` (if any) rides along."""
    out = torch.empty_like(t, dtype=dtype, memory_format=memory_format)
    out.copy_(t)
    return out


def dynamic_scale(x: torch.Tensor, qmax: int, per_row: bool
                  ) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Run-time symmetric scale(s) of x, exactly as numerics.qparams_from_range computes them.

    Rows are the entries of dim 0 (tokens of a 2-D Linear input, samples of a conv input).
    Returns (x, scale, bad): scale is max|x| / qmax floored at TINY, per row ([M, 1, ...]) or
    per tensor (0-dim). float32 division of the float32 max is correctly rounded, so it equals
    numerics' float64 division rounded to float32 (an all-zero row gets TINY, never 0 or NaN).
    Two plain reductions: abs().amax() and aminmax(dim) measured 3-14x slower.

    NaN/Inf never leak into other rows. Per row: a row holding NaN/Inf gets a NaN/Inf scale and
    so a non-finite output row, as a float layer would give; no check, no sync. Per tensor: the
    scale is needed as a Python float anyway; if it is not finite, the offending rows (`bad`,
    else None) are zeroed, the scale comes from the other rows, and callers set `bad` rows'
    outputs to NaN.
    """
    dims = tuple(range(1, x.dim()))
    absmax = torch.maximum(x.amax(dim=dims, keepdim=True), x.amin(dim=dims, keepdim=True).neg_())
    if per_row:
        return x, absmax.div_(qmax).clamp_(min=TINY), None
    scale = absmax.max().div_(qmax).clamp_(min=TINY)
    if math.isfinite(float(scale)):
        return x, scale, None
    bad = ~torch.isfinite(absmax)
    scale = absmax.masked_fill(bad, 0.0).max().div_(qmax).clamp_(min=TINY)
    return x.masked_fill(bad, 0.0), scale, bad


def quantize_symmetric_i8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """round(x / scale) as int8; no clamp is needed because |x| <= qmax * scale by
    construction of the dynamic scale (|x / scale| <= 127.00001 rounds to at most 127)."""
    return _to_dtype(torch.div(x, scale).round_(), torch.int8)


def quantize_symmetric_u8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """round(x / scale) + 128 as uint8 (codes with zero point 128 for oneDNN): the +128 is a
    bit flip of the int8 codes (v ^ 0x80 == v + 128 for v in [-128, 127]), a one-byte pass."""
    return quantize_symmetric_i8(x, scale).view(torch.uint8).bitwise_xor_(128)


def out_channel_params(weight_spec: QuantSpec, scale: torch.Tensor, zero_point: torch.Tensor,
                       n_out: int, axis: int = 0, ndim: int = 2
                       ) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """(scale [n_out] float32, zero point [n_out] int32) when the weight has one scale per
    output channel (PerTensor, or PerChannel along `axis` of an `ndim`-dim weight); None for
    other granularities (per-group, per-input-channel)."""
    g = weight_spec.granularity
    scale = torch.as_tensor(scale, dtype=torch.float32).detach()
    zero_point = torch.as_tensor(zero_point).detach().to(torch.int32)
    if isinstance(g, PerTensor):
        return (scale.reshape(-1)[:1].expand(n_out).contiguous(),
                zero_point.reshape(-1)[:1].expand(n_out).contiguous())
    if isinstance(g, PerChannel) and g.axis % ndim == axis and scale.numel() == n_out:
        zp = zero_point.reshape(-1)
        if zp.numel() == 1:
            zp = zp.expand(n_out)
        return scale.reshape(n_out).contiguous(), zp.contiguous()
    return None


def _tuple(value, dim: int) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * dim
    value = tuple(int(v) for v in value)
    if len(value) == 1 and dim > 1:
        return value * dim
    return value


@dataclass(frozen=True)
class ConvGeom:
    """Stride/padding/... of a convolution with `dim` spatial dims (1, 2 or 3)."""

    dim: int
    stride: tuple
    padding: Union[tuple, str]
    dilation: tuple
    groups: int
    transposed: bool = False
    output_padding: tuple = ()

    @classmethod
    def make(cls, dim, stride, padding, dilation, groups, transposed=False, output_padding=0):
        pad = padding if isinstance(padding, str) else _tuple(padding, dim)
        return cls(dim, _tuple(stride, dim), pad, _tuple(dilation, dim), int(groups),
                   bool(transposed), _tuple(output_padding, dim))

    def run_float(self, x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor]
                  ) -> torch.Tensor:
        import torch.nn.functional as F

        if self.transposed:
            fn = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[self.dim - 1]
            return fn(x, w, b, self.stride, self.padding, self.output_padding, self.groups,
                      self.dilation)
        fn = (F.conv1d, F.conv2d, F.conv3d)[self.dim - 1]
        return fn(x, w, b, self.stride, self.padding, self.dilation, self.groups)

    def explicit_padding(self, kernel_size: tuple) -> Optional[tuple]:
        """Symmetric per-dim padding, resolving 'valid'/'same'; None if 'same' is asymmetric."""
        if not isinstance(self.padding, str):
            return self.padding
        if self.padding == "valid":
            return (0,) * self.dim
        pads = []
        for k, d in zip(kernel_size, self.dilation):
            total = d * (k - 1)
            if total % 2:
                return None
            pads.append(total // 2)
        return tuple(pads)
