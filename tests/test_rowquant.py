"""The compiled per-token quantizer (kernels/rowquant.py, csrc/rowquant.c): the same scales and
codes, bit for bit, as the torch ops it replaces, and the model paths that use it."""

from __future__ import annotations

import pytest
import torch

from quantwise.kernels import rowquant
from quantwise.kernels.base import dynamic_scale

needs_lib = pytest.mark.skipif(not rowquant.available(), reason="no compiled kernels on this machine")


def _torch_codes(x, qmax):
    _, scale, _ = dynamic_scale(x, qmax, per_row=True)
    return torch.div(x, scale).round_(), scale


@needs_lib
@pytest.mark.parametrize("m,k", [(1, 5), (7, 13), (64, 384), (300, 1000), (2048, 1536)])
@pytest.mark.parametrize("qmax", [127, 63])
def test_codes_and_scales_are_those_of_the_torch_ops(m, k, qmax):
    g = torch.Generator().manual_seed(m * k + qmax)
    x = torch.randn(m, k, generator=g) * torch.rand(m, 1, generator=g).mul(20)
    x[0] = 0.0                                   # all-zero row: scale TINY, codes 0
    x[-1, 0] = 3.0 * x[-1].abs().max() + 1       # a row maximum to the last bit
    x[m // 2, k // 2] = 2.5 * (x[m // 2].abs().max() / qmax)  # exactly a half step: ties to even
    codes, scale = rowquant.row_quantize(x, qmax)
    ref_codes, ref_scale = _torch_codes(x, qmax)
    assert torch.equal(scale, ref_scale)
    assert torch.equal(codes, ref_codes)
    assert codes.abs().max() <= qmax


@needs_lib
def test_codes_written_in_place_over_the_input():
    x = torch.randn(33, 40)
    ref_codes, ref_scale = _torch_codes(x, 127)
    codes, scale = rowquant.row_quantize(x, 127, out=x)
    assert codes.data_ptr() == x.data_ptr()
    assert torch.equal(codes, ref_codes) and torch.equal(scale, ref_scale)


@needs_lib
def test_non_finite_rows_get_a_non_finite_scale_and_zero_codes():
    x = torch.randn(5, 24)
    x[1, 3], x[2, 0], x[3, 23] = float("nan"), float("-inf"), float("inf")
    codes, scale = rowquant.row_quantize(x, 127)
    assert torch.isnan(scale[1]) and torch.isinf(scale[2]) and torch.isinf(scale[3])
    assert codes[1:4].eq(0).all()  # never a clamped NaN code into the GEMM
    ref_codes, ref_scale = _torch_codes(x[[0, 4]], 127)
    assert torch.equal(codes[[0, 4]], ref_codes) and torch.equal(scale[[0, 4]], ref_scale)


@needs_lib
def test_dynamic_linear_gives_the_same_output_with_and_without_it(monkeypatch):
    from quantwise.kernels.int8_linear import FbgemmLinear
    from quantwise.kernels.base import DynamicAct
    from quantwise.spec import PerToken, QuantSpec

    g = torch.Generator().manual_seed(3)
    codes = torch.randint(-63, 64, (96, 80), generator=g, dtype=torch.int8)
    act = DynamicAct(QuantSpec("int8", symmetric=True, granularity=PerToken()))
    lin = FbgemmLinear(codes, torch.rand(96, generator=g) / 50, torch.zeros(96, dtype=torch.int32),
                       torch.randn(96, generator=g), act)
    x = torch.randn(4, 9, 80, generator=g)
    x[1, 2, 5] = float("nan")
    out = lin(x)
    monkeypatch.setenv("QUANTWISE_ROWQUANT", "off")
    ref = lin(x)
    assert torch.equal(out[~torch.isnan(ref)], ref[~torch.isnan(ref)])
    assert torch.isnan(out[1, 2]).all() and not torch.isfinite(ref[1, 2]).any()


@needs_lib
@pytest.mark.parametrize("with_bias,with_smooth", [(True, False), (False, False), (True, True)])
@pytest.mark.parametrize("m,n", [(3, 13), (128, 1536)])
def test_bias_gelu_quantize_against_torch(with_bias, with_smooth, m, n):
    g = torch.Generator().manual_seed(m + n)
    y = torch.randn(m, n, generator=g) * 30
    s = torch.rand(m, 1, generator=g) / 10
    bias = torch.randn(n, generator=g) if with_bias else None
    smooth = torch.rand(n, generator=g) + 0.5 if with_smooth else None
    v = torch.addcmul(bias, y, s) if with_bias else y * s
    act = torch.nn.functional.gelu(v)
    if with_smooth:
        act = act / smooth
    ref_codes, ref_scale = _torch_codes(act, 127)
    codes, scale = rowquant.bias_gelu_quantize(y.clone(), s, bias, smooth, 127)
    assert (scale - ref_scale).abs().le(2e-6 * ref_scale).all()  # GELU within ~1 step
    diff = (codes - ref_codes).abs()
    assert diff.max() <= 1 and diff.sum() <= max(2, codes.numel() // 100_000)


@needs_lib
def test_gelu_matches_erf_on_a_dense_grid():
    x = torch.linspace(-10, 10, 200_001).reshape(1, -1)
    exact = x.double() * 0.5 * (1 + torch.special.erf(x.double() / 2 ** 0.5))
    codes, scale = rowquant.bias_gelu_quantize(x.clone(), torch.ones(1, 1), None, None, 2 ** 22)
    got = codes.double() * scale.double()  # codes of step ~2.4e-6: GELU to within half a step
    assert (got - exact).abs().max() < 1.1e-6 + scale.item() / 2


@needs_lib
def test_bias_gelu_quantize_keeps_non_finite_rows_non_finite():
    y = torch.randn(4, 40)
    y[1, 7], y[2, 0] = float("nan"), float("-inf")  # GELU(-inf) is NaN in torch too
    codes, scale = rowquant.bias_gelu_quantize(y, torch.ones(4, 1), None, None, 127)
    assert torch.isnan(scale[1]) and torch.isnan(scale[2]) and codes[1:3].eq(0).all()
    assert torch.isfinite(scale[[0, 3]]).all()


@needs_lib
@pytest.mark.parametrize("b,heads,t,d", [(2, 3, 13, 16), (4, 12, 64, 32), (1, 2, 70, 64), (1, 1, 1, 8)])
def test_attention_against_torch(b, heads, t, d):
    g = torch.Generator().manual_seed(t + d)
    q, k, v = (torch.randn(b * heads, t, d, generator=g) for _ in range(3))
    q /= d ** 0.5
    mask = torch.zeros(b * heads, t)
    mask[:, t - t // 4:] = torch.finfo(torch.float32).min  # padded keys, as the encoder's mask
    for m in (mask, None):
        scores = q @ k.transpose(1, 2) + (0 if m is None else m[:, None, :])
        ref = (torch.softmax(scores, -1) @ v).view(b, heads, t, d).permute(0, 2, 1, 3)
        out = rowquant.attention(q, k, v, m, torch.empty(b, t, heads, d), heads)
        assert (out - ref).abs().max() < 2e-6


@needs_lib
def test_attention_keeps_nan_rows_nan():
    q, k, v = (torch.randn(2, 9, 8) for _ in range(3))
    q[1, 4, 0] = float("nan")   # one query: its output row only
    k[0, 2, 3] = float("inf")   # one key: every query of head 0 sees an infinite/NaN score
    out = rowquant.attention(q, k, v, None, torch.empty(1, 9, 2, 8), 2)
    ref = (torch.softmax(q @ k.transpose(1, 2), -1) @ v).view(1, 2, 9, 8).permute(0, 2, 1, 3)
    assert torch.equal(torch.isnan(out), torch.isnan(ref)) and torch.isnan(out[0, 4, 1]).all()
    finite = ~torch.isnan(ref)
    assert (out[finite] - ref[finite]).abs().max() < 2e-6


def _norm(n, g):
    norm = torch.nn.LayerNorm(n)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5, generator=g)
        norm.bias.normal_(generator=g)
    return norm


@needs_lib
@pytest.mark.parametrize("with_bias,with_smooth", [(True, False), (False, False), (True, True)])
@pytest.mark.parametrize("m,n", [(3, 13), (256, 384)])
def test_residual_layernorm_against_torch(with_bias, with_smooth, m, n):
    g = torch.Generator().manual_seed(m * n)
    y = torch.randn(m, n, generator=g) * 40
    s = torch.rand(m, 1, generator=g) / 20
    res = torch.randn(m, n, generator=g) * 3
    bias = torch.randn(n, generator=g) if with_bias else None
    smooth = torch.rand(n, generator=g) + 0.5 if with_smooth else None
    norm = _norm(n, g)
    with torch.no_grad():
        v = (torch.addcmul(bias, y, s) if with_bias else y * s).add_(res)
        ref = torch.nn.functional.layer_norm(v, (n,), norm.weight, norm.bias, norm.eps)
        ref_codes, ref_scale = _torch_codes(ref / smooth if with_smooth else ref, 127)
        h, codes, scale = rowquant.residual_layernorm(y.clone(), s, bias, res, norm, smooth, 127)
        assert (h - ref).abs().max() < 1e-5 * ref.abs().max()  # float32 rounding, not a step
        assert (scale - ref_scale).abs().le(1e-5 * ref_scale).all()
        diff = (codes - ref_codes).abs()
        assert diff.max() <= 1 and diff.sum() <= max(2, codes.numel() // 10_000)
        alone, none, no_scale = rowquant.residual_layernorm(y.clone(), s, bias, res, norm)
        assert none is None and no_scale is None and torch.equal(alone, h)


@needs_lib
def test_residual_layernorm_keeps_non_finite_rows_non_finite():
    g = torch.Generator().manual_seed(3)
    y, res = torch.randn(4, 24, generator=g), torch.randn(4, 24, generator=g)
    y[1, 3], res[2, 0] = float("nan"), float("inf")
    h, codes, scale = rowquant.residual_layernorm(y, torch.ones(4, 1), None, res, _norm(24, g), None, 127)
    assert torch.isnan(h[1:3]).all() and torch.isfinite(h[[0, 3]]).all()
    assert torch.isnan(scale[1:3]).all() and codes[1:3].eq(0).all() and torch.isfinite(scale[[0, 3]]).all()


def test_residual_layernorm_fits_only_affine_float32_norms():
    assert rowquant.residual_layernorm_fits(torch.nn.LayerNorm(8), 8)
    assert not rowquant.residual_layernorm_fits(torch.nn.LayerNorm(8), 16)
    assert not rowquant.residual_layernorm_fits(torch.nn.LayerNorm(8, elementwise_affine=False), 8)
    assert not rowquant.residual_layernorm_fits(torch.nn.LayerNorm(8, bias=False), 8)
    assert not rowquant.residual_layernorm_fits(torch.nn.LayerNorm(8).double(), 8)
