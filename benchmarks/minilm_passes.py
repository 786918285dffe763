"""all-MiniLM-L6-v2 w8a8-dynamic: the C row passes (kernels/rowquant.py) against the torch ops,
in one process on one quantized model, and the same model exported and run by ONNX Runtime.

    python benchmarks/minilm_passes.py [--rounds 8] [--ort] [--heap]

Part 1 (always): the benchmark's 32 x 64 batch, forwards alternating between
QUANTWISE_ROWQUANT=off (torch ops), only the attention in torch (the row passes in C), all but
the residual + LayerNorm pass in C, and all in C; median ms per forward of `rounds` blocks of 3, and whether the outputs are identical.
Part 2 (--ort): ORT fp32 (torch.onnx export), ORT quantize_dynamic on it, and quantwise's
export of the same w8a8-dynamic model, interleaved; then the per-op time of quantwise's file
from ORT's profiler (5 runs).
Part 3 (--heap): the same model in child processes alternating between glibc's malloc defaults
(QUANTWISE_MALLOC=system) and kernels/heap.py's setting (the process-wide choice cannot be
undone in one process); median ms of 15 forwards and page faults per forward, each child.
"""

from __future__ import annotations

import argparse
import collections
import copy
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import anchors  # noqa: E402
import cases  # noqa: E402
from harness import call_torch  # noqa: E402

import quantwise  # noqa: E402
from quantwise.encoder import FastBertLayer  # noqa: E402
from quantwise.kernels import rowquant  # noqa: E402
from quantwise.kernels.probe import cpu_model, isa_label  # noqa: E402


def _block(fn, n: int = 3) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - start) / n * 1e3


def torch_passes(model, x, rounds: int) -> None:
    fits = rowquant.attention_fits
    fast = [m.__dict__["forward"] for m in model.modules()
            if isinstance(m.__dict__.get("forward"), FastBertLayer)]
    norm = {layer: layer.norm_pass for layer in fast}
    # mode: (QUANTWISE_ROWQUANT, attention in C?, residual + LayerNorm in C?)
    modes = {"torch ops": ("off", fits, True),
             "row passes in C, attention torch": ("on", lambda d: False, True),
             "all in C but residual + LayerNorm": ("on", fits, False),
             "all in C": ("on", fits, True)}

    def run(mode):
        os.environ["QUANTWISE_ROWQUANT"], rowquant.attention_fits, with_norm = modes[mode]
        for layer in fast:
            layer.norm_pass = norm[layer] and with_norm
        with torch.no_grad():
            return call_torch(model, x)

    outs = {m: run(m) for m in modes}
    times = {m: [] for m in modes}
    for _ in range(rounds):
        for m in modes:
            times[m].append(_block(lambda: run(m)))
    os.environ.pop("QUANTWISE_ROWQUANT")
    rowquant.attention_fits = fits
    for layer in fast:
        layer.norm_pass = norm[layer]
    ref = outs["torch ops"]
    for m, t in times.items():
        diff = float((outs[m] - ref).norm() / ref.norm())
        print(f"{statistics.median(t):8.1f} ms  {m}  (rel diff vs torch ops {diff:.2e})")


def ort_files(case, qmodel, folder: Path) -> dict[str, Path]:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from quantwise.export import export_onnx

    fp32 = anchors.export_onnx(case.model, case.latency_input, folder / "ort")
    dyn = folder / "ort_dynamic.onnx"
    quantize_dynamic(str(fp32), str(dyn), weight_type=QuantType.QInt8)
    ours = folder / "quantwise.onnx"
    export_onnx(qmodel, case.latency_input, ours)
    return {"ORT fp32": fp32, "ORT quantize_dynamic": dyn, "quantwise w8a8-dynamic -> ORT": ours}


def ort_runs(files: dict[str, Path], x, rounds: int) -> None:
    import onnxruntime as ort

    sessions = {}
    for name, path in files.items():
        s = ort.InferenceSession(str(path), anchors.session_options(), providers=["CPUExecutionProvider"])
        sessions[name] = (s, anchors._feeds(x, [i.name for i in s.get_inputs()]))
    times = {n: [] for n in sessions}
    for _ in range(rounds):
        for n, (s, f) in sessions.items():
            times[n].append(_block(lambda: s.run(None, f)))
    for n, t in times.items():
        print(f"{statistics.median(t):8.1f} ms  {n}")
    so = anchors.session_options()
    so.enable_profiling, so.profile_file_prefix = True, str(files["ORT fp32"].parent / "prof")
    s = ort.InferenceSession(str(files["quantwise w8a8-dynamic -> ORT"]), so, providers=["CPUExecutionProvider"])
    feeds = anchors._feeds(x, [i.name for i in s.get_inputs()])
    for _ in range(7):
        s.run(None, feeds)
    events = json.loads(Path(s.end_profiling()).read_text())
    start = [e for e in events if e.get("name") == "model_run"][-5]["ts"]
    per_op, count = collections.Counter(), collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= start:
            per_op[e["args"]["op_name"]] += e["dur"] / 5 / 1e3
            count[e["args"]["op_name"]] += 1
    print("quantwise's file, ms per run by op (ORT profiler, 5 runs):")
    for op, ms in per_op.most_common(14):
        print(f"  {op:24s} {ms:7.1f}  x{count[op] // 5}")


def child_forwards(qmodel, x) -> None:
    """One child of part 3: median ms of 15 forwards and page faults per forward, as JSON."""
    times = []
    with torch.no_grad():
        call_torch(qmodel, x)
        start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(15):
            t0 = time.perf_counter()
            call_torch(qmodel, x)
            times.append((time.perf_counter() - t0) * 1e3)
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start) / 15
    print(json.dumps({"ms": statistics.median(times), "faults": faults}))


def heap_runs(rounds: int) -> None:
    results = {"glibc defaults": [], "kernels/heap.py": []}
    for _ in range(rounds):
        for name in results:
            env = {k: v for k, v in os.environ.items() if k != "QUANTWISE_MALLOC"}
            if name == "glibc defaults":
                env["QUANTWISE_MALLOC"] = "system"
            out = subprocess.run([sys.executable, __file__, "--child"], env=env, check=True,
                                 capture_output=True, text=True).stdout
            results[name].append(json.loads(out.strip().splitlines()[-1]))
    for name, runs in results.items():
        ms = [round(r["ms"], 1) for r in runs]
        faults = [round(r["faults"]) for r in runs]
        print(f"{statistics.median(ms):8.1f} ms  malloc: {name}  (children {ms}; page faults "
              f"per forward {faults})")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--ort", action="store_true", help="also the ONNX Runtime comparison")
    p.add_argument("--heap", action="store_true", help="also glibc's defaults vs kernels/heap.py")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(2)
    print(f"CPU: {cpu_model()}; integer ISA {isa_label()}; 2 threads")
    torch.manual_seed(0)
    case = cases.minilm_case()
    qmodel = quantwise.quantize(copy.deepcopy(case.model), "w8a8-dynamic", case.calib, progress=False)
    if args.child:
        child_forwards(qmodel, case.latency_input)
        return 0
    if not rowquant.available():
        print("no compiled row passes on this machine: nothing to compare")
    else:
        torch_passes(qmodel, case.latency_input, args.rounds)
    if args.ort:
        with tempfile.TemporaryDirectory() as tmp:
            ort_runs(ort_files(case, qmodel, Path(tmp)), case.latency_input, args.rounds)
    if args.heap:
        heap_runs(max(2, args.rounds // 2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
