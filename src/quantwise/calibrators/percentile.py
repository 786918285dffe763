"""Percentile calibrator: amax = the upper edge of the bin where the |x| CDF reaches p percent."""

from __future__ import annotations

import torch

from quantwise.calibrators.histogram import HistogramCalibrator
from quantwise.errors import ConfigError


class Percentile(HistogramCalibrator):
    """amax at the `percentile`-th percentile of |x|, at the resolution of `num_bins` bins.

    Typical choices are 99.9, 99.99, 99.999 and 99.9999; 100 gives the max (to one bin).

    Example:
        >>> cal = Percentile(99.0)
        >>> cal.update(torch.arange(1, 101, dtype=torch.float32))
        >>> abs(float(cal.compute_amax()) - 99.0) <= 100 / 2048  # within one bin of 99
        True
    """

    name = "percentile"

    def __init__(self, percentile: float = 99.99, num_bins: int = 2048) -> None:
        if not 0.0 < percentile <= 100.0:
            raise ConfigError(f"percentile must be in (0, 100], got {percentile}")
        super().__init__(num_bins)
        self.percentile = percentile

    def _amax_from_histogram(self, counts: torch.Tensor, width: float) -> float:
        cdf = counts.cumsum(0)
        target = cdf[-1] * (self.percentile / 100.0)
        # First bin whose cumulative count reaches the target; min() guards float round-off at 100.
        index = min(int(torch.searchsorted(cdf, target)), counts.numel() - 1)
        return (index + 1) * width
