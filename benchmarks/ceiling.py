"""This machine's own int8 ceiling: the best exact int8 and the float32 GEMM and conv throughput
at the models' shapes, and their ratio (what an int8 speedup can at most be here).

    python benchmarks/ceiling.py [--json]

Int8 candidates are the ones quantwise's kernel probe can choose (kernels/probe.py), fed codes
its exactness rule allows on this CPU (|w| <= 64 where only int16-pair kernels exist). Under
ONEDNN_MAX_CPU_ISA=AVX2 oneDNN runs its AVX2 code; float32 GEMMs (MKL/oneDNN) follow the same
cap only in part, so the ratio is the AVX2 int8 path against this CPU's float.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
import torch.nn.functional as F

from quantwise.kernels.probe import _gemm_fns, isa_label, probe, time_ms

GEMMS = [(2048, 384, 384), (2048, 384, 1536), (2048, 1536, 384), (1, 4096, 4096), (8, 4096, 4096)]
CONVS = [(64, 56), (128, 28), (256, 14), (512, 7)]  # ResNet-18 3x3 convs, batch 8
INT8_GEMMS = ("onednn_linear", "int_mm", "fbgemm_linear")  # the selector's Linear candidates


def gemm_row(m: int, k: int, n: int) -> dict:
    fns = _gemm_fns(m, k, n)
    times = {name: time_ms(fn, budget_s=0.3, max_runs=15) for name, fn in fns.items()}
    gops = {name: 2 * m * k * n / (t * 1e6) for name, t in times.items()}
    exact = [c for c in INT8_GEMMS if c in gops and probe().exact_for(c, 127, 64)]
    best = max(exact, key=lambda c: gops[c]) if exact else None
    return {"shape": f"GEMM {m} x {k} x {n}", "fp32_gops": gops["fp32"],
            **{f"{c}_gops": gops.get(c) for c in INT8_GEMMS},
            "best_int8": best, "ceiling": gops[best] / gops["fp32"] if best else None}


def conv_row(c: int, size: int, batch: int = 8) -> dict:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, c, size, size, generator=g).contiguous(memory_format=torch.channels_last)
    wf = torch.randn(c, c, 3, 3, generator=g)
    u = torch.randint(0, 256, x.shape, dtype=torch.uint8, generator=g).contiguous(
        memory_format=torch.channels_last)
    w = torch.randint(-64, 65, wf.shape, dtype=torch.int8, generator=g)
    packed = torch.ops.onednn.qconv_prepack(w, torch.ones(c), 1.0, 0, [1, 1], [1, 1], [1, 1], 1,
                                            list(u.shape))
    ones, zeros = torch.ones(c), torch.zeros(c, dtype=torch.int64)
    t_f = time_ms(lambda: F.conv2d(x, wf, padding=1), 0.3, 15)
    t_q = time_ms(lambda: torch.ops.onednn.qconv2d_pointwise(
        u, 1.0, 0, packed, ones, zeros, None, [1, 1], [1, 1], [1, 1], 1, 1.0, 0, torch.float32,
        "none", [], ""), 0.3, 15)
    ops = 2 * batch * c * c * 9 * size * size
    return {"shape": f"conv 3x3, {c} ch {size}x{size}, batch {batch}", "fp32_gops": ops / (t_f * 1e6),
            "onednn_conv_gops": ops / (t_q * 1e6), "best_int8": "onednn_conv",
            "ceiling": t_f / t_q}


def measure(threads: int = 2) -> dict:
    torch.set_num_threads(threads)
    p = probe()
    return {"cpu": p.data["cpu"], "isa": isa_label(), "accumulation": p.accumulation,
            "threads": threads, "rows": [gemm_row(*s) for s in GEMMS] + [conv_row(*s) for s in CONVS]}


def markdown(res: dict) -> str:
    lines = [f"Ceiling on {res['cpu']}, {res['isa']}, {res['threads']} threads; int8 sums: "
             + ", ".join(f"{k} {v}" for k, v in sorted(res["accumulation"].items())), "",
             "| shape | fp32 GOPS | oneDNN int8 | `_int_mm` | FBGEMM | best int8 / fp32 |",
             "|---|---|---|---|---|---|"]
    for r in res["rows"]:
        one = r.get("onednn_linear_gops") or r.get("onednn_conv_gops")
        cells = ["" if r.get(k) is None else f"{r[k]:.1f}" for k in ("int_mm_gops", "fbgemm_linear_gops")]
        ceil_text = "-" if r["ceiling"] is None else f"{r['ceiling']:.2f}x"
        lines.append(f"| {r['shape']} | {r['fp32_gops']:.1f} | {one:.1f} | {' | '.join(cells)} | {ceil_text} |")
    return "\n".join(lines)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    result = measure(args.threads)
    print(json.dumps(result, indent=1) if args.json else markdown(result))
    sys.exit(0)
