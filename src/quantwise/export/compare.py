"""Comparing a quantized model's outputs: with another runtime's (relative error, cosine per
sample, quality vs fp32) and with itself under float32-level noise (`rounding_spread`, how
closely two correct implementations of the model can agree at all)."""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from quantwise.encoder import remove_encoder_fastpath
from quantwise.errors import QuantwiseError
from quantwise.int8graph import remove_int8_graph
from quantwise.modules import QuantizedLayer
from quantwise.workflow import run_model

def first_tensor(output: Any) -> torch.Tensor:
    """Tensor; Hugging Face output: last_hidden_state, else logits; else the first tensor."""
    if isinstance(output, torch.Tensor):
        return output
    for key in ("last_hidden_state", "logits"):
        value = output.get(key) if isinstance(output, Mapping) else getattr(output, key, None)
        if isinstance(value, torch.Tensor):
            return value
    items = list(output.values()) if isinstance(output, Mapping) else output
    for item in items if isinstance(items, (tuple, list)) else ():
        if isinstance(item, (torch.Tensor, Mapping, tuple, list)):
            return first_tensor(item)
    raise QuantwiseError(f"cannot read a tensor from a model output of type {type(output).__name__}")


def to_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().double().numpy()


def rel_err(ref: np.ndarray, got: np.ndarray) -> float:
    diff, norm = float(np.linalg.norm(got - ref)), float(np.linalg.norm(ref))
    if norm == 0.0:
        return 0.0 if diff == 0.0 else math.inf
    return diff / norm


def row_cosines(ref: np.ndarray, got: np.ndarray) -> list[float]:
    """Cosine per sample (each item of dim 0, flattened)."""
    r, g = ref.reshape(ref.shape[0] if ref.ndim else 1, -1), got.reshape(got.shape[0] if got.ndim else 1, -1)
    den = np.linalg.norm(r, axis=1) * np.linalg.norm(g, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = (r * g).sum(1) / den
    same = np.all(r == g, axis=1)
    return np.where(den == 0, np.where(same, 1.0, 0.0), cos).tolist()  # two zero rows agree


# The jitter of `rounding_spread`: another runtime's float ops (softmax, GELU, LayerNorm, the
# float parts of its GEMMs) differ from torch's by a few float32 ulps at each quantization
# point. Measured on all-MiniLM-L6-v2's export: 1.4-1.8e-7 relative at its first quantized
# layers (one LayerNorm away from the input, before any code flips); deeper points sit behind
# several such ops. 1e-7 understated it (the static SmoothQuant export then read 1.6x "the
# spread" with every layer's error growing smoothly from 1e-7); 3e-7 is that measurement's
# order. The spread is the largest over SPREAD_SEEDS draws (one draw varied by 1.3x).
SPREAD_EPS = 3e-7
SPREAD_SEEDS = 2
SPREAD_FACTOR = 1.2  # the rounding-spread gate: error <= this x the model's own spread ...
QUALITY_TOL = 0.002  # ... and quality vs fp32 at most this much below the PyTorch model's


def quality_metric(output: np.ndarray, metric: str | None = None) -> str:
    """"top1" or "cosine": a model's own metric ("top1" for classifiers; anything else compares
    outputs by cosine), else top-1 for [B, C] outputs and cosine otherwise."""
    if metric is not None:
        return "top1" if metric == "top1" else "cosine"
    return "top1" if output.ndim == 2 and output.shape[1] > 1 else "cosine"


def quality_per_sample(f32: np.ndarray, out: np.ndarray, metric: str) -> list[float]:
    """Per sample: 1.0 / 0.0 top-1 agreement with fp32 ("top1"), else the cosine."""
    if metric == "top1":
        return (f32.argmax(1) == out.argmax(1)).astype(float).tolist()
    return row_cosines(f32, out)


def rounding_spread(model: nn.Module, samples: list[Any], eps: float = SPREAD_EPS,
                    seeds: int = SPREAD_SEEDS) -> float:
    """Largest relative change of the model's output over `samples` (and `seeds` noise draws)
    when every quantized layer's float input is multiplied by (1 + eps * N(0, 1)): how closely
    two correct implementations of this quantized model can agree at all."""
    debug = copy.deepcopy(model)
    remove_int8_graph(debug)
    remove_encoder_fastpath(debug)
    gen = torch.Generator().manual_seed(0)

    def jitter(module: nn.Module, args: tuple) -> tuple | None:
        x = args[0] if args else None
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            return None
        noise = torch.randn(x.shape, generator=gen, dtype=torch.float32).to(x.dtype)
        return (x * (1 + eps * noise), *args[1:])

    worst = 0.0
    with torch.no_grad():
        for sample in samples:
            ref = to_numpy(first_tensor(run_model(debug, sample)))
            handles = [m.register_forward_pre_hook(jitter) for m in debug.modules()
                       if isinstance(m, QuantizedLayer)]
            try:
                for _ in range(seeds):
                    moved = to_numpy(first_tensor(run_model(debug, sample)))
                    worst = max(worst, rel_err(ref, moved))
            finally:
                for h in handles:
                    h.remove()
    return worst
