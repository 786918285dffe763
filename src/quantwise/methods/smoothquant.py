"""SmoothQuant: move activation outliers into the weights, per input channel, before W8A8.

For a group of Linears that read one input X (K channels), with a in [0.5, 0.8]:

    s_j = max|X_j|^a / max_over_group|W[:, j]|^(1 - a)
    X' = X / s   (folded into what produces X)        W' = W * s  (columns)

so X' W'^T = X W^T and the float function is unchanged. Where the division goes:

| model / group                       | X comes from                    | fold (exact)                     |
|-------------------------------------|---------------------------------|----------------------------------|
| Llama q/k/v                         | input RMSNorm                   | RMSNorm weight / s               |
| Llama gate/up                       | post-attention RMSNorm          | RMSNorm weight / s               |
| Llama o_proj                        | softmax(QK^T) V                 | v_proj rows (+bias) / s; with GQA|
|                                     |                                 | s is shared by the query heads   |
|                                     |                                 | of one kv head (max over them)   |
| Llama down_proj                     | SiLU(gate) * up                 | up_proj rows (+bias) / s         |
| BERT attention.output.dense         | softmax(QK^T) V                 | value rows (+bias) / s           |
| BERT query/key/value                | previous LayerNorm (post-LN)    | explicit division (see below)    |
| BERT intermediate.dense             | attention.output.LayerNorm      | explicit division (see below)    |
| BERT output.dense                   | GELU(intermediate)              | none: GELU is not homogeneous,   |
|                                     |                                 | left unsmoothed (reported)       |

BERT is post-LN: the LayerNorm's output is both the Linears' input and the residual that the
next LayerNorm adds, so dividing the LayerNorm's weight and bias by s would change the residual
stream and hence the function. There the division is explicit: the parent module that feeds the
group (BertSelfAttention for Q/K/V, BertIntermediate) gets a `smooth_scale` buffer and a forward
that divides its input by it before calling the Linears (the Linears, and so the quantizer's
observers, see X / s). It costs one elementwise division per group in the per-layer path and
nothing in the encoder fast path (encoder/ folds 1/s into the static input quantization's
division). `restore_prescale` re-installs these forwards on a fresh model (io.load).

Alpha: fixed, or per group the alpha of `alphas` with the lowest output error after fake
quantization of the group (static per-tensor uint8 input with the min/max range over the
calibration data, or per-token dynamic int8 for a dynamic config, "w8a8-dynamic-smoothquant";
int8 symmetric per-channel weights), measured on a sample of calibration rows.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from quantwise.numerics import TINY, fake_quantize, qparams_from_range, tensor_range
from quantwise.spec import Format, PerChannel, PerTensor, PerToken, QuantSpec

ACT_SPEC = QuantSpec(Format.UINT8, symmetric=False, granularity=PerTensor())
TOKEN_SPEC = QuantSpec(Format.INT8, symmetric=True, granularity=PerToken())  # per_token=True
WEIGHT_SPEC = QuantSpec(Format.INT8, symmetric=True, granularity=PerChannel(0))
SAMPLE_ROWS_PER_BATCH = 128
SAMPLE_ROWS_MAX = 2048
MIN_SCALE = 1e-5


@dataclass
class GroupResult:
    linears: list[str]
    fold: str                       # where 1/s went
    alpha: float
    error: float                    # relative output error (sum |dY|^2 / sum |Y|^2) at alpha
    errors: dict[float, float] = field(default_factory=dict)  # every alpha tried
    error_unsmoothed: float = float("nan")  # same measure without smoothing


@dataclass
class SmoothReport:
    groups: dict[str, GroupResult] = field(default_factory=dict)   # group name -> result
    skipped: dict[str, str] = field(default_factory=dict)          # Linear -> why not smoothed

    def __str__(self) -> str:
        lines = [f"SmoothQuant: {len(self.groups)} groups smoothed, {len(self.skipped)} Linears not"]
        for name, g in self.groups.items():
            lines.append(f"  {name:40s} alpha={g.alpha:.2f} error={g.error:.3e} "
                         f"(unsmoothed {g.error_unsmoothed:.3e}) fold: {g.fold}")
        for name, why in self.skipped.items():
            lines.append(f"  {name:40s} not smoothed: {why}")
        return "\n".join(lines)


# -- explicit division (post-LN models) ---------------------------------------------------------
class PreScaledForward:
    """Installed as `module.forward`: divide the first input by `module.smooth_scale`, then run
    the module's own forward (whose Linears therefore see X / s)."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def __call__(self, hidden_states, *args, **kwargs):
        m = self.module
        return type(m).forward(m, hidden_states / m.smooth_scale, *args, **kwargs)


def _install_prescale(module: nn.Module, scale: torch.Tensor) -> None:
    if "forward" in module.__dict__ and not isinstance(module.__dict__["forward"], PreScaledForward):
        raise RuntimeError(f"{type(module).__name__} already has an instance forward")
    old = getattr(module, "smooth_scale", None)
    scale = scale.detach().to(torch.float32)
    if isinstance(old, torch.Tensor):
        scale = old * scale  # smoothing twice composes
    module.register_buffer("smooth_scale", scale.contiguous())
    object.__setattr__(module, "forward", PreScaledForward(module))


def prescaled_modules(model: nn.Module) -> dict[str, int]:
    """{module name: channels} of modules with an explicit smoothing division (for io.save)."""
    return {name: int(m.smooth_scale.numel()) for name, m in model.named_modules()
            if isinstance(m.__dict__.get("forward"), PreScaledForward)}


def restore_prescale(model: nn.Module, modules: dict[str, int]) -> None:
    """Re-install the explicit divisions on a fresh copy of the float model (values come from
    the checkpoint's state_dict afterwards)."""
    for name, channels in modules.items():
        _install_prescale(model.get_submodule(name), torch.ones(int(channels)))


# -- groups -------------------------------------------------------------------------------------
@dataclass
class _Group:
    name: str
    linears: list[tuple[str, nn.Linear]]
    fold_desc: str
    apply_fold: Callable[[torch.Tensor], None]       # divide X by s at its source
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None  # [K] -> [K'] (GQA)
    expand: Callable[[torch.Tensor], torch.Tensor] | None = None  # [K'] -> [K]
    order: int = 0                                   # child folds (v, up rows) first


def _div_rows(linear: nn.Linear, s: torch.Tensor) -> None:
    with torch.no_grad():
        linear.weight.div_(s.to(linear.weight.dtype).unsqueeze(1))
        if linear.bias is not None:
            linear.bias.div_(s.to(linear.bias.dtype))


def _div_norm(norm: nn.Module, s: torch.Tensor) -> None:
    with torch.no_grad():
        norm.weight.div_(s.to(norm.weight.dtype))
        if getattr(norm, "bias", None) is not None:
            norm.bias.div_(s.to(norm.bias.dtype))


def _is_linear(m: Any) -> bool:
    return isinstance(m, nn.Linear)


def _bert_groups(name: str, layer: nn.Module, skipped: dict) -> list[_Group]:
    try:
        att = layer.attention
        sa, q, k, v = att.self, att.self.query, att.self.key, att.self.value
        o, inter, f = att.output.dense, layer.intermediate, layer.output.dense
        i = inter.dense
    except AttributeError:
        return []
    if not all(_is_linear(x) for x in (q, k, v, o, i, f)):
        return []
    p = f"{name}." if name else ""
    groups = []
    if getattr(layer, "add_cross_attention", False) or getattr(sa, "is_decoder", False):
        skipped[f"{p}attention.self"] = "decoder / cross-attention layer"
    else:
        groups.append(_Group(f"{p}attention.self.qkv",
                             [(f"{p}attention.self.{n}", m) for n, m in
                              (("query", q), ("key", k), ("value", v))],
                             "explicit division in attention.self (post-LN residual)",
                             lambda s, sa=sa: _install_prescale(sa, s), order=1))
    heads = getattr(sa, "num_attention_heads", None)
    if heads and v.out_features == o.in_features:
        groups.append(_Group(f"{p}attention.output.dense", [(f"{p}attention.output.dense", o)],
                             "value rows (context = softmax(QK^T) V is linear in V)",
                             lambda s, v=v: _div_rows(v, s), order=0))
    else:
        skipped[f"{p}attention.output.dense"] = "value and output shapes do not match"
    groups.append(_Group(f"{p}intermediate.dense", [(f"{p}intermediate.dense", i)],
                         "explicit division in intermediate (post-LN residual)",
                         lambda s, inter=inter: _install_prescale(inter, s), order=1))
    skipped[f"{p}output.dense"] = ("input is GELU(intermediate): no linear op before it to fold "
                                   "1/s into (GELU is not positively homogeneous)")
    return groups


def _llama_groups(name: str, layer: nn.Module, skipped: dict) -> list[_Group]:
    try:
        attn, mlp = layer.self_attn, layer.mlp
        q, k, v, o = attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj
        gate, up, down = mlp.gate_proj, mlp.up_proj, mlp.down_proj
        ln1, ln2 = layer.input_layernorm, layer.post_attention_layernorm
    except AttributeError:
        return []
    if not all(_is_linear(x) for x in (q, k, v, o, gate, up, down)):
        return []
    p = f"{name}." if name else ""
    groups = []
    if getattr(ln1, "bias", None) is None and getattr(ln1, "weight", None) is not None:
        groups.append(_Group(f"{p}self_attn.qkv", [(f"{p}self_attn.{n}_proj", m) for n, m in
                                                   (("q", q), ("k", k), ("v", v))],
                             "input_layernorm weight", lambda s, ln=ln1: _div_norm(ln, s), order=1))
    else:
        skipped[f"{p}self_attn.q_proj"] = "input norm has no foldable weight"
    head_dim = getattr(attn, "head_dim", None)
    rep = getattr(attn, "num_key_value_groups", None)
    if head_dim and rep and v.out_features * rep == o.in_features:
        kv = v.out_features // head_dim

        def reduce(x: torch.Tensor, kv=kv, rep=rep, d=head_dim) -> torch.Tensor:
            # o's input channel (query head h, j) reads kv head h // rep: max over the rep heads
            return x.view(kv, rep, d).amax(dim=1).reshape(kv * d)

        def expand(s: torch.Tensor, kv=kv, rep=rep, d=head_dim) -> torch.Tensor:
            return s.view(kv, 1, d).expand(kv, rep, d).reshape(kv * rep * d)

        groups.append(_Group(f"{p}self_attn.o_proj", [(f"{p}self_attn.o_proj", o)],
                             "v_proj rows" + (f" (GQA: one s per kv channel, shared by {rep} "
                                              "query heads)" if rep > 1 else ""),
                             lambda s, v=v: _div_rows(v, s), reduce=reduce if rep > 1 else None,
                             expand=expand if rep > 1 else None, order=0))
    else:
        skipped[f"{p}self_attn.o_proj"] = "v_proj / o_proj head layout not understood"
    if getattr(ln2, "bias", None) is None and getattr(ln2, "weight", None) is not None:
        groups.append(_Group(f"{p}mlp.gate_up", [(f"{p}mlp.gate_proj", gate), (f"{p}mlp.up_proj", up)],
                             "post_attention_layernorm weight",
                             lambda s, ln=ln2: _div_norm(ln, s), order=1))
    groups.append(_Group(f"{p}mlp.down_proj", [(f"{p}mlp.down_proj", down)],
                         "up_proj rows (input = act(gate) * up is linear in up)",
                         lambda s, up=up: _div_rows(up, s), order=0))
    return groups


def find_groups(model: nn.Module) -> tuple[list[_Group], dict[str, str]]:
    groups, skipped = [], {}
    for name, module in model.named_modules():
        found = _bert_groups(name, module, skipped) or _llama_groups(name, module, skipped)
        groups.extend(found)
    return groups, skipped


# -- statistics ---------------------------------------------------------------------------------
class _Stats:
    def __init__(self, seed: int) -> None:
        self.amax: torch.Tensor | None = None
        self.amin: torch.Tensor | None = None
        self.rows: list[torch.Tensor] = []
        self.count = 0
        self.gen = torch.Generator().manual_seed(seed)

    def __call__(self, module, args, kwargs=None):
        x = args[0] if args else next(iter(kwargs.values()))
        x = x.detach().reshape(-1, x.shape[-1]).float()
        finite = torch.isfinite(x).all(dim=1)
        if not bool(finite.all()):
            x = x[finite]
        if x.shape[0] == 0:
            return
        hi, lo = x.amax(dim=0), x.amin(dim=0)
        self.amax = hi if self.amax is None else torch.maximum(self.amax, hi)
        self.amin = lo if self.amin is None else torch.minimum(self.amin, lo)
        room = SAMPLE_ROWS_MAX - self.count
        if room > 0:
            n = min(room, SAMPLE_ROWS_PER_BATCH, x.shape[0])
            idx = torch.randperm(x.shape[0], generator=self.gen)[:n]
            self.rows.append(x[idx].clone())
            self.count += n


def _run_model(model: nn.Module, sample: Any) -> Any:
    """As workflow.run_model (a level above this one): Tensor, tuple/list, or dict of kwargs."""
    if isinstance(sample, dict):
        return model(**sample)
    if isinstance(sample, (tuple, list)):
        return model(*sample)
    return model(sample)


def _collect(model: nn.Module, groups: list[_Group], calib_data, progress: bool) -> list[_Stats]:
    stats = [_Stats(seed=i) for i in range(len(groups))]
    handles = [g.linears[0][1].register_forward_pre_hook(st) for g, st in zip(groups, stats)]
    training = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            for n, sample in enumerate(calib_data):
                _run_model(model, sample)
                if progress:
                    print(f"smoothquant: calibration batch {n + 1}", flush=True)
    finally:
        for h in handles:
            h.remove()
        for m, t in training.items():
            m.train(t)
    return stats


# -- scales and error ---------------------------------------------------------------------------
def smoothing_scale(xmax: torch.Tensor, wmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """s = xmax^a / wmax^(1-a) (float64 arithmetic), 1 where a channel is all zero."""
    x = xmax.double().clamp(min=MIN_SCALE)
    w = wmax.double().clamp(min=MIN_SCALE)
    s = (x.pow(alpha) / w.pow(1.0 - alpha)).clamp(min=MIN_SCALE)
    s = torch.where((xmax <= 0) | (wmax <= 0), torch.ones_like(s), s)
    return s.float()


def group_error(x: torch.Tensor, amin: torch.Tensor, amax: torch.Tensor,
                weights: list[torch.Tensor], s: torch.Tensor | None,
                refs: list[torch.Tensor] | None = None, per_token: bool = False) -> float:
    """Relative output error of the group when its input is X / s (static per-tensor uint8 with
    the calibration min/max, or with `per_token` symmetric int8 with one run-time scale per row)
    and its weights are W * s (int8 per-channel), vs float X W^T."""
    if s is None:
        s = torch.ones(x.shape[1])
    xs = x / s
    if per_token:
        row = (xs.abs().amax(dim=1, keepdim=True) / TOKEN_SPEC.qmax).clamp(min=TINY)
        xq = torch.round(xs / row).clamp(TOKEN_SPEC.qmin, TOKEN_SPEC.qmax) * row
    else:
        lo = torch.minimum(amin / s, torch.zeros(())).min()  # channel-wise range -> tensor range
        hi = torch.maximum(amax / s, torch.zeros(())).max()
        xscale, xzp = qparams_from_range(lo, hi, ACT_SPEC)
        xq = fake_quantize(xs, xscale, xzp, ACT_SPEC)
    num = den = 0.0
    for j, w in enumerate(weights):
        ws = w.float() * s
        wscale, wzp = qparams_from_range(*tensor_range(ws, WEIGHT_SPEC), WEIGHT_SPEC)
        wq = fake_quantize(ws, wscale, wzp, WEIGHT_SPEC)
        ref = refs[j] if refs is not None else x @ w.float().t()
        num += float((xq @ wq.t() - ref).pow(2).sum())
        den += float(ref.pow(2).sum())
    return num / max(den, 1e-30)


def smooth(model: nn.Module, calib_data, *, alpha: float | None = None,
           alphas: tuple = (0.5, 0.6, 0.7, 0.8), progress: bool = False,
           per_token: bool = False) -> SmoothReport:
    """SmoothQuant `model` in place (see the module docstring); returns what was done.
    `per_token`: the alpha search scores each candidate with per-token dynamic int8 inputs (the
    activations the model will run with) instead of static per-tensor uint8."""
    groups, skipped = find_groups(model)
    report = SmoothReport(skipped=skipped)
    if not groups:
        return report
    candidates = (float(alpha),) if alpha is not None else tuple(float(a) for a in alphas)
    if not candidates:
        raise ValueError("alphas is empty")
    stats = _collect(model, groups, calib_data, progress)
    # Child folds first (they rescale v / up rows, which the norm-fed groups then see).
    for g, st in sorted(zip(groups, stats), key=lambda p: p[0].order):
        if st.amax is None:
            report.skipped[g.name] = "no calibration sample reached it"
            continue
        absmax = torch.maximum(st.amax.abs(), st.amin.abs())
        weights = [lin.weight.detach().float().clone() for _, lin in g.linears]
        wmax = torch.stack([w.abs().amax(dim=0) for w in weights]).amax(dim=0).float()
        if g.reduce is not None:
            absmax_r, wmax_r = g.reduce(absmax), g.reduce(wmax)
        else:
            absmax_r, wmax_r = absmax, wmax
        x = torch.cat(st.rows)
        refs = [x @ w.t() for w in weights]
        errors, scales = {}, {}
        for a in candidates:
            s_r = smoothing_scale(absmax_r, wmax_r, a)
            s = g.expand(s_r) if g.expand is not None else s_r
            scales[a] = (s_r, s)
            errors[a] = group_error(x, st.amin, st.amax, weights, s, refs, per_token)
        best = min(candidates, key=lambda a: errors[a])
        s_r, s = scales[best]
        g.apply_fold(s_r)
        with torch.no_grad():
            for _, lin in g.linears:
                lin.weight.mul_(s.to(lin.weight.dtype))
        report.groups[g.name] = GroupResult(
            [n for n, _ in g.linears], g.fold_desc, best, errors[best], errors,
            group_error(x, st.amin, st.amax, weights, None, refs, per_token))
    # report in model order
    order = {g.name: i for i, g in enumerate(groups)}
    report.groups = dict(sorted(report.groups.items(), key=lambda kv: order[kv[0]]))
    return report


__all__ = [
    "GroupResult",
    "PreScaledForward",
    "SmoothReport",
    "find_groups",
    "group_error",
    "prescaled_modules",
    "restore_prescale",
    "smooth",
    "smoothing_scale",
]
