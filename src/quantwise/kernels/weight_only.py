"""Weight-only Linear kernels (float32 activations, low-precision weights held in memory).

Measured on this CPU (2 threads, see benchmarks/kernels_micro.py), and why they are not used:
- `torch._weight_int8pack_mm` with float32 input: 2x slower than fp32 F.linear at M=1 and ~40x
  slower at M=2048 (a scalar loop); with bf16 input it is fast at M=1 but rounds the input to
  bf16 (relative error ~4e-3, far outside the fp32 simulation).
- `torch._weight_int4pack_mm_for_cpu`: exact with float32 input but 5-80x slower than fp32;
  with bf16 input the same bf16 rounding problem.
- `torch._dyn_quant_matmul_4bit`: quantizes the activations too (not weight-only numerics) and
  runs a reference loop here (~130x slower than fp32).

What runs instead:
- `Fp16CodesLinear` (8-bit weights, one scale per output channel): the integer codes
  (q - zero_point, |.| <= 255) are exact in fp16, so they go to FBGEMM's fp16-weight GEMM
  (fp32 activations, fp32 accumulation) and the per-channel scale is applied to the output:
  out = w_scale * (x @ codes^T) + bias. As fast as fp32 at large M, 3-4x faster at small M,
  2 bytes per weight (half of fp32; FBGEMM has no int8-weight / fp32-activation GEMM).
- `PackedDequantLinear` (int4 two per byte, or 8-bit per-group): codes stay packed; each call
  unpacks and dequantizes them exactly as numerics.dequantize does, then runs F.linear in
  fp32 -- bit-identical to the simulation, saves memory, costs time (reported as a fallback).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from quantwise.kernels.base import tensor_bytes
from quantwise.numerics import pack_int4
from quantwise.spec import Format, PerGroup, PerTensor, QuantSpec


class Fp16CodesLinear:
    def __init__(self, codes: torch.Tensor, w_scale: torch.Tensor, w_zero_point: torch.Tensor,
                 bias: Optional[torch.Tensor], weight_label: str = "int8"):
        self.out_features, self.in_features = codes.shape
        centered = codes.to(torch.int32) - w_zero_point.to(torch.int32).reshape(-1, 1)
        self.packed = torch.ops.quantized.linear_prepack_fp16(centered.to(torch.float32), None)
        self.w_scale = w_scale.to(torch.float32).contiguous()
        self.bias = None if bias is None else bias.detach().to(torch.float32).contiguous()
        self.name = (f"{weight_label} weight codes held exactly as fp16 -> FBGEMM fp16-weight GEMM "
                     f"(fp32 activations and accumulation), per-channel scale on the output")
        self.fallback_reason = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float32:
            x = x.float()
        y = torch.ops.quantized.linear_dynamic_fp16(x, self.packed)
        if self.bias is not None:
            return torch.addcmul(self.bias, y, self.w_scale, out=y)
        return y.mul_(self.w_scale)

    def nbytes(self) -> int:
        return 2 * self.out_features * self.in_features + tensor_bytes(self.w_scale, self.bias)


class PackedDequantLinear:
    """Low-bit codes held packed; dequantized per call, then float32 F.linear."""

    def __init__(self, codes: torch.Tensor, w_scale: torch.Tensor, w_zero_point: torch.Tensor,
                 spec: QuantSpec, bias: Optional[torch.Tensor], reason: str):
        n, k = codes.shape
        self.out_features, self.in_features = n, k
        self.format = spec.format
        self.four_bit = spec.format in (Format.INT4, Format.UINT4)
        self.signed = spec.format.is_signed
        if self.four_bit:
            packed = pack_int4(codes)
            self.codes = packed.view(torch.int8) if self.signed else packed
        else:
            self.codes = codes.contiguous()
        g = spec.granularity
        self.group = g.size if isinstance(g, PerGroup) else k
        groups = k // self.group
        per_group = isinstance(g, PerGroup)
        scale = torch.as_tensor(w_scale, dtype=torch.float32).detach()
        scale = scale.reshape(n, groups) if per_group else scale.reshape(-1, 1).expand(n, 1)
        self.w_scale = scale.reshape(n, groups, 1).contiguous()
        zp = torch.as_tensor(w_zero_point).detach().to(torch.int32)
        if bool(zp.any()):
            zp = zp.reshape(n, groups) if per_group else zp.reshape(-1, 1).expand(n, 1)
            self.w_zero_point = zp.reshape(n, groups, 1).to(torch.float32).contiguous()
        else:
            self.w_zero_point = None
        self.bias = None if bias is None else bias.detach().to(torch.float32).contiguous()
        layout = "packed two per byte" if self.four_bit else "held as 8-bit codes"
        gran = (f"group {self.group}" if per_group else
                "per-tensor" if isinstance(g, PerTensor) else "per-channel")
        self.name = (f"{spec.format.value} weights ({gran}) {layout}, unpacked and dequantized per "
                     f"call, float32 F.linear")
        self.fallback_reason = reason

    def _codes_float(self) -> torch.Tensor:
        n, k = self.out_features, self.in_features
        p = self.codes
        if not self.four_bit:
            return p.to(torch.float32)
        if self.signed:  # int8 arithmetic shifts sign-extend each nibble
            lo, hi = torch.bitwise_right_shift(torch.bitwise_left_shift(p, 4), 4), p >> 4
        else:
            lo, hi = p & 15, p >> 4
        q = torch.stack([lo, hi], dim=-1).reshape(n, -1)
        if q.shape[1] != k:
            q = q[:, :k]
        return q.to(torch.float32)

    def weight(self) -> torch.Tensor:
        """The dequantized float32 weight, equal to numerics.dequantize(codes, ...)."""
        n, k = self.out_features, self.in_features
        w = self._codes_float().reshape(n, k // self.group, self.group)
        if self.w_zero_point is not None:
            w.sub_(self.w_zero_point)
        return w.mul_(self.w_scale).reshape(n, k)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float32:
            x = x.float()
        return F.linear(x, self.weight(), self.bias)

    def nbytes(self) -> int:
        return tensor_bytes(self.codes, self.w_scale, self.w_zero_point, self.bias)
