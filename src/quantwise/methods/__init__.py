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

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from quantwise.config import Config
from quantwise.errors import ConfigError
from quantwise.methods.weights import PRECOMPUTED_ATTR, WeightTarget, rtn, set_result, weight_target
from quantwise.modules.layers import float_weight, is_supported, kind_of, unsupported_reason

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
                 progress: bool = False) -> dict[str, Any]:
    """Run config.method on `model` in place; returns a small report (what ran where)."""
    method, args = config.method, dict(config.method_args)
    if method is None:
        return {}
    if method == "smoothquant":
        from quantwise.methods.smoothquant import smooth  # written separately
        result = smooth(model, list(calib_data), progress=progress, **args)
        return {"method": method, "smooth": result}
    if method not in WEIGHT_METHODS:
        raise ConfigError(f"unknown method {method!r}")
    bits = args.pop("bits", None)
    selected = _selected(model, config, bits)
    report: dict[str, Any] = {"method": method, "bits": bits}
    in_blocks: set[str] = set()
    if method in ("gptq", "awq"):
        if calib_data is None:
            raise ConfigError(f"method {method!r} needs calibration data")
        from quantwise.methods.blocks import run_blocks
        linears = {n: m for n, (m, _) in selected.items() if kind_of(m) == "linear"}
        targets = {n: t for n, (_, t) in selected.items()}
        if method == "gptq":
            process = _gptq_process(targets, args, report)
        else:
            process = _awq_process(targets, args, report)
        report.update(run_blocks(model, calib_data, process, linears, progress=progress,
                                 desc=method))
        in_blocks = {n for n in linears if hasattr(linears[n], PRECOMPUTED_ATTR)}
    # Everything else: round-to-nearest on the same grid (needed for narrowed bits; harmless
    # otherwise: the same codes convert() would compute).
    rest = [n for n in selected if n not in in_blocks]
    for name in rest:
        module, target = selected[name]
        deq, scale, zp = rtn(float_weight(module).detach().float(), target)
        set_result(module, target, deq, scale, zp)
    report["rtn_layers"] = len(rest)
    report["method_layers"] = len(in_blocks)
    return report


def _gptq_process(targets: dict[str, WeightTarget], args: dict, report: dict):
    from quantwise.methods.gptq import HessianAccumulator, gptq_quantize

    damp = float(args.get("damp", 0.01))
    act_order = bool(args.get("act_order", False))
    block_size = int(args.get("block_size", 128))
    report.update(damp=damp, act_order=act_order)

    def process(bp) -> None:
        hessians: dict[str, HessianAccumulator] = {}

        def on_input(leader: str, x) -> None:
            if leader not in hessians:
                hessians[leader] = HessianAccumulator(x.shape[-1])
            hessians[leader].add(x)

        groups = bp.collect(on_input)
        for leader, names in groups.items():
            h = hessians[leader].value() if leader in hessians else None
            # Linears sharing an input (q/k/v) share H: GPTQ treats rows independently, so
            # their weights run stacked, once (same result, one factorization, fewer steps).
            by_target: dict[WeightTarget, list[str]] = {}
            for name in names:
                by_target.setdefault(targets[name], []).append(name)
            for target, members in by_target.items():
                ws = [float_weight(bp.linears[n]).detach().float() for n in members]
                w = torch.cat(ws)
                if h is None:
                    deq, scale, zp = rtn(w, target)
                else:
                    deq, scale, zp = gptq_quantize(w, h, target, damp=damp, act_order=act_order,
                                                   block_size=block_size)
                start = 0
                for name, wi in zip(members, ws):
                    stop = start + wi.shape[0]
                    set_result(bp.linears[name], target, deq[start:stop], scale[start:stop],
                               zp[start:stop])
                    start = stop
            hessians.pop(leader, None)  # free as soon as its Linears are done
    return process


def _awq_process(targets: dict[str, WeightTarget], args: dict, report: dict):
    from quantwise.methods.awq import awq_block

    def process(bp) -> None:
        awq_block(bp, targets, report=report, **args)
    return process
