"""Weight grids shared by the methods: target spec per layer, narrowed bit widths, fake quant,
and the hand-over of precomputed qparams to convert().

A method leaves two things on each float layer it quantized:
- its float weight set to the dequantized result ((q - zp) * scale, float32), and
- `module._quantwise_weight_qparams = (scale, zero_point)` in numerics' shapes
  (PerGroup: [out, in // G]; PerChannel(0): [out]).
convert() then quantizes that weight with those qparams, which gives back exactly the method's
codes (|q| <= 128, so (q * s) / s rounds to q in float32).

Bits below the format's (3 bits in int4): the codes are restricted to the narrower range
(symmetric signed 3 bits: [-4, 3], scale = absmax / 3) and stored in the wider format; the
arithmetic is the same as numerics.qparams_from_range with that range.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from quantwise.errors import ConfigError
from quantwise.modules.layers import float_weight, weight_spec_for
from quantwise.numerics import TINY
from quantwise.spec import PerChannel, PerGroup, QuantSpec

PRECOMPUTED_ATTR = "_quantwise_weight_qparams"


@dataclass(frozen=True)
class WeightTarget:
    """The integer grid one layer's weight [out, in] is quantized to."""

    spec: QuantSpec     # the layer's weight spec (after weight_spec_for)
    qmin: int
    qmax: int
    group: int          # input columns per scale (in_features for per-channel)

    @property
    def symmetric(self) -> bool:
        return self.spec.symmetric


def weight_target(module: nn.Module, weight_spec: QuantSpec, bits: int | None = None
                  ) -> WeightTarget | None:
    """The grid for `module` ([out, in] weights, per-group or per-output-channel integer specs),
    or None when a method cannot handle it (float formats, per-tensor, conv layouts)."""
    spec, _ = weight_spec_for(module, weight_spec)
    if not spec.format.is_integer:
        return None
    weight = float_weight(module)
    if weight.dim() != 2:
        return None
    g = spec.granularity
    if isinstance(g, PerGroup):
        group = g.size
    elif isinstance(g, PerChannel) and g.axis % 2 == 0:
        group = weight.shape[1]
    else:
        return None
    qmin, qmax = spec.qmin, spec.qmax
    fmt_bits = spec.format.bits
    if bits is not None and bits != fmt_bits:
        if bits > fmt_bits:
            raise ConfigError(f"method_args bits={bits} exceeds the weight format "
                              f"{spec.format.value} ({fmt_bits} bits): use a wider format")
        if spec.format.is_signed:
            qmin, qmax = -(2 ** (bits - 1)) + (1 if spec.narrow_range else 0), 2 ** (bits - 1) - 1
        else:
            qmin, qmax = 0, 2**bits - 1 - (1 if spec.narrow_range else 0)
    return WeightTarget(spec, qmin, qmax, group)


def group_qparams(w: torch.Tensor, target: WeightTarget, shrink: torch.Tensor | float = 1.0
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale float32, zero point int32) of each row of `w` [..., k] over its last dim, as
    numerics.qparams_from_range computes them for the target's (possibly narrowed) range;
    `shrink` (broadcast over the rows) scales the range down (clipping)."""
    w = w.detach()  # min/max are exact in the weight's own dtype: no float64 copy of the weight
    amin, amax = w.amin(dim=-1).to(torch.float64), w.amax(dim=-1).to(torch.float64)
    if not isinstance(shrink, float) or shrink != 1.0:
        shrink = torch.as_tensor(shrink, dtype=torch.float64)
        amin, amax = amin * shrink, amax * shrink
    if target.symmetric:
        absmax = torch.maximum(amin.abs(), amax.abs())
        scale = (absmax / target.qmax).clamp(min=TINY).to(torch.float32)
        return scale, torch.zeros(scale.shape, dtype=torch.int32)
    lo, hi = amin.clamp(max=0.0), amax.clamp(min=0.0)
    scale = ((hi - lo) / (target.qmax - target.qmin)).clamp(min=TINY).to(torch.float32)
    zp = torch.round(target.qmin - lo / scale.to(torch.float64)).clamp(target.qmin, target.qmax)
    return scale, zp.to(torch.int32)


def fake_quant(w: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, target: WeightTarget
               ) -> torch.Tensor:
    """(clamp(round(w / scale) + zp) - zp) * scale in float32; scale/zp broadcast against w."""
    q = w.float() / scale  # the only temporary: the rest runs in place on it
    return q.round_().add_(zp).clamp_(target.qmin, target.qmax).sub_(zp).mul_(scale)


def grouped(w: torch.Tensor, group: int) -> torch.Tensor:
    """[out, in] -> [out, in // group, group]."""
    out, k = w.shape
    if k % group:
        raise ConfigError(f"input dim {k} is not a multiple of group size {group}")
    return w.reshape(out, k // group, group)


def rtn(w: torch.Tensor, target: WeightTarget, shrink: torch.Tensor | float = 1.0
        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest of w [out, in] on the target grid: (dequantized [out, in], scale, zp),
    scale/zp of shape [out, in // group]."""
    wg = grouped(w.detach().float(), target.group)
    scale, zp = group_qparams(wg, target, shrink)
    deq = fake_quant(wg, scale.unsqueeze(-1), zp.unsqueeze(-1), target)
    return deq.reshape(w.shape), scale, zp


def set_result(module: nn.Module, target: WeightTarget, deq: torch.Tensor, scale: torch.Tensor,
               zp: torch.Tensor) -> None:
    """Write the dequantized weight into the float layer and leave its qparams for convert()."""
    with torch.no_grad():
        float_weight(module).copy_(deq.to(module.weight.dtype))
    if isinstance(target.spec.granularity, PerChannel):
        scale, zp = scale.reshape(-1), zp.reshape(-1)
    object.__setattr__(module, PRECOMPUTED_ATTR, (scale.clone(), zp.clone()))  # own storage


def precomputed_qparams(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
    return getattr(module, PRECOMPUTED_ATTR, None)


def mse_shrink(w: torch.Tensor, target: WeightTarget, norm: float = 2.4, steps: int = 40,
               lowest: float = 0.5) -> torch.Tensor:
    """Per-row factor in [lowest, 1] that shrinks the quantization range of w [..., k] (rows
    over the last dim) to minimize sum |w - Q(w)|^norm: the data-free clipping search of the
    reference GPTQ quantizer (norm 2.4). Returns float64 [...]. Rows are independent: a large
    weight (an embedding table) is searched in chunks of rows, so the search's temporaries stay
    a few MB instead of several copies of the table."""
    w = w.detach().float()
    chunk = max(1, (1 << 20) // max(1, w[0].numel()))  # ~1M elements per chunk
    if w.dim() > 1 and w.shape[0] > chunk:
        return torch.cat([mse_shrink(w[i:i + chunk], target, norm, steps, lowest)
                          for i in range(0, w.shape[0], chunk)])
    best_err = torch.full(w.shape[:-1], float("inf"))
    best = torch.ones(w.shape[:-1], dtype=torch.float64)
    for i in range(steps):
        r = 1.0 - (1.0 - lowest) * i / max(steps - 1, 1)
        scale, zp = group_qparams(w, target, r)
        err = (fake_quant(w, scale.unsqueeze(-1), zp.unsqueeze(-1), target) - w).abs().pow(norm).sum(-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, torch.full_like(best, r), best)
    return best


def rtn_mse(w: torch.Tensor, target: WeightTarget) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """rtn() with each group's range chosen by mse_shrink."""
    return rtn(w, target, mse_shrink(grouped(w.detach().float(), target.group), target))
