"""plan(): per-layer formats that meet an accuracy budget at the lowest size or measured latency.

    plan = quantwise.plan(model, calib_batches, eval_fn, max_drop="1%", objective="size")
    print(plan)                                   # budget, size, latency, formats, Pareto front
    qmodel = quantwise.quantize(model, plan.config, calib_batches)   # the same model, exactly
    plan.config.save("plan.yaml")

Every candidate is the REAL converted model (quantize with a Config of exact-name rules), scored
by eval_fn and by its saved checkpoint bytes or measured latency. Search: a per-layer proxy noise
table (sensitivity's SQNR proxy, one prepare + calibrate per format), step up the ranked layers
(gallop, then bisect; re-rank from the new state when a whole rung is not enough), then push
single layers back down while the budget holds (ARCHITECTURE.md, "Planning").
"""

from __future__ import annotations

import copy
import math
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from quantwise.config import Config, LayerConfig, Rule
from quantwise.errors import ConfigError, EvaluationError
from quantwise.evaluate import float_checkpoint_bytes, folder_bytes, median_latency_ms
from quantwise.kernels.probe import isa_label
from quantwise.io import save
from quantwise.modules import float_weight, is_supported, unsupported_reason
from quantwise.planresult import Candidate, Plan, mark_pareto
from quantwise.sensitivity import (OutputProxy, calibrator_ranges, metric_value,
                                   watch_calibrators)
from quantwise.state import get_state
from quantwise.workflow import (calibrate, nonempty, observed_layers, prepare, quantize,
                                run_model)

# format -> preset whose layer config it uses (None: float). Ascending precision order.
FORMATS: dict[str, str | None] = {"int4": "w4", "int8": "w8a8", "int8-dynamic": "w8a8-dynamic",
                                  "int8-weight": "w8", "bf16": "bf16", "fp16": "fp16", "fp32": None}
_PRECISION = {name: i for i, name in enumerate(FORMATS)}
_BYTES_PER_WEIGHT = {"int4": 0.5 + 4 / 128, "int8": 1, "int8-dynamic": 1, "int8-weight": 1,
                     "bf16": 2, "fp16": 2, "fp32": 4}
OBJECTIVES = ("size", "latency")
LATENCY_MARGIN = 0.01  # a push-down must be 1% faster to count (median latency noise)
NEAR_FLOAT = 0.05  # a latency plan this close to fp32 is re-timed against it run for run
CEILING_CHECK = 0.15  # the fastest uniform format this close to fp32: timed against it first


def plan(model: nn.Module, calib_data: Iterable[Any], eval_fn: Callable[[nn.Module], float],
         max_drop: float | str, *, formats: Iterable[str] = ("int4", "int8", "int8-dynamic", "fp16", "fp32"),
         objective: str = "size", eval_data: Iterable[Any] | None = None, latency_input: Any = None,
         max_evaluations: int = 40, proxy_batches: int = 1, progress: bool = True) -> Plan:
    """Choose a format per layer so that eval_fn(quantized) >= eval_fn(model) - max_drop and the
    saved checkpoint ("size") or the measured median latency ("latency") is as low as found.

    eval_fn(model) -> float, higher is better, called on real converted models (and once on
    `model`); max_drop: absolute (0.01) or relative to the fp32 metric ("1%"); eval_data: inputs
    for the proxy ranking (default calib_data, first `proxy_batches` batches); latency_input:
    one model input (default: the first calibration batch). max_evaluations caps eval_fn calls.
    """
    return _Planner(model, calib_data, eval_fn, max_drop, formats, objective, eval_data,
                    latency_input, max_evaluations, proxy_batches, progress).run()


def parse_max_drop(max_drop: Any, fp32_metric: float | None = None) -> tuple[float, bool]:
    """(value, relative): 0.01 -> (0.01, False); "1%" -> (0.01, True). Errors are ConfigError."""
    relative = isinstance(max_drop, str) and max_drop.strip().endswith("%")
    text = max_drop.strip().removesuffix("%") if isinstance(max_drop, str) else max_drop
    try:
        if isinstance(text, bool):
            raise TypeError
        value = float(text)
    except (TypeError, ValueError):
        raise ConfigError(f"max_drop must be a number (absolute drop of the metric) or a string "
                          f"like '1%' (relative to the fp32 metric), got {max_drop!r}") from None
    if not math.isfinite(value) or value < 0:
        raise ConfigError(f"max_drop must be finite and >= 0, got {max_drop!r}")
    if relative:
        value /= 100.0
        if fp32_metric is not None:
            return value * abs(fp32_metric), True
    return value, relative


def _exact(name: str) -> str:
    """An fnmatch pattern that matches exactly `name`."""
    return "".join(f"[{ch}]" if ch in "*?[" else ch for ch in name)


def plannable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The layers a config can quantize (outermost supported modules, as prepare() wraps them)."""
    out, seen = {}, []
    for name, module in model.named_modules():
        if name and is_supported(module) and not any(name.startswith(p + ".") for p in seen):
            seen.append(name)
            out.update({name: module} if unsupported_reason(module) is None else {})
    return out


class _Planner:
    def __init__(self, model, calib_data, eval_fn, max_drop, formats, objective, eval_data,
                 latency_input, max_evaluations, proxy_batches, progress) -> None:
        self.start = time.perf_counter()
        if not callable(eval_fn):
            raise EvaluationError(f"eval_fn must be a callable model -> float (higher is better), "
                                  f"got {type(eval_fn).__name__}")
        parse_max_drop(max_drop)  # fail before any work
        formats = [formats] if isinstance(formats, str) else list(formats)
        unknown = [f for f in formats if f not in FORMATS]
        if not formats or unknown:
            raise ConfigError(f"unknown format(s) {unknown or formats!r}; valid: {', '.join(FORMATS)}")
        if objective not in OBJECTIVES:
            raise ConfigError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
        for what, value, low in (("max_evaluations", max_evaluations, 2), ("proxy_batches", proxy_batches, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"{what} must be an integer >= {low}, got {value!r}")
        self.calib = list(nonempty(calib_data))
        source = self.calib if eval_data is None else list(nonempty(eval_data, "evaluation data"))
        self.proxy_data = source[:proxy_batches]
        self.latency_input = self.calib[0] if latency_input is None else latency_input
        self.model, self.eval_fn, self.max_drop_arg = model, eval_fn, max_drop
        self.formats = sorted(set(formats), key=_PRECISION.get)
        self.objective, self.cap, self.progress = objective, max_evaluations, progress
        self.layers = plannable_layers(model)
        if not self.layers:
            raise ConfigError("the model has no layer quantwise can quantize (Linear, Conv1d/2d, "
                              "ConvTranspose2d, Embedding), so there is nothing to plan")
        self.evaluations = 0
        self.front: list[Candidate] = []
        self.cache: dict[tuple, Candidate] = {}
        self.noise: dict[str, dict[str, float]] = {}  # format -> layer -> proxy noise power
        self.calibrators: dict[str, str] = {}  # static int8 layer -> calibrator with least noise
        self.presets: dict[str, Config] = {}
        self.float_reason = ""  # why a latency plan kept the model float before searching

    # -- evaluation ------------------------------------------------------------------------------
    def log(self, text: str) -> None:
        if self.progress:
            print(f"[plan {time.perf_counter() - self.start:6.1f}s] {text}", file=sys.stderr, flush=True)

    def score(self, model: nn.Module) -> float:
        value = self.eval_fn(model)
        self.evaluations += 1
        return metric_value(value)

    def config_for(self, fmts: dict[str, str], name: str = "plan") -> Config:
        rules, exclude, base = [], [], LayerConfig().to_dict()
        for layer, fmt in fmts.items():
            if FORMATS[fmt] is None:
                exclude.append(_exact(layer))
                continue
            preset = self.presets.setdefault(fmt, Config.preset(FORMATS[fmt]))
            lc, _ = preset.layer_config(layer, type(self.layers[layer]).__name__)
            overrides = {k: v for k, v in lc.to_dict().items() if v != base[k]}
            if fmt == "int8" and layer in self.calibrators:  # static inputs: the best range
                overrides["calibrator"] = self.calibrators[layer]
            rules.append(Rule(_exact(layer), overrides=overrides))
        return Config(LayerConfig(), rules, exclude, name=name)

    def quantized(self, fmts: dict[str, str], fuse: bool = True) -> tuple[Config, nn.Module]:
        config = self.config_for(fmts)
        return config, quantize(self.model, config, self.calib, progress=False, fuse=fuse)

    def evaluate(self, fmts: dict[str, str], label: str) -> Candidate:
        key = tuple(fmts[n] for n in self.layers)
        if key in self.cache:
            return self.cache[key]
        config, qmodel = self.quantized(fmts)
        metric = self.score(qmodel)
        with tempfile.TemporaryDirectory() as tmp:
            size = folder_bytes(save(qmodel, Path(tmp) / "plan"))
        latency = median_latency_ms(qmodel, self.latency_input, 2, 9) if self.objective == "latency" else None
        cand = Candidate(label, dict(fmts), config, metric, size, latency, metric >= self.target)
        self.cache[key] = cand
        self.front.append(cand)
        self.log(f"#{self.evaluations} {label}: metric {metric:.6g} ({'ok' if cand.met else 'over'}), "
                 f"{size / self.fp32_bytes:.3f}x" + ("" if latency is None else f", {latency:.1f} ms"))
        return cand

    def left(self) -> bool:
        return self.evaluations < self.cap

    def cost(self, cand: Candidate) -> float:
        return cand.size_bytes if self.objective == "size" else cand.latency_ms

    def fmts(self, state: dict[str, int]) -> dict[str, str]:
        return {n: self.ladder[level] for n, level in state.items()}

    # -- proxy table and per-layer cost model -----------------------------------------------------
    def noise_of(self, fmt: str) -> dict[str, float]:
        """Output noise power / signal power with only each layer in `fmt` (one calibration)."""
        if fmt not in self.noise and FORMATS[fmt] is None:
            self.noise[fmt] = {n: 0.0 for n in self.layers}
        if fmt not in self.noise:
            t0 = time.perf_counter()
            prepared = prepare(self.model, self.config_for({n: fmt for n in self.layers}))
            layers = observed_layers(prepared)
            if any(obs.calibrator is not None for obs in layers):
                for obs in layers:
                    if obs.calibrator is not None:
                        watch_calibrators(obs)  # every calibrator's range from this calibration
                calibrate(prepared, self.calib, progress=False)
            table = {n: 0.0 for n in self.layers}
            prepared.eval()  # a throwaway copy: no flags to restore
            with torch.no_grad():
                proxy = OutputProxy(prepared, self.proxy_data, layers)
                for obs in layers:
                    cal = obs.calibrator
                    if cal is not None:
                        if obs.calls == 0 or cal.num_seen == cal.num_nonfinite:
                            continue  # quantize() keeps it float: no noise
                        obs.input_range = cal.compute_range()
                    sqnr = proxy.sqnr({obs: "fake"}, "float")
                    if cal is not None and fmt == "int8":  # choose this layer's calibrator
                        sqnr = self._best_calibrator(obs, proxy, sqnr)
                    table[obs.qname] = 10.0 ** (-sqnr / 10.0) if not math.isnan(sqnr) else 1.0
                    obs.clear_cache()
            self.noise[fmt] = table
            self.log(f"proxy table for {fmt}: {proxy.forwards} forwards, {time.perf_counter() - t0:.1f} s")
        return self.noise[fmt]

    def _best_calibrator(self, obs, proxy: OutputProxy, configured_sqnr: float) -> float:
        """Try every calibrator's input range on this layer alone; keep the least noisy."""
        configured = obs.layer_config.calibrator
        best, best_sqnr = configured, configured_sqnr
        for name, rng in calibrator_ranges(obs).items():
            if name == configured:
                continue
            obs.input_range = rng
            sqnr = proxy.sqnr({obs: "fake"}, "float")
            if sqnr > best_sqnr + 0.1:  # 0.1 dB: a real improvement, not noise
                best, best_sqnr = name, sqnr
        self.calibrators[obs.qname] = best
        return best_sqnr

    def layer_costs(self) -> dict[str, dict[str, float]]:
        """Estimated cost per layer and format: weight bytes (size) or a latency share (latency)."""
        if self.objective == "size":
            return {n: {f: m.weight.numel() * _BYTES_PER_WEIGHT[f] for f in self.formats}
                    for n, m in self.layers.items()}
        macs: dict[str, float] = {}
        copy_ = self.fp32_copy
        hooks = [copy_.get_submodule(n).register_forward_hook(
            lambda mod, args, out, n=n: macs.__setitem__(n, 0.0 if isinstance(mod, nn.Embedding)
                                                         else mod.weight.numel() / float_weight(mod).shape[0] * out.numel()))
                 for n in self.layers]
        with torch.no_grad():
            run_model(copy_, self.latency_input)
        for h in hooks:
            h.remove()
        total = sum(macs.values()) or 1.0
        return {n: {f: self.format_latency[f] * macs.get(n, 0.0) / total for f in self.formats}
                for n in self.layers}

    def ladder_for(self, costs: dict[str, float]) -> list[str]:
        """Formats from cheapest up, each more precise than the one before (a Pareto chain)."""
        ladder: list[str] = []
        for fmt in sorted(self.formats, key=lambda f: (costs[f], -_PRECISION[f])):
            if not ladder or _PRECISION[fmt] > _PRECISION[ladder[-1]]:
                ladder.append(fmt)
        return ladder

    # -- the search ------------------------------------------------------------------------------
    def run(self) -> Plan:
        self.fp32_bytes = float_checkpoint_bytes(self.model)
        self.fp32_metric = self.score(self.model)
        self.max_drop, _ = parse_max_drop(self.max_drop_arg, self.fp32_metric)
        self.target = self.fp32_metric - self.max_drop
        self.log(f"fp32 metric {self.fp32_metric:.6g}; target >= {self.target:.6g}")
        self.fp32_copy = copy.deepcopy(self.model).eval()
        self.fp32_latency = None
        self.format_latency: dict[str, float] = {}
        if self.objective == "latency":
            self.fp32_latency = median_latency_ms(self.fp32_copy, self.latency_input, 2, 9)
            fastest = None  # the fastest uniform quantized model (no_gain_possible times it)
            for fmt in self.formats:
                if FORMATS[fmt] is None:
                    self.format_latency[fmt] = self.fp32_latency
                    continue
                _, qmodel = self.quantized({n: fmt for n in self.layers})
                self.format_latency[fmt] = median_latency_ms(qmodel, self.latency_input, 1, 5)
                self._fused_blocks(fmt, qmodel)
                if self.format_latency[fmt] == min(self.format_latency.values()):
                    fastest = qmodel
                del qmodel
            self.log("uniform latency (ms): " + ", ".join(f"{f} {v:.1f}" for f, v in self.format_latency.items()))
            self.ladder = self.ladder_for(self.format_latency)
            if self.no_gain_possible(fastest):
                return self.keep_float()
            del fastest
        else:
            self.ladder = self.ladder_for(_BYTES_PER_WEIGHT)
        self.log("precision ladder: " + " -> ".join(self.ladder))
        if "int8" in self.ladder:
            self.noise_of("int8")  # picks each static layer's calibrator before any candidate
        self.costs = self.layer_costs()
        state = {n: 0 for n in self.layers}
        current = self.evaluate(self.fmts(state), f"all {self.ladder[0]}")
        state = self.step_up(state, current)
        if state is not None:
            self.push_down(state)
        return self.finish()

    def _fused_blocks(self, fmt: str, qmodel: nn.Module) -> None:
        """Latency: the encoder fast path fuses a BERT-style block only while all its Linears are
        per-token int8, so moving one of them off `fmt` also costs the block's fusion gain,
        measured once as (unfused - fused) latency / number of fused blocks."""
        report = get_state(qmodel).encoder
        if report is None or not report.layers:
            return
        _, unfused = self.quantized({n: fmt for n in self.layers}, fuse=False)
        gain = median_latency_ms(unfused, self.latency_input, 1, 5) - self.format_latency[fmt]
        self.block_penalty = (fmt, max(gain, 0.0) / len(report.layers))
        self.blocks = {block: [n for n in self.layers if n.startswith(block + ".")]
                       for block in report.layers}
        self.log(f"encoder fast path: {len(self.blocks)} fused blocks under {fmt}, "
                 f"{self.block_penalty[1]:.1f} ms each")

    def _penalty(self, n: str, state: dict[str, int]) -> float:
        """Extra latency of moving `n` up: its block's fusion gain if the block is still whole."""
        fmt, ms = getattr(self, "block_penalty", (None, 0.0))
        for members in getattr(self, "blocks", {}).values():
            if n in members and all(self.ladder[state[m]] == fmt for m in members):
                return ms
        return 0.0

    def up_moves(self, state: dict[str, int]) -> list[str]:
        """Layers that can go one step up, most proxy noise removed per unit of cost first."""
        scored = []
        for n, level in state.items():
            if level + 1 < len(self.ladder):
                lo, hi = self.ladder[level], self.ladder[level + 1]
                gain = max(self.noise_of(lo)[n] - self.noise_of(hi)[n], 0.0)
                extra = max(self.costs[n][hi] - self.costs[n][lo] + self._penalty(n, state), 1e-9)
                scored.append((-gain / extra, -gain, n))
        return [n for *_, n in sorted(scored)]

    def step_up(self, state: dict[str, int], current: Candidate) -> dict[str, int] | None:
        """Gallop then bisect over the ranked moves; a whole level short: apply it and re-rank.

        With more than two moves the whole level is tried first: when it is not enough (MiniLM
        at max_drop 0.002: all int8-dynamic is short), one evaluation replaces a gallop of
        log2(moves) + 1 to find it out (6 of 18 evaluations of that plan). When it is enough it
        bounds the gallop; a level that takes every layer to fp32 meets any budget unevaluated."""
        rounds = 0
        while not current.met and self.left():
            moves, rounds = self.up_moves(state), rounds + 1
            if not moves:
                return None
            n = len(moves)
            def apply(k, moves=moves, state=state):
                return {name: lvl + (name in moves[:k]) for name, lvl in state.items()}
            def label(k, rounds=rounds):
                return f"round {rounds}: top {k} layer(s) one step up"
            lo, hi, k = 0, None, 1
            if n > 2:
                if all(FORMATS[f] is None for f in self.fmts(apply(n)).values()):
                    hi = n  # the float model
                else:
                    cand = self.evaluate(self.fmts(apply(n)), label(n))
                    if not cand.met:
                        state, current = apply(n), cand  # not enough: re-rank there
                        continue
                    hi = n
            while self.left() and k < (hi or n + 1):
                cand = self.evaluate(self.fmts(apply(k)), label(k))
                if cand.met:
                    hi = k
                    break
                lo = k
                if k == n:
                    break
                k = min(2 * k, n)
            if hi is None:
                if lo < n:
                    return None  # out of evaluations
                state, current = apply(lo), cand  # a whole level was not enough: re-rank there
                continue
            while hi - lo > 1 and self.left():
                mid = (lo + hi) // 2
                if self.evaluate(self.fmts(apply(mid)), label(mid)).met:
                    hi = mid
                else:
                    lo = mid
            return apply(hi)
        return state if current.met else None

    def push_down(self, state: dict[str, int]) -> None:
        """Greedy: move single layers one step down while the budget holds and the cost drops."""
        # (evaluated unless step_up chose the float model without evaluating it)
        current = self.evaluate(self.fmts(state), "all fp32")
        changed = True
        while changed and self.left():
            changed = False
            order = []
            for n, level in state.items():
                if level == 0:
                    continue
                lo, hi = self.ladder[level - 1], self.ladder[level]
                # moving the last odd member of a block back restores the block's fusion too
                saving = (self.costs[n][hi] - self.costs[n][lo]
                          + self._penalty(n, {**state, n: level - 1}))
                if saving <= 1e-9 * (1 + abs(self.costs[n][hi])):
                    continue  # nothing to win (e.g. an embedding's latency)
                if self.objective == "latency" and saving < LATENCY_MARGIN * self.cost(current):
                    # estimated below the margin a trial must beat: measuring it cannot pay
                    # (AVX2-only CPUs, where int8 is about as fast as float32: 13 such trials
                    # took 290 s of a MiniLM plan and none was taken)
                    continue
                harm = max(self.noise_of(lo)[n] - self.noise_of(hi)[n], 0.0)
                order.append((-saving / (harm + 1e-12), n))
            for _, n in sorted(order):
                if not self.left():
                    break
                trial = {**state, n: state[n] - 1}
                cand = self.evaluate(self.fmts(trial), f"{n} down to {self.ladder[trial[n]]}")
                margin = 1.0 if self.objective == "size" else 1.0 - LATENCY_MARGIN
                if cand.met and self.cost(cand) < self.cost(current) * margin:
                    state, current, changed = trial, cand, True

    def no_gain_possible(self, fastest: nn.Module | None) -> bool:
        """Whether even the whole model in the fastest format (the lower bound of every plan's
        latency under the per-layer cost model: every layer at its cheapest, every encoder block
        fused) fails to beat fp32 by LATENCY_MARGIN, timed run for run. Asked only when the
        uniform medians put them within CEILING_CHECK: on AVX2-only CPUs, where int8 runs at
        float32 speed, a MiniLM search spent 609 s to end at fp32 (separate medians had put
        int8 6.6% ahead; run for run the plan it found was 1.8% slower)."""
        cheapest = self.ladder[0]
        if FORMATS[cheapest] is None or (self.format_latency[cheapest]
                                         < self.fp32_latency * (1 - CEILING_CHECK)):
            return False
        if self.beats_float({n: cheapest for n in self.layers}, model=fastest):
            return False
        self.float_reason = (f"the whole model in {cheapest}, the fastest format here, did not "
                             f"measure {LATENCY_MARGIN:.0%} faster than fp32 run for run on this "
                             f"CPU ({isa_label()}), so no mix of formats can: the plan keeps the "
                             f"model float")
        return True

    def keep_float(self) -> Plan:
        self.evaluate({n: "fp32" for n in self.layers}, "all fp32")
        return self.finish()

    def beats_float(self, layers: dict[str, str], warmup: int = 2, rounds: int = 9,
                    model: nn.Module | None = None) -> bool:
        """Whether the plan `layers` (already quantized: `model`) is LATENCY_MARGIN faster than
        the float model, timed alternately (one run of each per round, so load on the machine
        falls on both alike)."""
        qmodel = self.quantized(layers)[1] if model is None else model
        times: dict[bool, list[float]] = {True: [], False: []}
        for i in range(warmup + rounds):
            for quantized, model in ((True, qmodel), (False, self.fp32_copy)):
                ms = median_latency_ms(model, self.latency_input, 0, 1)
                if i >= warmup:
                    times[quantized].append(ms)
        q, f = (sorted(times[k])[rounds // 2] for k in (True, False))
        self.log(f"run for run vs fp32: {q:.1f} vs {f:.1f} ms")
        return q < f * (1 - LATENCY_MARGIN)

    def finish(self) -> Plan:
        mark_pareto(self.front)
        met = [c for c in self.front if c.met]
        if met:
            best = min(met, key=lambda c: (self.cost(c), -c.metric))
            message = (self.float_reason if self.left() else
                       f"stopped at max_evaluations={self.cap}; more evaluations may find a "
                       f"{'smaller' if self.objective == 'size' else 'faster'} plan")
        else:
            best = max(self.front, key=lambda c: (c.metric, -self.cost(c)))
            message = (f"no candidate meets the budget: best metric {best.metric:.6g} < target "
                       f"{self.target:.6g} after {self.evaluations} evaluations; raise "
                       f"max_evaluations, allow higher-precision formats ('fp16', 'fp32'), or "
                       f"relax max_drop")
        if (met and self.objective == "latency" and self.fp32_latency is not None
                and any(f != "fp32" for f in best.layers.values())
                and best.latency_ms > self.fp32_latency * (1 - NEAR_FLOAT)
                and not self.beats_float(best.layers)):
            # never slower than float: on CPUs whose int8 kernels gain nothing (AVX2 without
            # VNNI) a quantized plan is within noise of the float model, and separate medians
            # can rank them either way
            fp = self.evaluate({n: "fp32" for n in self.layers}, "all fp32")
            if fp.met:
                best = fp
                message = (f"no quantized plan measured {LATENCY_MARGIN:.0%} faster than fp32 on "
                           f"this CPU ({isa_label()}) run for run: the plan keeps the model float")
        latency = best.latency_ms
        if latency is None:  # size objective: measure the chosen model once
            _, qmodel = self.quantized(best.layers)
            latency = median_latency_ms(qmodel, self.latency_input)
        return Plan(best.config, dict(best.layers), best.metric, self.fp32_metric, self.max_drop,
                    self.objective, best.size_bytes, self.fp32_bytes, latency, bool(met), self.front,
                    self.evaluations, time.perf_counter() - self.start, message,
                    self.fp32_latency, dict(self.format_latency))
