"""quantwise.plan on all-MiniLM-L6-v2 (objective size and latency) and on the digits CNN (issue 4).

    python benchmarks/plan_minilm.py            # all three plans, then the checks (~10-15 min)
    python benchmarks/plan_minilm.py --only size|latency|digits [--ort]

MiniLM: eval_fn = mean cosine of the embeddings vs fp32 on the first EVAL_SENTENCES held-out
sentences (fp32 embeddings computed once); the chosen config is then re-quantized from scratch
and checked on ALL held-out sentences (the first EVAL_SENTENCES plus the unseen rest), its
checkpoint saved for real, its latency measured on the 32x64 benchmark batch (benchmarks/cases.py).
--ort also times ONNX Runtime fp32 on that batch (torch.onnx export; a minute or two).
Digits: top-1 on its test split (360 images, job.eval_batches), max_drop 0.005, int4 allowed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))

import quantwise
from quantwise.data import corpus_split, load_calibration_data
from quantwise.evaluate import folder_bytes, median_latency_ms
from quantwise.models.minilm import load_tokenizer, tokenize
from quantwise.models.registry import load_model

EVAL_SENTENCES = 256
BATCH, SEQ = 32, 64


def minilm_setup():
    model, info = load_model("minilm")
    model.eval()
    calib = load_calibration_data("stdlib-text", info, limit=256)  # 8 batches of 32 x 64
    tok = load_tokenizer()
    held = corpus_split("heldout")
    batches = [tokenize(tok, held[i:i + BATCH], max_length=SEQ) for i in range(0, len(held), BATCH)]
    n_eval = EVAL_SENTENCES // BATCH
    with torch.no_grad():
        refs = [model(**b).float() for b in batches]
    latency_input = tokenize(tok, held[:BATCH], max_length=SEQ)
    return model, calib, batches, refs, n_eval, latency_input, len(held)


def cosine_fn(batches, refs):
    def fn(m):
        with torch.no_grad():
            cos = [torch.nn.functional.cosine_similarity(m(**b).float(), r, dim=-1)
                   for b, r in zip(batches, refs)]
        return float(torch.cat(cos).mean())
    return fn


def check(model, plan, calib, full_fn, latency_input, ort_ms=None):
    """Re-quantize the plan's config from scratch: reproduce, save, time, full held-out cosine."""
    qmodel = quantwise.quantize(model, plan.config, calib, progress=False)
    with tempfile.TemporaryDirectory() as tmp:
        plan.config.save(Path(tmp) / "plan.yaml")
        assert quantwise.Config.load(Path(tmp) / "plan.yaml") == plan.config
        size = folder_bytes(quantwise.save(qmodel, Path(tmp) / "q"))
    lat_q = [median_latency_ms(qmodel, latency_input) for _ in range(3)]
    lat_f = [median_latency_ms(model, latency_input) for _ in range(3)]
    out = {"full_heldout_cosine": full_fn(qmodel), "size_bytes": size,
           "size_ratio": size / plan.fp32_bytes, "latency_ms": statistics.median(lat_q),
           "fp32_torch_ms": statistics.median(lat_f)}
    if ort_ms is not None:
        out["ort_fp32_ms"] = ort_ms
        out["speedup_vs_ort_fp32"] = ort_ms / out["latency_ms"]
    return out


def ort_fp32_ms(model, latency_input) -> float:
    import onnxruntime as ort
    from anchors import _feeds, export_onnx, session_options

    with tempfile.TemporaryDirectory() as tmp:
        path = export_onnx(model, latency_input, Path(tmp))
        sess = ort.InferenceSession(str(path), session_options(), providers=["CPUExecutionProvider"])
        names = [i.name for i in sess.get_inputs()]
        feeds = _feeds(latency_input, names)
        times = []
        for i in range(18):
            t = time.perf_counter()
            sess.run(None, feeds)
            if i >= 3:
                times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000


def run_minilm(objective: str, max_drop: float, with_ort: bool) -> dict:
    model, calib, batches, refs, n_eval, latency_input, n_held = minilm_setup()
    eval_fn = cosine_fn(batches[:n_eval], refs[:n_eval])
    full_fn = cosine_fn(batches, refs)
    t = time.perf_counter()
    plan = quantwise.plan(model, calib, eval_fn, max_drop, objective=objective,
                          latency_input=latency_input, eval_data=[calib[0]], max_evaluations=40)
    seconds = time.perf_counter() - t
    print(plan)
    ort_ms = ort_fp32_ms(model, latency_input) if with_ort else None
    result = {"case": f"minilm {objective} max_drop {max_drop}", "met": plan.met,
              "plan_metric_first_256": plan.metric, "evaluations": plan.evaluations,
              "seconds": round(seconds, 1), "plan_size_ratio": plan.size_ratio,
              "plan_latency_ms": plan.latency_ms, "uniform_latency_ms": plan.format_latency_ms,
              "formats": _counts(plan.layers), "heldout_sentences": n_held,
              **check(model, plan, calib, full_fn, latency_input, ort_ms)}
    return result


def run_digits() -> dict:
    from quantwise.job import eval_batches

    model, info = load_model("digits")
    calib = load_calibration_data("digits", info)
    batches, _ = eval_batches(info, calib)
    eval_fn = lambda m: quantwise.evaluate(m, batches, "top1").value
    t = time.perf_counter()
    plan = quantwise.plan(model, calib, eval_fn, 0.005, objective="size")
    seconds = time.perf_counter() - t
    print(plan)
    reproduced = eval_fn(quantwise.quantize(model, plan.config, calib, progress=False))
    return {"case": "digits size max_drop 0.005", "met": plan.met, "top1": plan.metric,
            "fp32_top1": plan.fp32_metric, "reproduced_top1": reproduced,
            "size_bytes": plan.size_bytes, "size_ratio": plan.size_ratio,
            "evaluations": plan.evaluations, "seconds": round(seconds, 1),
            "formats": _counts(plan.layers)}


def _counts(layers: dict[str, str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for fmt in layers.values():
        out[fmt] = out.get(fmt, 0) + 1
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=("size", "latency", "digits"))
    parser.add_argument("--ort", action="store_true", help="also time ONNX Runtime fp32")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    results = []
    if args.only in (None, "size"):
        results.append(run_minilm("size", 0.01, False))
        print(json.dumps(results[-1], indent=2), flush=True)
    if args.only in (None, "latency"):
        results.append(run_minilm("latency", 0.002, args.ort))
        print(json.dumps(results[-1], indent=2), flush=True)
    if args.only in (None, "digits"):
        results.append(run_digits())
        print(json.dumps(results[-1], indent=2), flush=True)


if __name__ == "__main__":
    main()
