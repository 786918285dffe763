"""Real CPU kernels vs the float simulation.

Tolerance (stated once, used everywhere): the integer kernels accumulate exactly in int32 from
input codes that are bit-identical to numerics.quantize, so the only differences are float32
roundings -- the simulation's own dot product (<= gamma_K = K*u relative to sum |x_hat*w_hat|,
u = 2^-24), the rounding of x_hat and w_hat, and the kernel's rescale. Hence, elementwise,

    |kernel - sim| <= 2 (K + 4) u (|x_hat| @ |w_hat|^T + |bias|)      (K = fan-in)

i.e. ~5e-5 of the magnitude sum at K = 384. Observed errors are ~1e-7 of it, so a second,
typical-case check asks for 8 sqrt(K + 4) u (1e-5 at K = 384): one input code off by one step
moves an output by ~1/(25 K) of the magnitude sum (~1e-4 at K = 384) and fails it. bf16
kernels round their input and output to bf16: add 2^-7 (|x| @ |w|^T + |bias|). Kernels that
run the simulation's own float op on identical weights (fallbacks, per-call dequantization)
must match it exactly.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from quantwise import numerics
from quantwise.kernels import (DynamicAct, Kernel, StaticAct, make_conv_kernel, make_linear_kernel,
                               weight_code_limit)
from quantwise.kernels.gemv import FewRowsLinear
from quantwise.kernels.probe import probe
from quantwise.kernels.base import StaticU8Quantizer, dynamic_scale, quantize_symmetric_i8
from quantwise.spec import Format, PerChannel, PerGroup, PerTensor, PerToken, QuantSpec

U = 2.0 ** -24
W8 = QuantSpec(Format.INT8, symmetric=True, narrow_range=True, granularity=PerChannel(0))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def qweight(w: torch.Tensor, spec: QuantSpec, kind: str = "linear"):
    """Codes as quantize() makes them on this CPU: symmetric int8 weights limited to 7 bits
    where the probe found only int16-pair kernels (kernels.select)."""
    lo, hi = numerics.tensor_range(w, spec)
    limit = weight_code_limit(kind, 8) if spec.format == Format.INT8 and spec.symmetric else None
    scale, zp = numerics.qparams_from_range(lo, hi, spec, code_limit=limit)
    return numerics.quantize(w, scale, zp, spec), scale, zp


def static_act(x: torch.Tensor, fmt: Format = Format.UINT8, symmetric: bool = False) -> StaticAct:
    spec = QuantSpec(fmt, symmetric=symmetric, granularity=PerTensor())
    scale, zp = numerics.qparams_from_range(*numerics.tensor_range(x * 0.9, spec), spec)
    return StaticAct(float(scale), int(zp), spec)


def sim_input(x: torch.Tensor, act) -> torch.Tensor:
    if act is None:
        return x
    if isinstance(act, StaticAct):
        return numerics.fake_quantize(x, torch.tensor(act.scale), torch.tensor(act.zero_point),
                                      act.spec)
    scale, zp = numerics.qparams_from_range(*numerics.tensor_range(x, act.spec), act.spec)
    return numerics.fake_quantize(x, scale, zp, act.spec)


def assert_within(out, sim, magnitude, fan_in, extra=0.0):
    """The worst-case bound of the module docstring, plus a typical-case check (rounding errors
    add like a random walk: ~sqrt(K) u) that is tight enough to catch one wrong input code."""
    assert out.shape == sim.shape and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    err = (out - sim).abs()
    tol = (2 * (fan_in + 4) * U + extra) * magnitude + 1e-30
    excess = (err - tol).max().item()
    assert excess <= 0, f"max excess over bound {excess:.3g} (max |sim| {sim.abs().max():.3g})"
    typical = (8 * math.sqrt(fan_in + 4) * U + extra) * magnitude + 1e-30
    assert (err / typical).max().item() <= 1.0


def check_linear(kernel, x, codes, scale, zp, spec, bias, act, extra=0.0):
    w_hat = numerics.dequantize(codes, scale, zp, spec)
    xh = sim_input(x, act)
    sim = F.linear(xh, w_hat, bias)
    mag = F.linear(xh.abs(), w_hat.abs(), None if bias is None else bias.abs())
    assert_within(kernel(x), sim, mag, codes.shape[1], extra)


def real(kernel, *words):
    assert isinstance(kernel, Kernel)
    assert kernel.fallback_reason is None, kernel.fallback_reason
    for w in words:
        assert w in kernel.name, kernel.name


# ---------------------------------------------------------------- input quantization is exact
def test_static_input_codes_equal_numerics_including_ties():
    scale = 0.0375
    k = torch.arange(-200, 200, dtype=torch.float32)
    ties = (k + 0.5) * scale
    near = torch.cat([ties, torch.nextafter(ties, ties + 1), torch.nextafter(ties, ties - 1)])
    x = torch.cat([near, torch.randn(5000) * 3, torch.tensor([0.0, -0.0, 1e30, -1e30])])
    for fmt, zp in [(Format.UINT8, 131), (Format.INT8, -7), (Format.INT8, 0)]:
        act = StaticAct(scale, zp, QuantSpec(fmt, symmetric=zp == 0))
        ref = numerics.quantize(x, torch.tensor(scale), torch.tensor(zp), act.spec).to(torch.int16)
        q = StaticU8Quantizer(act)
        assert torch.equal(q(x).to(torch.int16) - q.shift, ref)


def test_dynamic_per_token_codes_equal_numerics():
    x = torch.randn(33, 37) * torch.logspace(-3, 3, 33)[:, None]
    x[5] = 0.0
    x[6, :] = 1e-42  # subnormal rows: scale floors at the smallest normal
    spec = QuantSpec(Format.INT8, symmetric=True, granularity=PerToken())
    scale, zp = numerics.qparams_from_range(*numerics.tensor_range(x, spec), spec)
    _, s, bad = dynamic_scale(x, 127, per_row=True)
    assert bad is None and torch.equal(s.squeeze(1), scale)
    _, s_tensor, _ = dynamic_scale(x, 127, per_row=False)
    per_tensor = QuantSpec(Format.INT8, symmetric=True)
    assert torch.equal(s_tensor, numerics.qparams_from_range(*numerics.tensor_range(x, per_tensor),
                                                             per_tensor)[0])
    assert torch.equal(quantize_symmetric_i8(x, s), numerics.quantize(x, scale, zp, spec))


# ---------------------------------------------------------------- W8A8 Linear
@pytest.mark.parametrize("shape,k,n", [((1,), 37, 5), ((64,), 384, 48), ((2, 7), 37, 5), ((3,), 5, 37)])
@pytest.mark.parametrize("fmt,symmetric", [(Format.UINT8, False), (Format.INT8, False), (Format.INT8, True)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_static_linear(shape, k, n, fmt, symmetric, with_bias):
    w, x = torch.randn(n, k), torch.randn(*shape, k) * 2
    bias = torch.randn(n) if with_bias else None
    codes, scale, zp = qweight(w, W8)
    act = static_act(x, fmt, symmetric)
    kernel = make_linear_kernel(codes, scale, zp, W8, bias, act)
    real(kernel, "int32")  # oneDNN or _int_mm, whichever the probe measured faster
    check_linear(kernel, x, codes, scale, zp, W8, bias, act)
    assert kernel.nbytes() <= n * k + 24 * n  # int8 weights + scales, no float copy


@pytest.mark.parametrize("wspec", [
    QuantSpec(Format.UINT8, symmetric=False, granularity=PerChannel(0)),
    QuantSpec(Format.INT8, symmetric=False, granularity=PerTensor()),
    QuantSpec(Format.UINT4, symmetric=False, granularity=PerChannel(0))])
@pytest.mark.parametrize("dynamic", [False, True])
def test_affine_weights_use_int_mm_with_corrections(wspec, dynamic):
    w, x, bias = torch.randn(6, 40) + 0.3, torch.randn(2, 5, 40), torch.randn(6)
    codes, scale, zp = qweight(w, wspec)
    act = DynamicAct(QuantSpec(Format.INT8, granularity=PerToken())) if dynamic else static_act(x, Format.INT8)
    kernel = make_linear_kernel(codes, scale, zp, wspec, bias, act)
    if wspec.format == Format.UINT4 or not probe().saturates("int_mm"):
        if kernel.fallback_reason is None:  # _int_mm, or FBGEMM where _int_mm is a slow loop
            assert "torch._int_mm" in kernel.name or "FBGEMM" in kernel.name, kernel.name
        else:  # AVX2-only CPUs: _int_mm exact but a scalar loop, FBGEMM saturates on 8-bit codes
            assert wspec.format != Format.UINT4 and "slower than float32" in kernel.fallback_reason
        check_linear(kernel, x, codes, scale, zp, wspec, bias, act)
    else:  # 8-bit affine codes where _int_mm sums int16 pairs: the exact simulation, said so
        assert "int16 pairs" in kernel.fallback_reason
        check_linear(kernel, x, codes, scale, zp, wspec, bias, act)


@pytest.mark.parametrize("shape,k,n", [((1,), 37, 5), ((2, 9), 37, 5), ((70,), 384, 96)])
@pytest.mark.parametrize("gran", [PerToken(), PerTensor()])
# forced, so every path runs on every CPU (per-token: AMX CPUs pick oneDNN, AVX2-only FBGEMM)
@pytest.mark.parametrize("gemm", ["onednn", "int_mm", "fbgemm"])
def test_dynamic_linear(shape, k, n, gran, gemm, monkeypatch):
    monkeypatch.setenv("QUANTWISE_INT8_GEMM", gemm)
    w, x, bias = torch.randn(n, k), torch.randn(*shape, k), torch.randn(n)
    x[..., 0, :3] *= 50  # an outlier
    codes, scale, zp = qweight(w, W8)
    act = DynamicAct(QuantSpec(Format.INT8, symmetric=True, granularity=gran))
    kernel = make_linear_kernel(codes, scale, zp, W8, bias, act)
    label = {"onednn": "oneDNN", "int_mm": "torch._int_mm", "fbgemm": "FBGEMM"}[gemm]
    real(kernel, label if isinstance(gran, PerToken) or gemm == "fbgemm" else "int32")
    assert ("per-token" in kernel.name) == isinstance(gran, PerToken)
    check_linear(kernel, x, codes, scale, zp, W8, bias, act)


@pytest.mark.parametrize("gran", [PerToken(), PerTensor()])
@pytest.mark.parametrize("with_bias", [True, False])
def test_dynamic_zero_rows_give_zeros_not_nan(gran, with_bias):
    w, x = torch.randn(5, 37), torch.randn(4, 3, 37)
    x[1] = 0.0
    bias = torch.randn(5) if with_bias else None
    codes, scale, zp = qweight(w, W8)
    kernel = make_linear_kernel(codes, scale, zp, W8, bias, DynamicAct(QuantSpec(granularity=gran)))
    out = kernel(x)
    assert torch.isfinite(out).all()
    expected = torch.zeros(3, 5) if bias is None else bias.expand(3, 5)
    assert torch.equal(out[1], expected)
    assert torch.equal(kernel(torch.zeros(2, 37)), torch.zeros(2, 5) if bias is None else bias.expand(2, 5))


@pytest.mark.parametrize("gran", [PerToken(), PerTensor()])
def test_dynamic_nonfinite_rows_do_not_poison_others(gran):
    w, x, bias = torch.randn(5, 37), torch.randn(4, 37), torch.randn(5)
    codes, scale, zp = qweight(w, W8)
    act = DynamicAct(QuantSpec(granularity=gran))
    kernel = make_linear_kernel(codes, scale, zp, W8, bias, act)
    clean = kernel(x[2:])
    x[0, 3], x[1, 5] = float("nan"), float("-inf")
    out = kernel(x)
    assert not torch.isfinite(out[:2]).any()  # NaN/Inf rows give non-finite rows, as in float
    assert torch.equal(out[2:], clean)  # per-tensor: the scale comes from the finite rows only


def test_dynamic_conv_nonfinite_sample():
    w, x = torch.randn(4, 3, 3, 3), torch.randn(3, 3, 6, 6)
    codes, scale, zp = qweight(w, W8)
    kernel = make_conv_kernel(codes, scale, zp, W8, None, DynamicAct(QuantSpec()), stride=1,
                              padding=1, dilation=1, groups=1)
    clean = kernel(x[1:])
    x[0, 1, 2, 2] = float("inf")
    out = kernel(x)
    assert torch.isnan(out[0]).all() and torch.equal(out[1:], clean)


def test_w4a8_runs_int8_kernel():
    spec = QuantSpec(Format.INT4, symmetric=True, granularity=PerChannel(0))
    w, x = torch.randn(16, 64), torch.randn(8, 64)
    codes, scale, zp = qweight(w, spec)
    act = static_act(x)
    kernel = make_linear_kernel(codes, scale, zp, spec, None, act)
    real(kernel, "int32")
    check_linear(kernel, x, codes, scale, zp, spec, None, act)


# ---------------------------------------------------------------- weight-only Linear
@pytest.mark.parametrize("wspec", [W8, QuantSpec(Format.UINT8, symmetric=False, granularity=PerChannel(0)),
                                   QuantSpec(Format.INT8, granularity=PerTensor())])
def test_weight_only_int8(wspec):
    w, x, bias = torch.randn(5, 37), torch.randn(2, 3, 37), torch.randn(5)
    codes, scale, zp = qweight(w, wspec)
    kernel = make_linear_kernel(codes, scale, zp, wspec, bias, None)
    real(kernel, "fp16", "FBGEMM")
    check_linear(kernel, x, codes, scale, zp, wspec, bias, None)
    assert kernel.nbytes() <= 2 * 5 * 37 + 8 * 5


@pytest.mark.parametrize("gran", [PerGroup(32), PerGroup(128), PerGroup(256), PerChannel(0)])
@pytest.mark.parametrize("m", [1, 5, 64])
def test_weight_only_int4_runs_torch_int4_gemm(gran, m):
    n, k = 48, 512
    spec = QuantSpec(Format.INT4, granularity=gran)
    w, x, bias = torch.randn(n, k), torch.randn(m, k), torch.randn(n)
    codes, scale, zp = qweight(w, spec)
    kernel = make_linear_kernel(codes, scale, zp, spec, bias, None)
    real(kernel, "int4", "packed two per byte", "bf16-rounded", "_weight_int4pack_mm_for_cpu")
    sim = F.linear(x, numerics.dequantize(codes, scale, zp, spec), bias)
    full = (scale.repeat_interleave(gran.size, dim=1) if isinstance(gran, PerGroup)
            else scale.reshape(-1, 1).expand(n, k))
    step = x.abs() @ full.t()  # one weight quantization step, per output element
    err = (kernel(x) - sim).abs()
    assert (err <= 0.02 * step).all(), float((err / step).max())  # bf16 input: ~0.4% measured
    # half a byte per weight; a layer that also runs the compiled GEMV for 1-8 rows keeps a
    # second packed copy in its layout and one float per row (kernels/gemv.py)
    copies = 2 if isinstance(kernel, FewRowsLinear) else 1
    assert kernel.nbytes() <= copies * (n * k // 2 + 4 * n * (k // 32) + 4 * n) + 4 * n * (copies - 1)


@pytest.mark.parametrize("fmt,symmetric,k,gran", [
    (Format.UINT4, False, 384, PerGroup(64)),   # affine: the int4 GEMM takes no integer zero point
    (Format.INT4, True, 37, PerChannel(0)),     # K not divisible by a supported group
    (Format.INT4, True, 48, PerGroup(16)),      # group size the op does not support
])
def test_weight_only_int4_other_layouts_dequantize_per_call(fmt, symmetric, k, gran):
    n = 48
    spec = QuantSpec(fmt, symmetric=symmetric, granularity=gran)
    w, x, bias = torch.randn(n, k), torch.randn(3, k), torch.randn(n)
    codes, scale, zp = qweight(w, spec)
    kernel = make_linear_kernel(codes, scale, zp, spec, bias, None)
    assert "packed two per byte" in kernel.name and kernel.fallback_reason
    sim = F.linear(x, numerics.dequantize(codes, scale, zp, spec), bias)
    assert torch.equal(kernel(x), sim)  # identical weights, identical float op
    assert kernel.nbytes() - 4 * n <= math.ceil(k / 2) * n + 8 * scale.numel()


def test_weight_only_int8_per_group_dequantizes_per_call():
    spec = QuantSpec(Format.INT8, granularity=PerGroup(32))
    w, x = torch.randn(8, 64), torch.randn(2, 64)
    codes, scale, zp = qweight(w, spec)
    kernel = make_linear_kernel(codes, scale, zp, spec, None, None)
    assert kernel.fallback_reason and "per call" in kernel.name
    assert torch.equal(kernel(x), F.linear(x, numerics.dequantize(codes, scale, zp, spec)))


# ---------------------------------------------------------------- fp16 / bf16
@pytest.mark.parametrize("fmt", [Format.BF16, Format.FP16])
def test_half_linear(fmt):
    spec = QuantSpec(fmt)
    w, x, bias = torch.randn(5, 37), torch.randn(2, 4, 37), torch.randn(5)
    codes, scale, zp = qweight(w, spec)
    kernel = make_linear_kernel(codes, scale, zp, spec, bias, None)
    if fmt == Format.BF16 and not kernel.native:  # measured slower than float32 here
        assert "upcast" in kernel.name and "measured" in kernel.fallback_reason
        assert torch.equal(kernel(x), F.linear(x, codes.float(), bias))
    else:
        real(kernel, fmt.value)
    w_hat = codes.float()
    sim, mag = F.linear(x, w_hat, bias), F.linear(x.abs(), w_hat.abs(), bias.abs())
    assert_within(kernel(x), sim, mag, 37, extra=2.0 ** -7 if fmt == Format.BF16 else 0.0)
    assert kernel.nbytes() == 2 * 5 * 37 + 4 * 5


@pytest.mark.parametrize("native", [True, False])
def test_bf16_kernels_follow_the_measured_choice(native, monkeypatch):
    """bf16 runs natively only where the probe times it faster than float32 on the upcast
    weights (not on AVX2-only CPUs, where it measured 4-5x slower): else exact upcast."""
    from quantwise.kernels import half

    times = {"bf16": 1.0, "upcast": 2.0, "fp32": 1.5} if native else \
        {"bf16": 9.0, "upcast": 2.0, "fp32": 1.8}
    monkeypatch.setattr(half, "_native_bf16", lambda key, make_fns: half._choice(times))
    spec = QuantSpec(Format.BF16)
    w, bias = torch.randn(24, 64), torch.randn(24)
    codes, scale, zp = qweight(w, spec)
    lin = make_linear_kernel(codes, scale, zp, spec, bias, None)
    wc, cscale, czp = qweight(torch.randn(8, 4, 3, 3), spec)
    conv = make_conv_kernel(wc, cscale, czp, spec, None, None, stride=1, padding=1,
                            dilation=1, groups=1)
    x, xc = torch.randn(3, 64), torch.randn(2, 4, 7, 7)
    for kernel in (lin, conv):
        assert kernel.native is native and (kernel.fallback_reason is None) is native
        assert kernel.speed_vs_fp32 == pytest.approx(1.5 if native else 0.9)
    if not native:
        assert "5.0x the float32 time" in lin.fallback_reason
        assert torch.equal(lin(x), F.linear(x, codes.float(), bias))
        assert torch.equal(conv(xc), F.conv2d(xc, wc.float(), None, 1, 1))


@pytest.mark.parametrize("fmt", [Format.BF16, Format.FP16])
def test_half_conv(fmt):
    spec = QuantSpec(fmt)
    w, x, bias = torch.randn(6, 3, 3, 3), torch.randn(2, 3, 9, 9), torch.randn(6)
    codes, scale, zp = qweight(w, spec)
    kernel = make_conv_kernel(codes, scale, zp, spec, bias, None, stride=1, padding=1, dilation=1, groups=1)
    sim = F.conv2d(x, codes.float(), bias, 1, 1)
    if fmt == Format.BF16 and not kernel.native:
        assert "upcast" in kernel.name and "measured" in kernel.fallback_reason
        assert torch.equal(kernel(x), sim)
    elif fmt == Format.BF16:
        real(kernel, "bf16")
        mag = F.conv2d(x.abs(), codes.float().abs(), bias.abs(), 1, 1)
        assert_within(kernel(x), sim, mag, 27, extra=2.0 ** -7)
    else:
        assert "upcast" in kernel.name and "fp16" in kernel.fallback_reason
        assert torch.equal(kernel(x), sim)
    assert kernel.nbytes() == 2 * w.numel() + 4 * 6


# ---------------------------------------------------------------- W8A8 Conv
CONV_CASES = [  # (in_shape, weight_shape, stride, padding, dilation, groups)
    ((2, 8, 11, 11), (6, 8, 3, 3), 1, 1, 1, 1),
    ((1, 6, 10, 9), (9, 2, 3, 3), 2, 1, 1, 3),      # grouped, strided
    ((2, 8, 10, 10), (8, 1, 3, 3), 1, 2, 2, 8),     # depthwise, dilated
    ((2, 5, 7, 7), (7, 5, 1, 1), 1, 0, 1, 1),       # pointwise, odd channels
    ((2, 4, 9, 9), (6, 4, 3, 3), 1, "same", 1, 1),
    ((3, 4, 17), (5, 4, 3), 2, 1, 1, 1),            # conv1d
    ((1, 3, 5, 6, 6), (4, 3, 3, 3, 3), 1, 1, 1, 1),  # conv3d
]


def check_conv(kernel, x, codes, scale, zp, spec, bias, act, stride, padding, dilation, groups,
               transposed=False, output_padding=0):
    dim = codes.dim() - 2
    w_hat = numerics.dequantize(codes, scale, zp, spec)
    xh = sim_input(x, act)
    if transposed:
        fn = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[dim - 1]
        run = lambda a, w, b: fn(a, w, b, stride, padding, output_padding, groups, dilation)  # noqa: E731
        fan_in = codes.shape[0] // groups * codes[0, 0].numel()
    else:
        fn = (F.conv1d, F.conv2d, F.conv3d)[dim - 1]
        run = lambda a, w, b: fn(a, w, b, stride, padding, dilation, groups)  # noqa: E731
        fan_in = codes[0].numel()
    sim = run(xh, w_hat, bias)
    mag = run(xh.abs(), w_hat.abs(), None if bias is None else bias.abs())
    assert_within(kernel(x), sim, mag, fan_in)


@pytest.mark.parametrize("case", CONV_CASES)
@pytest.mark.parametrize("dynamic", [False, True])
def test_conv(case, dynamic):
    in_shape, w_shape, stride, padding, dilation, groups = case
    w, x, bias = torch.randn(*w_shape), torch.randn(*in_shape), torch.randn(w_shape[0])
    codes, scale, zp = qweight(w, W8)
    act = DynamicAct(QuantSpec(Format.INT8)) if dynamic else static_act(x)
    kernel = make_conv_kernel(codes, scale, zp, W8, bias, act, stride=stride, padding=padding,
                              dilation=dilation, groups=groups)
    real(kernel, "oneDNN", f"qconv{len(in_shape) - 2}d")
    check_conv(kernel, x, codes, scale, zp, W8, bias, act, stride, padding, dilation, groups)
    assert kernel.nbytes() <= w.numel() + 20 * w_shape[0]


def test_conv_memory_format_follows_input():
    w, x = torch.randn(8, 4, 3, 3), torch.randn(2, 4, 12, 12)
    codes, scale, zp = qweight(w, W8)
    kernel = make_conv_kernel(codes, scale, zp, W8, None, static_act(x), stride=1, padding=1,
                              dilation=1, groups=1)
    out = kernel(x)
    assert out.is_contiguous()
    out_cl = kernel(x.contiguous(memory_format=torch.channels_last))
    assert out_cl.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(out, out_cl)
    assert torch.equal(kernel(x[0]), out[0])  # unbatched input


@pytest.mark.parametrize("stride,padding,output_padding,groups,dilation,dynamic", [
    (2, 1, 1, 1, 1, False), (1, 0, 0, 2, 1, False), (2, 0, 0, 1, 1, True), (3, 2, 2, 2, 2, False),
    (1, 3, 0, 1, 1, True)])
def test_conv_transpose(stride, padding, output_padding, groups, dilation, dynamic):
    cin, cout = 4, 6
    w, x, bias = torch.randn(cin, cout // groups, 3, 3), torch.randn(2, cin, 5, 6), torch.randn(cout)
    spec = QuantSpec(Format.INT8, symmetric=True, narrow_range=True, granularity=PerChannel(1))
    codes, scale, zp = qweight(w, spec)
    act = DynamicAct(QuantSpec(Format.INT8)) if dynamic else static_act(x, Format.INT8)
    kernel = make_conv_kernel(codes, scale, zp, spec, bias, act, stride=stride, padding=padding,
                              dilation=dilation, groups=groups, transposed=True,
                              output_padding=(output_padding, output_padding))
    real(kernel, "oneDNN", "sub-pixel")
    check_conv(kernel, x, codes, scale, zp, spec, bias, act, stride, padding, dilation, groups,
               transposed=True, output_padding=output_padding)


def test_conv_transpose1d():
    w, x, bias = torch.randn(3, 5, 4), torch.randn(2, 3, 7), torch.randn(5)
    spec = QuantSpec(Format.INT8, symmetric=True, granularity=PerChannel(1))
    codes, scale, zp = qweight(w, spec)
    act = static_act(x)
    kernel = make_conv_kernel(codes, scale, zp, spec, bias, act, stride=2, padding=1, dilation=1,
                              groups=1, transposed=True, output_padding=1)
    real(kernel, "qconv1d")
    check_conv(kernel, x, codes, scale, zp, spec, bias, act, 2, 1, 1, 1, transposed=True,
               output_padding=1)


# ---------------------------------------------------------------- fallbacks
FALLBACKS = [  # (description, linear?, weight spec, act factory, words in reason)
    ("fp8 weights", True, QuantSpec(Format.FP8_E4M3, granularity=PerChannel(0)), lambda x: None, "fp8"),
    ("fp8 W8A8", True, QuantSpec(Format.FP8_E5M2), lambda x: static_act(x), "fp8"),
    ("per-group W8A8", True, QuantSpec(Format.INT8, granularity=PerGroup(16)), lambda x: static_act(x), "K"),
    ("int8 act + bf16 weights", True, QuantSpec(Format.BF16), lambda x: static_act(x), "bf16"),
    ("fp32 weights", True, QuantSpec(Format.FP32), lambda x: None, "not quantized"),
    ("affine dynamic", True, W8, lambda x: DynamicAct(QuantSpec(Format.INT8, symmetric=False)), "symmetric"),
    ("weight-only conv", False, W8, lambda x: None, "weight-only"),
    ("per-token conv", False, W8, lambda x: DynamicAct(QuantSpec(granularity=PerToken())), "PerToken"),
    ("uint8 conv weights", False, QuantSpec(Format.UINT8, symmetric=False, granularity=PerChannel(0)),
     lambda x: static_act(x), "symmetric"),
    ("per-channel acts", False, W8, lambda x: StaticAct(0.1, 0, QuantSpec(granularity=PerChannel(1))), "per-tensor"),
]


@pytest.mark.parametrize("desc,linear,wspec,make_act,words", FALLBACKS, ids=[f[0] for f in FALLBACKS])
def test_fallbacks_say_why_and_equal_simulation(desc, linear, wspec, make_act, words):
    if linear:
        w, x, bias = torch.randn(5, 32), torch.randn(3, 32), torch.randn(5)
    else:
        w, x, bias = torch.randn(4, 3, 3, 3), torch.randn(1, 3, 6, 6), torch.randn(4)
    codes, scale, zp = qweight(w, wspec)
    act = make_act(x)
    if linear:
        kernel = make_linear_kernel(codes, scale, zp, wspec, bias, act)
        sim = F.linear(sim_input(x, act), numerics.dequantize(codes, scale, zp, wspec), bias)
    else:
        kernel = make_conv_kernel(codes, scale, zp, wspec, bias, act, stride=1, padding=1,
                                  dilation=1, groups=1)
        sim = F.conv2d(sim_input(x, act), numerics.dequantize(codes, scale, zp, wspec), bias, 1, 1)
    assert isinstance(kernel, Kernel)
    assert kernel.fallback_reason and words in kernel.fallback_reason, kernel.fallback_reason
    assert "simulation" in kernel.name or "float32" in kernel.name
    torch.testing.assert_close(kernel(x), sim, rtol=0, atol=0)


@pytest.mark.filterwarnings("ignore:Using padding='same'")
def test_asymmetric_same_padding_falls_back():
    w, x = torch.randn(4, 3, 2, 2), torch.randn(1, 3, 6, 6)
    codes, scale, zp = qweight(w, W8)
    act = static_act(x)
    kernel = make_conv_kernel(codes, scale, zp, W8, None, act, stride=1, padding="same",
                              dilation=1, groups=1)
    assert "padding" in kernel.fallback_reason
    sim = F.conv2d(sim_input(x, act), numerics.dequantize(codes, scale, zp, W8), None, 1, "same")
    torch.testing.assert_close(kernel(x), sim, rtol=0, atol=0)


def test_int4pack_rows_packed_in_chunks_give_the_whole_layout(monkeypatch):
    from quantwise.kernels.weight_only import Int4PackLinear

    spec = QuantSpec(Format.INT4, symmetric=True, granularity=PerGroup(32))
    codes = torch.randint(-8, 8, (160, 64), dtype=torch.int8, generator=torch.Generator().manual_seed(0))
    scale = torch.rand(160, 2) + 0.1
    whole = Int4PackLinear(codes, scale, spec, None)
    monkeypatch.setattr(Int4PackLinear, "ROWS", 64)  # 3 calls, the last one 32 rows
    chunked = Int4PackLinear(codes, scale, spec, None)
    assert torch.equal(chunked.packed, whole.packed)
    x = torch.randn(3, 64)
    assert torch.equal(chunked(x), whole(x))
