"""oneDNN weight layout: packed for the first real input size, once."""

import torch

from quantwise import numerics
from quantwise.kernels import StaticAct, make_conv_kernel, weight_code_limit
from quantwise.spec import Format, PerChannel, QuantSpec


def test_conv_repacks_once_for_the_first_real_input_size():
    """The weight layout is tuned to the first real input (not the construction probe); results
    do not change, and later sizes reuse that packing."""
    from quantwise.kernels.int8_conv import OneDnnConv
    torch.manual_seed(0)
    spec = QuantSpec(Format.INT8, granularity=PerChannel(0))
    w = torch.randn(16, 8, 3, 3)
    scale, zp = numerics.qparams_from_range(*numerics.tensor_range(w, spec), spec,
                                            code_limit=weight_code_limit("conv", 8))
    codes = numerics.quantize(w, scale, zp, spec)
    act = StaticAct(0.05, 3, QuantSpec(Format.UINT8, symmetric=False))
    kernel = make_conv_kernel(codes, scale, zp, spec, None, act, stride=1, padding=1, dilation=1,
                              groups=1)
    assert isinstance(kernel, OneDnnConv) and not kernel._variants  # the probe did not tune it
    x = torch.randn(2, 8, 7, 7)
    first = kernel(x)
    (packed,) = [v["packed"] for v in kernel._variants.values()]
    assert torch.equal(kernel(x), first)
    kernel(torch.randn(1, 8, 11, 11))
    assert [v["packed"] for v in kernel._variants.values()] == [packed]


def test_conv_input_sizes_that_trip_onednn_get_their_own_packing():
    """Per input size: padding >= the input size is done by hand, and a size-1 output under
    stride > 1 runs with stride 1, cropped (int8_conv._plan); results match the float conv."""
    import torch.nn.functional as F
    torch.manual_seed(1)
    spec = QuantSpec(Format.INT8, granularity=PerChannel(0))
    w = torch.randn(6, 3, 3, 3)
    scale, zp = numerics.qparams_from_range(*numerics.tensor_range(w, spec), spec,
                                            code_limit=weight_code_limit("conv", 8))
    codes = numerics.quantize(w, scale, zp, spec)
    w_hat = numerics.dequantize(codes, scale, zp, spec)
    act = StaticAct(0.05, 128, QuantSpec(Format.UINT8, symmetric=False))
    kernel = make_conv_kernel(codes, scale, zp, spec, None, act, stride=2, padding=1, dilation=1,
                              groups=1)
    plans = {}
    for size in [(9, 9), (1, 1), (2, 2), (1, 5), (3, 3)]:
        x = (torch.randn(2, 3, *size) * 2).clamp(-6, 6)
        xh = (torch.round(x / 0.05) + 128).clamp(0, 255).sub(128).mul(0.05)
        ref = F.conv2d(xh, w_hat, None, 2, 1)
        got = kernel(x)
        assert got.shape == ref.shape
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-3)
        plans[size] = kernel._plan(size)
    assert plans[(9, 9)] == (True, [2, 2], [0, 0])      # oneDNN pads, stride 2
    assert plans[(1, 1)] == (False, [1, 1], [1, 1])     # padding >= size: by hand; 1x1 out
    assert plans[(2, 2)] == (True, [1, 1], [0, 0])      # 1x1 out: stride 1, cropped
    assert plans[(1, 5)] == (False, [1, 2], [1, 1])


def test_4_bit_static_activations_run_on_the_8_bit_kernels_exactly():
    """uint4 / int4 input codes are a sub-range of the 8-bit ones: real kernels, and the result
    equals the float simulation up to float rounding of the exact integer sums."""
    import torch.nn.functional as F

    from quantwise.kernels import make_linear_kernel

    torch.manual_seed(0)
    spec = QuantSpec(Format.INT4, granularity=PerChannel(0))
    for fmt, zp in ((Format.UINT4, 3), (Format.INT4, 0)):
        act = StaticAct(0.2, zp, QuantSpec(fmt, symmetric=fmt == Format.INT4))
        w, x = torch.randn(24, 40), torch.randn(5, 40)
        scale, wzp = numerics.qparams_from_range(*numerics.tensor_range(w, spec), spec)
        codes = numerics.quantize(w, scale, wzp, spec)
        kernel = make_linear_kernel(codes, scale, wzp, spec, None, act)
        assert kernel.fallback_reason is None, kernel.fallback_reason
        xq = numerics.fake_quantize(x, torch.tensor(act.scale), torch.tensor(zp), act.spec)
        sim = F.linear(xq, numerics.dequantize(codes, scale, wzp, spec))
        torch.testing.assert_close(kernel(x), sim, rtol=1e-5, atol=1e-5)
