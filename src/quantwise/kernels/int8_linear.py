"""W8A8 Linear kernels: int8 x int8 products accumulated exactly in int32.

- `OneDnnLinear`: oneDNN `qlinear_pointwise` (VNNI u8 x s8 -> s32, rescale and bias fused into
  the GEMM epilogue, float32 out), prepacked once. Used for static and dynamic per-tensor
  activations with symmetric 8-bit (or int4-valued) weights. oneDNN wants uint8 activations:
  int8 codes are shifted by +128 together with their zero point, which leaves (q - zp)
  unchanged. (Its s8-activation path is a reference loop here: one MiniLM-sized call did not
  finish in 10 minutes.) MiniLM shapes, M=2048: 2.5-3.4x fp32 F.linear.
- `IntMMLinear`: `torch._int_mm` (s8 x s8 -> s32) plus explicit zero-point corrections and a
  rescale. Used for per-token dynamic activations (oneDNN takes one activation scale only) and
  for weights with non-zero zero points (oneDNN assumes symmetric weights). Per-token at M=2048:
  2.8-3.5x fp32; measured against oneDNN with x_scale=1 and a per-row multiply afterwards, it is
  equal at M=2048 and 2x faster at M=1 on AVX-512 VNNI CPUs, and needs no second weight copy. On
  CPUs with AMX, oneDNN uses the tiles and is 1.9-2.1x faster at M=2048, so dynamic activations
  with symmetric weights run there (kernels.select): qlinear with x_scale 1 and zero point
  128 gives acc * w_scale exactly, then the per-row scale and the bias.

Per-token activation quantization is eager and minimal: amax and amin (two reads, no
temporaries; `aminmax(dim=-1)` and `abs().amax()` measured 3-14x slower), one true division,
an in-place round and one conversion, all float32. torch.compile of the same function was no
faster here (and costs 18 s to compile), so nothing is compiled.
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch

from quantwise.kernels import rowquant
from quantwise.kernels.base import (StaticAct, StaticI8Quantizer, StaticU8Quantizer,
                                    dynamic_scale, quantize_symmetric_i8, weight_shift,
                                    quantize_symmetric_u8, tensor_bytes)
from quantwise.spec import PerToken


def _flat(x: torch.Tensor, k: int) -> torch.Tensor:
    if x.dtype != torch.float32:
        x = x.float()
    return x.reshape(-1, k)


def _act_label(act) -> str:
    if isinstance(act, StaticAct):
        return f"static per-tensor {act.spec.format.value} activations"
    per = "per-token" if isinstance(act.spec.granularity, PerToken) else "per-tensor"
    return f"{per} dynamic int8 activations"


class OneDnnLinear:
    def __init__(self, codes: torch.Tensor, w_scale: torch.Tensor, bias: Optional[torch.Tensor],
                 act, weight_label: str = "int8"):
        self.out_features, self.in_features = codes.shape
        self.packed = torch.ops.onednn.qlinear_prepack(codes.to(torch.int8).contiguous(), None)
        self.w_scale = w_scale.to(torch.float32).contiguous()
        self.w_zero_point = torch.zeros(self.out_features, dtype=torch.int64)
        self.bias = None if bias is None else bias.detach().to(torch.float32).contiguous()
        self.static = isinstance(act, StaticAct)
        if self.static:
            self.quant = StaticU8Quantizer(act)
        else:
            self.qmax = act.spec.qmax
        self.name = (f"{weight_label} weights x uint8 activations -> int32, oneDNN "
                     f"qlinear_pointwise (rescale+bias fused; {_act_label(act)})")
        self.fallback_reason = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = _flat(x, self.in_features)
        if x2.shape[0] == 0:
            return x2.new_zeros(*lead, self.out_features)
        bad = None
        if self.static:
            u = self.quant(x2)
            xs, xzp = self.quant.scale, self.quant.zero_point
        else:
            x2, s, bad = dynamic_scale(x2, self.qmax, per_row=False)
            u = quantize_symmetric_u8(x2, s)
            xs, xzp = float(s), 128
        y = torch.ops.onednn.qlinear_pointwise(u, xs, xzp, self.packed, self.w_scale,
                                               self.w_zero_point, self.bias, 1.0, 0,
                                               torch.float32, "none", [], "")
        if bad is not None:
            y.masked_fill_(bad, float("nan"))
        return y.reshape(*lead, self.out_features)

    def nbytes(self) -> int:
        return (self.out_features * self.in_features
                + tensor_bytes(self.w_scale, self.w_zero_point, self.bias))


def _signed_weights(codes: torch.Tensor, zero_point: torch.Tensor
                    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """int8 weight codes [N, K] and their int32 zero points (None when all 0): uint8 codes are
    shifted to int8 and their zero point moves along, leaving (q - zp) unchanged."""
    shift = weight_shift(codes)
    w = (codes.to(torch.int16) + shift).to(torch.int8).contiguous()
    zw = (zero_point.to(torch.int32) + shift).expand(codes.shape[0]).contiguous()
    return w, (zw if bool(zw.any()) else None)


def _as_float_inplace(acc: torch.Tensor) -> torch.Tensor:
    """int32 -> float32 in the accumulator's own memory (same element size; each element is
    read before it is overwritten). Saves allocating and page-faulting a second M x N buffer,
    and a plain conversion is 2x faster than the mixed int32 * float32 multiply (measured)."""
    y = acc.view(torch.float32)
    y.copy_(acc)
    return y


class IntMMLinear:
    """out = x_scale * w_scale * (sum_k (qx - zx)(qw - zw)) + bias, with the integer sum as
    _int_mm(qx, qw^T) - zx * colsum(qw) - zw * rowsum(qx) + K * zx * zw (all int32, exact)."""

    def __init__(self, codes: torch.Tensor, w_scale: torch.Tensor, w_zero_point: torch.Tensor,
                 bias: Optional[torch.Tensor], act, weight_label: str = "int8",
                 gemm: str = "int_mm"):
        n, k = codes.shape
        self.out_features, self.in_features = n, k
        w, self.w_zero_point = _signed_weights(codes, w_zero_point)
        self.w_t = w.t()  # [K, N] view; _int_mm reads it as fast as a contiguous copy
        self.w_scale = w_scale.to(torch.float32).contiguous()
        self.bias = None if bias is None else bias.detach().to(torch.float32).contiguous()
        self.static = isinstance(act, StaticAct)
        self.correction = None  # [N] int32 subtracted from every row of the accumulator
        if self.static:
            self.quant = StaticI8Quantizer(act)
            zx = self.quant.zero_point
            if zx:
                corr = zx * w.sum(dim=1, dtype=torch.int32)
                if self.w_zero_point is not None:
                    corr = corr - k * zx * self.w_zero_point
                self.correction = corr.contiguous()
            self.out_scale = (self.w_scale * self.quant.scale_t).contiguous()
        self.packed = None  # dynamic activations on oneDNN's GEMM when the selector chose it
        if not self.static:
            self.qmax = act.spec.qmax
            self.per_token = isinstance(act.spec.granularity, PerToken)
            if self.w_zero_point is None and gemm == "onednn":
                self.packed = torch.ops.onednn.qlinear_prepack(w, None)
                self.no_zero_points = torch.zeros(n, dtype=torch.int64)
        gemm = ("oneDNN qlinear_pointwise, x_scale 1, row scales after"
                if self.packed is not None else "torch._int_mm")
        self.name = (f"{weight_label} x int8 -> int32 {gemm} ({_act_label(act)}"
                     + (", weight zero-point correction" if self.w_zero_point is not None else "")
                     + ")")
        self.fallback_reason = None

    def _accumulate(self, q: torch.Tensor) -> torch.Tensor:
        acc = torch._int_mm(q, self.w_t)
        if self.correction is not None:
            acc.sub_(self.correction)
        if self.w_zero_point is not None:
            rowsum = q.sum(dim=1, keepdim=True, dtype=torch.int32)
            acc.addcmul_(rowsum, self.w_zero_point, value=-1)
        return acc

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = _flat(x, self.in_features)
        if x2.shape[0] == 0:
            return x2.new_zeros(*lead, self.out_features)
        if self.static:
            acc = self._accumulate(self.quant(x2))
            y = _as_float_inplace(acc)
            if self.bias is not None:
                torch.addcmul(self.bias, y, self.out_scale, out=y)
            else:
                y.mul_(self.out_scale)
        else:
            x2, s, bad = dynamic_scale(x2, self.qmax, per_row=self.per_token)  # [M, 1] or []
            if self.packed is not None:  # acc * w_scale from the GEMM's epilogue, then * s + bias
                y = torch.ops.onednn.qlinear_pointwise(
                    quantize_symmetric_u8(x2, s), 1.0, 128, self.packed, self.w_scale,
                    self.no_zero_points, None, 1.0, 0, torch.float32, "none", [], "")
                y = torch.addcmul(self.bias, y, s, out=y) if self.bias is not None else y.mul_(s)
            else:
                y = _as_float_inplace(self._accumulate(quantize_symmetric_i8(x2, s))).mul_(s)
                if self.bias is not None:
                    torch.addcmul(self.bias, y, self.w_scale, out=y)
                else:
                    y.mul_(self.w_scale)
            if bad is not None:  # per-tensor rows that held NaN/Inf: NaN out
                y.masked_fill_(bad, float("nan"))
        return y.reshape(*lead, self.out_features)

    def nbytes(self) -> int:
        copies = 1 if self.packed is None else 2  # oneDNN's packed copy next to the codes
        return (copies * self.out_features * self.in_features
                + tensor_bytes(self.w_scale, self.w_zero_point, self.bias, self.correction))


def fbgemm_prepack(codes: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor],
                   zero_point: Optional[torch.Tensor] = None):
    """FBGEMM's packed int8 weights [N, K] with one float scale (and zero point) per output row,
    and the bias."""
    n = codes.shape[0]
    zp = (torch.zeros(n, dtype=torch.int64) if zero_point is None
          else zero_point.to(torch.int64).expand(n).contiguous())
    engine = torch.backends.quantized.engine
    with warnings.catch_warnings():  # quantized tensors are deprecated API, still FBGEMM's input
        warnings.simplefilter("ignore", UserWarning)
        q = torch._make_per_channel_quantized_tensor(
            codes.to(torch.int8).contiguous(), scale.to(torch.float64).expand(n).contiguous(),
            zp, 0)
        try:
            torch.backends.quantized.engine = "fbgemm"
            return torch.ops.quantized.linear_prepack(
                q, None if bias is None else bias.detach().to(torch.float32).contiguous())
        finally:
            torch.backends.quantized.engine = engine


def fbgemm_linear(codes: torch.Tensor, zero_point: int, packed) -> torch.Tensor:
    """float32 out = sum_k (u - zero_point) * w * row scale (+ bias), where u = codes +
    zero_point: `codes` are float32 integers (the activation codes minus their zero point), so
    FBGEMM's own input quantization (scale 1) only converts them to uint8."""
    return torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(
        codes, 1.0, zero_point, packed)


class FbgemmLinear:
    """FBGEMM's u8 x s8 -> s32 GEMM with float32 output (rescale and bias in its epilogue).

    On AVX2-only CPUs it is the fastest exact int8 GEMM measured (1.05-1.9x float32 at M = 8 to
    2048, where oneDNN's AVX2 int8 GEMM is 2x slower than float32 at M = 128..512, and
    _int_mm a scalar loop); like oneDNN it sums u8 x s8 pairs in int16 there, so it runs only
    where the probe found it exact for the layer's codes (7-bit weights). Static per-tensor
    inputs: the activation scale is folded into the packed row scales, one call. Dynamic
    (per-tensor or per-token): codes round(x / s) with zero point 128, then * s + bias."""

    def __init__(self, codes: torch.Tensor, w_scale: torch.Tensor, w_zero_point: torch.Tensor,
                 bias: Optional[torch.Tensor], act, weight_label: str = "int8"):
        self.out_features, self.in_features = codes.shape
        codes, self.w_zero_point = _signed_weights(codes, w_zero_point)
        self.w_scale = w_scale.to(torch.float32).contiguous()
        self.static = isinstance(act, StaticAct)
        if self.static:
            quant = StaticU8Quantizer(act)
            self.scale_t, self.zero_point = quant.scale_t, quant.zero_point
            self.lo, self.hi = quant.lo - quant.zero_point, quant.hi - quant.zero_point
            self.bias = None
            self.packed = fbgemm_prepack(codes, self.w_scale * quant.scale_t, bias,
                                         self.w_zero_point)
        else:
            self.qmax = act.spec.qmax
            self.per_token = isinstance(act.spec.granularity, PerToken)
            self.bias = None if bias is None else bias.detach().to(torch.float32).contiguous()
            self.packed = fbgemm_prepack(codes, self.w_scale, None, self.w_zero_point)
        self.name = (f"{weight_label} weights x uint8 activations -> int32, FBGEMM "
                     f"(rescale+bias fused; {_act_label(act)}"
                     + (", weight zero points" if self.w_zero_point is not None else "") + ")")
        self.fallback_reason = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = _flat(x, self.in_features)
        if x2.shape[0] == 0:
            return x2.new_zeros(*lead, self.out_features)
        if self.static:
            t = torch.div(x2, self.scale_t).round_().clamp_(self.lo, self.hi)
            y = fbgemm_linear(t, self.zero_point, self.packed)
        else:
            if self.per_token and rowquant.available():  # the same codes, one pass per row in C
                codes, s = rowquant.row_quantize(x2.contiguous(), self.qmax)
                bad = None
            else:
                x2, s, bad = dynamic_scale(x2, self.qmax, per_row=self.per_token)
                codes = torch.div(x2, s).round_()
            y = fbgemm_linear(codes, 128, self.packed)
            y = torch.addcmul(self.bias, y, s, out=y) if self.bias is not None else y.mul_(s)
            if bad is not None:
                y.masked_fill_(bad, float("nan"))
        return y.reshape(*lead, self.out_features)

    def nbytes(self) -> int:
        return (self.out_features * self.in_features
                + tensor_bytes(self.w_scale, self.w_zero_point, self.bias))


__all__ = ["OneDnnLinear", "IntMMLinear", "FbgemmLinear"]
