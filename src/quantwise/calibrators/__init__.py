"""Calibrators: streaming range estimators for activations (and weights).

| name         | class      | amax                                                     |
|--------------|------------|----------------------------------------------------------|
| "max"        | Max        | largest |x| (per tensor or per channel; optional EMA)    |
| "percentile" | Percentile | p-th percentile of |x| from a 2048-bin histogram          |
| "entropy"    | Entropy    | TensorRT's KL-divergence threshold                       |
| "mse"        | MSE        | least squared fake-quantization error over the histogram |

Example:
    >>> import torch
    >>> cal = make_calibrator("percentile", percentile=99.9)
    >>> cal.update(torch.randn(10_000))
    >>> amax = cal.compute_amax()  # 0-d float32
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Any, Mapping

from quantwise.calibrators.base import Calibrator
from quantwise.calibrators.entropy import Entropy
from quantwise.calibrators.histogram import HistogramCalibrator
from quantwise.calibrators.max import Max
from quantwise.calibrators.mse import MSE
from quantwise.calibrators.percentile import Percentile
from quantwise.errors import ConfigError

__all__ = ["Calibrator", "HistogramCalibrator", "Max", "Percentile", "Entropy", "MSE",
           "CALIBRATORS", "make_calibrator"]

# Read-only: the registry is a constant, not a hook for monkey-patching.
CALIBRATORS: Mapping[str, type[Calibrator]] = MappingProxyType(
    {cls.name: cls for cls in (Max, Percentile, Entropy, MSE)})


def make_calibrator(name: str, **kwargs: Any) -> Calibrator:
    """A calibrator by name ("max", "percentile", "entropy", "mse") with its keyword arguments.

    Raises:
        ConfigError: unknown name, or arguments the calibrator does not take.

    Example:
        >>> make_calibrator("entropy", num_quant_levels=256).name
        'entropy'
    """
    cls = CALIBRATORS.get(str(name).lower())
    if cls is None:
        valid = ", ".join(CALIBRATORS)
        raise ConfigError(f"unknown calibrator {name!r}; valid calibrators: {valid}")
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"bad arguments for calibrator {name!r}: {kwargs} ({exc})") from None
