"""Fallback kernels: the float simulation itself, for everything without a real kernel.

The weights are dequantized once (held as float32), the input is fake-quantized exactly as
the simulation does (static: calibrated scale/zero point; dynamic: numerics' run-time
qparams), and the float op runs. `fallback_reason` always says why.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from quantwise import numerics
from quantwise.kernels.base import ConvGeom, StaticAct, tensor_bytes


def _fake_quant_input(x: torch.Tensor, act) -> torch.Tensor:
    if act is None:
        return x
    if isinstance(act, StaticAct):
        scale = torch.tensor(act.scale, dtype=torch.float32)
        zp = torch.tensor(int(act.zero_point), dtype=torch.int32)
        return numerics.fake_quantize(x, scale, zp, act.spec)
    finite = torch.isfinite(x)
    if bool(finite.all()):
        scale, zp = numerics.qparams_from_range(*numerics.tensor_range(x, act.spec), act.spec)
        return numerics.fake_quantize(x, scale, zp, act.spec)
    # NaN/Inf: excluded from the range (never a NaN or infinite scale) and passed through
    clean = torch.where(finite, x, torch.zeros((), dtype=x.dtype))
    scale, zp = numerics.qparams_from_range(*numerics.tensor_range(clean, act.spec), act.spec)
    return torch.where(finite, numerics.fake_quantize(clean, scale, zp, act.spec), x)


def _act_label(act) -> str:
    if act is None:
        return "float32 activations"
    kind = "static" if isinstance(act, StaticAct) else "dynamic"
    return f"{kind} {act.spec.format.value} fake-quantized activations"


def dequantized_weight(codes, scale, zero_point, spec) -> torch.Tensor:
    return numerics.dequantize(codes.detach(), torch.as_tensor(scale).detach(),
                               torch.as_tensor(zero_point).detach(), spec).float().contiguous()


class FallbackLinear:
    def __init__(self, codes, scale, zero_point, spec, bias: Optional[torch.Tensor], act,
                 reason: str):
        self.weight = dequantized_weight(codes, scale, zero_point, spec)
        self.bias = None if bias is None else bias.detach().float().contiguous()
        self.act = act
        self.name = (f"float32 simulation: {spec.format.value} weights dequantized once, "
                     f"{_act_label(act)}, F.linear")
        self.fallback_reason = reason

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x if x.dtype == torch.float32 else x.float()
        return F.linear(_fake_quant_input(x, self.act), self.weight, self.bias)

    def nbytes(self) -> int:
        return tensor_bytes(self.weight, self.bias)


class FallbackConv:
    def __init__(self, codes, scale, zero_point, spec, bias, act, geom: ConvGeom, reason: str):
        self.weight = dequantized_weight(codes, scale, zero_point, spec)
        self.bias = None if bias is None else bias.detach().float().contiguous()
        self.act = act
        self.geom = geom
        kind = "conv_transpose" if geom.transposed else "conv"
        self.name = (f"float32 simulation: {spec.format.value} weights dequantized once, "
                     f"{_act_label(act)}, F.{kind}{geom.dim}d")
        self.fallback_reason = reason

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x if x.dtype == torch.float32 else x.float()
        return self.geom.run_float(_fake_quant_input(x, self.act), self.weight, self.bias)

    def nbytes(self) -> int:
        return tensor_bytes(self.weight, self.bias)
