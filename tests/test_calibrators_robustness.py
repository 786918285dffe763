"""Calibrators on hard inputs: non-finite values, nothing seen, constants, outliers, denormals."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from calib_common import ALL_NAMES, BINS, FP32_MAX, HISTOGRAM_NAMES, fed, make_data

from quantwise.calibrators import (
    MSE,
    Calibrator,
    Entropy,
    Max,
    Percentile,
    make_calibrator,
)
from quantwise.errors import CalibrationError, ConfigError, QuantwiseWarning
from quantwise.numerics import (
    TINY,
    dequantize,
    fake_quantize,
    qparams_from_range,
    quantize,
)
from quantwise.spec import QuantSpec

pytestmark = pytest.mark.usefixtures("one_thread")


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
