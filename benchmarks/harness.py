"""Shared benchmark machinery: the System record, timing, memory, quality metrics, machine info.

Every system (torch fp32, ONNX Runtime, torch.ao, quantwise presets) is reduced to a `System`:
a `prepare` step that turns the common torch-form input into what the system consumes (done
outside the timed region, so ORT is not charged for tensor -> numpy conversion), and a `run` step
that is timed. The runner builds every system once, then times them interleaved.
"""

from __future__ import annotations

import ctypes
import datetime
import gc
import io
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

MEMORY_DEFINITION = (
    "peak MB: in-process peak resident memory (Linux VmHWM, reset via /proc/self/clear_refs) above "
    "a baseline, while the system's model is in memory and runs its first (cold) inference on the "
    "latency batch. Baseline: process RSS before the system was built (torch systems: the model "
    "copy/conversion counts as what it holds), or, for ONNX Runtime, RSS after the conversion and "
    "before the session loads the .onnx file. The conversion/calibration peak itself is excluded. "
    "Approximate: one process, shared allocator (gc + malloc_trim before each baseline), heavy "
    "libraries imported up front."
)


def identity(x: Any) -> Any:
    return x


@dataclass
class System:
    """One thing to benchmark. `run(prepare(x))` must return the model output for torch-form x."""

    name: str
    run: Callable[[Any], Any]
    prepare: Callable[[Any], Any] = identity
    load: Callable[[], None] | None = None  # read the artifact (ORT session); runner calls it
    size_bytes: int | None = None
    size_note: str = ""
    info: dict[str, Any] = field(default_factory=dict)

    def output(self, x: Any) -> torch.Tensor:
        return as_tensor(self.run(self.prepare(x)))


@dataclass
class Case:
    """One model and its fixed inputs, built once and shared by every system."""

    name: str
    description: str
    model: torch.nn.Module          # the fp32 reference, never modified (builders deep-copy it)
    latency_input: Any              # one batch in torch form: Tensor, tuple, or dict of kwargs
    quality_inputs: list[Any]       # full-size batches (the last one padded by repeating a row)
    quality_rows: int               # real rows across quality_inputs
    calib: list[Any]                # calibration batches, the same for every static method
    kind: str                       # "classifier" or "embedding"
    labels: torch.Tensor | None = None


def as_tensor(out: Any) -> torch.Tensor:
    """First output of a model or session as a float32 torch tensor [B, ...]."""
    if isinstance(out, (list, tuple)):
        out = out[0]
    if isinstance(out, np.ndarray):
        out = torch.from_numpy(out)
    if hasattr(out, "logits"):
        out = out.logits
    if hasattr(out, "dequantize") and getattr(out, "is_quantized", False):
        out = out.dequantize()
    return out.detach().float()


def call_torch(model: torch.nn.Module, x: Any) -> Any:
    """Call a torch model on a Tensor, a tuple of positional inputs, or a dict of keyword inputs."""
    if isinstance(x, dict):
        return model(**x)
    if isinstance(x, tuple):
        return model(*x)
    return model(x)


def torch_system(name: str, model: torch.nn.Module, **kw: Any) -> System:
    model.eval()

    def run(x: Any) -> Any:
        with torch.no_grad():
            return call_torch(model, x)

    return System(name, run, **kw)


def saved_bytes(save: Callable[[io.BytesIO], None]) -> int:
    buf = io.BytesIO()
    save(buf)
    return buf.tell()


# ---------------------------------------------------------------- memory (Linux /proc)

_LIBC = ctypes.CDLL("libc.so.6") if platform.system() == "Linux" else None


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def rss_mb() -> float:
    return _status_kb("VmRSS") / 1024.0


def peak_rss_mb() -> float:
    return _status_kb("VmHWM") / 1024.0


def settle_memory() -> None:
    """Free what is garbage and hand freed heap back to the OS, so RSS deltas mean something."""
    gc.collect()
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0). False where the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# ---------------------------------------------------------------- timing

MIN_BLOCK_S = 0.1  # a millisecond-scale system runs this long per block, so a block is not
                   # dominated by the first runs after another system held the cores


def time_interleaved(systems: list[System], inputs: list[Any], runs: int, rounds: int,
                     warmup: int, budget_s: float) -> list[dict[str, Any]]:
    """Median latency per system, measured in `rounds` blocks that cycle through the systems.

    Interleaving spreads the noise of a shared machine (bursts that slow everything 2-5x for a
    few seconds were seen here) over every system instead of charging it to whichever ran during
    the burst. Within a block the runs are back to back (the steady state a server sees); a short
    sleep between blocks lets the previous system's spinning worker threads (OpenMP, ORT's pool)
    go idle so they do not steal the two cores from the next one, and each block starts with one
    untimed run. Millisecond-scale systems run for at least MIN_BLOCK_S per block (more runs
    than asked: their medians were dominated by the first runs after a switch). A system whose runs so far say
    it would exceed `budget_s` gets fewer runs (at least 3); the count is recorded.
    """
    plans = []
    for s, x in zip(systems, inputs):
        first: list[float] = []
        plan: dict[str, Any] = {"times": []}
        try:
            for _ in range(max(1, warmup)):
                t0 = time.perf_counter()
                s.run(x)
                first.append(time.perf_counter() - t0)
        except Exception as exc:  # noqa: BLE001 - one system failing must not stop the others
            plan["error"] = f"during warm-up: {type(exc).__name__}: {exc}"[:600]
        plan.update(warmup_ms=[round(t * 1e3, 2) for t in first], estimate=min(first, default=0))
        plans.append(plan)
    for r in range(rounds):
        order = list(range(len(systems)))
        order = order[r % len(order):] + order[:r % len(order)]  # rotate who goes first
        for i in order:
            plan = plans[i]
            if "error" in plan:
                continue
            # re-estimate from the timed runs: a noisy warm-up must not cut a fast system's runs
            est = statistics.median(plan["times"]) if plan["times"] else plan["estimate"]
            target = runs if est * runs <= budget_s else max(3, int(budget_s / est))
            todo = max(0, -(-(target - len(plan["times"])) // (rounds - r)))  # ceil division
            if todo and est > 0:  # fast systems: fill at least MIN_BLOCK_S per block
                todo = max(todo, min(int(MIN_BLOCK_S / est), int(budget_s / rounds / est)))
            time.sleep(0.02)
            try:
                if todo:  # one untimed run: the caches and threads the previous system took
                    systems[i].run(inputs[i])
                for _ in range(todo):
                    t0 = time.perf_counter()
                    systems[i].run(inputs[i])
                    plan["times"].append(time.perf_counter() - t0)
            except Exception as exc:  # noqa: BLE001
                plan["error"] = f"during timing: {type(exc).__name__}: {exc}"[:600]
    out: list[dict[str, Any]] = []
    for plan in plans:
        t = plan["times"]
        if "error" in plan:
            out.append({"error": plan["error"], "warmup_ms": plan["warmup_ms"]})
            continue
        out.append({"latency_ms": statistics.median(t) * 1e3, "runs": len(t), "runs_requested": runs,
                    "latency_min_ms": min(t) * 1e3, "latency_max_ms": max(t) * 1e3,
                    "warmup_ms": plan["warmup_ms"],
                    "times_ms": [round(x * 1e3, 1) for x in t]})  # in run order, to see bursts
    return out


# ---------------------------------------------------------------- quality

def collect_outputs(system: System, batches: list[Any], rows: int,
                    budget_s: float) -> torch.Tensor:
    """Concatenated outputs over `batches`, cut to `rows` real rows (the last batch is padded).

    Stops early (at least one batch) when `budget_s` is spent, so one pathologically slow system
    cannot eat the whole run; the caller compares on however many rows came back.
    """
    outs, t0 = [], time.perf_counter()
    for b in batches:
        outs.append(system.output(b).flatten(1))
        if time.perf_counter() - t0 > budget_s:
            break
    return torch.cat(outs)[:rows]


def quality(out: torch.Tensor, ref: torch.Tensor, kind: str,
            labels: torch.Tensor | None = None) -> dict[str, Any]:
    """Relative error, per-row cosine, and top-1 agreement (classifier) or same nearest neighbour
    (embeddings), all against the fp32 torch outputs on the same inputs."""
    ref = ref[: len(out)]
    q: dict[str, Any] = {"rows": len(out)}
    if not torch.isfinite(out).all():
        q["nonfinite_outputs"] = int((~torch.isfinite(out)).sum())
        out = torch.nan_to_num(out)
    q["rel_err"] = float((out - ref).norm() / ref.norm().clamp_min(1e-30))
    cos = torch.nn.functional.cosine_similarity(out, ref, dim=1, eps=1e-12)
    q["cos_mean"], q["cos_min"] = float(cos.mean()), float(cos.min())
    if kind == "classifier":
        q["top1_agree"] = float((out.argmax(1) == ref.argmax(1)).float().mean())
        if labels is not None:
            q["accuracy"] = float((out.argmax(1) == labels[: len(out)]).float().mean())
    else:
        q["same_nn"] = float((_nearest(out) == _nearest(ref)).float().mean())
    return q


def _nearest(emb: torch.Tensor) -> torch.Tensor:
    """Index of each row's nearest other row by cosine similarity."""
    e = torch.nn.functional.normalize(emb, dim=1)
    sim = e @ e.T
    sim.fill_diagonal_(-float("inf"))
    return sim.argmax(1)


# ---------------------------------------------------------------- machine and versions

def machine_info() -> dict[str, Any]:
    cpu, flags = "unknown", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and cpu == "unknown":
                    cpu = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for mod in ("onnxruntime", "onnx", "onnxscript", "transformers", "numpy"):
        try:
            versions[mod] = __import__(mod).__version__
        except Exception as exc:  # noqa: BLE001 - a missing optional package is a fact to report
            versions[mod] = f"unavailable ({type(exc).__name__})"
    try:
        mem_gib = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError):
        mem_gib = None
    return {
        "cpu": cpu,
        "cores_online": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "isa": sorted(f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_int8",
                                  "avx512_fp16") if f in flags),
        "memory_gib": mem_gib,
        "loadavg_start": list(os.getloadavg()),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "versions": versions,
    }
