"""fp16 / bf16 kernels: weights held in half precision, float32 in and out.

- bf16 Linear/Conv, where the probe times it faster than float32 on the upcast weights: the
  input is cast to bf16 and the GEMM/conv runs in bf16 on oneDNN (AVX512-BF16 / AMX, fp32
  accumulation; ~2x fp32 speed for MiniLM-sized Linear, ~1.6x for a ResNet 3x3 conv). oneDNN
  rounds its output to bf16; the bias is added afterwards in float32 (after a plain .float():
  torch's mixed bf16 + fp32 add is a scalar loop, 20x slower). Numerics: input and output are
  bf16-rounded, so the error against an fp32 product is ~2^-8 relative (tested bound in
  test_kernels.py). Elsewhere (no native bf16: AVX2-only CPUs, or oneDNN capped to AVX2, where
  the bf16 path measured 4-5x slower than fp32 on ResNet-18 and MiniLM) the bf16 weights are
  upcast per call (exact) and the product runs in float32, reported as a fallback.
- fp16 Linear: FBGEMM fp16-weight GEMM (fp32 activations, fp32 accumulation): as accurate as
  fp32 with the fp16-rounded weights; at M=1 1.4x (384x1536) to 3x (4096x4096) faster than
  fp32, equal at M=2048.
  (torch's fp16 x fp16 matmul runs ~4x slower than fp32 here: Zen 4 has no AVX512-FP16.)
- fp16 Conv: torch's fp16 conv is ~30x slower than fp32 on this CPU, so the fp16 weights are
  upcast per call and the conv runs in float32 (reported as a fallback; memory still halved).
"""

from __future__ import annotations

from typing import Optional

import torch

from quantwise.kernels.base import ConvGeom, tensor_bytes


def _bias(bias: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if bias is None else bias.detach().to(torch.float32).contiguous()


def _f32(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float32 else x.float()


def _native_bf16(key: str, make_fns) -> tuple[bool, Optional[float], str]:
    """(run bf16 natively?, chosen kernel's speed vs float32, why not) from the probe's timings
    of the calls make_fns() returns ("bf16", "upcast", "fp32") at this layer's shape (cached per
    CPU, torch and ISA cap: inputs are only made when a shape is timed the first time)."""
    from quantwise.kernels.probe import probe

    return _choice(probe().timings(key, make_fns))


def _choice(times: dict[str, float]) -> tuple[bool, Optional[float], str]:
    bf16, up, f32 = (times.get(k, float("inf")) for k in ("bf16", "upcast", "fp32"))
    if bf16 <= up:
        return True, (f32 / bf16 if bf16 > 0 else None), ""
    return False, (f32 / up if up > 0 else None), (
        f"this CPU's bf16 kernel measured {bf16 / max(f32, 1e-9):.1f}x the float32 time at this "
        f"shape (no native bf16 in oneDNN here, or a layer so small that the casts cost more "
        f"than they save), so the bf16 weights are upcast per call (exact) and the product "
        f"runs in float32")


class Bf16Linear:
    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor]):
        self.weight = weight.detach().to(torch.bfloat16).contiguous()
        self.bias = _bias(bias)
        n, k = self.weight.shape

        def fns():
            x, w32 = torch.randn(64, k), self.weight.float()
            return {"bf16": lambda: self._native(x), "upcast": lambda: self._upcast(x),
                    "fp32": lambda: torch.nn.functional.linear(x, w32)}

        self.native, self.speed_vs_fp32, why = _native_bf16(f"bf16-linear-{n}x{k}", fns)
        if self.native:
            self.name = "bf16 x bf16 GEMM (oneDNN, fp32 accumulation), bias added in fp32"
        else:
            self.name = "bf16 weights upcast per call, float32 GEMM"
        self.fallback_reason = why or None

    def _native(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.nn.functional.linear(x.to(torch.bfloat16), self.weight).float()
        return y if self.bias is None else y.add_(self.bias)

    def _upcast(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(_f32(x), self.weight.float(), self.bias)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self._native(x) if self.native else self._upcast(x)

    def nbytes(self) -> int:
        return tensor_bytes(self.weight, self.bias)


class Fp16Linear:
    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor]):
        self.out_features, self.in_features = weight.shape
        w = weight.detach().to(torch.float16).to(torch.float32)
        self.bias = _bias(bias)
        self.packed = torch.ops.quantized.linear_prepack_fp16(w, self.bias)
        self.name = "fp16 weights -> FBGEMM fp16-weight GEMM (fp32 activations and accumulation)"
        self.fallback_reason = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.quantized.linear_dynamic_fp16(_f32(x), self.packed)

    def nbytes(self) -> int:
        return 2 * self.out_features * self.in_features + tensor_bytes(self.bias)


class Bf16Conv:
    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor], geom: ConvGeom):
        self.weight = weight.detach().to(torch.bfloat16).contiguous()
        self.bias = _bias(bias)
        self.bias_view = None if bias is None else self.bias.reshape(-1, *([1] * geom.dim))
        self.geom = geom
        kind = "transposed conv" if geom.transposed else "conv"
        w = self.weight

        def fns():
            cin = w.shape[0] if geom.transposed else w.shape[1] * geom.groups
            x = torch.randn(2, cin, *[16] * geom.dim)  # representative: the choice is by ISA
            w32 = w.float()
            return {"bf16": lambda: self._native(x), "upcast": lambda: self._upcast(x),
                    "fp32": lambda: geom.run_float(x, w32, self.bias)}

        key = f"bf16-{kind.replace(' ', '-')}{geom.dim}d-{'x'.join(map(str, w.shape))}-g{geom.groups}"
        self.native, self.speed_vs_fp32, why = _native_bf16(key, fns)
        if self.native:
            self.name = f"bf16 {kind}{geom.dim}d (oneDNN, fp32 accumulation), bias added in fp32"
        else:
            self.name = f"bf16 weights upcast per call, float32 {kind}{geom.dim}d"
        self.fallback_reason = why or None

    def _native(self, x: torch.Tensor) -> torch.Tensor:
        y = self.geom.run_float(x.to(torch.bfloat16), self.weight, None).float()
        return y if self.bias is None else y.add_(self.bias_view)

    def _upcast(self, x: torch.Tensor) -> torch.Tensor:
        return self.geom.run_float(_f32(x), self.weight.float(), self.bias)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self._native(x) if self.native else self._upcast(x)

    def nbytes(self) -> int:
        return tensor_bytes(self.weight, self.bias)


class Fp16Conv:
    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor], geom: ConvGeom):
        self.weight = weight.detach().to(torch.float16).contiguous()
        self.bias = _bias(bias)
        self.geom = geom
        self.name = f"fp16 weights upcast per call, float32 conv{geom.dim}d"
        self.fallback_reason = ("fp16 convolution has no fast CPU kernel here (no AVX512-FP16; "
                                "torch's fp16 conv measured ~30x slower than fp32), so the fp16 "
                                "weights are upcast per call and the conv runs in float32")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.geom.run_float(_f32(x), self.weight.float(), self.bias)

    def nbytes(self) -> int:
        return tensor_bytes(self.weight, self.bias)
