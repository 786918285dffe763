"""Weight-only Linear kernels (float32 activations, low-precision weights held in memory).

Measured on this CPU (2 threads, benchmarks/kernels_micro.py --alternatives; MiniLM shapes
K=384, N=1536), and why they are not used:
- `torch._weight_int8pack_mm` with float32 input: a scalar loop, 3x slower than fp32 F.linear
  at M=1 and 40x slower at M=2048 (510 ms vs 13 ms). With bf16 input it is 2.4x faster than
  fp32 at M=1 (slower at M=2048) but rounds the input to bf16: relative error ~4e-3 against the
  fp32 simulation, far outside the stated tolerance.
- `torch._weight_int4pack_mm_for_cpu` with float32 input: exact but 7x (M=1) to 80x (M=2048)
  slower than fp32. With bf16 input it is the int4 kernel used (`Int4PackLinear`, below).
- `torch._dyn_quant_matmul_4bit`: quantizes the activations too (not weight-only numerics:
  error ~5e-3 relative) and runs a reference loop here (~130x slower than fp32).

What runs:
- `Int4PackLinear` (symmetric int4, per-group 32..256 or per-channel): torch's CPU int4 GEMM on
  weights packed two per byte, activations rounded to bf16, fp32 accumulation. Measured at
  K=384, N=1536: 2.3x faster than fp32 at M=1, 2x at M=8, 1.3x at M=64, 0.9x at M=2048.
  Its name says the input is rounded to bf16: the error that adds (~3e-3 relative, under 1% of
  one weight quantization step per output) is tested against the simulation with that bound.
- `Fp16CodesLinear` (8-bit weights, one scale per output channel): the integer codes
  (q - zero_point, |.| <= 255) are exact in fp16, so they go to FBGEMM's fp16-weight GEMM
  (fp32 activations, fp32 accumulation) and the per-channel scale is applied to the output:
  out = w_scale * (x @ codes^T) + bias. As fast as fp32 at M=2048, 1.4x faster at M=1 (3-4x
  for 4096x4096 weights), 2 bytes per weight: half of fp32, twice int8 -- no CPU op here
  multiplies fp32 activations by int8 weights at fp32 accuracy and useful speed.
- `PackedDequantLinear` (int4 two per byte, or 8-bit per-group): codes stay packed; each call
  unpacks and dequantizes them exactly as numerics.dequantize does, then runs F.linear in
  fp32 -- bit-identical to the simulation, saves memory, costs time: ~1.0x fp32 at M=2048,
  ~0.2 ms of unpacking per 0.6 M weights at M=1 (reported as a fallback for that reason).
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
        # codes - zero point, exact in float32 (|.| <= 255): one float32 temporary, no int32 copy
        # (the head of a 32K-vocabulary LLM: 262 MB instead of 524 MB beside the packed copy)
        centered = codes.to(torch.float32)
        if bool(w_zero_point.any()):
            centered.sub_(w_zero_point.to(torch.float32).reshape(-1, 1))
        self.packed = torch.ops.quantized.linear_prepack_fp16(centered, None)
        del centered
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


class Int4PackLinear:
    """int4 weights in torch's CPU int4 layout, bf16 activations: out = x_bf16 @ (c * s)^T."""

    GROUPS = (256, 128, 64, 32)
    ROWS = 4096  # rows packed per call: a multiple of 64, the op's block of rows

    def __init__(self, codes: torch.Tensor, w_scale: torch.Tensor, spec: QuantSpec,
                 bias: Optional[torch.Tensor]):
        n, k = codes.shape
        self.out_features, self.in_features = n, k
        g = spec.granularity
        if isinstance(g, PerGroup):
            group, scale = g.size, w_scale.reshape(n, k // g.size)
        else:  # one scale per row: any group size that divides K, with the scale repeated
            group = next(size for size in self.GROUPS if k % size == 0)
            scale = w_scale.reshape(-1, 1).expand(n, k // group)
        self.group = group
        # the op's dequantization is (u - 8) * scale + zero with u in [0, 15]: u = code + 8.
        # The op takes int32 codes (4 bytes each: 262 MB for a 32K x 2048 head), so the rows go
        # in chunks (its [N, K/2] layout packs blocks of 64 rows on their own: tested equal)
        self.packed = torch.cat([
            torch._convert_weight_to_int4pack_for_cpu(
                (codes[r:r + self.ROWS].to(torch.int8) + 8).to(torch.int32), 1)
            for r in range(0, n, self.ROWS)])
        self.scale_zeros = torch.stack([scale.t(), torch.zeros_like(scale.t())], dim=-1).to(
            torch.bfloat16).contiguous()
        self.bias = None if bias is None else bias.detach().to(torch.float32).contiguous()
        self.name = (f"int4 weights (group {group}) packed two per byte x bf16-rounded activations, "
                     f"torch._weight_int4pack_mm_for_cpu (fp32 accumulation)")
        self.fallback_reason = None

    @classmethod
    def supports(cls, spec: QuantSpec, codes: torch.Tensor, w_zero_point: torch.Tensor) -> bool:
        k = codes.shape[1]
        g = spec.granularity
        grouping = (g.size in cls.GROUPS and k % g.size == 0) if isinstance(g, PerGroup) \
            else any(k % size == 0 for size in cls.GROUPS)
        return (spec.format == Format.INT4 and not bool(torch.as_tensor(w_zero_point).any())
                and not isinstance(g, PerTensor) and grouping)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features).to(torch.bfloat16)
        y = torch._weight_int4pack_mm_for_cpu(x2, self.packed, self.group, self.scale_zeros).float()
        if self.bias is not None:
            y.add_(self.bias)
        return y.reshape(*lead, self.out_features)

    def nbytes(self) -> int:
        return tensor_bytes(self.packed, self.scale_zeros, self.bias)


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
        # two strided converting copies: 2x faster than torch.stack(...).float()
        q = torch.empty(n, 2 * p.shape[1], dtype=torch.float32)
        pairs = q.view(n, -1, 2)
        pairs[..., 0].copy_(lo)
        pairs[..., 1].copy_(hi)
        return q if q.shape[1] == k else q[:, :k].contiguous()

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
