"""One command for the whole benchmark:

    python benchmarks/run.py [--models resnet18,minilm,digits] [--runs 15] [--out benchmarks/results]

Per model: build the inputs once; build every system (torch fp32, ORT fp32, each quantwise preset,
ORT static/dynamic, torch.ao static/dynamic) in this one process with the same thread settings;
time them interleaved; compare each one's outputs with fp32 torch on the same inputs. Writes
results.json and results.md into --out and prints the Markdown.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import sys
import tempfile
import time
import traceback
import types
import warnings
from collections import Counter
from functools import partial
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # sibling modules, whatever the current directory is

import torch  # noqa: E402

import anchors  # noqa: E402
import cases as cases_mod  # noqa: E402  (imports quantwise lazily, inside the case builders)
import harness  # noqa: E402
import report  # noqa: E402
import resnet18  # noqa: E402
from harness import Case, System, torch_system  # noqa: E402

PRESETS = ("w8a8", "w8a8-dynamic", "w8", "w4", "fp16", "bf16")


def import_quantwise() -> dict[str, Any]:
    """Import quantwise; if the package itself is broken (e.g. a subpackage being written right
    now), install a bare package object so its model and data helpers, which need only
    quantwise.errors, still load. The anchors then still run and every preset row says why not."""
    try:
        import quantwise

        return {"importable": True, "version": quantwise.__version__, "error": None}
    except Exception as exc:  # noqa: BLE001 - any failure is reported, the anchors still run
        error = f"{type(exc).__name__}: {exc}"
        src = HERE.parent / "src" / "quantwise"
        stub = types.ModuleType("quantwise")
        stub.__path__ = [str(src)]
        stub.__file__ = str(src / "__init__.py")
        sys.modules["quantwise"] = stub
        return {"importable": False, "version": None, "error": error}


# ---------------------------------------------------------------- system builders

def torch_fp32(case: Case, ctx: dict[str, Any]) -> System:
    import safetensors.torch

    model = copy.deepcopy(case.model).eval()
    path = ctx["tmp"] / f"{case.name}_fp32.safetensors"
    safetensors.torch.save_model(model, str(path))
    ctx["fp32_bytes"] = path.stat().st_size
    return torch_system("torch fp32", model, size_bytes=path.stat().st_size,
                        size_note="safetensors")


def quantwise_preset(preset: str, case: Case, ctx: dict[str, Any]) -> System:
    if not ctx["quantwise"]["importable"]:
        raise RuntimeError(f"quantwise not importable: {ctx['quantwise']['error']}")
    import quantwise
    from quantwise.evaluate import folder_bytes

    qmodel = quantwise.quantize(copy.deepcopy(case.model), preset, case.calib, progress=False)
    folder = ctx["tmp"] / "quantwise" / f"{case.name}-{preset}"
    quantwise.save(qmodel, folder)
    summary = quantwise.summary(qmodel)
    info = layer_counts(summary.rows)
    if summary.graph.startswith("int8 graph path: ") and "not applied" not in summary.graph:
        info["int8_graph"] = summary.graph.removeprefix("int8 graph path: ")
    return torch_system(f"quantwise {preset}", qmodel, size_bytes=folder_bytes(folder),
                        size_note="quantwise.save folder", info=info)


def quantwise_onnx(preset: str, case: Case, ctx: dict[str, Any], runtime: str = "ort") -> System:
    """The quantwise model exported as an ONNX QDQ graph (quantwise.export), run by ONNX Runtime."""
    if not ctx["quantwise"]["importable"]:
        raise RuntimeError(f"quantwise not importable: {ctx['quantwise']['error']}")
    import quantwise
    from quantwise.export import export_onnx

    qmodel = quantwise.quantize(copy.deepcopy(case.model), preset, case.calib, progress=False)
    path = ctx["tmp"] / "quantwise" / f"{case.name}-{preset}.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    result = export_onnx(qmodel, case.latency_input, path, overwrite=True)
    info = {"exported_layers": len(result.layers)}
    if result.notes:
        info["exported_in_float"] = len(result.notes)
    if runtime == "openvino":  # the same exported int8 graph, run by OpenVINO's CPU plugin
        return anchors.ov_system(f"quantwise {preset} -> OpenVINO", path, **info)
    return anchors.ort_system(f"quantwise {preset} -> ORT", path, ctx["tmp"], **info)


def layer_counts(rows: list[Any]) -> dict[str, Any]:
    """Sort quantwise's summary rows into: a real low-precision kernel; a fallback (quantized on
    paper but the kernel is the float32 simulation, or the reason says it fell back); kept float
    (status "float", e.g. LayerNorm); folded away (BatchNorm merged into its conv, runs nothing)."""
    def category(r: Any) -> str:
        reason, kernel = (r.reason or "").lower(), (r.kernel or "").lower()
        if r.status == "folded":
            return "folded"
        if r.status != "quantized":
            return "float"
        if kernel.startswith("float32 simulation") or "fallback" in reason or "fell back" in reason:
            return "fallback"
        return "real_kernel"

    cats = [category(r) for r in rows]
    out: dict[str, Any] = {k: cats.count(k) for k in ("real_kernel", "fallback", "float", "folded")}
    out["layers"] = len(rows) - out["folded"]  # layers that still run something
    out["kernels"] = dict(Counter(r.kernel for r, c in zip(rows, cats) if c == "real_kernel"))
    for cat in ("fallback", "float"):
        reasons = Counter((r.reason or r.status)[:160] for r, c in zip(rows, cats) if c == cat)
        out[f"{cat}_reasons"] = dict(reasons.most_common(4))
    return out


# Presets that only make sense for some models (SmoothQuant needs transformer layers).
MODEL_PRESETS = {"minilm": ("w8a8-smoothquant", "w8a8-dynamic-smoothquant")}


def builders(args: argparse.Namespace, model: str = "") -> list[tuple[str, Any]]:
    rows = [("torch fp32", torch_fp32), anchors.BUILDERS[0]]
    presets = list(args.presets) + [p for p in MODEL_PRESETS.get(model, ()) if args.model_presets]
    rows += [(f"quantwise {p}", partial(quantwise_preset, p)) for p in presets]
    rows += [(f"quantwise {p} -> ORT", partial(quantwise_onnx, p)) for p in args.onnx_presets]
    rows += [(f"quantwise {p} -> OpenVINO", partial(quantwise_onnx, p, runtime="openvino"))
             for p in args.onnx_presets]
    rows += anchors.BUILDERS[1:] + [("OpenVINO fp32", anchors.ov_fp32),
                                    ("NNCF + OpenVINO int8", anchors.nncf_openvino)]
    if args.systems:  # development filter; the two fp32 references always run (ratios need them)
        keep = [s.strip() for s in args.systems.split(",")]
        rows = [r for r in rows if r[0] in ("torch fp32", "ORT fp32") or any(k in r[0] for k in keep)]
    return rows


# ---------------------------------------------------------------- one model

def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def bench_case(case: Case, args: argparse.Namespace, ctx: dict[str, Any]) -> dict[str, Any]:
    ref = cases_mod.reference_outputs(case)
    systems, natives, rows = [], [], []
    for name, build in builders(args, case.name):
        row: dict[str, Any] = {"system": name}
        rows.append(row)
        try:
            system, native = build_one(build, case, ctx, row)
        except Exception as exc:  # noqa: BLE001 - a failing system is a result, not a crash
            row["error"] = f"{type(exc).__name__}: {exc}"[:600]
            row["traceback_tail"] = traceback.format_exc().strip().splitlines()[-4:]
            log(f"{case.name}: {name} FAILED: {row['error'][:200]}")
            continue
        row.update(size_bytes=system.size_bytes, size_note=system.size_note, info=system.info)
        systems.append(system)
        natives.append(native)
        row["_index"] = len(systems) - 1
        log(f"{case.name}: built {name} in {row['build_s']}s")

    log(f"{case.name}: timing {len(systems)} systems")
    timings = harness.time_interleaved(systems, natives, args.runs, args.rounds, args.warmup,
                                       args.system_budget)
    for row in rows:
        if "_index" not in row:
            continue
        i = row.pop("_index")
        row.update(timings[i])
        if "error" in row:
            log(f"{case.name}: {row['system']} FAILED {row['error'][:200]}")
            continue
        try:
            out = harness.collect_outputs(systems[i], case.quality_inputs, case.quality_rows,
                                          args.quality_budget)
            row["quality"] = harness.quality(out, ref, case.kind, case.labels)
        except Exception as exc:  # noqa: BLE001
            row["quality_error"] = f"{type(exc).__name__}: {exc}"[:400]
    _ratios(rows, ctx.get("fp32_bytes"))
    ref_acc = None
    if case.labels is not None:
        ref_acc = float((ref.argmax(1) == case.labels).float().mean())
    del systems, natives
    harness.settle_memory()
    return {"description": case.description, "fp32_accuracy": ref_acc, "systems": rows}


def build_one(build: Any, case: Case, ctx: dict[str, Any], row: dict[str, Any]) -> tuple[System, Any]:
    """Build (convert/calibrate), load, and run once, measuring memory around it (see harness)."""
    harness.settle_memory()
    base = harness.rss_mb()
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        logging.disable(logging.WARNING)  # ORT's quantizer logs advice through the root logger
        try:
            system = build(case, ctx)
        finally:
            logging.disable(logging.NOTSET)
    row["build_s"] = round(time.perf_counter() - t0, 2)
    # keep what the tool itself said (quantwise fallback warnings matter); drop torch.ao's
    # deprecation notices, which repeat on every call
    said = {f"{w.category.__name__}: {w.message}"[:200] for w in caught
            if not issubclass(w.category, (DeprecationWarning, FutureWarning))}
    if said:
        row["warnings"] = sorted(said)[:6]
    harness.settle_memory()
    if system.load is not None:  # ORT: measure the file's load, not the conversion's leftovers
        base = harness.rss_mb()
        harness.reset_peak()
        system.load()
    native = system.prepare(case.latency_input)
    harness.settle_memory()
    row["held_mem_mb"] = round(harness.rss_mb() - base, 1)
    if system.load is None:
        harness.reset_peak()
    system.run(native)  # first, cold inference: lazy allocations and weight packing happen here
    row["peak_mem_mb"] = round(harness.peak_rss_mb() - base, 1)
    return system, native


def preimport() -> None:
    """Import every heavy library before the first memory baseline, so no system is charged
    for an import that happened to occur during its build."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        import onnxruntime.quantization  # noqa: F401
        import onnxruntime.quantization.shape_inference  # noqa: F401
        import safetensors.torch  # noqa: F401
        import torch.ao.quantization.quantize_fx  # noqa: F401
        import torch.onnx  # noqa: F401
        try:
            import onnxscript  # noqa: F401
            import torch.onnx._internal.exporter._core  # noqa: F401
        except ImportError:
            pass  # the ORT fp32 row will say the exporter needs onnxscript


def _ratios(rows: list[dict[str, Any]], fp32_bytes: int | None) -> None:
    """speedup_vs_X = X's median latency / this system's (above 1 means faster than X)."""
    lat = {r["system"]: r.get("latency_ms") for r in rows}
    for r in rows:
        for ref, key in (("ORT fp32", "speedup_vs_ort_fp32"), ("torch fp32", "speedup_vs_torch_fp32")):
            if r.get("latency_ms") and lat.get(ref):
                r[key] = round(lat[ref] / r["latency_ms"], 3)
        if r.get("size_bytes") and fp32_bytes:
            r["size_vs_fp32"] = round(r["size_bytes"] / fp32_bytes, 4)


# ---------------------------------------------------------------- main

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="resnet18,minilm,digits")
    p.add_argument("--runs", type=int, default=15, help="timed runs per system (median reported)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved blocks the runs are split into")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=2, help="torch threads = ORT intra-op threads")
    p.add_argument("--presets", default=",".join(PRESETS), help="quantwise presets to run")
    p.add_argument("--no-model-presets", dest="model_presets", action="store_false",
                   help="skip the per-model presets (w8a8-smoothquant on MiniLM)")
    p.add_argument("--onnx-presets", default="w8a8,w8a8-dynamic",
                   help="quantwise presets exported to ONNX (quantwise.export) and run by ONNX Runtime")
    p.add_argument("--systems", default="", help="only systems whose name contains one of these")
    p.add_argument("--system-budget", type=float, default=30.0,
                   help="seconds of timed runs per system before its run count is cut (min 3)")
    p.add_argument("--quality-budget", type=float, default=60.0,
                   help="seconds per system for the quality pass before it stops early")
    p.add_argument("--resnet-init", default="default", choices=resnet18.INITS,
                   help="ResNet-18 random weights: 'default' matches docs/anchors.md; "
                        "'calibrated-bn' is closer to a trained network and harder to quantize")
    p.add_argument("--out", default=str(HERE / "results"))
    args = p.parse_args(argv)
    args.presets = [s for s in args.presets.split(",") if s]
    args.onnx_presets = [s for s in args.onnx_presets.split(",") if s]
    unknown = set(args.models.split(",")) - set(cases_mod.CASES)
    if unknown:
        p.error(f"unknown model(s) {', '.join(sorted(unknown))}; choose from {', '.join(cases_mod.CASES)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    anchors.INTRA_THREADS = args.threads
    torch.manual_seed(0)
    qw = import_quantwise()
    preimport()
    log("quantwise importable" if qw["importable"] else f"quantwise NOT importable: {qw['error']}")
    results: dict[str, Any] = {
        "machine": harness.machine_info(), "quantwise": qw,
        "settings": {"resnet_init": args.resnet_init, "threads": args.threads,
                     "ort_inter_op_threads": 1, "warmup": args.warmup, "runs": args.runs,
                     "rounds": args.rounds, "presets": args.presets,
                     "memory": harness.MEMORY_DEFINITION,
                     "speedup": "reference median latency / this system's median latency",
                     "size_vs_fp32": "bytes on disk / fp32 safetensors bytes"},
        "models": {},
    }
    if qw["importable"]:  # the probe's findings and this machine's int8 ceiling (ceiling.py)
        import ceiling

        log("measuring this machine's int8 ceiling")
        results["machine"]["ceiling"] = ceiling.measure(args.threads)
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="quantwise-bench-") as tmp:
        for name in args.models.split(","):
            log(f"== {name}")
            ctx = {"tmp": Path(tmp) / name, "quantwise": qw}
            ctx["tmp"].mkdir(parents=True)
            try:
                case = (cases_mod.resnet18_case(args.resnet_init) if name == "resnet18"
                        else cases_mod.CASES[name]())
            except Exception as exc:  # noqa: BLE001 - e.g. the MiniLM weights package missing
                results["models"][name] = {"error": f"{type(exc).__name__}: {exc}"[:600]}
                log(f"{name}: cannot build the model: {exc}")
                continue
            try:
                results["models"][name] = bench_case(case, args, ctx)
            except Exception as exc:  # noqa: BLE001 - keep the other models' results
                results["models"][name] = {"error": f"{type(exc).__name__}: {exc}"[:600]}
                log(f"{name}: benchmark failed: {traceback.format_exc()}")
            del case
    results["machine"]["loadavg_end"] = list(os.getloadavg())
    results["total_s"] = round(time.perf_counter() - t_start, 1)
    results["targets"] = report.evaluate_targets(results)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    md = report.markdown(results)
    (out / "results.md").write_text(md)
    print(md)
    log(f"done in {results['total_s']}s; wrote {out / 'results.json'} and {out / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
