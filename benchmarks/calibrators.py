"""Quality of each calibrator on the built-in models (w8a8, static per-tensor activations).

    python benchmarks/calibrators.py            # prints a Markdown table

digits: top-1 on the 360 held-out test images. minilm: cosine of the embeddings vs fp32 on the
944 held-out stdlib sentences, calibrated on 128 calibration sentences.
"""

from __future__ import annotations

import tempfile
import time
import warnings

import torch

import quantwise
from quantwise.data import corpus_split
from quantwise.evaluate import evaluate, float_checkpoint_bytes, folder_bytes
from quantwise.models.digits import digits_calib_batches, digits_data, load_digits_model
from quantwise.models.minilm import load_minilm, load_tokenizer, tokenize

METHODS = ("max", "percentile", "entropy", "mse")


def main() -> None:
    torch.set_num_threads(2)
    warnings.simplefilter("ignore", quantwise.QuantwiseWarning)
    rows = ["| model | calibrator | quality (fp32) | quality (w8a8) | calibrate+convert s | checkpoint / fp32 |",
            "|---|---|---|---|---|---|"]
    model = load_digits_model()
    images, labels = digits_data("test")
    test = [(images, labels)]
    fp32 = evaluate(model, test, "top1").value
    calib = list(digits_calib_batches(32))
    for method in METHODS:
        start = time.perf_counter()
        cfg = quantwise.Config.preset("w8a8").with_calibrator(method)
        qmodel = quantwise.quantize(model, cfg, calib, progress=False)
        elapsed = time.perf_counter() - start
        with tempfile.TemporaryDirectory() as tmp:
            quantwise.save(qmodel, f"{tmp}/q")
            ratio = folder_bytes(f"{tmp}/q") / float_checkpoint_bytes(model)
        rows.append(f"| digits | {method} | top-1 {fp32:.4f} | top-1 {evaluate(qmodel, test, 'top1').value:.4f} "
                    f"| {elapsed:.1f} | {ratio:.3f} |")
    model = load_minilm()
    tok = load_tokenizer()
    calib = [tokenize(tok, corpus_split("calib")[i:i + 32]) for i in range(0, 128, 32)]
    held = corpus_split("heldout")
    held = [tokenize(tok, held[i:i + 32]) for i in range(0, len(held), 32)]
    for method in METHODS:
        start = time.perf_counter()
        cfg = quantwise.Config.preset("w8a8").with_calibrator(method)
        qmodel = quantwise.quantize(model, cfg, calib, progress=False)
        elapsed = time.perf_counter() - start
        result = evaluate(qmodel, held, "cosine", reference=model)
        rows.append(f"| minilm | {method} | cosine 1 | cosine mean {result.value:.4f} min "
                    f"{result.details['min']:.4f} | {elapsed:.1f} | |")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
