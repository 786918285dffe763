"""Peak memory of GPTQ in place: does it stay at the model plus one block's working set?

    python benchmarks/gptq_memory.py [--calib 256] [--json out.json]

all-MiniLM-L6-v2, quantize(model, "w4-gptq", calib, inplace=True), calibration as in
llm_methods.py (--calib sentences, batches of 32 x 64). Each measurement runs in a fresh
subprocess, after a warm-up quantization (imports, kernel caches) on a throw-away copy: the
figure is the peak resident memory (RSS sampled every 0.5 ms) above the RSS just before
quantize(), the float model already loaded.

Two model depths: the full 6-block encoder, and the same model cut to its first block (same
embeddings, same data). A method that works block by block adds the same peak at any depth:
the 1-block figure IS one block's working set (its captured inputs, one calibration batch's
activations inside the block, one Hessian and its factorization), plus the embedding's
round-to-nearest and the conversion, which are smaller.

Two allocator settings: glibc's defaults, and MALLOC_MMAP_THRESHOLD_=65536 (every allocation
of 64 KiB or more is its own mapping, returned to the OS when freed: RSS then follows the live
data). With the defaults, freed tensors below glibc's dynamic mmap threshold stay in the heap
as holes; the difference between the two columns is that allocator slack, not live data.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

HERE = Path(__file__).resolve().parent
ALLOCATORS = {"glibc defaults": {}, "MALLOC_MMAP_THRESHOLD_=65536": {"MALLOC_MMAP_THRESHOLD_": "65536"}}


def child(blocks: int, n_calib: int) -> dict:
    import torch

    import quantwise
    from quantwise.data import corpus_split
    from quantwise.methods.blocks import release_free_memory
    from quantwise.models.minilm import load_minilm, load_tokenizer, tokenize
    sys.path.insert(0, str(HERE))
    from llm_methods import BATCH, SEQ, PeakRSS

    torch.set_num_threads(1)
    model = load_minilm().eval()
    tok = load_tokenizer()
    sents = corpus_split("calib")[:n_calib]
    calib = [tokenize(tok, sents[i:i + BATCH], SEQ) for i in range(0, len(sents), BATCH)]

    def cut(depth: int):
        work = copy.deepcopy(model)
        layers = work.encoder.encoder.layer
        work.encoder.encoder.layer = layers[:depth]
        return work

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantwise.quantize(cut(1), "w4-gptq", calib[:1], progress=False, inplace=True)  # warm-up
        work = cut(blocks)
        model_bytes = sum(p.numel() * p.element_size() for p in work.parameters())
        gc.collect()
        release_free_memory()
        time.sleep(0.05)
        with PeakRSS(interval=0.0005) as peak:
            q = quantwise.quantize(work, "w4-gptq", calib, progress=False, inplace=True)
    return {"blocks": blocks, "model_bytes": model_bytes, "peak_extra_rss_bytes": peak.extra,
            "quantized_bytes": sum(t.numel() * t.element_size()
                                   for t in list(q.parameters()) + list(q.buffers()))}


def measure(n_calib: int = 256) -> dict:
    rows = []
    for label, env in ALLOCATORS.items():
        for blocks in (1, 6):
            out = subprocess.run([sys.executable, __file__, "--child", str(blocks), "--calib", str(n_calib)],
                                 env={**os.environ, **env}, capture_output=True, text=True, check=True)
            row = json.loads(out.stdout.strip().splitlines()[-1])
            row["allocator"] = label
            rows.append(row)
            print(f"  gptq memory [{label}] {blocks} block(s): +{row['peak_extra_rss_bytes'] / 2**20:.1f} MiB "
                  f"(model {row['model_bytes'] / 2**20:.1f} MiB)", flush=True)
    hidden, tokens = 384, n_calib * 64
    return {"calib_sentences": n_calib, "rows": rows,
            "block_inputs_bytes": tokens * hidden * 4, "largest_hessian_bytes": 1536 ** 2 * 8}


def markdown(result: dict) -> str:
    mib = lambda b: f"{b / 2**20:.1f} MiB"  # noqa: E731
    by = {(r["allocator"], r["blocks"]): r for r in result["rows"]}
    lines = ["| allocator | model (fp32) | peak added, 1 block | peak added, 6 blocks | 6 blocks / 1 block |",
             "|---|---|---|---|---|"]
    for label in ALLOCATORS:
        one, six = by[(label, 1)], by[(label, 6)]
        lines.append(f"| {label} | {mib(six['model_bytes'])} | {mib(one['peak_extra_rss_bytes'])} | "
                     f"{mib(six['peak_extra_rss_bytes'])} | "
                     f"{six['peak_extra_rss_bytes'] / one['peak_extra_rss_bytes']:.2f} |")
    lines += ["", f"By construction: one block's captured inputs {mib(result['block_inputs_bytes'])} "
              f"({result['calib_sentences']} sentences x 64 tokens x 384 x 4 B), largest Hessian "
              f"{mib(result['largest_hessian_bytes'])} (float64, factorized in place)."]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calib", type=int, default=256)
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.child is not None:
        print(json.dumps(child(args.child, args.calib)))
        return 0
    result = measure(args.calib)
    print(markdown(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
