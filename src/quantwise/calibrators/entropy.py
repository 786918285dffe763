"""Entropy calibrator: TensorRT's KL-divergence search over clipping thresholds."""

from __future__ import annotations

import torch

from quantwise.calibrators.histogram import FIRST_CANDIDATE, HistogramCalibrator
from quantwise.errors import ConfigError


class Entropy(HistogramCalibrator):
    """amax minimizing KL(P || Q) between the clipped histogram P and its quantized version Q.

    For each candidate i (from max(128, num_quant_levels) to `num_bins` bins):
    P = the first i bins with every count beyond them added to bin i-1; Q = the same first i
    bins (without that tail) merged into `num_quant_levels` groups, bin j going to group
    floor(j * levels / i), each group's total spread evenly over its non-empty bins (empty
    bins stay 0). A bin with P > 0 and Q = 0 makes the candidate infinitely bad. amax is
    i * bin width at the smallest KL (ties: the larger i). Before the search bin 0 takes bin
    1's count, so the spike of zeros after a ReLU does not dominate.

    Args:
        num_bins: bins of the |x| histogram.
        num_quant_levels: 128 for signed int8 (|x| has 128 levels), 256 for unsigned.

    Example:
        >>> cal = Entropy()
        >>> cal.update(torch.randn(100_000))
        >>> 2.0 < float(cal.compute_amax()) < 5.0
        True
    """

    name = "entropy"

    def __init__(self, num_bins: int = 2048, num_quant_levels: int = 128) -> None:
        if num_quant_levels < 2:
            raise ConfigError(f"num_quant_levels must be at least 2, got {num_quant_levels}")
        if num_bins < max(FIRST_CANDIDATE, num_quant_levels):
            raise ConfigError(f"entropy needs num_bins >= max({FIRST_CANDIDATE}, num_quant_levels="
                              f"{num_quant_levels}), got {num_bins}")
        super().__init__(num_bins)
        self.num_quant_levels = num_quant_levels

    def _amax_from_histogram(self, counts: torch.Tensor, width: float) -> float:
        kl = kl_per_candidate(counts, self.num_quant_levels)
        first = max(FIRST_CANDIDATE, self.num_quant_levels)
        # Ties go to the larger candidate: take the last position of the minimum.
        best = kl.numel() - 1 - int(torch.argmin(kl.flip(0)))
        return (first + best) * width


def kl_per_candidate(counts: torch.Tensor, levels: int) -> torch.Tensor:
    """KL(P || Q) for every candidate i = max(128, levels) .. len(counts), as one [K] tensor.

    Expanding the definition with unnormalized P (sum T) and Q (sum K_i = counts of the first
    i bins, q_j = G_g / N_g on group g's N_g non-empty bins of total G_g) gives
        KL_i = (sum_j P_j log P_j - sum_g Pg_g log(G_g / N_g)) / T - log T + log K_i,
    where Pg_g = G_g plus the clipped tail for the last group. Every sum over bins is a
    difference of prefix sums, so the search costs O(candidates x levels), not x bins.
    """
    c = counts.to(torch.float64).clone()
    c[0] = c[1]
    num_bins = c.numel()
    zero = c.new_zeros(1)
    cum = torch.cat([zero, c.cumsum(0)])  # cum[k] = sum of c[:k]
    cum_nonempty = torch.cat([zero, (c > 0).to(torch.float64).cumsum(0)])
    cum_xlogx = torch.cat([zero, torch.special.xlogy(c, c).cumsum(0)])
    total = cum[-1]

    sizes = torch.arange(max(FIRST_CANDIDATE, levels), num_bins + 1)  # candidate i, [K]
    last = sizes - 1
    tail = total - cum[sizes]  # counts clipped into bin i-1
    p_last = c[last] + tail
    sum_xlogx = cum_xlogx[last] + torch.special.xlogy(p_last, p_last)

    # Bin j is in group floor(j * levels / i), so group g starts at ceil(g * i / levels).
    g = torch.arange(levels + 1)
    starts = -torch.div(-g[None, :] * sizes[:, None], levels, rounding_mode="floor")  # [K, L+1]
    group_total = cum[starts[:, 1:]] - cum[starts[:, :-1]]  # [K, L]
    group_nonempty = cum_nonempty[starts[:, 1:]] - cum_nonempty[starts[:, :-1]]
    p_group = group_total.clone()
    p_group[:, -1] += tail
    # Groups with no counts hold no P either (else the candidate is infinite, handled below).
    log_q = torch.log(group_total / group_nonempty.clamp(min=1)).where(group_total > 0, 0.0)
    cross = (p_group * log_q).sum(dim=1)

    kept = cum[sizes]
    kl = (sum_xlogx - cross) / total - torch.log(total) + torch.log(kept)
    # P > 0 where Q = 0: the tail lands on an empty bin i-1 (or nothing is kept at all).
    infinite = ((c[last] == 0) & (tail > 0)) | (kept == 0)
    return kl.where(~infinite, torch.inf)
