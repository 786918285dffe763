"""Fold BatchNorm into the convolution before it, so the int8 kernel computes both.

conv(x) * g / sqrt(var + eps) + (b - mean) * g / sqrt(var + eps) + beta  ==  conv'(x)
with W' = W * g / sqrt(var + eps) per output channel. Exact in float (up to rounding) in eval
mode; the BatchNorm is replaced by nn.Identity. Pairs are found with torch.fx when the model
traces, else by adjacency inside nn.Sequential containers.
"""

from __future__ import annotations

import torch
from torch import nn

_CONVS = (nn.Conv1d, nn.Conv2d)
_BNS = (nn.BatchNorm1d, nn.BatchNorm2d)


def find_conv_bn_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """(conv name, batchnorm name) pairs where the BatchNorm consumes only that conv's output."""
    kinds = {type(m) for m in model.modules()}
    if not (kinds & set(_CONVS) and kinds & set(_BNS)):
        return []  # nothing to fold: do not pay for a trace
    try:
        return _pairs_from_fx(model)
    except Exception:  # noqa: BLE001 - tracing fails on data-dependent control flow: fall back
        return _pairs_from_sequential(model)


def _pairs_from_fx(model: nn.Module) -> list[tuple[str, str]]:
    graph = torch.fx.symbolic_trace(model).graph
    modules = dict(model.named_modules())
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), _BNS):
            continue
        source = node.args[0] if node.args else None
        if (isinstance(source, torch.fx.Node) and source.op == "call_module"
                and isinstance(modules.get(source.target), _CONVS) and len(source.users) == 1
                and _called_once(graph, source.target) and _called_once(graph, node.target)):
            pairs.append((source.target, node.target))
    return pairs


def _called_once(graph: torch.fx.Graph, target: str) -> bool:
    """A module reused at two places cannot be folded without changing the other use."""
    return sum(1 for n in graph.nodes if n.op == "call_module" and n.target == target) == 1


def _pairs_from_sequential(model: nn.Module) -> list[tuple[str, str]]:
    pairs = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Sequential):
            continue
        children = list(module.named_children())
        for (a_name, a), (b_name, b) in zip(children, children[1:]):
            if isinstance(a, _CONVS) and isinstance(b, _BNS):
                prefix = f"{name}." if name else ""
                pairs.append((prefix + a_name, prefix + b_name))
    return pairs


def foldable(bn: nn.Module) -> bool:
    """A BatchNorm with running statistics (one that uses batch statistics at inference has
    nothing fixed to fold)."""
    return bool(bn.track_running_stats) and bn.running_var is not None


def bn_factor(bn: nn.Module) -> torch.Tensor:
    """gamma / sqrt(running_var + eps) per channel, float64: what a fold scales the weight by."""
    inv_std = torch.rsqrt(bn.running_var.double() + bn.eps)
    return bn.weight.double() * inv_std if bn.affine else inv_std


def folded_conv_bn(weight: torch.Tensor, bias: torch.Tensor | None, bn: nn.Module
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(W', b') of one conv + eval-mode BatchNorm pair, computed in float64 and returned in
    the weight's dtype. Differentiable in weight, bias, gamma and beta (QAT trains through it)."""
    factor = bn_factor(bn)
    beta = bn.bias.double() if bn.affine else torch.zeros_like(factor)
    folded_weight = weight.double() * factor.reshape((-1,) + (1,) * (weight.dim() - 1))
    bias = bias.double() if bias is not None else torch.zeros_like(factor)
    folded_bias = (bias - bn.running_mean.double()) * factor + beta
    return folded_weight.to(weight.dtype), folded_bias.to(weight.dtype)


@torch.no_grad()
def fold_into_conv(conv: nn.Module, bn: nn.Module) -> None:
    """Give `conv` the weight and bias of conv + `bn` (eval mode), as new Parameters."""
    weight, bias = folded_conv_bn(conv.weight, conv.bias, bn)
    conv.weight = nn.Parameter(weight, requires_grad=conv.weight.requires_grad)
    conv.bias = nn.Parameter(bias)


def fold_conv_bn(model: nn.Module, pairs: list[tuple[str, str]]) -> None:
    """Fold each pair in place: the conv takes the BatchNorm's affine map, the BN becomes Identity."""
    for conv_name, bn_name in pairs:
        conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
        if not foldable(bn):
            continue  # batch statistics at inference: nothing fixed to fold
        fold_into_conv(conv, bn)
        model.set_submodule(bn_name, nn.Identity())
