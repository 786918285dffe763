"""Streamed quantization of Llama-shaped folders larger than memory: peak RSS against depth,
time per block, and a model whose float32 size is over the memory limit the run puts on itself.

    python benchmarks/scale.py [--cases tiny4,tiny22,big] [--configs w8,w4-gptq]
                               [--samples 64] [--seq 256] [--limit-gib 6] [--workdir DIR]
                               [--eval-seqs 8]

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

CALIBRATED = ("w4-gptq", "w4-awq")  # configs whose run pushes the calibration set through
# Both children sample their own resident memory every 10 ms from a thread (peak[0])
SAMPLER = r"""
import threading, time
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
"""
CHILD = SAMPLER + r"""
import json, sys, threading, time, torch
from quantwise.stream import quantize_folder
src, cfg, out, samples, seq, vocab = sys.argv[1:7]
torch.set_num_threads(2)
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

# The quantized output, loaded again (io.load: parameters on the meta device, never the float
# model) and scored: perplexity of `seqs` random-token sequences (random weights: the number
# itself means nothing; the run shows evaluate() fits in the same memory).
LOAD_CHILD = SAMPLER + r"""
import json, sys, threading, time, torch
import quantwise
from quantwise.evaluate import evaluate
out, seqs, seq, vocab, limit = sys.argv[1:6]
torch.set_num_threads(2)
g = torch.Generator().manual_seed(1)
batches = [torch.randint(0, int(vocab), (1, int(seq)), generator=g) for _ in range(int(seqs))]
base = rss()
t = time.perf_counter()
# the run's memory limit is the load's budget (past it: 8-bit codes without their fp16 copy)
model = quantwise.load(out, max_memory=int(limit) - base)
from quantwise.state import get_state
lean = any("memory-lean" in (r.reason or "") for r in get_state(model).records.values())
load_s = time.perf_counter() - t
t = time.perf_counter()
ppl = evaluate(model, batches, "perplexity").value
eval_s = time.perf_counter() - t
time.sleep(0.05)
print(json.dumps({"load_s": load_s, "eval_s": eval_s, "perplexity": ppl, "peak_rss": peak[0],
                  "rss_before": base, "lean": lean}))
"""


def _rss_child(code: str, args: list[str]) -> dict | str:
    """Run `code` in a fresh interpreter; its last stdout line as JSON, or the error's last line."""
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
    if proc.returncode != 0:
        return (proc.stderr.strip().splitlines() or ["exit %d" % proc.returncode])[-1][:120]
    return json.loads(proc.stdout.strip().splitlines()[-1])


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
    ap.add_argument("--eval-seqs", type=int, default=8,
                    help="reload each output and score this many sequences (0: skip)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    from quantwise.kernels.probe import cpu_model, isa_label

    rows = []
    print(f"CPU: {cpu_model()} ({isa_label()}); 2 threads; calibration {args.samples} x {args.seq} "
          f"tokens; limit {args.limit_gib} GiB (sampled peak RSS)\n")
    print("| model | layers | float32 GB | config | wall s | s / block | calibration tokens / s "
          "| peak RSS GiB | RSS before GiB | under limit |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for case in args.cases.split(","):
        src = folder_for(case, workdir)
        cfg = json.loads((src / "config.json").read_text())
        index = json.loads((src / "model.safetensors.index.json").read_text())
        fp32_gb = index["metadata"]["total_size"] * 2 / 1e9  # bf16 on disk
        for config in args.configs.split(","):
            out = workdir / f"out-{case}-{config}"
            r = _rss_child(CHILD, [str(src), config, str(out), str(args.samples), str(args.seq),
                                   str(cfg["vocab_size"])])
            if isinstance(r, str):
                print(f"| {case} | {cfg['num_hidden_layers']} | {fp32_gb:.1f} | {config} | failed: "
                      f"{r} | | | | | |", flush=True)
                continue
            layers = cfg["num_hidden_layers"]
            peak = r["peak_rss"] / 2 ** 30
            row = {"case": case, "layers": layers, "fp32_gb": round(fp32_gb, 2), "config": config,
                   "wall_s": round(r["wall_s"], 1), "s_per_block": round(r["wall_s"] / layers, 2),
                   # every calibration token through all the blocks; none for round-to-nearest
                   "calib_tokens_per_s": (round(args.samples * args.seq / r["wall_s"], 1)
                                          if config in CALIBRATED else None),
                   "peak_rss_gib": round(peak, 3), "rss_before_gib": round(r["rss_before"] / 2 ** 30, 3),
                   "under_limit": peak < args.limit_gib}
            rows.append(row)
            print(f"| {case} | {layers} | {row['fp32_gb']} | {config} | {row['wall_s']} | "
                  f"{row['s_per_block']} | {row['calib_tokens_per_s'] or '-'} | "
                  f"{row['peak_rss_gib']} | {row['rss_before_gib']} | "
                  f"{row['under_limit']} |", flush=True)
            if args.eval_seqs:
                loaded = _rss_child(LOAD_CHILD, [str(out), str(args.eval_seqs), str(args.seq),
                                                 str(cfg["vocab_size"]),
                                                 str(int(args.limit_gib * 2 ** 30))])
                row["load"] = loaded if isinstance(loaded, dict) else {"failed": loaded}
    if args.eval_seqs:
        print(f"\nReloaded with quantwise.load and scored (perplexity of {args.eval_seqs} x "
              f"{args.seq} random tokens) in a fresh process:\n")
        print("| model | config | load s | evaluate s | tokens / s | peak RSS GiB | RSS before GiB | under limit "
              "| 8-bit codes only |")
        print("|---|---|---|---|---|---|---|---|---|")
        for row in rows:
            r = row.get("load", {})
            if "failed" in r:
                print(f"| {row['case']} | {row['config']} | failed: {r['failed']} | | | | | | |")
                continue
            peak = r["peak_rss"] / 2 ** 30
            print(f"| {row['case']} | {row['config']} | {r['load_s']:.1f} | {r['eval_s']:.1f} | "
                  f"{args.eval_seqs * args.seq / r['eval_s']:.1f} | "
                  f"{peak:.3f} | {r['rss_before'] / 2 ** 30:.3f} | {peak < args.limit_gib} | "
                  f"{r['lean']} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
