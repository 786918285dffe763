"""AWQ (Lin et al. 2023), weight-only: activation-aware scaling, then a clipping search.

Per block, from one run of the float block on the calibration inputs:
- mean |X_j| per input channel and a sample of input rows (`n_samples` tokens, padding left
  out) for each distinct Linear input (Linears fed the same tensor, e.g. q/k/v, form a group);
- scaling (groups with a foldable predecessor only): s = mean|X|^a / sqrt(max * min), a on a
  grid of `grid` points in [0, 1); the a with the least summed output error
  sum ||X W^T - X (Q(W diag(s)) diag(s)^-1)^T||^2 over the group's Linears on the sampled rows
  wins (a = 0 is plain round-to-nearest, so the search never does worse on that objective).
  Then W[:, j] *= s_j and 1/s_j is folded into the predecessor: a LayerNorm/RMSNorm's weight
  (and bias) for q/k/v and gate/up (pre-norm blocks), v_proj's rows for o_proj, up_proj's rows
  for down_proj (act(gate) * up is linear in up), GPT-2's c_attn value rows for attn.c_proj,
  BERT's value rows for attention.output.dense. The float block output is checked before and
  after each fold (relative error < 1e-4) and a fold that changes it is undone. A Linear without
  such a predecessor (BERT's post-norm q/k/v, anything after a GELU) is not scaled.
- clipping: per Linear, per output row and group, the range shrunk by factors
  1.0 .. 1 - max_shrink (`clip_grid` points) with the least error of that group's contribution
  to the output on the sampled (scaled) inputs; the float weight is clamped to it.
- quantization: round-to-nearest of the scaled, clamped weight on the target grid.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from quantwise.methods.blocks import BlockPass, is_linear
from quantwise.methods.weights import (WeightTarget, fake_quant, group_qparams, grouped, rtn,
                                       set_result)
from quantwise.modules.layers import float_weight

# (predecessor, consumers) relative to the block; "last" = the predecessor's last rows
_FOLDS: list[tuple[str, tuple[str, ...], str]] = [
    ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "all"),
    ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "all"),
    ("self_attn.v_proj", ("self_attn.o_proj",), "all"),
    ("mlp.up_proj", ("mlp.down_proj",), "all"),
    ("ln_1", ("attn.c_attn",), "all"),
    ("ln_2", ("mlp.c_fc",), "all"),
    ("attn.c_attn", ("attn.c_proj",), "last"),
    ("attention.self.value", ("attention.output.dense",), "all"),
]


class _InputStats:
    def __init__(self, columns: int, per_sample: int, generator: torch.Generator) -> None:
        self.abs_sum = torch.zeros(columns, dtype=torch.float64)
        self.count = 0
        self.samples: list[torch.Tensor] = []
        self.per_sample = per_sample
        self.generator = generator

    def add(self, x: torch.Tensor) -> None:
        self.abs_sum += x.abs().sum(dim=0, dtype=torch.float64)
        self.count += x.shape[0]
        if x.shape[0] > self.per_sample:
            idx = torch.randperm(x.shape[0], generator=self.generator)[:self.per_sample]
            x = x[idx]
        self.samples.append(x.clone())

    def mean_abs(self) -> torch.Tensor:
        return (self.abs_sum / max(self.count, 1)).float()

    def sample(self) -> torch.Tensor:
        return torch.cat(self.samples)


def awq_block(bp: BlockPass, targets: dict[str, WeightTarget], *, grid: int = 20,
              max_shrink: float = 0.5, clip_grid: int = 20, n_samples: int = 512,
              scale: bool = True, report: dict | None = None) -> None:
    """AWQ on one block's selected Linears (see the module docstring); quantizes them in place
    (weights set to their dequantized values, qparams left for convert via set_result)."""
    groups, stats, scales = awq_scale_block(bp, targets, grid=grid if scale else 0,
                                            n_samples=n_samples, report=report)
    for leader, names in groups.items():
        for name in names:
            module = bp.linears[name]
            target = targets[name]
            w = float_weight(module).detach().float()
            x = stats[leader].sample() if leader in stats else None
            if x is not None and name in scales:
                x = x / scales[name]
            if x is not None and max_shrink > 0 and clip_grid > 1:
                shrink = _search_clip(w, x, target, max_shrink, clip_grid)
                deq, sc, zp = rtn(w, target, shrink)
            else:
                deq, sc, zp = rtn(w, target)
            set_result(module, target, deq, sc, zp)
    stats.clear()


def awq_scale_block(bp: BlockPass, targets: dict[str, WeightTarget], *, grid: int = 20,
                    n_samples: int = 512, report: dict | None = None
                    ) -> tuple[dict[str, list[str]], dict[str, "_InputStats"], dict[str, torch.Tensor]]:
    """The scaling step alone (float weights scaled and folded, nothing quantized): returns the
    input groups (leader -> Linears), their input statistics, and the scale s of each scaled
    Linear's input channels (its input is now X / s). grid=0: statistics only."""
    gen = torch.Generator().manual_seed(bp.index)
    per_sample = max(1, math.ceil(n_samples / max(len(bp.inputs), 1)))
    stats: dict[str, _InputStats] = {}

    def on_input(leader: str, x: torch.Tensor) -> None:
        if leader not in stats:
            stats[leader] = _InputStats(x.shape[-1], per_sample, gen)
        stats[leader].add(x)

    groups = bp.collect(on_input)
    scales: dict[str, torch.Tensor] = {}
    if grid <= 0:
        return groups, stats, scales
    reference = bp.forward(bp.inputs[0])
    for leader, names in groups.items():
        if leader not in stats:
            continue
        fold = _find_fold(bp, names)
        if fold is None:
            continue
        s = _search_scale(bp, names, targets, stats[leader], grid)
        if s is None:
            continue
        undo = _apply_scale(bp, names, fold, s)
        out = bp.forward(bp.inputs[0])
        err = float((out - reference).norm() / reference.norm().clamp(min=1e-30))
        if not err < 1e-4:
            undo()
            if report is not None:
                report.setdefault("folds_undone", []).append(f"{bp.name}: {fold[0]} ({err:.2g})")
            continue
        for name in names:
            scales[name] = s
        if report is not None:
            report.setdefault("scaled", []).append(
                f"{bp.name}: {fold[0]} -> {', '.join(n[len(bp.name) + 1:] for n in names)}")
    return groups, stats, scales


def _find_fold(bp: BlockPass, names: list[str]) -> tuple[str, nn.Module, str] | None:
    rel = {n[len(bp.name) + 1:] for n in names}
    for pred_name, consumers, rows in _FOLDS:
        if set(consumers) != rel:
            continue
        try:
            pred = bp.block.get_submodule(pred_name)
        except AttributeError:
            continue
        width = float_weight(bp.linears[names[0]]).shape[1]
        if is_linear(pred):
            out = float_weight(pred).shape[0]
            if out != width and not (rows == "last" and out > width):
                continue
        else:
            weight = getattr(pred, "weight", None)
            if not isinstance(weight, torch.Tensor) or weight.dim() != 1 or weight.numel() != width:
                continue
        return pred_name, pred, rows
    return None


def _search_scale(bp: BlockPass, names: list[str], targets: dict[str, WeightTarget],
                  stats: _InputStats, grid: int) -> torch.Tensor | None:
    x = stats.sample()
    mean_abs = stats.mean_abs().clamp(min=1e-5)
    weights = [float_weight(bp.linears[n]).detach().float() for n in names]
    refs = [x @ w.t() for w in weights]
    best, best_s = None, None
    for i in range(grid):
        a = i / grid
        s = mean_abs.pow(a)
        s = s / (s.max() * s.min()).sqrt()
        loss = 0.0
        for name, w, ref in zip(names, weights, refs):
            deq, _, _ = rtn(w * s, targets[name])
            loss += float(((x @ (deq / s).t()) - ref).pow(2).sum())
        if best is None or loss < best:
            best, best_s = loss, s
    if best_s is None or torch.all(best_s == 1):
        return None
    return best_s


def _apply_scale(bp: BlockPass, names: list[str], fold: tuple[str, nn.Module, str],
                 s: torch.Tensor):
    """W[:, j] *= s_j for the consumers, 1/s_j into the predecessor; returns an undo function."""
    _, pred, rows = fold
    saved = {id(p): p.detach().clone() for p in [*(bp.linears[n].weight for n in names),
                                                  *pred.parameters(recurse=False)]}
    params = [*(bp.linears[n].weight for n in names), *pred.parameters(recurse=False)]
    with torch.no_grad():
        for name in names:
            w = float_weight(bp.linears[name])
            w.mul_(s.to(w.dtype))
        if is_linear(pred):
            pw = float_weight(pred)
            start = pw.shape[0] - s.numel()  # "all": 0; "last": the last len(s) rows
            pw[start:].div_(s.to(pw.dtype).unsqueeze(1))
            bias = getattr(pred, "bias", None)
            if bias is not None:
                bias[start:].div_(s.to(bias.dtype))
        else:
            pred.weight.div_(s.to(pred.weight.dtype))
            bias = getattr(pred, "bias", None)
            if isinstance(bias, torch.Tensor):
                bias.div_(s.to(bias.dtype))

    def undo() -> None:
        with torch.no_grad():
            for p in params:
                p.copy_(saved[id(p)])
    return undo


def _search_clip(w: torch.Tensor, x: torch.Tensor, target: WeightTarget, max_shrink: float,
                 steps: int, chunk: int = 256) -> torch.Tensor:
    """Per (row, group) shrink factor of the range with the least output error on x."""
    out, k = w.shape
    g = target.group
    xg = grouped(x, g)                       # [n, G, g]
    wg = grouped(w, g)                       # [out, G, g]
    best_err = torch.full((out, k // g), float("inf"))
    best = torch.ones(out, k // g, dtype=torch.float64)
    for step in range(steps):
        r = 1.0 - max_shrink * step / (steps - 1)
        for o in range(0, out, chunk):
            wc = wg[o:o + chunk]
            scale, zp = group_qparams(wc, target, r)
            lo, hi = _range(scale, zp, target)
            wq = fake_quant(wc.clamp(lo.unsqueeze(-1), hi.unsqueeze(-1)), scale.unsqueeze(-1),
                            zp.unsqueeze(-1), target)
            d = torch.einsum("ngk,ogk->nog", xg, wc - wq).pow(2).mean(dim=0)
            better = d < best_err[o:o + chunk]
            best_err[o:o + chunk] = torch.where(better, d, best_err[o:o + chunk])
            best[o:o + chunk] = torch.where(better, torch.full_like(best[o:o + chunk], r),
                                            best[o:o + chunk])
    return best


def _range(scale: torch.Tensor, zp: torch.Tensor, target: WeightTarget):
    return (target.qmin - zp) * scale, (target.qmax - zp) * scale
