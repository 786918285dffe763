"""Per-layer sensitivity: which layers hurt when quantized, and whether weight or input is why.

    report = quantwise.sensitivity(model, "w8a8", calib_batches, eval_fn=my_metric)
    print(report)                 # ranked table, most harmful layer first
    report.to_json()

How it works (ARCHITECTURE.md, "Sensitivity"):
- prepare + calibrate once; afterwards only ObservedLayer modes are toggled ("float", "fake",
  "fake_weight", "fake_act"), so nothing is calibrated twice and the user's model is untouched.
- Proxy metric: SQNR (dB) of the model output against the all-float output on the first
  `proxy_batches` batches of eval_data (else calib_data); the float reference is computed once.
- Per layer: quantize only this (its cost), quantize all but this (what reverting it buys: the
  gain in dB over all-quantized), and the only-this cost split into weight-only and input-only.
- Calibrators: during the one calibration each static layer also feeds a per-tensor Max and one
  |x| histogram; the percentile / entropy / MSE amax are found on that same histogram by the
  calibrators' own searches. Each range is then tried in an input-only, this-layer-only sweep,
  so the number reported is the model-output SQNR that calibrator gives (not an input statistic).
- With eval_fn (model -> float, higher is better): fp32, all-quantized and, for the top_k layers
  by proxy harm, all-but-this are measured; the measured gain re-ranks those top_k.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from itertools import islice
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from quantwise.calibrators import Max, Percentile, make_calibrator
from quantwise.config import Config
from quantwise.errors import ConfigError, EvaluationError, QuantwiseError, QuantwiseWarning
from quantwise.modules import ObservedLayer
from quantwise.state import get_state
from quantwise.workflow import calibrate, nonempty, observed_layers, prepare, run_model

CALIBRATOR_NAMES = ("max", "percentile", "entropy", "mse")
# Reverting a layer that buys less than this (2% of the noise power) counts as no gain: a layer
# masked by a worse one shows ~0 gain, and is then ranked by its quantize-only-this SQNR.
GAIN_TOLERANCE_DB = 0.1


@dataclass
class LayerSensitivity:
    """One layer. SQNRs are dB of the model output vs fp32 on the proxy batches (higher: better)."""

    name: str
    module_type: str
    config: str                          # LayerConfig.describe()
    only_sqnr: float                     # only this layer quantized
    all_but_sqnr: float                  # every other layer quantized, this one float
    gain_db: float                       # all_but_sqnr - all-quantized SQNR: what reverting buys
    weight_only_sqnr: float | None       # only this layer's weight quantized (None: float weight)
    act_only_sqnr: float | None          # only its input quantized (None: input not quantized)
    worse_side: str                      # "weight" / "activation": the lower SQNR; "none": no error
    calibrator: str | None               # configured: "max".. for static inputs, "dynamic", None
    calibrator_sqnr: dict[str, float] | None = None  # input-only SQNR with each calibrator's range
    best_calibrator: str | None = None
    metric: float | None = None          # eval_fn with all but this layer quantized (top_k only)
    metric_gain: float | None = None     # metric - all-quantized metric
    rank: int = 0                        # 1 = most harmful


@dataclass
class SensitivityReport:
    rows: list[LayerSensitivity]         # ranked, most harmful first
    skipped: list[dict[str, str]]        # layers kept float (config, unsupported, folded, unseen)
    config: str
    proxy_batches: int
    all_quantized_sqnr: float
    fp32_metric: float | None = None
    quantized_metric: float | None = None
    evaluations: int = 0                 # eval_fn calls
    forwards: int = 0                    # proxy forward passes (one batch each)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        # Strict JSON has no Infinity/NaN (an SQNR is inf when nothing changed): write strings.
        return json.dumps(_json_safe(self.to_dict()), indent=2, allow_nan=False)

    def __str__(self) -> str:
        header = ("rank", "layer", "type", "only dB", "gain dB", "w-only dB", "a-only dB", "worse",
                  "calibrator", "best calibrator", "metric gain")
        table = [header]
        for r in self.rows:
            best = "-" if r.best_calibrator is None else \
                f"{r.best_calibrator} ({_db(r.calibrator_sqnr[r.best_calibrator])})"
            table.append((str(r.rank), r.name, r.module_type, _db(r.only_sqnr), _db(r.gain_db),
                          _db(r.weight_only_sqnr), _db(r.act_only_sqnr), r.worse_side,
                          r.calibrator or "-", best,
                          "-" if r.metric_gain is None else f"{r.metric_gain:+.4g}"))
        widths = [min(max(len(row[i]) for row in table), 48) for i in range(len(header))]
        lines = [(f"sensitivity, config {self.config}: SQNR of the model output vs fp32 on "
                  f"{self.proxy_batches} batch(es); all layers quantized: "
                  f"{_db(self.all_quantized_sqnr)} dB")]
        if self.fp32_metric is not None:
            lines.append(f"eval_fn: fp32 {self.fp32_metric + 0.0:.6g}, all quantized "  # no -0
                         f"{self.quantized_metric + 0.0:.6g} ({self.evaluations} evaluations)")
        for i, row in enumerate(table):
            lines.append("  ".join(c[:w].ljust(w) for c, w in zip(row, widths)).rstrip())
            if i == 0:
                lines.append("  ".join("-" * w for w in widths))
        if self.skipped:
            lines.append(f"kept float, not analysed ({len(self.skipped)}):")
            lines += [f"  {s['name']} ({s['type']}): {s['reason']}" for s in self.skipped]
        lines.append(f"{len(self.rows)} layers, {self.forwards} forward passes, "
                     f"{self.seconds:.1f} s")
        return "\n".join(lines)


def sensitivity(model: nn.Module, config: "Config | str" = "w8a8",
                calib_data: Iterable[Any] | None = None, eval_data: Iterable[Any] | None = None,
                eval_fn: Callable[[nn.Module], float] | None = None, *, proxy_batches: int = 4,
                top_k: int = 5, progress: bool = True) -> SensitivityReport:
    """Rank the quantized layers of `model` under `config` by how much each one hurts.

    calib_data: model inputs (Tensor, tuple or dict each) to calibrate once; eval_data: inputs
    for the proxy (default: calib_data); eval_fn(model) -> float (higher is better) is called on
    the analysed copy with layers in fake-quantized or float modes, 2 + top_k times.
    Each calibrator's error is the model-output SQNR of an input-only, this-layer-only sweep
    with the range that calibrator derives from the statistics of the one calibration.
    """
    start = time.perf_counter()
    _check_args(eval_fn, proxy_batches, top_k)
    config = Config.resolve(config)
    calib_data = nonempty(calib_data)
    if eval_data is None and iter(calib_data) is calib_data:  # one-shot iterator: keep for proxy
        calib_data = list(calib_data)
    prepared = prepare(model, config)
    layers = observed_layers(prepared)
    if not layers:
        raise ConfigError(f"config {config.name!r} quantizes no layer of this model, so there is "
                          "nothing to analyse; see quantwise.summary(quantwise.prepare(model, "
                          "config)) for why each layer stays float")
    for obs in layers:
        if obs.calibrator is not None:  # for the per-calibrator ranges, from this one calibration
            watch_calibrators(obs)
    calibrate(prepared, calib_data, progress=progress)
    source = calib_data if eval_data is None else nonempty(eval_data, "evaluation data")
    proxy = list(islice(source, proxy_batches))
    report = analyze(prepared, proxy, eval_fn, top_k=top_k, progress=progress)
    report.seconds = time.perf_counter() - start
    return report


def analyze(prepared: nn.Module, proxy_data: list[Any],
            eval_fn: Callable[[nn.Module], float] | None = None, *, top_k: int = 5,
            progress: bool = True) -> SensitivityReport:
    """The sweeps of `sensitivity` on an already prepared and calibrated model.

    Layer modes, input ranges and training flags are restored afterwards.
    """
    start = time.perf_counter()
    _check_args(eval_fn, 1, top_k)
    proxy_data = list(nonempty(proxy_data, "proxy data"))
    layers = observed_layers(prepared)
    saved = [(obs, obs.mode, obs.input_range) for obs in layers]
    training = {m: m.training for m in prepared.modules()}
    prepared.eval()
    try:
        with torch.no_grad():
            report = _analyze(prepared, layers, proxy_data, eval_fn, top_k, progress)
    finally:
        for obs, mode, input_range in saved:
            obs.mode, obs.input_range = mode, input_range
            obs.clear_cache()
        for module, flag in training.items():
            module.train(flag)
    report.seconds = time.perf_counter() - start
    return report


def _check_args(eval_fn: Any, proxy_batches: Any, top_k: Any) -> None:
    if eval_fn is not None and not callable(eval_fn):
        raise EvaluationError(f"eval_fn must be a callable model -> float (higher is better), "
                              f"got {type(eval_fn).__name__}")
    if not isinstance(proxy_batches, int) or proxy_batches < 1:
        raise ConfigError(f"proxy_batches must be an integer >= 1, got {proxy_batches!r}")
    if not isinstance(top_k, int) or top_k < 0:
        raise ConfigError(f"top_k must be an integer >= 0, got {top_k!r}")


class OutputProxy:
    """Runs the proxy batches with given layer modes; SQNR against the all-float reference."""

    def __init__(self, model: nn.Module, data: list[Any], layers: list[ObservedLayer]) -> None:
        self.model, self.data, self.layers = model, data, layers
        self.forwards = 0
        self.reference = self._outputs({}, "float")
        self.signal = sum(float(t.double().square().sum()) for out in self.reference for t in out)
        if not math.isfinite(self.signal) or self.signal == 0.0:
            raise QuantwiseError(f"the fp32 model output on the proxy batches is "
                                 f"{'all zeros' if self.signal == 0 else 'not finite'}, so SQNR "
                                 "means nothing; pass eval_data the model gives a real output on")

    def set_modes(self, modes: dict[ObservedLayer, str], default: str) -> None:
        for obs in self.layers:
            obs.mode = modes.get(obs, default)

    def _outputs(self, modes: dict[ObservedLayer, str], default: str) -> list[list[torch.Tensor]]:
        self.set_modes(modes, default)
        outs = []
        for sample in self.data:
            self.forwards += 1
            tensors = _float_tensors(run_model(self.model, sample))
            if not tensors:
                raise QuantwiseError("the model output holds no floating-point tensor, so its "
                                     "SQNR cannot be measured; return logits or embeddings")
            outs.append(tensors)
        return outs

    def sqnr(self, modes: dict[ObservedLayer, str], default: str) -> float:
        noise = 0.0
        for out, ref in zip(self._outputs(modes, default), self.reference):
            if len(out) != len(ref):
                raise QuantwiseError("the model output changed structure between runs")
            noise += sum(float((o.double() - r.double()).square().sum()) for o, r in zip(out, ref))
        if noise == 0.0:
            return math.inf
        return 10.0 * math.log10(self.signal / noise) if math.isfinite(noise) else -math.inf


def _float_tensors(output: Any) -> list[torch.Tensor]:
    """The float tensors in a model output: Tensor, tuple/list, dict or Hugging Face ModelOutput."""
    if isinstance(output, torch.Tensor):
        return [output.detach()] if output.is_floating_point() else []
    if isinstance(output, dict):  # ModelOutput is an OrderedDict
        output = list(output.values())
    if isinstance(output, (tuple, list)):
        return [t for item in output for t in _float_tensors(item)]
    return []


def _analyze(model: nn.Module, layers: list[ObservedLayer], data: list[Any],
             eval_fn: Callable | None, top_k: int, progress: bool) -> SensitivityReport:
    state = get_state(model)
    observed = {obs.qname for obs in layers}
    skipped = [{"name": r.name, "type": r.module_type, "reason": r.reason or r.status}
               for r in state.records.values() if r.name not in observed]
    usable = []
    for obs in layers:
        cal = obs.calibrator
        if cal is not None and (obs.calls == 0 or cal.num_seen - cal.num_nonfinite == 0):
            skipped.append({"name": obs.qname, "type": type(obs.module).__name__,
                            "reason": "no calibration sample reached this layer"})
            continue
        if cal is not None:  # computed once (and warned once), not at every fake forward
            obs.input_range = cal.compute_range()
        usable.append(obs)
    proxy = OutputProxy(model, data, layers)  # unusable layers stay "float" in every run
    all_sqnr = proxy.sqnr({}, "fake") if usable else math.inf
    rows = []
    for obs in tqdm(usable, desc="sensitivity", unit="layer", disable=not progress):
        rows.append(_layer_row(obs, proxy, all_sqnr))
    rows.sort(key=_harm)
    report = SensitivityReport(rows, skipped, state.config.name, len(data), all_sqnr)
    if eval_fn is not None:
        _measure(report, proxy, usable, eval_fn, top_k, progress)
    for rank, row in enumerate(report.rows, start=1):
        row.rank = rank
    report.forwards = proxy.forwards
    return report


def _layer_row(obs: ObservedLayer, proxy: OutputProxy, all_sqnr: float) -> LayerSensitivity:
    only = proxy.sqnr({obs: "fake"}, "float")
    all_but = proxy.sqnr({obs: "float"}, "fake")
    has_w, has_a = obs.layer_config.weight is not None, obs.quantizes_input
    # A layer with one quantized side needs no split: that side is the whole cost.
    w_only = (proxy.sqnr({obs: "fake_weight"}, "float") if has_a else only) if has_w else None
    a_only = (proxy.sqnr({obs: "fake_act"}, "float") if has_w else only) if has_a else None
    if only == math.inf:
        worse = "none"  # quantizing it changes nothing in the output (an unused layer)
    else:
        weight_worse = a_only is None or (w_only is not None and w_only <= a_only)
        worse = "weight" if weight_worse else "activation"
    cfg = obs.layer_config
    row = LayerSensitivity(
        obs.qname, type(obs.module).__name__, cfg.describe(), only, all_but,
        all_but - all_sqnr if not (math.isinf(all_but) and math.isinf(all_sqnr)) else 0.0,
        w_only, a_only, worse,
        None if not has_a else ("dynamic" if cfg.dynamic else cfg.calibrator))
    ranges = calibrator_ranges(obs)
    if ranges:
        configured = obs.input_range
        row.calibrator_sqnr = {}
        for name, rng in ranges.items():
            if name == cfg.calibrator:
                row.calibrator_sqnr[name] = a_only  # the configured range: already measured
                continue
            obs.input_range = rng
            row.calibrator_sqnr[name] = proxy.sqnr({obs: "fake_act"}, "float")
        obs.input_range = configured
        # Ties go to the configured calibrator, then to the table's order.
        order = sorted(ranges, key=lambda n: (n != cfg.calibrator, CALIBRATOR_NAMES.index(n)))
        row.best_calibrator = max(order, key=lambda n: row.calibrator_sqnr[n])
    return row


def watch_calibrators(obs: ObservedLayer) -> None:
    """Before calibrating: also feed a Max and one shared histogram, for calibrator_ranges."""
    obs.extra_calibrators = {"max": Max(), "histogram": Percentile()}


def calibrator_ranges(obs: ObservedLayer) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(min, max) input range each calibrator gives, from the Max and histogram statistics."""
    mx, hist = obs.extra_calibrators.get("max"), obs.extra_calibrators.get("histogram")
    if mx is None or hist is None or obs.input_range is None or hist.num_seen == hist.num_nonfinite:
        return {}
    with warnings.catch_warnings():  # the configured calibrator already warned about this input
        warnings.simplefilter("ignore", QuantwiseWarning)
        lo, hi = (float(v) for v in mx.compute_range())
        counts, width = hist.histogram()
    cfg = obs.layer_config
    ranges = {"max": (torch.tensor(lo), torch.tensor(hi))}
    for name in ("percentile", "entropy", "mse"):
        args = dict(cfg.calibrator_args) if name == cfg.calibrator else {}
        if name in ("entropy", "mse") and cfg.activation.format.value == "uint8":
            args.setdefault("num_quant_levels", 256)  # as ObservedLayer builds them
        args.pop("num_bins", None)  # the search runs on the shared histogram's bins
        searcher = make_calibrator(name, **args)
        # The same search the calibrator runs on its own histogram, clipped at the max seen.
        amax = 0.0 if width == 0.0 else min(searcher._amax_from_histogram(counts, width),
                                            max(-lo, hi))
        amax = float(torch.tensor(amax, dtype=torch.float32))
        ranges[name] = (torch.tensor(max(lo, -amax)), torch.tensor(min(hi, amax)))
    ranges[cfg.calibrator] = obs.input_range  # the configured one exactly, with its own args
    return ranges


def _measure(report: SensitivityReport, proxy: OutputProxy, usable: list[ObservedLayer],
             eval_fn: Callable, top_k: int, progress: bool) -> None:
    """eval_fn on fp32, all-quantized and all-but-this for the top_k rows; re-rank those."""

    def evaluate(modes: dict[ObservedLayer, str], default: str) -> float:
        proxy.set_modes(modes, default)
        proxy.model.eval()  # eval_fn may have switched to training mode
        value = eval_fn(proxy.model)
        report.evaluations += 1
        return metric_value(value)

    report.fp32_metric = evaluate({}, "float")
    report.quantized_metric = evaluate({}, "fake")
    by_name = {obs.qname: obs for obs in usable}
    top = report.rows[:top_k]
    for row in tqdm(top, desc="eval_fn", unit="layer", disable=not progress):
        row.metric = evaluate({by_name[row.name]: "float"}, "fake")
        row.metric_gain = row.metric - report.quantized_metric
    top.sort(key=lambda r: -r.metric_gain)  # stable: the proxy order breaks ties
    report.rows[:top_k] = top


def metric_value(value: Any) -> float:
    """An eval_fn result as a finite float, or a clear EvaluationError."""
    try:
        number = float(value)
    except (TypeError, ValueError, RuntimeError):
        raise EvaluationError(f"eval_fn must return a number (higher is better), got "
                              f"{type(value).__name__}: {value!r:.80}") from None
    if not math.isfinite(number):
        raise EvaluationError(f"eval_fn returned {number} (not finite); it must return a "
                              "finite number, higher is better")
    return number


def _harm(row: LayerSensitivity) -> tuple[float, float]:
    """Sort key, most harmful first: the all-but-this gain, then the only-this SQNR."""
    gain = row.gain_db if row.gain_db >= GAIN_TOLERANCE_DB else 0.0  # NaN compares False: 0
    return -gain, row.only_sqnr


def _db(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:.1f}" if math.isfinite(x) else ("inf" if x > 0 else "-inf" if x < 0 else "nan")


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value
