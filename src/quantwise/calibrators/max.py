"""Max calibrator: running min / max / max |x|, per tensor or per channel, optionally averaged."""

from __future__ import annotations

from typing import Callable

import torch

from quantwise.calibrators.base import NOTHING_SEEN, Calibrator
from quantwise.errors import CalibrationError, ConfigError


class Max(Calibrator):
    """amax = the largest |x| seen (or a moving average of each batch's largest |x|).

    Args:
        axis: None for one amax per tensor; an int to keep that axis and reduce all others,
            giving one amax per channel (shape [C]).
        moving_average: None for the true running max; a constant c in (0, 1] to update
            amax <- amax + c * (batch_amax - amax) after the first batch (0.01 is usual).

    Example:
        >>> cal = Max(axis=0)
        >>> cal.update(torch.tensor([[1.0, -2.0], [0.5, 0.25]]))
        >>> cal.compute_amax()
        tensor([2.0000, 0.5000])
    """

    name = "max"

    def __init__(self, axis: int | None = None, moving_average: float | None = None) -> None:
        super().__init__()
        if moving_average is not None and not 0.0 < moving_average <= 1.0:
            raise ConfigError(f"moving_average must be in (0, 1], got {moving_average}")
        self.axis = axis
        self.moving_average = moving_average
        self._reset_stats()

    def _reset_stats(self) -> None:
        # float64 per channel (a single "channel" per tensor); None until the first non-empty batch.
        self._min: torch.Tensor | None = None
        self._max: torch.Tensor | None = None
        self._amax: torch.Tensor | None = None
        self._peak: torch.Tensor | None = None  # true largest |x|, even with a moving average
        self._has_finite: torch.Tensor | None = None  # bool: channel has seen a finite value
        self._abs_sum: torch.Tensor | None = None
        self._num_finite: torch.Tensor | None = None

    def _as_rows(self, x: torch.Tensor) -> torch.Tensor:
        """x as (channels, elements): one row per tensor, or one per slice along `axis`."""
        if self.axis is None:
            return x.reshape(1, -1)
        if x.dim() == 0 or not -x.dim() <= self.axis < x.dim():
            raise CalibrationError(
                f"max calibrator with axis={self.axis} got a tensor of shape {tuple(x.shape)}")
        return x.movedim(self.axis, 0).reshape(x.shape[self.axis], -1)

    def _collect(self, x: torch.Tensor, finite: torch.Tensor | None) -> None:
        rows = self._as_rows(x)
        if rows.numel() == 0:
            return
        if self._min is not None and rows.shape[0] != self._min.shape[0]:
            raise CalibrationError(
                f"max calibrator with axis={self.axis}: expected {self._min.shape[0]} channels, "
                f"got a tensor of shape {tuple(x.shape)}")
        if finite is None:
            bmin, bmax = rows.aminmax(dim=1)
            abs_sum = rows.abs().sum(dim=1, dtype=torch.float64)
            count = torch.full((rows.shape[0],), rows.shape[1], dtype=torch.int64)
        else:
            mask = self._as_rows(finite)
            # +-inf are neutral for min / max; 0 is neutral for the |x| sum.
            bmin = torch.where(mask, rows, torch.inf).amin(dim=1)
            bmax = torch.where(mask, rows, -torch.inf).amax(dim=1)
            abs_sum = torch.where(mask, rows.abs(), 0).sum(dim=1, dtype=torch.float64)
            count = mask.sum(dim=1)
        self._fold(bmin.double().cpu(), bmax.double().cpu(), abs_sum.cpu(), count.cpu())

    def _fold(self, bmin: torch.Tensor, bmax: torch.Tensor, abs_sum: torch.Tensor,
              count: torch.Tensor) -> None:
        """Merge one batch's per-channel statistics (float64, CPU) into the running ones."""
        has = count > 0
        bamax = torch.maximum(bmin.abs(), bmax.abs())
        if self._min is None:
            self._min, self._max, self._amax, self._peak = bmin, bmax, bamax, bamax
            self._has_finite, self._abs_sum, self._num_finite = has, abs_sum, count
            return
        first = has & ~self._has_finite
        later = has & self._has_finite
        ema = self.moving_average

        def running(old: torch.Tensor, new: torch.Tensor, pick: Callable,
                    average: float | None) -> torch.Tensor:
            # A channel's first finite batch sets it; channels absent from a batch keep theirs.
            combined = pick(old, new) if average is None else old + average * (new - old)
            return torch.where(first, new, torch.where(later, combined, old))

        self._min = running(self._min, bmin, torch.minimum, ema)
        self._max = running(self._max, bmax, torch.maximum, ema)
        self._amax = running(self._amax, bamax, torch.maximum, ema)
        # The peak (for the outlier check) is the true max even with a moving average.
        self._peak = running(self._peak, bamax, torch.maximum, None)
        self._has_finite = self._has_finite | has
        self._abs_sum = self._abs_sum + abs_sum
        self._num_finite = self._num_finite + count

    def _check_seen(self) -> None:
        if self._has_finite is None or not bool(self._has_finite.any()):
            raise CalibrationError(f"max calibrator: {NOTHING_SEEN}")
        if not bool(self._has_finite.all()):
            missing = (~self._has_finite).nonzero().flatten().tolist()
            raise CalibrationError(
                f"max calibrator (axis={self.axis}): channels {missing[:10]}"
                f"{'...' if len(missing) > 10 else ''} saw no finite values")

    def _squeeze(self, t: torch.Tensor) -> torch.Tensor:
        return t.reshape(()) if self.axis is None else t

    def _amax64(self) -> torch.Tensor:
        self._check_seen()
        return self._squeeze(self._amax)

    def _outlier_stats(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return (self._squeeze(self._peak), self._squeeze(self._abs_sum),
                self._squeeze(self._num_finite.double()))

    def compute_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 (running min, running max), shaped like the amax. Warns like compute_amax."""
        self._warn(self._amax64())
        return self._squeeze(self._min).float(), self._squeeze(self._max).float()
