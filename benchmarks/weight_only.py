"""Weight-only int8 / int4 Linears at 1-8 rows (LLM decoding) against float32 F.linear.

    python benchmarks/weight_only.py [--reps 200] [--threads 2] [--json out.json]

Each Linear is quantized with `quantwise.quantize(nn.Sequential(linear), "w8" | "w4")`, i.e.
with the kernel the probe picks on this CPU, and called as a user calls it (the module, Python
overhead included). Shapes: 4096 x 4096 (a 7B model's attention projection), all-MiniLM-L6-v2
(384 x 384, 384 -> 1536, 1536 -> 384) and stdlib-lm (256 x 256, 256 -> 640, 640 -> 256).
Method: 2 threads, warm-ups, then `reps` rounds in which every contender of a case runs once
(interleaved); median and min per contender. Ratios are F.linear time / quantwise time (above
1: faster), and the float nn.Linear module's time / quantwise's (a module call, as the quantized
one is). Shapes whose float32 weights fit in L2 (the small ones) are not bound by memory
bandwidth: there the kernel time is a few microseconds and the call overhead shows.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

import quantwise
from quantwise import numerics
from quantwise.kernels.probe import cpu_model, isa_label

SHAPES = [("4096x4096", 4096, 4096), ("minilm qkvo 384x384", 384, 384),
          ("minilm up 384->1536", 384, 1536), ("minilm down 1536->384", 1536, 384),
          ("stdlib-lm qkvo 256x256", 256, 256), ("stdlib-lm up 256->640", 256, 640),
          ("stdlib-lm down 640->256", 640, 256)]
ROWS = (1, 4, 8)


def bench(fns: dict, reps: int) -> dict:
    times = {k: [] for k in fns}
    for fn in fns.values():
        for _ in range(5):
            fn()
    for _ in range(reps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {k: (statistics.median(v) * 1e6, min(v) * 1e6) for k, v in times.items()}


def case(label: str, k: int, n: int, reps: int) -> list[dict]:
    torch.manual_seed(0)
    lin = nn.Linear(k, n)
    models = {p: quantwise.quantize(nn.Sequential(lin), p, progress=False) for p in ("w8", "w4")}
    kernels = {p: m[0].kernel_name for p, m in models.items()}
    out = []
    for m in ROWS:
        x = torch.randn(m, k)
        with torch.no_grad():
            float_model = nn.Sequential(lin)
            fns = {"fp32": lambda: F.linear(x, lin.weight, lin.bias), "module": lambda: float_model(x)}
            fns.update({p: (lambda mm=mm: mm(x)) for p, mm in models.items()})
            res = bench(fns, reps if k * n >= 1 << 22 else reps * 5)
            for p, mm in models.items():  # the kernel computes x @ dequantized weights
                q = mm[0]
                w = numerics.dequantize(q.codes(), q.weight_scale, q.zero_points(), q.weight_spec)
                ref = F.linear(x, w.reshape(n, k), q.bias)
                rel = float((mm(x) - ref).norm() / ref.norm())  # int4 GEMM: bf16 activations
                assert rel < (1e-4 if p == "w8" else 1e-2), (label, p, m, rel)
        fp, fp_min = res["fp32"]
        row = {"shape": label, "k": k, "n": n, "rows": m, "fp32_us": round(fp, 1),
               "module_us": round(res["module"][0], 1)}
        for p in models:
            med, low = res[p]
            row[f"{p}_us"] = round(med, 1)
            row[f"{p}_x"] = round(fp / med, 2)
            row[f"{p}_x_min"] = round(fp_min / low, 2)
            row[f"{p}_x_module"] = round(res["module"][0] / med, 2)
            row[f"{p}_kernel"] = kernels[p]
        out.append(row)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"CPU: {cpu_model()} ({isa_label()}); torch {torch.__version__}, {args.threads} threads\n")
    print("| shape | rows | F.linear us | float module us | w8 us | w8 x F.linear (min) | w8 x module "
          "| w4 us | w4 x F.linear (min) | w4 x module |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    for label, k, n in SHAPES:
        for r in case(label, k, n, args.reps):
            rows.append(r)
            print(f"| {r['shape']} | {r['rows']} | {r['fp32_us']} | {r['module_us']} | {r['w8_us']} | "
                  f"{r['w8_x']}x ({r['w8_x_min']}x) | {r['w8_x_module']}x | {r['w4_us']} | "
                  f"{r['w4_x']}x ({r['w4_x_min']}x) | {r['w4_x_module']}x |", flush=True)
    print("\nKernels chosen:")
    for label, *_ in SHAPES:
        r = next(x for x in rows if x["shape"] == label)
        print(f"- {label}: w8: {r['w8_kernel']}; w4: {r['w4_kernel']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cpu": cpu_model(), "isa": isa_label(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
