"""MSE calibrator: the amax whose fake-quantization of the histogram has the least squared error."""

from __future__ import annotations

import torch

from quantwise.calibrators.histogram import FIRST_CANDIDATE, HistogramCalibrator
from quantwise.errors import ConfigError


class MSE(HistogramCalibrator):
    """amax minimizing the count-weighted squared error of fake-quantizing the bin centres.

    Candidates are the edges k * bin width for k = 128 .. `num_bins`. With amax a, |x| is
    quantized onto levels 0 .. num_quant_levels - 1 of step a / (num_quant_levels - 1) (round
    half to even, clipped at a), as symmetric int8 does with 128 levels. All candidates are
    evaluated in one [candidates, bins] tensor operation. Ties go to the larger amax.

    Example:
        >>> cal = MSE()
        >>> cal.update(torch.randn(100_000))
        >>> 2.0 < float(cal.compute_amax()) < 5.0
        True
    """

    name = "mse"

    def __init__(self, num_bins: int = 2048, num_quant_levels: int = 128) -> None:
        if num_quant_levels < 2:
            raise ConfigError(f"num_quant_levels must be at least 2, got {num_quant_levels}")
        if num_bins < FIRST_CANDIDATE:
            raise ConfigError(f"mse needs num_bins >= {FIRST_CANDIDATE}, got {num_bins}")
        super().__init__(num_bins)
        self.num_quant_levels = num_quant_levels

    def _amax_from_histogram(self, counts: torch.Tensor, width: float) -> float:
        errors = squared_error_per_candidate(counts, width, self.num_quant_levels)
        best = errors.numel() - 1 - int(torch.argmin(errors.flip(0)))
        return (FIRST_CANDIDATE + best) * width


def squared_error_per_candidate(counts: torch.Tensor, width: float, levels: int) -> torch.Tensor:
    """Mean squared error of fake-quantizing the bin centres, for each candidate k = 128 .. B."""
    num_bins = counts.numel()
    centres = (torch.arange(num_bins, dtype=torch.float64) + 0.5) * width  # [B]
    candidates = torch.arange(FIRST_CANDIDATE, num_bins + 1, dtype=torch.float64)
    amax = candidates[:, None] * width  # [K, 1]
    step = amax / (levels - 1)
    # In place after the first op: the [K, B] temporaries dominate the time.
    err = (centres / step).round_().clamp_(max=levels - 1).mul_(step)  # x_hat, [K, B]
    err.sub_(centres).square_().mul_(counts)
    return err.sum(dim=1) / counts.sum()
