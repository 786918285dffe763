"""oneDNN weight layout: packed for the first real input size, once."""

import torch

from quantwise import numerics
from quantwise.kernels import StaticAct, make_conv_kernel
from quantwise.spec import Format, PerChannel, QuantSpec


def test_conv_repacks_once_for_the_first_real_input_size():
    """The weight layout is tuned to the first real input (not the construction probe); results
    do not change, and later sizes reuse that packing."""
    from quantwise.kernels.int8_conv import OneDnnConv
    torch.manual_seed(0)
    spec = QuantSpec(Format.INT8, granularity=PerChannel(0))
    w = torch.randn(16, 8, 3, 3)
    scale, zp = numerics.qparams_from_range(*numerics.tensor_range(w, spec), spec)
    codes = numerics.quantize(w, scale, zp, spec)
    act = StaticAct(0.05, 3, QuantSpec(Format.UINT8, symmetric=False))
    kernel = make_conv_kernel(codes, scale, zp, spec, None, act, stride=1, padding=1, dilation=1,
                              groups=1)
    assert isinstance(kernel, OneDnnConv) and not kernel._tuned  # the probe did not tune it
    x = torch.randn(2, 8, 7, 7)
    first = kernel(x)
    assert kernel._tuned
    packed = kernel.phases[0]["packed"]
    assert torch.equal(kernel(x), first)
    kernel(torch.randn(1, 8, 11, 11))
    assert kernel.phases[0]["packed"] is packed
