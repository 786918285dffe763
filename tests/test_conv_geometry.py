"""oneDNN int8 conv geometries: the defects it has (crashes, wrong values) and how the kernel
routes around them (kernels/int8_conv.py), plus randomized geometries against the simulation."""

from __future__ import annotations

import pytest
import torch

from quantwise.kernels import DynamicAct, make_conv_kernel
from quantwise.spec import Format, PerChannel, QuantSpec

from test_kernels import W8, check_conv, qweight, real, static_act

ONEDNN_DEFECTS = [  # (in_shape, weight_shape, stride, padding, dilation, groups): raw oneDNN
    ((1, 2, 3, 1), (1, 2, 2, 2), 2, (2, 3), 2, 1),         # SIGSEGV: padding beyond the input
    ((2, 3, 2, 1), (3, 3, 1, 2), (2, 1), 1, 2, 1),         # wrong values (~1e10 off)
    ((2, 1, 7, 6), (3, 1, 4, 4), (1, 3), 0, 1, 1),         # wrong: 1 input ch, width-1 output
    ((2, 2, 5, 2), (4, 1, 3, 2), (1, 2), (1, 0), 1, 2),    # wrong: channel multiplier 2
    ((2, 1, 7, 13), (36, 1, 3, 3), 1, 3, 1, 1),            # garbage: pad 3 > reach 2, zp != 0
    ((4, 24, 4, 4), (48, 1, 3, 3), 1, 3, 1, 24),           # garbage: same, channel multiplier 2
    ((2, 4, 2, 1), (8, 4, 1, 1), 2, 1, 2, 1),              # SIGSEGV: 1x1 with padding, width 1
    # found on AMX CPUs, handled per input size (OneDnnConv._plan):
    ((2, 2, 2, 1), (3, 2, 3, 4), (2, 1), (3, 3), (2, 1), 1),  # SIGSEGV: padding >= input size
    ((2, 4, 4, 7), (6, 2, 1, 4), (1, 2), (1, 0), (2, 2), 2),  # wrong: width-1 output, stride 2
]


@pytest.mark.parametrize("case", [
    ((2, 16, 9, 9), (16, 16, 3, 3), 1, 1, 1, 1),    # ResNet 3x3 / pad 1
    ((2, 3, 20, 20), (8, 3, 7, 7), 2, 3, 1, 1),     # stem 7x7 / stride 2 / pad 3
    ((1, 8, 5, 5), (8, 1, 3, 3), 1, 2, 2, 8),       # depthwise, dilated: pad 2 = reach 2
])
def test_conv_padding_inside_the_kernel_reach_goes_to_onednn(case):
    _static_conv_matches_simulation(case, "oneDNN padding")


def _static_conv_matches_simulation(case, *words):
    in_shape, w_shape, stride, padding, dilation, groups = case
    w, x, bias = torch.randn(*w_shape), torch.randn(*in_shape), torch.randn(w_shape[0])
    codes, scale, zp = qweight(w, W8)
    act = static_act(x)
    kernel = make_conv_kernel(codes, scale, zp, W8, bias, act, stride=stride, padding=padding,
                              dilation=dilation, groups=groups)
    real(kernel, *words)
    check_conv(kernel, x, codes, scale, zp, W8, bias, act, stride, padding, dilation, groups)
    return kernel


@pytest.mark.parametrize("case", ONEDNN_DEFECTS)
def test_conv_avoids_onednn_defects(case):
    kernel = _static_conv_matches_simulation(case, "oneDNN")
    _, w_shape, _, padding, dilation, _ = case
    pads = padding if isinstance(padding, tuple) else (padding, padding)
    dils = dilation if isinstance(dilation, tuple) else (dilation, dilation)
    beyond_reach = any(p > d * (k - 1) for p, d, k in zip(pads, dils, w_shape[2:]))
    if beyond_reach:  # oneDNN crashes or gives garbage there: the hand-padded buffer is used
        assert "oneDNN padding" not in kernel.name


def test_conv_random_geometries():
    import random
    rng = random.Random(7)
    checked = 0
    while checked < 60:
        dim, transposed = rng.choice([1, 2, 2, 3]), rng.random() < 0.4
        g = rng.choice([1, 1, 2, 3])
        cin, cout = g * rng.choice([1, 1, 2, 3]), g * rng.choice([1, 2, 3])
        k, s, d, p, sp = ([rng.randint(lo, hi) for _ in range(dim)] for lo, hi in
                          [(1, 4), (1, 3), (1, 2), (0, 3), (1, 7)])
        op = [rng.randint(0, max(a, b) - 1) for a, b in zip(s, d)] if transposed else [0] * dim
        if transposed:
            if min((n - 1) * a - 2 * b + c * (e - 1) + f + 1 for n, a, b, c, e, f in zip(sp, s, p, d, k, op)) <= 0:
                continue
            w, spec = torch.randn(cin, cout // g, *k), QuantSpec(Format.INT8, granularity=PerChannel(1))
        else:
            if any(n + 2 * b < c * (e - 1) + 1 for n, b, c, e in zip(sp, p, d, k)):
                continue
            w, spec = torch.randn(cout, cin // g, *k), W8
        x, bias = torch.randn(2, cin, *sp), torch.randn(cout)
        codes, scale, zp = qweight(w, spec)
        act = rng.choice([static_act(x), static_act(x, Format.INT8, True), DynamicAct(QuantSpec())])
        kernel = make_conv_kernel(codes, scale, zp, spec, bias, act, stride=s, padding=p, dilation=d,
                                  groups=g, transposed=transposed, output_padding=op)
        real(kernel, "oneDNN")
        check_conv(kernel, x, codes, scale, zp, spec, bias, act, s, p, d, g, transposed, op)
        checked += 1
