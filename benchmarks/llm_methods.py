"""GPTQ and AWQ vs round-to-nearest at int4 (and 3 bits) on the built-in transformers.

    python benchmarks/llm_methods.py                 # MiniLM + stdlib-lm (if trained), < 10 min
    python benchmarks/llm_methods.py --only minilm --calib 128 --heldout 256 --json out.json

all-MiniLM-L6-v2, int4 weight-only group 128 (every Linear and embedding): mean cosine of the
sentence embeddings vs fp32 on held-out sentences (corpus_split("heldout"), batches of 32 x 64),
calibration on the first --calib (256) sentences of corpus_split("calib"). Per config also the
peak resident memory quantize() adds (RSS sampled every 2 ms, minus the RSS before it; a copy of
the model included). GPTQ's memory in place is measured by benchmarks/gptq_memory.py.

stdlib-lm (a small byte-level Llama, if its weights exist): held-out perplexity for fp32, w4
(RTN), w4-gptq, w4-awq, and 3 bits (codes in [-4, 3], int4 storage) with RTN, GPTQ, AWQ.
Prints a Markdown table and writes JSON (--json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import threading
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch

import quantwise
from quantwise.config import Config, weight_method_config

BATCH, SEQ = 32, 64


def _rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class PeakRSS:
    """Peak RSS above the level at entry, sampled by a thread."""

    def __init__(self, interval: float = 0.002):
        self.interval = interval

    def __enter__(self):
        self.start = _rss()
        self.peak = self.start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss())
            time.sleep(self.interval)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())

    @property
    def extra(self) -> int:
        return self.peak - self.start


def _quantize(model, config, calib, inplace=False):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        start = time.perf_counter()
        q = quantwise.quantize(model, config, calib, progress=False, inplace=inplace)
        return q, time.perf_counter() - start


def minilm(n_calib: int, n_heldout: int, variants: bool = False) -> dict:
    from quantwise.data import corpus_split
    from quantwise.models.minilm import load_minilm, load_tokenizer, tokenize

    model = load_minilm().eval()
    tok = load_tokenizer()
    calib_sents = corpus_split("calib")[:n_calib]
    held = corpus_split("heldout")[:n_heldout]
    calib = [tokenize(tok, calib_sents[i:i + BATCH], SEQ) for i in range(0, len(calib_sents), BATCH)]
    batches = [tokenize(tok, held[i:i + BATCH], SEQ) for i in range(0, len(held), BATCH)]
    with torch.no_grad():
        refs = [model(**b) for b in batches]

    def cosine(m):
        with torch.no_grad():
            cos = torch.cat([torch.nn.functional.cosine_similarity(m(**b).float(), r, dim=-1)
                             for b, r in zip(batches, refs)])
        return float(cos.mean()), float(cos.min())

    configs = [("w4 (RTN)", "w4"), ("w4-gptq", "w4-gptq"), ("w4-awq", "w4-awq")]
    if variants:
        configs.append(("w4-gptq without act_order", Config.from_dict(
            {"preset": "w4-gptq", "method_args": {"act_order": False}})))
    rows = []
    for label, config in configs:
        with PeakRSS() as peak:
            q, seconds = _quantize(model, config, calib)
        mean, low = cosine(q)
        rows.append({"config": label, "cosine_mean": round(mean, 5), "cosine_min": round(low, 5),
                     "quantize_s": round(seconds, 1), "peak_extra_rss_bytes": peak.extra})
        print(f"  minilm {label}: cosine {mean:.5f} (min {low:.4f}), {seconds:.1f} s, "
              f"peak RSS +{peak.extra / 2**20:.0f} MiB", flush=True)
        del q

    return {"calib_sentences": len(calib_sents), "heldout_sentences": len(held), "rows": rows}


def stdlib_lm(n_calib: int, n_heldout: int) -> dict | None:
    try:
        from quantwise.models.stdlib_lm import lm_batches, lm_windows, load_stdlib_lm, perplexity
        model = load_stdlib_lm()
    except Exception as exc:  # noqa: BLE001 - not trained yet, or not there at all
        print(f"  stdlib-lm skipped: {exc}", flush=True)
        return {"skipped": str(exc)}
    calib = lm_batches("calib", n_calib, batch_size=16)
    windows = lm_windows("heldout", n_heldout)
    rows = [{"config": "fp32", "perplexity": round(perplexity(model, windows), 4), "quantize_s": 0.0}]
    print(f"  stdlib-lm fp32: {rows[0]['perplexity']}", flush=True)
    for label, config in [("w4 (RTN)", "w4"), ("w4-gptq", "w4-gptq"), ("w4-awq", "w4-awq"),
                          ("w3 g128 RTN", weight_method_config("rtn", bits=3)),
                          ("w3 g128 GPTQ", weight_method_config("gptq", bits=3)),
                          ("w3 g128 AWQ", weight_method_config("awq", bits=3))]:
        q, seconds = _quantize(model, config, calib)
        ppl = perplexity(q, windows)
        rows.append({"config": label, "perplexity": round(ppl, 4), "quantize_s": round(seconds, 1)})
        print(f"  stdlib-lm {label}: {ppl:.4f} ({seconds:.1f} s)", flush=True)
        del q
    return {"calib_windows": n_calib, "heldout_windows": n_heldout, "rows": rows}


def markdown(result: dict) -> str:
    lines = []
    m = result.get("minilm")
    if m:
        lines += [f"all-MiniLM-L6-v2, int4 weight-only group 128, cosine vs fp32 on "
                  f"{m['heldout_sentences']} held-out sentences ({m['calib_sentences']} calibration "
                  "sentences)", "", "| config | mean cosine | min cosine | quantize (s) | peak RSS added |",
                  "|---|---|---|---|---|"]
        mib = lambda b: "-" if b is None else f"{b / 2**20:.1f} MiB"  # noqa: E731
        lines += [f"| {r['config']} | {r['cosine_mean']:.5f} | {r['cosine_min']:.4f} | {r['quantize_s']} "
                  f"| {mib(r['peak_extra_rss_bytes'])} |" for r in m["rows"]]
        lines += ["", "(GPTQ's memory in place, by model depth and allocator: benchmarks/gptq_memory.py)", ""]
    s = result.get("stdlib_lm")
    if s and "rows" in s:
        lines += [f"stdlib-lm held-out perplexity ({s['heldout_windows']} windows of 256 bytes, "
                  f"{s['calib_windows']} calibration windows)", "", "| config | perplexity | quantize (s) |",
                  "|---|---|---|"]
        lines += [f"| {r['config']} | {r['perplexity']:.4f} | {r['quantize_s']} |" for r in s["rows"]]
    elif s:
        lines += [f"stdlib-lm: skipped ({s['skipped']})"]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=["minilm", "lm"])
    parser.add_argument("--calib", type=int, default=256, help="MiniLM calibration sentences")
    parser.add_argument("--variants", action="store_true", help="also GPTQ without act_order")
    parser.add_argument("--heldout", type=int, default=944, help="MiniLM held-out sentences")
    parser.add_argument("--lm-calib", type=int, default=64, help="stdlib-lm calibration windows")
    parser.add_argument("--lm-heldout", type=int, default=200, help="stdlib-lm held-out windows")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = {"machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
              "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M")}
    start = time.perf_counter()
    if args.only in (None, "minilm"):
        result["minilm"] = minilm(args.calib, args.heldout, args.variants)
    if args.only in (None, "lm"):
        result["stdlib_lm"] = stdlib_lm(args.lm_calib, args.lm_heldout)
    result["total_s"] = round(time.perf_counter() - start, 1)
    print(json.dumps(result, indent=2))
    print(markdown(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
