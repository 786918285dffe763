"""Model-level quantization methods that run before convert(): GPTQ, AWQ, round-to-nearest at
narrowed bit widths (weights), SmoothQuant (activations; methods/smoothquant.py).

    report = apply_method(model, config, calib_data)   # modifies `model` (a copy) in place

GPTQ and AWQ run block by block (methods/blocks.py) over the Linears inside the model's
repeated transformer blocks; every other quantized layer (embeddings, lm_head, ...) is
round-to-nearest. Weight methods leave the dequantized weight in each float layer and its
(scale, zero point) as an attribute (methods/weights.py) that convert() uses, so the stored
codes are the method's codes.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from quantwise.config import Config
from quantwise.errors import ConfigError, QuantwiseWarning
from quantwise.methods.weights import (PRECOMPUTED_ATTR, WeightTarget, rtn, rtn_mse, set_result,
                                       weight_target)
from quantwise.modules.layers import float_weight, is_supported, kind_of, unsupported_reason

if TYPE_CHECKING:
    from quantwise.methods.blocks import BlockStream

WEIGHT_METHODS = ("rtn", "gptq", "awq")

__all__ = ["apply_method", "PRECOMPUTED_ATTR", "WEIGHT_METHODS"]


def _selected(model: nn.Module, config: Config, bits: int | None
              ) -> dict[str, tuple[nn.Module, WeightTarget]]:
    """Layers prepare() will quantize with an integer weight grid a method can produce."""
    out: dict[str, tuple[nn.Module, WeightTarget]] = {}
    for name, module in model.named_modules():
        if not name or not is_supported(module) or unsupported_reason(module):
            continue
        if any(name.startswith(p + ".") for p in out):
            continue
        layer_config, _ = config.layer_config(name, type(module).__name__)
        if layer_config.weight is None:
            continue
        target = weight_target(module, layer_config.weight, bits)
        if target is not None:
            out[name] = (module, target)
    return out


def apply_method(model: nn.Module, config: Config, calib_data: Iterable[Any] | None,
                 progress: bool = False, stream: "BlockStream | None" = None) -> dict[str, Any]:
    """Run config.method on `model` in place; returns a small report (what ran where).
    `stream`: the blocks are read and released one at a time (quantwise.stream; BlockStream in
    methods/blocks.py), so `model`'s own blocks may be meta-device placeholders; each finished
    block gets its unseen Linears rounded before it is handed on."""
    method, args = config.method, dict(config.method_args)
    if method is None:
        return {}
    if method == "smoothquant":
        from quantwise.methods.smoothquant import smooth  # written separately
        if "alphas" in args:
            args["alphas"] = tuple(args["alphas"])
        # score alphas with the activations the model will run with (static or per-token)
        per_token = bool(config.default.dynamic and config.default.activation is not None)
        result = smooth(model, list(calib_data), progress=progress, per_token=per_token, **args)
        return {"method": method, "smooth": result}
    if method not in WEIGHT_METHODS:
        raise ConfigError(f"unknown method {method!r}")
    bits = args.pop("bits", None)
    selected = _selected(model, config, bits)
    report: dict[str, Any] = {"method": method, "bits": bits}
    linears: dict[str, nn.Module] = {}
    if method in ("gptq", "awq"):
        from quantwise.methods.blocks import find_blocks
        found = find_blocks(model)
        prefix = f"{found[0]}." if found is not None else None
        linears = {n: m for n, (m, _) in selected.items()
                   if prefix is not None and n.startswith(prefix) and kind_of(m) == "linear"}
    if method in ("gptq", "awq") and not linears:
        warnings.warn(f"{method}: no Linear inside repeated transformer blocks to run it on; "
                      "every layer is round-to-nearest", QuantwiseWarning, stacklevel=3)
    # Layers outside the blocks (embeddings, lm_head, ...) first: round-to-nearest, with each
    # group's range chosen by a weight-error search (mse_shrink) for gptq/awq; done before the
    # blocks run so block 0's captured inputs already carry the quantized embeddings and the
    # method compensates for them.
    rest = [n for n in selected if n not in linears]
    for name in rest:
        _round(*selected[name], mse=method in ("gptq", "awq"))
    report["rtn_layers"] = len(rest)
    # only the blocks' Linears are looked up from here on: no reference to the other layers
    # (streaming frees the embeddings and the head once they are written)
    selected = {n: selected[n] for n in linears}
    if linears:
        if calib_data is None:
            raise ConfigError(f"method {method!r} needs calibration data")
        from quantwise.methods.blocks import run_blocks
        targets = {n: t for n, (_, t) in selected.items()}
        if method == "gptq":
            process = _gptq_process(targets, args, report)
        else:
            process = _awq_process(targets, args, report)
        unseen: list[str] = []

        def round_unseen(modules: dict[str, nn.Module]) -> None:
            for name, module in modules.items():  # never called on the calibration data
                if not hasattr(module, PRECOMPUTED_ATTR):  # (e.g. unused cross-attention)
                    target = selected[name][1]
                    set_result(module, target, *rtn(float_weight(module).detach().float(), target))
                    unseen.append(name)

        if stream is not None:
            handed_on = stream.finish

            def finish(index: int, block: nn.Module, outputs: list[torch.Tensor]):
                prefix = f"{found[0]}.{index}."
                round_unseen({n: block.get_submodule(n[len(prefix):]) for n in linears
                              if n.startswith(prefix)})
                return handed_on(index, block, outputs)
            stream = dataclasses.replace(stream, finish=finish)
        report.update(run_blocks(model, calib_data, process, linears, progress=progress,
                                 desc=method, stream=stream))
        if stream is None:
            round_unseen(linears)
        report["unseen_layers"] = unseen
    report["method_layers"] = len(linears)
    return report


def _round(module: nn.Module, target: WeightTarget, mse: bool) -> None:
    """Round-to-nearest of one layer (its temporaries die here, not in the caller's frame)."""
    w = float_weight(module).detach().float()
    set_result(module, target, *(rtn_mse(w, target) if mse else rtn(w, target)))


def _gptq_process(targets: dict[str, WeightTarget], args: dict, report: dict):
    from quantwise.methods.blocks import release_free_memory
    from quantwise.methods.gptq import HessianAccumulator, gptq_quantize

    damp = float(args.get("damp", 0.01))
    act_order = bool(args.get("act_order", False))
    block_size = int(args.get("block_size", 128))
    mse = bool(args.get("mse", True))
    sequential = bool(args.get("sequential", True))
    report.update(damp=damp, act_order=act_order, mse=mse, sequential=sequential)

    def quantize_group(bp, names: list[str], acc: "HessianAccumulator | None") -> None:
        # Linears sharing an input (q/k/v) share H: GPTQ treats rows independently, so their
        # weights run stacked, once (the same result, one factorization, fewer steps).
        by_target: dict[WeightTarget, list[str]] = {}
        for name in names:
            by_target.setdefault(targets[name], []).append(name)
        last = list(by_target)[-1]
        for target, members in by_target.items():
            ws = [float_weight(bp.linears[n]).detach().float() for n in members]
            w = ws[0] if len(ws) == 1 else torch.cat(ws)  # (cat would copy even one)
            if acc is None:
                deq, scale, zp = rtn(w, target)
            else:
                # the last user of H takes it and factorizes it in place (one H-sized copy
                # less; freed before the column loop)
                deq, scale, zp = gptq_quantize(w, acc.take() if target is last else acc.value(),
                                               target, damp=damp, act_order=act_order,
                                               block_size=block_size, mse=mse,
                                               overwrite_h=target is last)
            start = 0
            for name, wi in zip(members, ws):
                stop = start + wi.shape[0]
                set_result(bp.linears[name], target, deq[start:stop], scale[start:stop],
                           zp[start:stop])
                start = stop

    def process(bp) -> None:
        hessians: dict[str, HessianAccumulator] = {}
        only_first: list[str] = []

        def on_input(leader: str, x) -> None:
            if sequential and hessians_phase["first"]:
                # the first pass needs only the first group's H (the block's first call)
                if not only_first:
                    only_first.append(leader)
                if leader != only_first[0]:
                    return
            if leader not in hessians:
                hessians[leader] = HessianAccumulator(x.shape[-1])
            hessians[leader].add(x)

        hessians_phase = {"first": True}
        groups = list(bp.collect(on_input).items())
        hessians_phase["first"] = False
        for index, (leader, names) in enumerate(groups):
            if sequential and index > 0:
                # true-sequential: this group's inputs with the groups before it quantized
                hessians.clear()
                bp.collect(on_input, only=names)
                acc = next(iter(hessians.values()), None)
            else:
                acc = hessians.get(leader)
            held = sum(a.value().numel() * 8 for a in hessians.values())
            report["hessian_bytes_peak"] = max(report.get("hessian_bytes_peak", 0), held)
            release_free_memory()  # the passes' freed temporaries: not on top of GPTQ's peak
            quantize_group(bp, names, acc)
            hessians.pop(leader, None)  # freed as soon as its Linears are done
            release_free_memory()
        hessians.clear()
    return process


def _awq_process(targets: dict[str, WeightTarget], args: dict, report: dict):
    from quantwise.methods.awq import awq_block

    def process(bp) -> None:
        awq_block(bp, targets, report=report, **args)
    return process
