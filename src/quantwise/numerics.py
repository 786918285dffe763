"""Pure quantization arithmetic: ranges -> (scale, zero_point), quantize, dequantize, packing.

Rounding and saturation follow ONNX QuantizeLinear exactly so that exported graphs agree bit
for bit: q = saturate(round_half_to_even(x / scale) + zero_point), x_hat = (q - zp) * scale,
with the division done in float32. Range arithmetic is float64 so 1e30 outliers cannot overflow.

| granularity | scale shape for x of shape (..., K)            |
|-------------|------------------------------------------------|
| PerTensor   | ()                                             |
| PerChannel  | (x.shape[axis],)                               |
| PerToken    | x.shape[:-1]                                   |
| PerGroup(G) | x.shape[:-1] + (K // G,)                       |
"""

from __future__ import annotations

import torch

from quantwise.errors import ConfigError
from quantwise.spec import Format, PerChannel, PerTensor, PerToken, QuantSpec

# Smallest positive normal float32: the floor for every scale (bad-inputs 11 and 14).
TINY = torch.finfo(torch.float32).tiny
FP32_MAX = torch.finfo(torch.float32).max


def tensor_range(x: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """(min, max) of `x` reduced to the scale shape of `spec`'s granularity, as float64.
    Reduced in x's own dtype (min and max are exact in it): no float64 copy of a large weight."""
    x = x.detach()
    g = spec.granularity
    if isinstance(g, PerTensor):
        lo, hi = x.amin(), x.amax()
    elif isinstance(g, PerChannel):
        axis = g.axis % x.dim()
        dims = [d for d in range(x.dim()) if d != axis]
        lo, hi = x.amin(dim=dims), x.amax(dim=dims)
    elif isinstance(g, PerToken):
        lo, hi = x.amin(dim=-1), x.amax(dim=-1)
    else:
        grouped = _grouped(x, g.size)
        lo, hi = grouped.amin(dim=-1), grouped.amax(dim=-1)
    return lo.to(torch.float64), hi.to(torch.float64)


def qparams_from_range(amin: torch.Tensor, amax: torch.Tensor, spec: QuantSpec,
                       code_limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale (float32, floored at TINY) and zero point (int32) covering [amin, amax].

    Symmetric: scale = max(|amin|, |amax|) / qmax, zero_point = 0; `code_limit` (symmetric
    only) uses fewer codes, +-code_limit (7-bit weights for CPUs without VNNI: kernels.select).
    Affine: the range is widened to include 0, scale = (max - min) / (qmax - qmin),
    zero_point = round(qmin - min / scale) clamped into [qmin, qmax].
    Float formats: fp8 scales amax onto the format's largest value; fp16/bf16/fp32 use scale 1.
    """
    amin = torch.as_tensor(amin, dtype=torch.float64)
    amax = torch.as_tensor(amax, dtype=torch.float64)
    if not (torch.isfinite(amin).all() and torch.isfinite(amax).all()):
        raise ConfigError("quantization range is not finite; calibrators must exclude NaN/Inf first")
    fmt = spec.format
    zero = torch.zeros(amax.shape, dtype=torch.int32)
    if not fmt.is_integer:
        if fmt in (Format.FP8_E4M3, Format.FP8_E5M2):
            absmax = torch.maximum(amin.abs(), amax.abs())
            return _floor_scale(absmax / fmt.float_max, FP32_MAX / fmt.float_max), zero
        return torch.ones(amax.shape, dtype=torch.float32), zero
    qmin, qmax = spec.qmin, spec.qmax
    if code_limit is not None and spec.symmetric and code_limit < qmax:
        qmin, qmax = max(qmin, -code_limit), code_limit
    if spec.symmetric:
        if not fmt.is_signed and bool((amin < 0).any()):
            raise ConfigError(
                f"{fmt.value} symmetric (zero point 0) cannot represent negative values "
                f"(min seen {float(amin.min()):.4g}); use a signed format or symmetric=False")
        absmax = torch.maximum(amin.abs(), amax.abs())
        return _floor_scale(absmax / qmax, FP32_MAX / (qmax - qmin)), zero
    lo = torch.clamp(amin, max=0.0)
    hi = torch.clamp(amax, min=0.0)
    scale = _floor_scale((hi - lo) / (qmax - qmin), FP32_MAX / (qmax - qmin))
    zp = torch.round(qmin - lo / scale.to(torch.float64)).clamp(qmin, qmax).to(torch.int32)
    return scale, zp


def _floor_scale(scale64: torch.Tensor, cap: float) -> torch.Tensor:
    """float32 scale in [TINY, cap]; `cap` keeps (q - zp) * scale finite at float32's edge."""
    scale32 = scale64.clamp(min=TINY, max=cap).to(torch.float32)
    rounded_up = scale32.to(torch.float64) > cap
    return torch.where(rounded_up, torch.nextafter(scale32, torch.zeros_like(scale32)), scale32)


def _grouped(x: torch.Tensor, size: int) -> torch.Tensor:
    k = x.shape[-1]
    if k % size:
        raise ConfigError(f"last dimension {k} is not a multiple of group size {size}")
    return x.reshape(*x.shape[:-1], k // size, size)


def _broadcast(p: torch.Tensor, x: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Reshape a scale/zero-point tensor to broadcast against x (grouped x for PerGroup)."""
    g = spec.granularity
    if isinstance(g, PerTensor) or p.dim() == 0:
        return p, x
    if isinstance(g, PerChannel):
        shape = [1] * x.dim()
        shape[g.axis % x.dim()] = -1
        return p.reshape(shape), x
    if isinstance(g, PerToken):
        return p.unsqueeze(-1), x
    return p.unsqueeze(-1), _grouped(x, g.size)


# Tensors larger than this are quantized in chunks of rows (the same values): the float
# temporary of x / scale stays ~64 MB instead of a copy of a 262 MB embedding table or head.
CHUNK_ELEMENTS = 1 << 24


def _splits_by_row(x: torch.Tensor, p: torch.Tensor, spec: QuantSpec) -> bool:
    """Whether qparams `p` hold one leading entry per row of x (sliced with it)."""
    g = spec.granularity
    if p.dim() == 0 or isinstance(g, PerTensor) or p.shape[0] != x.shape[0]:
        return False
    return g.axis % x.dim() == 0 if isinstance(g, PerChannel) else True


def quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, spec: QuantSpec
             ) -> torch.Tensor:
    """Integer codes (int8 for signed, uint8 for unsigned; int4 codes unpacked) or fp8 values."""
    scale, zero_point = torch.as_tensor(scale), torch.as_tensor(zero_point)
    if x.numel() <= CHUNK_ELEMENTS or x.dim() < 2:
        return _quantize(x, scale, zero_point, spec)
    by_row = [_splits_by_row(x, p, spec) for p in (scale, zero_point)]
    if not all(split or p.numel() == 1 for p, split in zip((scale, zero_point), by_row)):
        return _quantize(x, scale, zero_point, spec)  # qparams along another axis: in one go
    rows = max(1, CHUNK_ELEMENTS // x[0].numel())
    out = None
    for i in range(0, x.shape[0], rows):
        s, z = (p[i:i + rows] if split else p for p, split in zip((scale, zero_point), by_row))
        part = _quantize(x[i:i + rows], s, z, spec)
        if out is None:
            out = torch.empty((x.shape[0], *part.shape[1:]), dtype=part.dtype)
        out[i:i + rows] = part
    return out


def _quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, spec: QuantSpec
              ) -> torch.Tensor:
    fmt = spec.format
    if not fmt.is_integer:
        if fmt in (Format.FP8_E4M3, Format.FP8_E5M2):
            s, xg = _broadcast(scale, x, spec)
            y = (xg.float() / s).clamp(-fmt.float_max, fmt.float_max).to(fmt.storage_dtype)
            return y.reshape(x.shape)
        return x.to(fmt.storage_dtype)
    s, xg = _broadcast(scale, x, spec)
    z, _ = _broadcast(zero_point, x, spec)
    q = xg.float() / s  # one float temporary, the rest in place (large weights: embeddings)
    return q.round_().add_(z).clamp_(spec.qmin, spec.qmax).to(fmt.storage_dtype).reshape(x.shape)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, spec: QuantSpec
               ) -> torch.Tensor:
    """float32 values (q - zero_point) * scale, in the shape of q."""
    fmt = spec.format
    if not fmt.is_integer and fmt not in (Format.FP8_E4M3, Format.FP8_E5M2):
        return q.float()
    s, qg = _broadcast(scale, q, spec)
    if fmt.is_integer:
        z, _ = _broadcast(zero_point, q, spec)
        return ((qg.to(torch.int32) - z).float() * s).reshape(q.shape)
    return (qg.float() * s).reshape(q.shape)


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, spec: QuantSpec
                  ) -> torch.Tensor:
    """dequantize(quantize(x)) in x's dtype: the float simulation of the quantized tensor."""
    return dequantize(quantize(x, scale, zero_point, spec), scale, zero_point, spec).to(x.dtype)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Two 4-bit codes per byte along the last dim (element 2i in the low nibble).

    `codes` holds int4 values in [-8, 7] (int8) or uint4 in [0, 15] (uint8); an odd last
    dimension is padded with a zero code. Returns uint8 of shape (..., ceil(K / 2)).
    """
    # in bytes throughout (two's-complement nibbles): a 32K x 2048 head's temporaries are
    # 65 MB, not the 0.4 GB of int16 copies
    u = codes.to(torch.int8 if codes.dtype != torch.uint8 else torch.uint8).view(torch.uint8) & 0xF
    if u.shape[-1] % 2:
        u = torch.nn.functional.pad(u, (0, 1))
    return u[..., 0::2] | (u[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor, length: int, signed: bool = True) -> torch.Tensor:
    """Inverse of pack_int4: codes of last dimension `length` (int8 if signed else uint8)."""
    p = packed.to(torch.uint8)
    u = torch.stack([p & 0xF, p >> 4], dim=-1).reshape(*packed.shape[:-1], 2 * packed.shape[-1])
    u = u[..., :length].contiguous()
    if signed:  # u ^ 8 - 8: 0..7 stay, 8..15 become -8..-1 (in place, in int8)
        return u.view(torch.int8).bitwise_xor_(8).sub_(8)
    return u
