"""Streaming histogram of |x| shared by the percentile, entropy and MSE calibrators.

Collection uses fine bins (k w, (k+1) w] (0 goes to bin 0) whose width w is a function of
the largest |x| seen so far only: the smallest power of two with max / w <= FINE_FACTOR *
num_bins. When a later batch raises the max, the range grows by whole bins of the same width;
when w must grow too, neighbouring bins merge in pairs, which is exact because all bins start
at 0 and |x| / w is exact for a power of two. The fine histogram therefore ends up the same
whatever the order or the split of the batches: streaming equals one big batch, bit for bit.

`HistogramCalibrator.histogram()` then maps each fine bin, by its centre, to one of exactly
`num_bins` bins over [0, max seen]. Each value moves by less than one fine bin (at most 1/16
of a final bin) and stays in a single bin, so empty bins stay empty and counts stay integers.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from typing import ClassVar

import torch

from quantwise.calibrators.base import NOTHING_SEEN, Calibrator
from quantwise.errors import CalibrationError, ConfigError

# How many times finer than the final histogram the collecting one is (16x to 32x).
FINE_FACTOR = 32
# The smallest candidate amax, in bins, of the entropy and MSE searches (TensorRT's start).
FIRST_CANDIDATE = 128
# Elements binned per step, which bounds the float64 temporaries of a huge batch.
_CHUNK = 1 << 22


def fine_width(abs_max: float, max_bins: int) -> float:
    """The smallest power of two w with abs_max / w <= max_bins (abs_max > 0)."""
    width = math.ldexp(1.0, math.ceil(math.log2(abs_max / max_bins)))
    while abs_max / width > max_bins:  # log2 may round down near a power of two
        width *= 2.0
    while width > 0.0 and abs_max / (width / 2.0) <= max_bins:
        width /= 2.0
    return width


class HistogramCalibrator(Calibrator):
    """Base of the histogram calibrators: collects |x|; subclasses choose amax from the bins."""

    _outlier_advice: ClassVar[str] = (
        "the outlier also squeezes the other values into the histogram's first bins; find "
        "where it comes from, or calibrate this layer with data that does not contain it")

    def __init__(self, num_bins: int = 2048) -> None:
        super().__init__()
        if num_bins < 1:
            raise ConfigError(f"num_bins must be positive, got {num_bins}")
        self.num_bins = num_bins
        self._reset_stats()

    def _reset_stats(self) -> None:
        self._counts: torch.Tensor | None = None  # int64 fine bins, once a positive |x| was seen
        self._width = 0.0  # fine bin width, a power of two
        self._zeros_before_width = 0  # zeros seen while every value so far was 0
        self._num_finite = 0
        self._abs_max = 0.0
        self._abs_sum = 0.0
        self._min = math.inf
        self._max = -math.inf

    # -- collecting -------------------------------------------------------------------------
    def _collect(self, x: torch.Tensor, finite: torch.Tensor | None) -> None:
        values = x.reshape(-1) if finite is None else x[finite]
        if values.numel() == 0:
            return
        bmin, bmax = values.aminmax()
        self._min = min(self._min, float(bmin))
        self._max = max(self._max, float(bmax))
        self._abs_max = max(self._abs_max, -float(bmin), float(bmax))
        self._num_finite += values.numel()
        self._abs_sum += float(values.abs().sum(dtype=torch.float64))
        if self._abs_max == 0.0:
            self._zeros_before_width += values.numel()
            return
        self._make_room()
        for chunk in values.split(_CHUNK):
            self._add(chunk)

    def _make_room(self) -> None:
        """Start the fine bins, or merge and extend them to cover the max seen."""
        width = fine_width(self._abs_max, FINE_FACTOR * self.num_bins)
        needed = math.ceil(self._abs_max / width)
        if self._counts is None:
            self._width = width
            self._counts = torch.zeros(needed, dtype=torch.int64)
            self._counts[0] = self._zeros_before_width
            return
        factor = round(width / self._width)  # a power of two
        if factor >= self._counts.numel():  # a far larger max: everything so far is in bin 0
            self._counts = self._counts.sum().reshape(1)
        elif factor > 1:
            counts = torch.nn.functional.pad(self._counts, (0, -self._counts.numel() % factor))
            self._counts = counts.reshape(-1, factor).sum(dim=1)
        self._width = width
        if needed > self._counts.numel():
            self._counts = torch.nn.functional.pad(self._counts, (0, needed - self._counts.numel()))

    def _add(self, values: torch.Tensor) -> None:
        n = self._counts.numel()
        # float64 and a power-of-two width: |x| / w is exact, so bins do not depend on history.
        idx = (values.double().abs() / self._width).ceil_().sub_(1).clamp_(0, n - 1).long()
        self._counts += torch.bincount(idx, minlength=n).cpu()

    # -- the final histogram ----------------------------------------------------------------
    def histogram(self) -> tuple[torch.Tensor, float]:
        """(counts, bin_width): `num_bins` float64 counts over [0, max |x| seen].

        Raises:
            CalibrationError: nothing finite was seen.
        """
        if self._num_finite == 0:
            raise CalibrationError(f"{self.name} calibrator: {NOTHING_SEEN}")
        counts = torch.zeros(self.num_bins, dtype=torch.float64)
        if self._counts is None:  # only zeros so far
            counts[0] = self._zeros_before_width
            return counts, 0.0
        width = self._abs_max / self.num_bins
        centres = (torch.arange(self._counts.numel(), dtype=torch.float64) + 0.5) * self._width
        target = (centres / width).floor_().clamp_(0, self.num_bins - 1).long()
        counts.index_add_(0, target, self._counts.double())
        return counts, width

    # -- amax -------------------------------------------------------------------------------
    def _amax64(self) -> torch.Tensor:
        counts, width = self.histogram()
        if width == 0.0:
            return torch.tensor(0.0, dtype=torch.float64)
        amax = self._amax_from_histogram(counts, width)
        # Never past the max seen: float32(amax) must stay finite even at float32 max.
        return torch.tensor(min(amax, self._abs_max), dtype=torch.float64)

    @abstractmethod
    def _amax_from_histogram(self, counts: torch.Tensor, width: float) -> float:
        """amax from `num_bins` float64 counts of bin width `width` (> 0) starting at 0."""

    def _outlier_stats(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return (torch.tensor(self._abs_max, dtype=torch.float64),
                torch.tensor(self._abs_sum, dtype=torch.float64),
                torch.tensor(float(self._num_finite), dtype=torch.float64))

    def compute_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 (max(min seen, -amax), min(max seen, amax)): non-negative data keeps min >= 0."""
        amax64 = self._amax64()
        self._warn(amax64)
        amax = float(amax64.to(torch.float32))
        lo = max(self._min, -amax)
        hi = min(self._max, amax)
        return torch.tensor(lo, dtype=torch.float32), torch.tensor(hi, dtype=torch.float32)
