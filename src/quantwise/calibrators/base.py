"""The Calibrator interface and the bookkeeping every calibrator shares.

A calibrator streams statistics of the tensors it is shown (`update`, any number of times) and
never keeps the tensors themselves; `compute_amax` / `compute_range` then turn the statistics
into a range for `quantwise.numerics.qparams_from_range`.

Non-finite values (an attention mask's -inf, a NaN) are counted in `num_nonfinite`, excluded from
every statistic and reported by a `QuantwiseWarning`; they never become the range.
"""

from __future__ import annotations

import warnings
from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch

from quantwise.errors import CalibrationError, QuantwiseWarning

# A largest |x| above this multiple of the mean |x| of the other values is a lone outlier
# that sets the range (bad-inputs 13).
OUTLIER_RATIO = 1e6

NOTHING_SEEN = "no finite values were seen; did any calibration sample reach this layer?"


def as_real_tensor(x: Any) -> torch.Tensor:
    """`x` detached, as a real floating tensor (integers are widened to float64)."""
    if not isinstance(x, torch.Tensor):
        raise CalibrationError(f"calibrators take a torch.Tensor, got {type(x).__name__}")
    x = x.detach()
    if x.is_complex():
        raise CalibrationError(f"calibrators take real tensors, got dtype {x.dtype}")
    if not x.is_floating_point():
        x = x.to(torch.float64)
    return x


class Calibrator(ABC):
    """Streaming range estimator: `update` with batches, then `compute_amax` or `compute_range`.

    Attributes:
        num_seen: elements passed to `update`, non-finite ones included.
        num_nonfinite: NaN / +inf / -inf elements seen (excluded from the statistics).

    Example:
        >>> import torch
        >>> from quantwise.calibrators import Max
        >>> cal = Max()
        >>> cal.update(torch.tensor([1.0, -3.0, float("-inf")]))
        >>> cal.num_seen, cal.num_nonfinite
        (3, 1)
        >>> lo, hi = cal.compute_range()  # also warns that one value was non-finite
        >>> float(lo), float(hi)
        (-3.0, 1.0)
    """

    name: ClassVar[str]
    # Said after an outlier warning: what the user can do about it.
    _outlier_advice: ClassVar[str] = (
        "use the 'percentile', 'entropy' or 'mse' calibrator, or find where the outlier comes from")

    def __init__(self) -> None:
        self.num_seen = 0
        self.num_nonfinite = 0

    def update(self, x: torch.Tensor) -> None:
        """Fold the finite values of `x` (any float dtype, any shape, may be empty) in."""
        x = as_real_tensor(x)
        finite = torch.isfinite(x)
        num_finite = int(finite.sum())
        self.num_seen += x.numel()
        self.num_nonfinite += x.numel() - num_finite
        # Passing None when everything is finite lets subclasses skip the masking pass.
        self._collect(x, None if num_finite == x.numel() else finite)

    def compute_amax(self) -> torch.Tensor:
        """float32 amax: 0-d per tensor, [C] per channel. Warns on non-finite input and outliers.

        Raises:
            CalibrationError: nothing finite was seen.
        """
        amax = self._amax64()
        self._warn(amax)
        return amax.to(torch.float32)

    @abstractmethod
    def compute_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 (min, max) for affine quantization."""

    def reset(self) -> None:
        """Forget everything seen so far."""
        self.num_seen = 0
        self.num_nonfinite = 0
        self._reset_stats()

    def summary(self) -> dict[str, Any]:
        """Counts and amax (None before any finite value) as plain Python values, for reports."""
        try:
            amax: Any = self._amax64().tolist()
        except CalibrationError:
            amax = None
        return {"calibrator": self.name, "num_seen": self.num_seen,
                "num_nonfinite": self.num_nonfinite, "amax": amax}

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(num_seen={self.num_seen}, "
                f"num_nonfinite={self.num_nonfinite})")

    # -- subclass hooks ---------------------------------------------------------------------
    @abstractmethod
    def _collect(self, x: torch.Tensor, finite: torch.Tensor | None) -> None:
        """Fold `x` in; `finite` is the mask of finite elements, or None when all are finite."""

    @abstractmethod
    def _amax64(self) -> torch.Tensor:
        """float64 amax without warnings; raises CalibrationError when nothing finite was seen."""

    @abstractmethod
    def _outlier_stats(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """float64 (largest |x|, sum of |x|, count) of the finite values, shaped like the amax."""

    @abstractmethod
    def _reset_stats(self) -> None:
        """Clear the subclass's statistics."""

    # -- warnings ---------------------------------------------------------------------------
    def _warn(self, amax: torch.Tensor) -> None:
        """One QuantwiseWarning for non-finite input, one for a range set by a lone outlier."""
        if self.num_nonfinite:
            warnings.warn(
                f"{self.name} calibrator: {self.num_nonfinite} of {self.num_seen} values were "
                "NaN or infinite (an attention mask's -inf?); they were counted and excluded "
                "from the range", QuantwiseWarning, stacklevel=3)
        peak, abs_sum, count = self._outlier_stats()
        # Mean |x| of the values other than the largest one: a lone outlier must not hide
        # itself by inflating the mean it is compared with.
        rest_mean = (abs_sum - peak).clamp(min=0) / (count - 1).clamp(min=1)
        rest = torch.where(count > 1, rest_mean, peak)
        dominated = peak > OUTLIER_RATIO * rest
        if bool(dominated.any()):
            worst = int(torch.argmax(torch.where(dominated, peak, -1.0)))
            where = ("" if amax.dim() == 0 else
                     f" (channel {worst}, the worst of {int(dominated.sum())} such channel(s))")
            warnings.warn(
                f"{self.name} calibrator: amax {float(amax.reshape(-1)[worst]):.4g}{where} comes "
                f"from a lone outlier: the largest |x| seen, {float(peak.reshape(-1)[worst]):.4g}, "
                f"is more than {OUTLIER_RATIO:.0e} times the mean |x| of the other values "
                f"({float(rest.reshape(-1)[worst]):.4g}), so nearly every other value would "
                f"quantize to zero; {self._outlier_advice}", QuantwiseWarning, stacklevel=3)
