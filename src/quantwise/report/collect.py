"""Per-layer statistics for the report: where each quantized layer's calibration activations and
weights lie, the range each calibrator would pick there, the one the layer uses, and the SQNR
of the layer's output (its real kernel against the float layer on the same float input).

Two passes over the calibration data through the float model (hooks on the quantized layers'
float counterparts): the first streams the four calibrators and the min / max, the second fills
a fixed-edge histogram, so no activation is stored. Plain floats and lists come out: the report
JSON holds them and the HTML is rendered from that JSON alone.
"""

from __future__ import annotations

import copy
import math
import warnings
from typing import Any, Iterable

import torch
from torch import nn

from quantwise.calibrators import CALIBRATORS, make_calibrator
from quantwise.data import run_model
from quantwise.errors import CalibrationError
from quantwise.fold import fold_conv_bn
from quantwise.modules import QuantizedLayer
from quantwise.modules.layers import float_weight
from quantwise.state import get_state

BINS = 96            # histogram bins: enough to see a tail, small enough for 40 layers in < 5 MB
MAX_CHANNELS = 512   # per-channel weight ranges kept for at most this many channels (evenly spaced)


def layer_stats(model: nn.Module, qmodel: nn.Module, calib: Iterable[Any],
                max_batches: int = 8) -> dict[str, dict[str, Any]]:
    """name -> {"activation": ..., "weight": ..., "sqnr_db": ...} for every QuantizedLayer of
    `qmodel` whose float layer `model` has under the same name."""
    state = get_state(qmodel)
    # the float reference transformed as the quantized model was: BatchNorms folded into their
    # convs (a conv's output is compared after its BatchNorm)
    model = copy.deepcopy(model)
    fold_conv_bn(model, list(state.folded))
    # SmoothQuant moved scales into the layers before (LayerNorm weights): the float layer's
    # input is not the quantized layer's, so no like-for-like SQNR (None, said in the page)
    smoothed = state.config.method == "smoothquant"
    layers = {n: m for n, m in qmodel.named_modules() if isinstance(m, QuantizedLayer)}
    floats = {n: model.get_submodule(n) for n in layers if _has(model, n)}
    batches = list(calib)[:max_batches]
    acts = {n: _ActStats() for n, q in layers.items() if n in floats and q.act_spec is not None}
    sqnr = {n: [0.0, 0.0] for n in floats}
    model.eval()

    def first_pass(name: str):
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            x = args[0] if args else None
            if not isinstance(x, torch.Tensor) or not x.is_floating_point():
                return
            if name in acts:
                acts[name].update(x)
            if not smoothed and isinstance(output, torch.Tensor) and output.is_floating_point():
                got = layers[name](x).float()
                want = output.float()
                ok = torch.isfinite(want) & torch.isfinite(got)
                sqnr[name][0] += float(want[ok].double().pow(2).sum())
                sqnr[name][1] += float((want[ok] - got[ok]).double().pow(2).sum())
        return hook

    def second_pass(name: str):
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            if args and isinstance(args[0], torch.Tensor) and args[0].is_floating_point():
                acts[name].fill(args[0])
        return hook

    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the calibration itself already reported them
        for hooks in ((first_pass, floats), (second_pass, acts)):
            handles = [floats[n].register_forward_hook(hooks[0](n)) for n in hooks[1]]
            try:
                for batch in batches:
                    run_model(model, batch)
            finally:
                for h in handles:
                    h.remove()
            for stats in acts.values():
                stats.freeze()
    out: dict[str, dict[str, Any]] = {}
    for name, layer in layers.items():
        entry: dict[str, Any] = {"weight": _weight_stats(floats.get(name), layer)}
        if name in acts:
            entry["activation"] = acts[name].result(layer)
        if name in sqnr and sqnr[name][0] > 0:
            signal, noise = sqnr[name]
            entry["sqnr_db"] = _r(10 * math.log10(signal / noise)) if noise > 0 else None  # None: exact
        out[name] = entry
    return out


def _has(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
        return True
    except AttributeError:
        return False


class _ActStats:
    """The four calibrators streamed over a layer's inputs, then a histogram over [min, max]."""

    def __init__(self) -> None:
        self.calibrators = {name: make_calibrator(name) for name in CALIBRATORS}
        self.lo, self.hi = math.inf, -math.inf
        self.counts: torch.Tensor | None = None

    def update(self, x: torch.Tensor) -> None:
        for cal in self.calibrators.values():
            cal.update(x)
        finite = x[torch.isfinite(x)]
        if finite.numel():
            self.lo, self.hi = min(self.lo, float(finite.min())), max(self.hi, float(finite.max()))

    def freeze(self) -> None:
        if self.counts is None:
            self.counts = torch.zeros(BINS, dtype=torch.float64)

    def fill(self, x: torch.Tensor) -> None:
        if self.lo > self.hi:
            return
        finite = x[torch.isfinite(x)].double().flatten()
        hi = self.hi if self.hi > self.lo else self.lo + 1.0
        self.counts += torch.histc(finite.clamp(self.lo, hi), BINS, self.lo, hi)

    def result(self, layer: QuantizedLayer) -> dict[str, Any]:
        ranges = {}
        for name, cal in self.calibrators.items():
            try:
                lo, hi = cal.compute_range()
                ranges[name] = [_r(float(lo)), _r(float(hi))]
            except CalibrationError:
                ranges[name] = None
        spec = layer.act_spec
        chosen = None
        if not layer.dynamic and hasattr(layer, "input_scale"):
            scale, zp = float(layer.input_scale), int(layer.input_zero_point)
            chosen = [_r((spec.qmin - zp) * scale), _r((spec.qmax - zp) * scale)]
        hi = self.hi if self.hi > self.lo else self.lo + 1.0
        return {"min": _finite(self.lo), "max": _finite(self.hi),
                "edges": [_r(self.lo), _r(hi)] if self.lo <= hi else None,
                "counts": [] if self.counts is None else [int(c) for c in self.counts.tolist()],
                "ranges": ranges, "chosen": chosen, "dynamic": layer.dynamic,
                "nonfinite": self.calibrators["max"].num_nonfinite, "seen": self.calibrators["max"].num_seen,
                "format": spec.format.value, "granularity": spec.granularity.to_dict()["type"]}


def _finite(value: float) -> float | None:
    return _r(value) if math.isfinite(value) else None


def _r(value: float) -> float:
    """6 significant digits: what a plot or a table shows, at a third of the JSON's bytes."""
    return float(f"{value:.6g}")


def _rl(values: list[float]) -> list[float]:
    return [_r(v) for v in values]


def _weight_stats(module: nn.Module | None, layer: QuantizedLayer) -> dict[str, Any]:
    """Histogram of the float weights, every calibrator's per-tensor range on them, and per
    output channel the float |w| max against the clip the stored scales give."""
    spec = layer.weight_spec
    out: dict[str, Any] = {"format": spec.format.value, "granularity": spec.granularity.to_dict()["type"]}
    if module is None or not hasattr(module, "weight"):
        return out
    w = float_weight(module).detach().float()
    lo, hi = float(w.min()), float(w.max())
    top = hi if hi > lo else lo + 1.0
    out.update(min=_r(lo), max=_r(hi), edges=[_r(lo), _r(top)],
               counts=[int(c) for c in torch.histc(w.double(), BINS, lo, top).tolist()])
    ranges = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in CALIBRATORS:
            cal = make_calibrator(name)
            cal.update(w)
            try:
                a, b = cal.compute_range()
                ranges[name] = [_r(float(a)), _r(float(b))]
            except CalibrationError:
                ranges[name] = None
    out["ranges"] = ranges
    if w.dim() >= 2 and spec.format.is_integer:
        axis = 1 if layer.kind == "conv_transpose" else 0
        absmax = w.abs().transpose(0, axis).reshape(w.shape[axis], -1).amax(dim=1)
        scale = layer.weight_scale.float()
        clip = (scale.reshape(scale.shape[0], -1).amax(dim=1) if scale.dim() >= 1 and scale.numel() > 1
                else scale.reshape(1).expand(absmax.numel())) * spec.qmax
        if clip.numel() == absmax.numel():
            keep = torch.linspace(0, absmax.numel() - 1, min(absmax.numel(), MAX_CHANNELS)).round().long()
            out["channels"] = {"index": keep.tolist(), "absmax": _rl(absmax[keep].tolist()),
                               "clip": _rl(clip[keep].tolist())}
    return out
