"""evaluate / compare: quality, size on disk and latency of float vs quantized models.

    quantwise.evaluate(qmodel, test_batches, metric="top1")                  # (inputs, labels) batches
    quantwise.evaluate(qmodel, sentences, metric="cosine", reference=model)  # vs the float outputs
"""

from __future__ import annotations

import math
import statistics
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import nn

from quantwise import metrics
from quantwise.errors import QuantwiseError
from quantwise.workflow import nonempty, run_model

METRICS = ("top1", "cosine", "sqnr", "perplexity")


@dataclass
class EvalResult:
    metric: str
    value: float                       # higher is better, except perplexity
    details: dict[str, float] = field(default_factory=dict)

    def __str__(self) -> str:
        extra = ", ".join(f"{k} {v:.4f}" for k, v in self.details.items())
        return f"{self.metric} {self.value:.4f}" + (f" ({extra})" if extra else "")


def _logits(output: Any) -> torch.Tensor:
    """Model outputs may be a tensor, a tuple, or a Hugging Face output with .logits (an
    encoder's: .last_hidden_state)."""
    if isinstance(output, torch.Tensor):
        return output
    for key in ("logits", "last_hidden_state"):
        if isinstance(getattr(output, key, None), torch.Tensor):
            return getattr(output, key)
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise QuantwiseError(f"cannot read a tensor from a model output of type {type(output).__name__}")


@torch.no_grad()
def evaluate(model: nn.Module, data: Iterable[Any], metric: str = "top1",
             reference: nn.Module | None = None) -> EvalResult:
    """Score `model` on `data`.

    top1: batches of (inputs, labels).
    perplexity (lower is better): batches of token ids [B, T] (or dicts with input_ids, and an
    optional attention_mask whose 0 positions are not scored); exp of the mean next-token NLL
    over every predicted token of every batch, summed batch by batch in float64.
    cosine / sqnr: batches of inputs; compared with `reference`'s outputs on the same inputs.
    """
    if metric not in METRICS:
        raise QuantwiseError(f"unknown metric {metric!r}; valid metrics: {', '.join(METRICS)}")
    if metric in ("cosine", "sqnr") and reference is None:
        raise QuantwiseError(f"metric {metric!r} compares with a reference: pass reference=float_model")
    model.eval()
    outs, refs, labels = [], [], []
    nll, tokens = 0.0, 0
    for batch in nonempty(data, "evaluation data"):
        if metric == "top1":
            inputs, target = batch
            outs.append(_logits(run_model(model, inputs)).float())
            labels.append(target)
        elif metric == "perplexity":
            ids = batch["input_ids"] if isinstance(batch, dict) else batch
            mask = batch.get("attention_mask") if isinstance(batch, dict) else None
            if mask is not None:
                ids = ids.masked_fill(mask == 0, -100)  # padding is not predicted
            batch_nll, batch_tokens = metrics.nll_sum(_logits(run_model(model, batch)).float(), ids)
            nll, tokens = nll + batch_nll, tokens + batch_tokens
        else:
            outs.append(_logits(run_model(model, batch)).float().flatten(1))
            refs.append(_logits(run_model(reference, batch)).float().flatten(1))
    if metric == "top1":
        return EvalResult("top1", metrics.top1_accuracy(torch.cat(outs), torch.cat(labels)))
    if metric == "perplexity":
        if tokens == 0:
            raise QuantwiseError("perplexity: no tokens to predict (sequences shorter than 2, or all padding)")
        return EvalResult("perplexity", math.exp(nll / tokens))
    out, ref = torch.cat(outs), torch.cat(refs)
    if metric == "sqnr":
        return EvalResult("sqnr", metrics.sqnr_db(ref, out))
    cos = metrics.cosine_similarity(out, ref)
    return EvalResult("cosine", float(cos.mean()), {"min": float(cos.min())})


def median_latency_ms(model: nn.Module, sample: Any, warmup: int = 3, runs: int = 15) -> float:
    """Median wall time of one forward pass, in milliseconds, with the current torch threads."""
    model.eval()
    times = []
    with torch.no_grad():
        for i in range(warmup + runs):
            start = time.perf_counter()
            run_model(model, sample)
            if i >= warmup:
                times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000.0


def folder_bytes(folder: str | Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def float_checkpoint_bytes(model: nn.Module) -> int:
    """Size of the float model's weights saved as safetensors (what the user ships today)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.safetensors"
        safetensors.torch.save_model(model, str(path))
        return path.stat().st_size
