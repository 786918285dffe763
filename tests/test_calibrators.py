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
import warnings

import numpy as np
import pytest
import torch

from quantwise.calibrators import (
    MSE, Calibrator, Entropy, Max, Percentile, make_calibrator)
from quantwise.calibrators.entropy import kl_per_candidate
from quantwise.errors import CalibrationError, ConfigError, QuantwiseWarning
from quantwise.numerics import TINY, dequantize, fake_quantize, qparams_from_range, quantize
from quantwise.spec import QuantSpec

BINS = 2048
FP32_MAX = torch.finfo(torch.float32).max
HISTOGRAM_NAMES = ["percentile", "entropy", "mse"]
ALL_NAMES = ["max", *HISTOGRAM_NAMES]


@pytest.fixture(autouse=True, scope="module")
def _one_intra_op_thread():
    # These tensors are too small to gain from intra-op threads, and on a shared 2-core machine
    # OpenMP threads waiting for a busy core made this file 5x slower; restored afterwards.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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


# -- non-finite, empty, nothing seen -------------------------------------------------------
@pytest.mark.parametrize("name", ALL_NAMES)
def test_nonfinite_values_are_counted_excluded_and_reported(name):
    x = make_data("gauss", 4096, seed=5).reshape(64, 64)
    clean = fed(name, x)
    dirty = x.copy()
    dirty[np.triu_indices(64, 1)] = -np.inf  # a causal attention mask: 2016 values
    dirty[0, 0] = np.inf
    dirty[1, 0] = np.nan
    finite = dirty[np.isfinite(dirty)]
    cal = fed(name, dirty, np.array([np.nan, np.inf], dtype=np.float32), np.zeros(0, np.float32))
    assert cal.num_seen == 4096 + 2 and cal.num_nonfinite == 2016 + 2 + 2
    with pytest.warns(QuantwiseWarning, match="2020 of 4098 values were NaN or infinite"):
        amax = cal.compute_amax()
    assert torch.isfinite(amax)
    assert torch.equal(amax, fed(name, finite).compute_amax())
    if name == "max":
        assert torch.equal(amax, torch.tensor(np.abs(finite).max()))
    else:
        assert float(amax) <= float(clean.compute_amax()) * 1.01 + 1e-6
    with pytest.warns(QuantwiseWarning):
        lo, hi = cal.compute_range()
    assert torch.isfinite(lo) and torch.isfinite(hi)


@pytest.mark.parametrize("name", ALL_NAMES)
def test_nothing_finite_raises_a_clear_error(name):
    cal = fed(name, torch.full((3, 3), float("nan")), torch.empty(0), torch.tensor([-float("inf")]))
    assert (cal.num_seen, cal.num_nonfinite) == (10, 10)
    with pytest.raises(CalibrationError, match="no finite values were seen; did any calibration"):
        cal.compute_amax()
    with pytest.raises(CalibrationError, match="no finite values"):
        cal.compute_range()
    assert cal.summary()["amax"] is None


@pytest.mark.parametrize("name", ALL_NAMES)
def test_reset_forgets_everything(name):
    cal = fed(name, torch.randn(100), torch.tensor([float("nan")]))
    cal.reset()
    assert (cal.num_seen, cal.num_nonfinite) == (0, 0)
    with pytest.raises(CalibrationError):
        cal.compute_amax()
    cal.update(torch.tensor([0.5, -0.25]))
    assert float(cal.compute_amax()) <= 0.5 and cal.summary()["num_seen"] == 2


@pytest.mark.parametrize("name", ALL_NAMES)
def test_summary_reports_counts_and_amax(name):
    cal = fed(name, torch.tensor([1.0, -2.0, float("nan")]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # summary() reports; it does not warn
        s = cal.summary()
    assert s["calibrator"] == name and s["num_seen"] == 3 and s["num_nonfinite"] == 1
    with pytest.warns(QuantwiseWarning, match="1 of 3 values"):
        assert s["amax"] == pytest.approx(float(cal.compute_amax()))


# -- degenerate tensors ----------------------------------------------------------------------
def _zero_is_exact(lo: torch.Tensor, hi: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    scale, zp = qparams_from_range(lo, hi, spec)
    assert torch.isfinite(scale).all() and (scale > 0).all()
    zero = torch.zeros(5)
    return dequantize(quantize(zero, scale, zp, spec), scale, zp, spec)


@pytest.mark.parametrize("name", ALL_NAMES)
@pytest.mark.parametrize("value", [0.0, 3.0, -2.5])
def test_constant_and_all_zero_tensors_give_a_finite_range(name, value):
    cal = fed(name, torch.full((10, 10), value), torch.full((7,), value))
    amax = cal.compute_amax()
    assert torch.isfinite(amax) and 0.0 <= float(amax) <= abs(value)
    if name in ("max", "percentile", "entropy"):
        assert float(amax) == abs(value)
    lo, hi = cal.compute_range()
    assert torch.isfinite(lo) and torch.isfinite(hi) and float(lo) <= float(hi)
    for spec in (QuantSpec("int8"), QuantSpec("int8", symmetric=False),
                 QuantSpec("uint8", symmetric=False)):
        assert torch.equal(_zero_is_exact(lo, hi, spec), torch.zeros(5))


@pytest.mark.parametrize("name", HISTOGRAM_NAMES)
def test_histogram_range_of_nonnegative_data_starts_at_or_above_zero(name):
    cal = fed(name, make_data("relu", 10_000) + 0.5)
    lo, hi = cal.compute_range()
    assert float(lo) == pytest.approx(0.5, abs=1e-3) and float(hi) == float(cal.compute_amax())


@pytest.mark.parametrize("name", ALL_NAMES)
@pytest.mark.parametrize("outlier", [1e30, FP32_MAX, -FP32_MAX])
def test_outliers_do_not_overflow_and_warn(name, outlier):
    x = torch.from_numpy(make_data("gauss", 100_000))
    x[123] = outlier
    cal = fed(name, x)
    with pytest.warns(QuantwiseWarning, match=r"amax .* comes from a lone outlier"):
        amax = cal.compute_amax()
    assert torch.isfinite(amax) and float(amax) <= FP32_MAX
    if name == "max":
        assert float(amax) == abs(float(np.float32(outlier)))
    with pytest.warns(QuantwiseWarning):
        lo, hi = cal.compute_range()
    scale, _ = qparams_from_range(lo, hi, QuantSpec("int8", symmetric=False))
    assert torch.isfinite(scale).all()


@pytest.mark.parametrize("name", ALL_NAMES)
def test_ordinary_data_raises_no_warning(name):
    cal = fed(name, make_data("student", 100_000), np.zeros(1000, np.float32))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cal.compute_amax()
        cal.compute_range()


def test_each_problem_is_reported_once_per_compute_amax():
    x = torch.randn(100_000)
    x[5], x[6] = float("nan"), 1e30
    cal = Percentile()
    cal.update(x)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cal.compute_amax()
    messages = [str(w.message) for w in caught if issubclass(w.category, QuantwiseWarning)]
    assert len(messages) == 2
    assert "1 of 100000 values were NaN or infinite" in messages[0]
    assert "lone outlier" in messages[1] and "1e+30" in messages[1]


def test_per_channel_outlier_names_the_channel():
    w = torch.randn(4, 10_000)
    w[2, 17] = 1e12
    cal = Max(axis=0)
    cal.update(w)
    with pytest.warns(QuantwiseWarning, match=r"amax 1e\+12 \(channel 2, the worst of 1 such"):
        amax = cal.compute_amax()
    assert float(amax[2]) == float(np.float32(1e12))


@pytest.mark.parametrize("name", ALL_NAMES)
def test_a_tensor_full_of_float32_max_sums_without_overflow(name):
    cal = fed(name, torch.full((10_000,), FP32_MAX), torch.full((10_000,), -FP32_MAX))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no outlier: every value is as large as the max
        amax = cal.compute_amax()
    # MSE judges bin centres, which sit half a bin below the constant.
    assert FP32_MAX * (1 - 1.01 / BINS) <= float(amax) <= FP32_MAX


@pytest.mark.parametrize("name", ALL_NAMES)
def test_denormal_values_floor_the_scale_and_stay_finite(name):
    w = torch.full((8, 16), 1e-40) * torch.sign(torch.randn(8, 16))
    cal = fed(name, w)
    amax = cal.compute_amax()
    assert 0 < float(amax) <= 1.0001e-40
    spec = QuantSpec("int8")
    scale, zp = qparams_from_range(-amax, amax, spec)
    assert float(scale) == TINY
    out = fake_quantize(w, scale, zp, spec)
    assert not torch.isnan(out).any() and torch.equal(out, torch.zeros_like(w))


@pytest.mark.parametrize("name", ALL_NAMES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_low_precision_inputs_are_accepted(name, dtype):
    x = torch.from_numpy(make_data("gauss", 50_000)).to(dtype)
    cal = fed(name, x, torch.tensor([float("nan")], dtype=dtype))
    with pytest.warns(QuantwiseWarning):
        amax = cal.compute_amax()
    assert amax.dtype == torch.float32 and amax.shape == ()
    if name == "max":
        assert float(amax) == float(x.double().abs().max())
    else:
        reference = float(fed(name, x.float()).compute_amax())
        assert abs(float(amax) - reference) <= 0.1 * reference


# -- construction ---------------------------------------------------------------------------
def test_make_calibrator_builds_each_kind():
    assert isinstance(make_calibrator("max", axis=0), Max)
    assert isinstance(make_calibrator("Percentile", percentile=99.9), Percentile)
    assert make_calibrator("entropy", num_quant_levels=256).num_quant_levels == 256
    assert isinstance(make_calibrator("mse"), MSE) and isinstance(Entropy(), Calibrator)


def test_make_calibrator_rejects_unknown_names_and_arguments():
    with pytest.raises(ConfigError, match="valid calibrators: max, percentile, entropy, mse"):
        make_calibrator("minmax")
    with pytest.raises(ConfigError, match="bad arguments"):
        make_calibrator("max", percentile=99.0)
    with pytest.raises(ConfigError, match="percentile"):
        Percentile(percentile=0.0)
    with pytest.raises(ConfigError, match="num_bins"):
        Entropy(num_bins=64)


def test_update_rejects_non_tensors_and_complex():
    with pytest.raises(CalibrationError, match="torch.Tensor"):
        Max().update([1.0, 2.0])
    with pytest.raises(CalibrationError, match="real"):
        Percentile().update(torch.ones(3, dtype=torch.complex64))
