"""Real low-precision CPU kernels for quantized Linear and Conv layers, and their dispatch.

`make_linear_kernel` / `make_conv_kernel` pick what actually runs for a weight spec and an
activation descriptor; every kernel says what runs in `name`, and `fallback_reason` is None only
when a low-precision kernel does the arithmetic. Integer kernels are taken only where the probe
(probe.py) measured them exact for the layer's codes on this CPU, the fastest measured first
(select.py); otherwise the exact float simulation runs and says why. Choices (measured with
benchmarks/kernels_micro.py; the reasons are in each module's docstring):

| case                                             | kernel (module)                           |
|--------------------------------------------------|-------------------------------------------|
| Linear, static int8/uint8 input, symmetric W     | oneDNN qlinear_pointwise, _int_mm, FBGEMM |
| Linear, dynamic per-tensor input, symmetric W    | oneDNN qlinear_pointwise (int8_linear)    |
| Linear, dynamic per-token input, or affine W     | torch._int_mm + corrections (int8_linear) |
| (AVX2-only CPUs: the timing picks FBGEMM)        | FBGEMM u8 x s8, float out (int8_linear)   |
| Linear, weight-only 8-bit per-channel            | fp16-exact codes, FBGEMM (weight_only)    |
| Linear, weight-only symmetric int4, group/channel| torch int4 GEMM, bf16 input (weight_only) |
| Linear, other int4 / 8-bit per-group             | packed, dequant per call (flagged)        |
| Linear/Conv bf16, Linear fp16                    | oneDNN bf16 / FBGEMM fp16 (half)          |
| Conv fp16                                        | fp16 held, fp32 conv (half; flagged)      |
| Conv1d/2d/3d, static or dynamic per-tensor input | oneDNN qconv_pointwise (int8_conv)        |
| ConvTranspose1d/2d/3d, same inputs               | sub-pixel oneDNN qconvs (int8_conv)       |
| fp8, fp32, weight-only int conv, per-group W8A8, | float simulation (fallback)               |
| affine/per-token-conv dynamic inputs, rejections |                                           |

Example:
    >>> import torch
    >>> from quantwise import numerics
    >>> from quantwise.spec import Format, PerChannel, PerToken, QuantSpec
    >>> spec = QuantSpec(Format.INT8, granularity=PerChannel(0))
    >>> w = torch.randn(16, 32)
    >>> scale, zp = numerics.qparams_from_range(*numerics.tensor_range(w, spec), spec)
    >>> kernel = make_linear_kernel(numerics.quantize(w, scale, zp, spec), scale, zp, spec,
    ...                             None, DynamicAct(QuantSpec(granularity=PerToken())))
    >>> kernel(torch.randn(4, 32)).shape, kernel.fallback_reason
    (torch.Size([4, 16]), None)
"""

from __future__ import annotations

from typing import Optional

import torch

from quantwise.errors import ConfigError
from quantwise.kernels.base import (Act, ConvGeom, DynamicAct, Kernel, StaticAct, act_i8_max,
                                    act_u8_max, dynamic_act_problem, out_channel_params,
                                    shifted_weight_max, static_act_problem)
from quantwise.kernels.fallback import FallbackConv, FallbackLinear
from quantwise.kernels.gemv import with_gemv
from quantwise.kernels.half import Bf16Conv, Bf16Linear, Fp16Conv, Fp16Linear
from quantwise.kernels.int8_conv import OneDnnConv
from quantwise.kernels.int8_linear import FbgemmLinear, IntMMLinear, OneDnnLinear
from quantwise.kernels.select import (NoExactKernel, check_conv, choose_linear,
                                      default_affine_order, default_per_token_order,
                                      default_static_order, weight_code_limit)
from quantwise.kernels.weight_only import Fp16CodesLinear, Int4PackLinear, PackedDequantLinear
from quantwise.spec import Format, PerGroup, PerTensor, PerToken, QuantSpec

__all__ = ["StaticAct", "DynamicAct", "Kernel", "make_linear_kernel", "make_conv_kernel",
           "ConvGeom", "weight_code_limit"]

_FP8 = (Format.FP8_E4M3, Format.FP8_E5M2)
_INT = (Format.INT8, Format.UINT8, Format.INT4, Format.UINT4)


class _Fallback(Exception):
    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _float_format_reason(fmt: Format, act: Act) -> Optional[str]:
    if fmt == Format.FP32:
        return "fp32 weights are not quantized; runs as float32"
    if fmt in _FP8:
        return f"{fmt.value} has no CPU kernel; runs as float32 simulation"
    if act is not None:
        return (f"{fmt.value} weights combined with quantized activations have no CPU kernel; "
                f"runs as float32 simulation")
    return None


def _act_reason(act: Act, allow_per_token: bool) -> Optional[str]:
    if isinstance(act, (StaticAct, DynamicAct)):
        problem = (static_act_problem(act) if isinstance(act, StaticAct)
                   else dynamic_act_problem(act, allow_per_token))
        return None if problem is None else problem + "; runs as float32 simulation"
    raise ConfigError(f"act must be StaticAct, DynamicAct or None, got {type(act).__name__}")


def _params(scale, zero_point) -> tuple[torch.Tensor, torch.Tensor]:
    """Detached float32 scale and int32 zero point (None allowed: 1 and 0)."""
    scale = torch.ones(()) if scale is None else torch.as_tensor(scale).detach().to(torch.float32)
    if zero_point is None:
        return scale, torch.zeros(scale.shape, dtype=torch.int32)
    return scale, torch.as_tensor(zero_point).detach().to(torch.int32)


def _codes(weight_codes: torch.Tensor, fmt: Format) -> torch.Tensor:
    dtype = torch.int8 if fmt.is_signed else torch.uint8
    return weight_codes.detach().to(dtype)


LEAN_REASON = ("memory-lean load: 8-bit weights held as their codes only (no fp16 copy, 1 byte "
               "per weight, not 3); batches of more than 8 rows dequantize them per call")


def make_linear_kernel(weight_codes: torch.Tensor, weight_scale: torch.Tensor,
                       weight_zero_point: torch.Tensor, weight_spec: QuantSpec,
                       bias: Optional[torch.Tensor], act: Act, lean: bool = False) -> Kernel:
    """The fastest correct kernel for y = x @ dequantize(W)^T + bias with `act` applied to x.
    `lean`: for 8-bit weight-only layers, no fp16 copy of the codes beside them (io.load when
    the model would not fit otherwise): the GEMV at 1-8 rows, dequantize + F.linear above."""
    fmt = weight_spec.format
    weight_scale, weight_zero_point = _params(weight_scale, weight_zero_point)
    if weight_codes.dim() != 2:
        raise ConfigError(f"Linear weight codes must be 2-D [N, K], "
                          f"got shape {tuple(weight_codes.shape)}")
    try:
        reason = _float_format_reason(fmt, act) if not fmt.is_integer else None
        if reason:
            raise _Fallback(reason)
        if fmt == Format.BF16:
            return Bf16Linear(weight_codes, bias)
        if fmt == Format.FP16:
            return Fp16Linear(weight_codes, bias)
        codes = _codes(weight_codes, fmt)
        n, k = codes.shape
        per_out = out_channel_params(weight_spec, weight_scale, weight_zero_point, n, 0, 2)
        label = fmt.value
        if act is None:
            symmetric = not bool(torch.as_tensor(weight_zero_point).any())
            if per_out is not None and fmt in (Format.INT8, Format.UINT8):
                base = (PackedDequantLinear(codes, weight_scale, weight_zero_point, weight_spec,
                                            bias, LEAN_REASON) if lean else
                        Fp16CodesLinear(codes, *per_out, bias, weight_label=label))
                if fmt == Format.INT8 and symmetric:  # 1-8 rows: the compiled GEMV, if faster
                    return with_gemv(base, codes, per_out[0], 8, k, bias)
                return base
            g = weight_spec.granularity
            group = g.size if isinstance(g, PerGroup) else k
            int4_gemv = fmt == Format.INT4 and symmetric and not isinstance(g, PerTensor)
            if Int4PackLinear.supports(weight_spec, codes, weight_zero_point):
                try:
                    kernel = Int4PackLinear(codes, weight_scale, weight_spec, bias)
                    kernel(torch.zeros(1, k))  # probe: a shape the op rejects falls back now
                    return with_gemv(kernel, codes, weight_scale, 4, group, bias) if int4_gemv \
                        else kernel
                except RuntimeError:
                    pass
            why = ("this int4 layout (affine, per-tensor, or group not in 32..256 dividing K) or "
                   "shape has no CPU int4 GEMM; codes stay packed and are dequantized per call"
                   if fmt in (Format.INT4, Format.UINT4) else
                   "per-group 8-bit weights have no CPU GEMM; codes are dequantized per call")
            base = PackedDequantLinear(codes, weight_scale, weight_zero_point, weight_spec, bias,
                                       why)
            return with_gemv(base, codes, weight_scale, 4, group, bias) if int4_gemv else base
        reason = _act_reason(act, allow_per_token=True)
        if reason:
            raise _Fallback(reason)
        if per_out is None:
            raise _Fallback(f"{type(weight_spec.granularity).__name__} weight scales vary along K, "
                            f"so no single integer GEMM applies; runs as float32 simulation")
        w_scale, w_zp = per_out
        symmetric_s8 = codes.dtype == torch.int8 and not bool(w_zp.any())
        per_token = isinstance(act, DynamicAct) and isinstance(act.spec.granularity, PerToken)
        if symmetric_s8:
            order = default_per_token_order() if per_token else default_static_order()
        else:
            order = default_affine_order()
        umax = act_u8_max(act)
        wmax = shifted_weight_max(codes)
        choice, ratio = choose_linear(order, {"onednn_linear": umax, "int_mm": act_i8_max(act),
                                              "fbgemm_linear": umax}, wmax, k, n)
        if choice == "fbgemm_linear":
            kernel = FbgemmLinear(codes, w_scale, w_zp, bias, act, weight_label=label)
        elif choice == "onednn_linear" and not per_token:
            kernel = OneDnnLinear(codes, w_scale, bias, act, weight_label=label)
        else:
            kernel = IntMMLinear(codes, w_scale, w_zp, bias, act, weight_label=label,
                                 gemm="onednn" if choice == "onednn_linear" else "int_mm")
        kernel.speed_vs_fp32 = ratio
        kernel(torch.zeros(1, k))  # probe: a shape the op rejects falls back here, not later
        return kernel
    except NoExactKernel as exc:
        return FallbackLinear(weight_codes, weight_scale, weight_zero_point, weight_spec, bias,
                              act, f"{exc}; runs as float32 simulation (exact)")
    except _Fallback as fb:
        return FallbackLinear(weight_codes, weight_scale, weight_zero_point, weight_spec, bias,
                              act, fb.reason)
    except RuntimeError as exc:  # an op rejected this shape/layout at construction
        return FallbackLinear(weight_codes, weight_scale, weight_zero_point, weight_spec, bias, act,
                              f"the low-precision kernel rejected this layer at construction "
                              f"({str(exc).splitlines()[0][:200]}); runs as float32 simulation")


def _conv_probe(weight_codes: torch.Tensor, geom: ConvGeom, pad: tuple) -> torch.Tensor:
    """Smallest valid input, run once at construction so rejections fall back early."""
    k = weight_codes.shape[2:]
    if geom.transposed:
        cin, size = weight_codes.shape[0], [2 * p + 1 for p in pad]
    else:
        cin = weight_codes.shape[1] * geom.groups
        size = [max(1, d * (kk - 1) + 1 - 2 * p) for kk, d, p in zip(k, geom.dilation, pad)]
    return torch.zeros(1, cin, *size)


def make_conv_kernel(weight_codes: torch.Tensor, weight_scale: torch.Tensor,
                     weight_zero_point: torch.Tensor, weight_spec: QuantSpec,
                     bias: Optional[torch.Tensor], act: Act, *, stride, padding, dilation, groups,
                     transposed: bool = False, output_padding=(0, 0)) -> Kernel:
    """The fastest correct kernel for a (transposed) conv1d/2d/3d with quantized weights."""
    dim = weight_codes.dim() - 2
    if dim not in (1, 2, 3):
        raise ConfigError(f"conv weight codes must be 3-D to 5-D, "
                          f"got shape {tuple(weight_codes.shape)}")
    geom = ConvGeom.make(dim, stride, padding, dilation, groups, transposed, output_padding)
    fmt = weight_spec.format
    weight_scale, weight_zero_point = _params(weight_scale, weight_zero_point)
    try:
        reason = _float_format_reason(fmt, act) if not fmt.is_integer else None
        if reason:
            raise _Fallback(reason)
        if fmt == Format.BF16:
            return Bf16Conv(weight_codes, bias, geom)
        if fmt == Format.FP16:
            return Fp16Conv(weight_codes, bias, geom)
        if act is None:
            raise _Fallback(f"weight-only {fmt.value} convolution has no CPU kernel; weights are "
                            f"dequantized once and the conv runs in float32")
        reason = _act_reason(act, allow_per_token=False)
        if reason:
            raise _Fallback(reason)
        axis = 1 if transposed else 0
        n_out = weight_codes.shape[axis]
        per_out = out_channel_params(weight_spec, weight_scale, weight_zero_point, n_out, axis,
                                     weight_codes.dim())
        if per_out is None:
            raise _Fallback(f"{type(weight_spec.granularity).__name__} conv weight scales are not "
                            f"one per output channel; runs as float32 simulation")
        w_scale, w_zp = per_out
        if not fmt.is_signed or bool(w_zp.any()):
            raise _Fallback("oneDNN int8 conv needs symmetric signed weights (zero point 0); "
                            "runs as float32 simulation")
        pad = geom.explicit_padding(tuple(weight_codes.shape[2:]))
        if pad is None:
            raise _Fallback("padding='same' with an even kernel needs asymmetric padding, which "
                            "oneDNN qconv does not take; runs as float32 simulation")
        ratio = check_conv(act_u8_max(act), shifted_weight_max(_codes(weight_codes, fmt)))
        kernel = OneDnnConv(_codes(weight_codes, fmt), w_scale, bias, act, geom, pad,
                            weight_label=fmt.value)
        kernel.speed_vs_fp32 = ratio
        kernel.probe(_conv_probe(weight_codes, geom, pad))
        return kernel
    except NoExactKernel as exc:
        return FallbackConv(weight_codes, weight_scale, weight_zero_point, weight_spec, bias, act,
                            geom, f"{exc}; runs as float32 simulation (exact)")
    except _Fallback as fb:
        return FallbackConv(weight_codes, weight_scale, weight_zero_point, weight_spec, bias, act,
                            geom, fb.reason)
    except RuntimeError as exc:
        return FallbackConv(weight_codes, weight_scale, weight_zero_point, weight_spec, bias, act,
                            geom, f"the low-precision kernel rejected this layer at construction "
                                  f"({str(exc).splitlines()[0][:200]}); runs as float32 simulation")
