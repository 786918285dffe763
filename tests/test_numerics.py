"""quantwise.numerics: round-trip bounds (hypothesis), rounding, ONNX bit-exactness, packing, fp8.

The properties come from docs/algorithms.md ("Numbers and rounding"): inside the clipping range
|x - x_hat| <= scale / 2, outside it x_hat is the clipped value; zero is exactly representable;
ties round to even; ONNX QuantizeLinear / DequantizeLinear agree bit for bit.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from quantwise.errors import ConfigError
from quantwise.numerics import (
    TINY, dequantize, fake_quantize, pack_int4, qparams_from_range, quantize, tensor_range,
    unpack_int4)
from quantwise.spec import Format, PerChannel, PerGroup, PerTensor, PerToken, QuantSpec

FP32_MAX = torch.finfo(torch.float32).max
EPS32 = float(np.finfo(np.float32).eps)
INT_FORMATS = ["int8", "uint8", "int4", "uint4"]
PROPERTY = settings(max_examples=100, deadline=None)


def expand(p: torch.Tensor, x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """A scale / zero-point tensor broadcast to x's full shape (written independently here)."""
    g = spec.granularity
    if isinstance(g, PerTensor):
        return p.expand(x.shape)
    if isinstance(g, PerChannel):
        shape = [1] * x.dim()
        shape[g.axis % x.dim()] = -1
        return p.reshape(shape).expand(x.shape)
    return p.repeat_interleave(g.size, dim=-1)


@st.composite
def quant_cases(draw):
    """(x, spec, shrink): a 2-D float32 tensor, a spec, and a factor narrowing its range."""
    fmt = draw(st.sampled_from(INT_FORMATS))
    symmetric = draw(st.booleans())
    narrow = draw(st.booleans())
    rows = draw(st.integers(1, 5))
    groups, size = draw(st.integers(1, 3)), draw(st.sampled_from([2, 4, 8]))
    granularity = draw(st.sampled_from(
        [PerTensor(), PerChannel(0), PerChannel(1), PerChannel(-1), PerGroup(size)]))
    magnitude = draw(st.sampled_from([1e-3, 1.0, 1e3]))
    x = draw(arrays(np.float32, (rows, groups * size),
                    elements=st.floats(-1.0, 1.0, width=32))) * np.float32(magnitude)
    spec = QuantSpec(fmt, symmetric=symmetric, narrow_range=narrow, granularity=granularity)
    if symmetric and not spec.format.is_signed:
        x = np.abs(x)  # symmetric unsigned (zero point 0) only holds non-negative data
    shrink = draw(st.sampled_from([1.0, 1.0, 0.7, 0.3]))
    return torch.from_numpy(x), spec, shrink


@PROPERTY
@given(quant_cases())
def test_round_trip_error_is_at_most_half_a_step_inside_and_clipped_outside(case):
    x, spec, shrink = case
    lo, hi = tensor_range(x, spec)
    scale, zp = qparams_from_range(lo * shrink, hi * shrink, spec)
    assert torch.isfinite(scale).all() and (scale >= TINY).all()
    assert ((zp >= spec.qmin) & (zp <= spec.qmax)).all()

    q = quantize(x, scale, zp, spec)
    assert q.dtype == spec.format.storage_dtype and q.shape == x.shape
    assert int(q.min()) >= spec.qmin and int(q.max()) <= spec.qmax
    x_hat = dequantize(q, scale, zp, spec)
    assert x_hat.dtype == torch.float32 and x_hat.shape == x.shape

    s, z = expand(scale, x, spec), expand(zp, x, spec)
    clip_lo = (spec.qmin - z).float() * s  # the same float32 products dequantize makes
    clip_hi = (spec.qmax - z).float() * s
    inside = (x >= clip_lo) & (x <= clip_hi)
    error = (x.double() - x_hat.double()).abs()
    # Half a step, plus float32 rounding of x / scale and of the product (a few ulps of |x|).
    bound = s.double() * 0.5 * (1 + 4 * EPS32) + 4 * EPS32 * x.double().abs()
    assert (error[inside] <= bound[inside]).all()
    assert torch.equal(x_hat[x < clip_lo], clip_lo[x < clip_lo])
    assert torch.equal(x_hat[x > clip_hi], clip_hi[x > clip_hi])
    # Zero is exactly representable in every group.
    zeros = torch.zeros_like(x)
    assert torch.equal(dequantize(quantize(zeros, scale, zp, spec), scale, zp, spec), zeros)
    assert torch.equal(fake_quantize(x, scale, zp, spec), x_hat)


def test_ties_round_half_to_even():
    spec = QuantSpec("int8")
    x = torch.tensor([0.5, 1.5, 2.5, 3.5, -0.5, -1.5, -2.5, -3.5, 126.5, 127.5, -128.5])
    q = quantize(x, torch.tensor(1.0), torch.tensor(0, dtype=torch.int32), spec)
    assert q.tolist() == [0, 2, 2, 4, 0, -2, -2, -4, 126, 127, -128]
    # With a power-of-two scale x / scale is exact, so the ties survive the division.
    affine = QuantSpec("uint8", symmetric=False)
    q = quantize(torch.tensor([0.125, 0.375, -0.125]), torch.tensor(0.25),
                 torch.tensor(10, dtype=torch.int32), affine)
    assert q.tolist() == [10, 12, 10]


# -- ONNX ---------------------------------------------------------------------------------------
def _onnx_qdq(x: np.ndarray, scale: np.ndarray, zp: np.ndarray, axis: int | None):
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    from onnx.reference import ReferenceEvaluator

    attrs = {} if axis is None else {"axis": axis}
    inits = [numpy_helper.from_array(scale, "scale"), numpy_helper.from_array(zp, "zp")]
    zp_type = TensorProto.INT8 if zp.dtype == np.int8 else TensorProto.UINT8
    graph = helper.make_graph(
        [helper.make_node("QuantizeLinear", ["x", "scale", "zp"], ["q"], **attrs),
         helper.make_node("DequantizeLinear", ["q", "scale", "zp"], ["y"], **attrs)],
        "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
        [helper.make_tensor_value_info("q", zp_type, list(x.shape)),
         helper.make_tensor_value_info("y", TensorProto.FLOAT, list(x.shape))], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    onnx.checker.check_model(model)
    return ReferenceEvaluator(model).run(None, {"x": x})


@pytest.mark.parametrize("fmt", ["int8", "uint8"])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("granularity", [PerTensor(), PerChannel(0), PerChannel(1)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bit_exact_with_onnx_quantize_dequantize_linear(fmt, symmetric, granularity, seed):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((6, 8, 3)) * rng.uniform(0.01, 50, (6, 1, 1))).astype(np.float32)
    if fmt == "uint8" and symmetric:
        x = np.abs(x)
    x[0, 0, 0] = 0.0
    spec = QuantSpec(fmt, symmetric=symmetric, granularity=granularity)
    t = torch.from_numpy(x)
    lo, hi = tensor_range(t, spec)
    # Clip a little so that saturation is part of the comparison.
    scale, zp = qparams_from_range(lo * 0.8, hi * 0.8, spec)
    q = quantize(t, scale, zp, spec)
    y = dequantize(q, scale, zp, spec)
    np_zp = zp.numpy().astype(np.int8 if fmt == "int8" else np.uint8)
    axis = granularity.axis if isinstance(granularity, PerChannel) else None
    q_ref, y_ref = _onnx_qdq(x, scale.numpy(), np_zp, axis)
    assert q.numpy().dtype == q_ref.dtype and np.array_equal(q.numpy(), q_ref)
    assert np.array_equal(y.numpy().view(np.int32), y_ref.view(np.int32))  # bit for bit


def test_bit_exact_with_onnx_on_ties_and_saturation():
    x = np.array([0.0, 0.0625, 0.1875, -0.0625, -0.1875, 1e6, -1e6, 15.9375, 16.0625],
                 dtype=np.float32)
    for fmt, zp in (("int8", 3), ("uint8", 128)):
        spec = QuantSpec(fmt, symmetric=False)
        scale, zp_t = torch.tensor(0.125), torch.tensor(zp, dtype=torch.int32)
        q = quantize(torch.from_numpy(x), scale, zp_t, spec)
        q_ref, y_ref = _onnx_qdq(x, scale.numpy(), np.array(zp, dtype=q.numpy().dtype), None)
        assert np.array_equal(q.numpy(), q_ref)
        y = dequantize(q, scale, zp_t, spec).numpy()
        assert np.array_equal(y.view(np.int32), y_ref.view(np.int32))


# -- packing ----------------------------------------------------------------------------------
@PROPERTY
@given(st.booleans(), st.integers(1, 3), st.integers(1, 33), st.data())
def test_pack_unpack_int4_round_trip(signed, rows, length, data):
    low, high = (-8, 7) if signed else (0, 15)
    codes = data.draw(arrays(np.int8 if signed else np.uint8, (rows, length),
                             elements=st.integers(low, high)))
    packed = pack_int4(torch.from_numpy(codes))
    assert packed.dtype == torch.uint8 and packed.shape == (rows, (length + 1) // 2)
    out = unpack_int4(packed, length, signed=signed)
    assert out.dtype == (torch.int8 if signed else torch.uint8)
    assert torch.equal(out, torch.from_numpy(codes))


def test_unpack_int4_of_zero_rows():
    packed = pack_int4(torch.zeros(0, 5, dtype=torch.int8))
    assert unpack_int4(packed, 5).shape == (0, 5)


def test_pack_int4_puts_the_even_element_in_the_low_nibble():
    packed = pack_int4(torch.tensor([1, 2, -1], dtype=torch.int8))
    assert packed.tolist() == [0x21, 0x0F]


# -- fp8 --------------------------------------------------------------------------------------
@PROPERTY
@given(st.sampled_from(["fp8_e4m3", "fp8_e5m2"]),
       arrays(np.float32, 16, elements=st.floats(-FP32_MAX, FP32_MAX, width=32)))
def test_fp8_saturates_and_never_makes_inf_or_nan(fmt, x):
    spec = QuantSpec(fmt)
    limit = spec.format.float_max
    one, zero = torch.tensor(1.0), torch.tensor(0, dtype=torch.int32)
    t = torch.from_numpy(x)
    y = dequantize(quantize(t, one, zero, spec), one, zero, spec)
    assert torch.isfinite(y).all()
    assert torch.equal(y[t >= limit], torch.full_like(y[t >= limit], limit))
    assert torch.equal(y[t <= -limit], torch.full_like(y[t <= -limit], -limit))
    assert (y.abs() <= limit).all()
    # With a calibrated scale the largest value lands on the format's largest value.
    scale, zp = qparams_from_range(*tensor_range(t, spec), spec)
    y = fake_quantize(t, scale, zp, spec)
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("fmt,limit", [("fp8_e4m3", 448.0), ("fp8_e5m2", 57344.0)])
def test_fp8_limits_and_relative_error(fmt, limit):
    spec = QuantSpec(fmt)
    assert spec.format.float_max == limit
    one, zero = torch.tensor(1.0), torch.tensor(0, dtype=torch.int32)
    q = quantize(torch.tensor([1e9, -1e9, FP32_MAX, limit]), one, zero, spec)
    assert q.dtype == spec.format.storage_dtype
    assert q.float().tolist() == [limit, -limit, limit, limit]
    x = torch.randn(1000) * 10
    scale, zp = qparams_from_range(*tensor_range(x, spec), spec)
    y = fake_quantize(x, scale, zp, spec)
    assert float(y.abs().max()) == pytest.approx(float(x.abs().max()), rel=1e-6)  # amax -> limit
    # Normal fp8 numbers are within half an ulp: 2^-(mantissa bits + 1) relative.
    mantissa = 3 if fmt == "fp8_e4m3" else 2
    big = x.abs() > 1.0
    assert float(((y - x).abs() / x.abs())[big].max()) <= 2.0 ** -(mantissa + 1)


# -- degenerate ranges --------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", INT_FORMATS + ["fp8_e4m3"])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("granularity", [PerTensor(), PerChannel(0), PerGroup(4)])
@pytest.mark.parametrize("value", [0.0, 2.5, 1e-40])
def test_constant_zero_and_denormal_tensors_get_a_floored_scale(fmt, symmetric, granularity, value):
    spec = QuantSpec(fmt, symmetric=symmetric, granularity=granularity)
    x = torch.full((3, 8), value)
    scale, zp = qparams_from_range(*tensor_range(x, spec), spec)
    assert torch.isfinite(scale).all() and (scale >= TINY).all()
    if value in (0.0, 1e-40):
        assert (scale == TINY).all()
    y = fake_quantize(x, scale, zp, spec)
    assert not torch.isnan(y).any()
    if value == 2.5:
        assert torch.allclose(y, x, rtol=1e-2)
    zeros = torch.zeros_like(x)
    assert torch.equal(fake_quantize(zeros, scale, zp, spec), zeros)


@pytest.mark.parametrize("spec", [QuantSpec("int8"), QuantSpec("uint8", symmetric=False),
                                  QuantSpec("fp8_e4m3")], ids=["int8", "uint8-affine", "fp8"])
def test_float32_max_range_gives_a_finite_scale(spec):
    scale, _ = qparams_from_range(torch.tensor(-FP32_MAX), torch.tensor(FP32_MAX), spec)
    assert torch.isfinite(scale).all() and float(scale) > 0


@pytest.mark.parametrize("spec", [QuantSpec("int8"), QuantSpec("uint8", symmetric=False)],
                         ids=["int8", "uint8-affine"])
def test_float32_max_range_dequantizes_without_overflow(spec):
    scale, zp = qparams_from_range(torch.tensor(-FP32_MAX), torch.tensor(FP32_MAX), spec)
    x = torch.tensor([-FP32_MAX, 0.0, FP32_MAX])
    assert torch.isfinite(fake_quantize(x, scale, zp, spec)).all()


def test_non_finite_or_impossible_ranges_are_refused():
    with pytest.raises(ConfigError, match="not finite"):
        qparams_from_range(torch.tensor(0.0), torch.tensor(float("inf")), QuantSpec("int8"))
    with pytest.raises(ConfigError, match="cannot represent negative"):
        qparams_from_range(torch.tensor(-1.0), torch.tensor(1.0), QuantSpec("uint8"))


def test_format_table():
    assert [(QuantSpec(f).qmin, QuantSpec(f).qmax) for f in INT_FORMATS] == [
        (-128, 127), (0, 255), (-8, 7), (0, 15)]
    assert QuantSpec("int8", narrow_range=True).qmin == -127
    assert Format.parse("FP8_E5M2") is Format.FP8_E5M2


@pytest.mark.parametrize("spec", [
    QuantSpec(Format.INT8, symmetric=True, granularity=PerChannel(0)),
    QuantSpec(Format.INT8, symmetric=True, granularity=PerChannel(1)),  # scales along columns
    QuantSpec(Format.UINT8, symmetric=False, granularity=PerTensor()),
    QuantSpec(Format.INT4, symmetric=True, granularity=PerGroup(16)),
    QuantSpec(Format.UINT4, symmetric=False, granularity=PerGroup(16)),
    QuantSpec(Format.INT8, symmetric=True, granularity=PerToken()),
    QuantSpec(Format.FP8_E4M3, symmetric=True, granularity=PerChannel(0))])
@pytest.mark.parametrize("shape", [(64, 48), (48, 48), (3, 40, 32), (130, 16)])
def test_large_tensors_quantize_in_row_chunks_to_the_same_codes(spec, shape, monkeypatch):
    import quantwise.numerics as numerics

    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 3
    scale, zp = qparams_from_range(*tensor_range(x, spec), spec)
    whole = quantize(x, scale, zp, spec)
    monkeypatch.setattr(numerics, "CHUNK_ELEMENTS", 500)  # several chunks of rows
    chunked = quantize(x, scale, zp, spec)
    assert chunked.dtype == whole.dtype and chunked.shape == whole.shape
    assert torch.equal(chunked.view(torch.uint8), whole.view(torch.uint8))
