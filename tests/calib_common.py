"""Shared data and helpers of the calibrator tests."""

from __future__ import annotations

import numpy as np
import torch

from quantwise.calibrators import Calibrator, make_calibrator

BINS = 2048
FP32_MAX = torch.finfo(torch.float32).max
HISTOGRAM_NAMES = ["percentile", "entropy", "mse"]
ALL_NAMES = ["max", *HISTOGRAM_NAMES]


# -- data ----------------------------------------------------------------------------------
def make_data(kind: str, n: int = 200_000, seed: int = 0, aligned: bool = False) -> np.ndarray:
    """float32 samples; `aligned` rescales them so that max |x| is exactly 8 (a power of two)."""
    rng = np.random.default_rng(seed)
    x = {"relu": lambda: np.maximum(rng.standard_normal(n), 0),
         "gauss": lambda: rng.standard_normal(n),
         "student": lambda: rng.standard_t(3, n),
         "laplace": lambda: rng.laplace(0.0, 1.0, n)}[kind]()
    if aligned:
        top = np.argmax(np.abs(x))
        x = x * (8.0 / abs(x[top]))
        x[top] = np.sign(x[top]) * 8.0
    return x.astype(np.float32)


def fed(name: str, *batches: np.ndarray | torch.Tensor, **kwargs) -> Calibrator:
    cal = make_calibrator(name, **kwargs)
    for b in batches:
        cal.update(torch.as_tensor(b))
    return cal
