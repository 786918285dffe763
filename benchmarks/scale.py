"""Streamed quantization of Llama-shaped folders larger than memory: peak RSS against depth,
time per block, and a model whose float32 size is over the memory limit the run puts on itself.

    python benchmarks/scale.py [--cases tiny4,tiny22,big] [--configs w8,w4-gptq]
                               [--samples 64] [--seq 256] [--limit-gib 6] [--workdir DIR]

Folders are written with random bf16 weights from configs (formats/synthetic.py; no
download), once per workdir: "tinyN" is the TinyLlama-1.1B shape (hidden 2048, MLP 5632, 32
heads, 4 KV heads, vocab 32000) with N layers; "big" a 3B-class shape (hidden 3200, MLP 8640,
26 layers, 32 heads, 32 KV heads, vocab 32000: ~3.4B parameters, ~13.7 GB in float32).
Each (case, config) runs `quantwise.stream.quantize_folder` in a fresh child process; the child
samples its own resident memory every 10 ms (VmRSS) and reports the peak, the wall time and
the time per block. The limit is checked against that sampled peak (no cgroup is assumed).
GPTQ / AWQ calibrate on `samples` random-token sequences of `seq` tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CASES = {
    "tiny4": dict(num_hidden_layers=4),
    "tiny22": dict(num_hidden_layers=22),
    "big": dict(hidden_size=3200, intermediate_size=8640, num_hidden_layers=26,
                num_attention_heads=32, num_key_value_heads=32),
}

CHILD = r"""
import json, sys, threading, time, torch
from quantwise.stream import quantize_folder
src, cfg, out, samples, seq, vocab = sys.argv[1:7]
torch.set_num_threads(2)
peak = [0]
def rss():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
def sample():
    while True:
        peak[0] = max(peak[0], rss())
        time.sleep(0.01)
threading.Thread(target=sample, daemon=True).start()
g = torch.Generator().manual_seed(0)
calib = [{"input_ids": torch.randint(0, int(vocab), (1, int(seq)), generator=g)}
         for _ in range(int(samples))]
base = rss()
t = time.perf_counter()
quantize_folder(src, cfg, calib, out, overwrite=True, progress=True)
wall = time.perf_counter() - t
time.sleep(0.05)
print(json.dumps({"wall_s": wall, "peak_rss": peak[0], "rss_before": base}))
"""


def folder_for(case: str, workdir: Path) -> Path:
    from quantwise.formats.synthetic import write_llama_folder

    path = workdir / case
    if not (path / "model.safetensors.index.json").is_file():
        import shutil

        import torch

        shutil.rmtree(path, ignore_errors=True)
        t = time.perf_counter()
        write_llama_folder(path, dtype=torch.bfloat16, shard_bytes=2 ** 30, **CASES[case])
        print(f"wrote {path} in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="tiny4,tiny22,big")
    ap.add_argument("--configs", default="w8,w4-gptq")
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--limit-gib", type=float, default=6.0)
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "quantwise-scale"))
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    from quantwise.kernels.probe import cpu_model, isa_label

    rows = []
    print(f"CPU: {cpu_model()} ({isa_label()}); 2 threads; calibration {args.samples} x {args.seq} "
          f"tokens; limit {args.limit_gib} GiB (sampled peak RSS)\n")
    print("| model | layers | float32 GB | config | wall s | s / block | peak RSS GiB | RSS before GiB "
          "| under limit |")
    print("|---|---|---|---|---|---|---|---|---|")
    for case in args.cases.split(","):
        src = folder_for(case, workdir)
        cfg = json.loads((src / "config.json").read_text())
        index = json.loads((src / "model.safetensors.index.json").read_text())
        fp32_gb = index["metadata"]["total_size"] * 2 / 1e9  # bf16 on disk
        for config in args.configs.split(","):
            out = workdir / f"out-{case}-{config}"
            proc = subprocess.run([sys.executable, "-c", CHILD, str(src), config, str(out),
                                   str(args.samples), str(args.seq), str(cfg["vocab_size"])],
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                print(f"| {case} | {cfg['num_hidden_layers']} | {fp32_gb:.1f} | {config} | failed: "
                      f"{proc.stderr.strip().splitlines()[-1][:120]} | | | | |", flush=True)
                continue
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            layers = cfg["num_hidden_layers"]
            peak = r["peak_rss"] / 2 ** 30
            row = {"case": case, "layers": layers, "fp32_gb": round(fp32_gb, 2), "config": config,
                   "wall_s": round(r["wall_s"], 1), "s_per_block": round(r["wall_s"] / layers, 2),
                   "peak_rss_gib": round(peak, 3), "rss_before_gib": round(r["rss_before"] / 2 ** 30, 3),
                   "under_limit": peak < args.limit_gib}
            rows.append(row)
            print(f"| {case} | {layers} | {row['fp32_gb']} | {config} | {row['wall_s']} | "
                  f"{row['s_per_block']} | {row['peak_rss_gib']} | {row['rss_before_gib']} | "
                  f"{row['under_limit']} |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
