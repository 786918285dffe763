"""Calibrators against independent float64 references written here from docs/algorithms.md.

The references rebuild the 2048-bin histogram of |x| with numpy (bins (k w, (k+1) w] over
[0, max], 0 in bin 0) and run each method with plain loops over the candidates; they share no
code with the library. The library first bins at 16-32x finer resolution (so that streaming is
order-independent) and maps those fine bins onto the final ones; when max |x| is a power of two
the two grids align and the results must agree exactly ("aligned" data below), otherwise every
value moves by at most 1/32 of a bin and the results agree to within that.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from calib_common import ALL_NAMES, BINS, fed, make_data

from quantwise.calibrators import Max, Percentile
from quantwise.calibrators.entropy import kl_per_candidate
from quantwise.errors import CalibrationError, ConfigError, QuantwiseWarning

pytestmark = pytest.mark.usefixtures("one_thread")


# -- independent float64 references --------------------------------------------------------
def ref_histogram(x: np.ndarray) -> tuple[np.ndarray, float]:
    """2048 counts of |x| (finite values) over [0, max |x|], and the bin width."""
    a = np.abs(x[np.isfinite(x)].astype(np.float64))
    width = a.max() / BINS
    index = np.clip(np.ceil(a / width) - 1, 0, BINS - 1).astype(np.int64)
    return np.bincount(index, minlength=BINS).astype(np.float64), width


def ref_percentile(x: np.ndarray, p: float) -> float:
    counts, width = ref_histogram(x)
    cdf = np.cumsum(counts)
    i = int(np.argmax(cdf >= p / 100.0 * cdf[-1]))  # first bin reaching p percent
    return (i + 1) * width


def ref_entropy_kl(counts: np.ndarray, levels: int) -> dict[int, float]:
    """KL(P || Q) for every candidate i, straight from the TensorRT description."""
    c = counts.copy()
    c[0] = c[1]
    out = {}
    for i in range(max(128, levels), len(c) + 1):
        p = c[:i].copy()
        p[i - 1] += c[i:].sum()
        raw = c[:i]
        group = np.arange(i) * levels // i  # bin j -> group floor(j * levels / i)
        group_total = np.bincount(group, weights=raw, minlength=levels)
        group_nonempty = np.bincount(group, weights=raw > 0, minlength=levels)
        # Each group's total spread evenly over its non-empty bins; empty bins stay 0.
        q = np.where(raw > 0, group_total[group] / np.maximum(group_nonempty[group], 1), 0.0)
        if q.sum() == 0:
            out[i] = math.inf
            continue
        p, q = p / p.sum(), q / q.sum()
        if np.any((p > 0) & (q == 0)):
            out[i] = math.inf
            continue
        m = p > 0
        out[i] = float(np.sum(p[m] * np.log(p[m] / q[m])))
    return out


def ref_mse_errors(counts: np.ndarray, width: float, levels: int) -> dict[int, float]:
    centres = (np.arange(len(counts)) + 0.5) * width
    out = {}
    for k in range(128, len(counts) + 1):
        step = k * width / (levels - 1)
        x_hat = np.minimum(np.round(centres / step), levels - 1) * step
        out[k] = float(np.sum(counts * (centres - x_hat) ** 2) / counts.sum())
    return out


def best_largest(scores: dict[int, float]) -> int:
    """The candidate with the smallest score; ties go to the larger candidate."""
    low = min(scores.values())
    return max(k for k, v in scores.items() if v == low)


# -- Max -------------------------------------------------------------------------------------
def test_max_per_tensor_is_exact_over_batches():
    batches = [make_data("student", 1000, seed) for seed in range(5)]
    cal = fed("max", *batches)
    allx = np.concatenate(batches)
    assert torch.equal(cal.compute_amax(), torch.tensor(np.abs(allx).max(), dtype=torch.float32))
    lo, hi = cal.compute_range()
    assert torch.equal(lo, torch.tensor(allx.min())) and torch.equal(hi, torch.tensor(allx.max()))
    assert cal.num_seen == 5000 and cal.num_nonfinite == 0


@pytest.mark.parametrize("axis", [0, 1, -1])
def test_max_per_channel_is_exact(axis):
    rng = np.random.default_rng(1)
    batches = [rng.standard_normal((4, 6, 5)).astype(np.float32) * rng.uniform(0.1, 10)
               for _ in range(3)]
    cal = Max(axis=axis)
    for b in batches:
        cal.update(torch.from_numpy(b))
    allx = np.concatenate(batches, axis=0 if axis != 0 else 1)
    other = tuple(d for d in range(3) if d != axis % 3)
    expect = np.abs(allx).max(axis=other)
    amax = cal.compute_amax()
    assert amax.shape == (allx.shape[axis],)
    assert torch.equal(amax, torch.from_numpy(expect))
    lo, hi = cal.compute_range()
    assert torch.equal(lo, torch.from_numpy(allx.min(axis=other)))
    assert torch.equal(hi, torch.from_numpy(allx.max(axis=other)))


def test_max_per_channel_rejects_a_changed_channel_count():
    cal = Max(axis=0)
    cal.update(torch.ones(3, 4))
    with pytest.raises(CalibrationError, match="expected 3 channels"):
        cal.update(torch.ones(5, 4))


def test_max_per_channel_excludes_nonfinite_per_channel():
    x = torch.tensor([[1.0, -float("inf"), -2.0], [float("nan"), 0.5, 0.25]])
    cal = Max(axis=0)
    cal.update(x)
    with pytest.warns(QuantwiseWarning, match="NaN or infinite"):
        assert torch.equal(cal.compute_amax(), torch.tensor([2.0, 0.5]))
    assert cal.num_nonfinite == 2


def test_max_moving_average_follows_the_spec():
    batches = [make_data("gauss", 500, seed) * (seed + 1) for seed in range(6)]
    cal = fed("max", *batches, moving_average=0.01)
    ref = float(np.abs(batches[0]).max())
    for b in batches[1:]:
        ref += 0.01 * (float(np.abs(b).max()) - ref)
    assert float(cal.compute_amax()) == pytest.approx(ref, rel=1e-6)
    assert float(cal.compute_amax()) < float(np.abs(np.concatenate(batches)).max())


def test_max_rejects_a_bad_moving_average():
    with pytest.raises(ConfigError, match="moving_average"):
        Max(moving_average=1.5)


# -- histogram calibrators vs references ---------------------------------------------------
@pytest.mark.parametrize("kind", ["gauss", "relu", "student"])
@pytest.mark.parametrize("p", [99.0, 99.9, 99.99])
def test_percentile_matches_reference_at_bin_resolution(kind, p):
    x = make_data(kind)
    cal = fed("percentile", x, percentile=p)
    _, width = ref_histogram(x)
    amax = float(cal.compute_amax())
    assert abs(amax - ref_percentile(x, p)) <= width * (1 + 1e-6)  # float32 amax
    # And against the exact order statistic: the bin holding it has its upper edge at amax.
    exact = float(np.percentile(np.abs(x.astype(np.float64)), p, method="inverted_cdf"))
    assert amax - width * (1 + 1e-6) <= exact <= amax * (1 + 1e-6)


ENTROPY_CASES = [("relu", 128), ("relu", 256), ("gauss", 128), ("student", 128), ("laplace", 128)]


@pytest.mark.parametrize("kind,levels", ENTROPY_CASES)
def test_entropy_matches_reference_exactly_on_aligned_data(kind, levels):
    x = make_data(kind, aligned=True)
    counts, width = ref_histogram(x)
    kl = ref_entropy_kl(counts, levels)
    amax = float(fed("entropy", x, num_quant_levels=levels).compute_amax())
    assert amax == best_largest(kl) * width


@pytest.mark.parametrize("kind", ["relu", "gauss", "student"])
def test_entropy_is_near_optimal_on_unaligned_data(kind):
    x = make_data(kind)
    counts, width = ref_histogram(x)
    kl = ref_entropy_kl(counts, 128)
    amax = float(fed("entropy", x).compute_amax())
    chosen = round(amax / width)
    assert amax == pytest.approx(chosen * width, rel=1e-7)  # a bin edge (float32 amax)
    # Values move by at most 1/32 of a bin, so the pick is nearly optimal under the exact KL.
    best = min(kl.values())
    assert kl[chosen] <= best * 1.05


@pytest.mark.parametrize("levels", [128, 200, 256])
def test_entropy_kl_of_every_candidate_matches_reference(levels):
    # A sparse histogram: empty bins everywhere, so Q's spreading and the infinite case matter.
    rng = np.random.default_rng(levels)
    counts = rng.poisson(3.0, 700) * (rng.random(700) < 0.6)
    counts[[0, 1]] = [5000, 40]
    ref = ref_entropy_kl(counts.astype(np.float64), levels)
    got = kl_per_candidate(torch.from_numpy(counts).double(), levels).numpy()
    expect = np.array([ref[i] for i in sorted(ref)])
    assert got.shape == expect.shape
    assert np.array_equal(np.isinf(got), np.isinf(expect)) and np.isinf(expect).any()
    finite = np.isfinite(expect)
    np.testing.assert_allclose(got[finite], expect[finite], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("kind", ["gauss", "relu", "laplace"])
@pytest.mark.parametrize("levels", [128, 8])
def test_mse_matches_brute_force_on_aligned_data(kind, levels):
    x = make_data(kind, aligned=True)
    counts, width = ref_histogram(x)
    errors = ref_mse_errors(counts, width, levels)
    amax = float(fed("mse", x, num_quant_levels=levels).compute_amax())
    assert amax == best_largest(errors) * width


@pytest.mark.parametrize("kind", ["gauss", "student"])
def test_mse_is_near_optimal_on_unaligned_data(kind):
    x = make_data(kind)
    counts, width = ref_histogram(x)
    errors = ref_mse_errors(counts, width, 128)
    chosen = round(float(fed("mse", x).compute_amax()) / width)
    assert errors[chosen] <= min(errors.values()) * 1.01


@pytest.mark.parametrize("kind", ["gauss", "student"])
def test_percentile_matches_reference_exactly_on_aligned_data(kind):
    x = make_data(kind, aligned=True)
    assert float(fed("percentile", x, percentile=99.9).compute_amax()) == ref_percentile(x, 99.9)


def test_entropy_and_mse_clip_heavy_tails_and_percentile_is_monotone():
    x = make_data("student", 400_000)
    top = float(np.abs(x).max())
    assert float(fed("entropy", x).compute_amax()) < top / 2
    assert float(fed("mse", x).compute_amax()) < top  # t(3) tails: the MSE optimum clips less
    amaxes = [float(fed("percentile", x, percentile=p).compute_amax()) for p in (99.0, 99.9, 99.99)]
    assert amaxes == sorted(amaxes) and amaxes[0] < amaxes[-1]


# -- streaming -----------------------------------------------------------------------------
# The fine bins depend only on the values and their max, so streaming is exact, not just
# within the one bin width the specification allows.
@pytest.mark.parametrize("name", ALL_NAMES)
@pytest.mark.parametrize("kind", ["gauss", "relu"])
def test_many_small_batches_agree_with_one_big_batch(name, kind):
    x = make_data(kind, 400_000, seed=3)
    whole = fed(name, x)
    streamed = fed(name, *np.array_split(x, 40))
    assert torch.equal(whole.compute_amax(), streamed.compute_amax())
    assert all(torch.equal(a, b) for a, b in zip(whole.compute_range(), streamed.compute_range()))


@pytest.mark.parametrize("name", ALL_NAMES)
def test_batch_order_does_not_change_the_result(name):
    rng = np.random.default_rng(7)
    # Ranges from 0.5x to 300x the first one: the histogram must grow and merge bins.
    batches = [(rng.standard_t(4, 50_000) * s).astype(np.float32) for s in (0.5, 1.0, 2.0, 300.0)]
    small_first = fed(name, *batches).compute_amax()
    large_first = fed(name, *batches[::-1]).compute_amax()
    shuffled = fed(name, *(batches[i] for i in (2, 0, 3, 1))).compute_amax()
    assert torch.equal(small_first, large_first) and torch.equal(small_first, shuffled)
    if name != "max":
        counts, _ = fed(name, *batches).histogram()
        assert counts.sum().item() == 200_000  # every value still counted once


def test_huge_range_growth_keeps_every_count():
    cal = Percentile(percentile=50.0)
    cal.update(torch.rand(10_000) * 1e-3)
    cal.update(torch.tensor([1e30]))  # forces many merges of the fine bins
    counts, width = cal.histogram()
    assert counts.sum().item() == pytest.approx(10_001)
    assert width == pytest.approx(1e30 / BINS, rel=1e-6)
