"""The int8 graph path: fused conv+ReLU / conv+add(+ReLU), uint8 codes between int8 convs."""

import copy
import warnings

import pytest
import torch
from torch import nn

import quantwise
from quantwise.int8graph import FusedConv, remove_int8_graph
from quantwise.numerics import dequantize, quantize
from quantwise.spec import Format, QuantSpec
from quantwise.state import get_state
from small_models import MiniResNet, randomize_bn


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    model = randomize_bn(MiniResNet())
    calib = [torch.randn(4, 3, 32, 32) for _ in range(3)]
    return model, calib, torch.randn(5, 3, 32, 32)


@pytest.fixture(scope="module")
def qresnet(resnet):
    model, calib, _ = resnet
    return quantwise.quantize(model, "w8a8", calib, progress=False)


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def test_resnet_is_fused_with_uint8_edges(qresnet):
    report = get_state(qresnet).graph
    assert report.applied
    # stem+ReLU, block1 conv1+ReLU, conv2+add+ReLU, block2 conv1+ReLU, its add, the downsample
    assert len(report.fused) == 6
    assert sum("residual add" in v for v in report.fused.values()) == 2
    assert report.uint8_pools == 1
    # every fused conv but the last block's output (consumed by float pooling) writes uint8
    assert report.uint8_edges == 5
    assert "int8 graph path: 6 convs fused" in str(quantwise.summary(qresnet))


def test_the_heavier_conv_absorbs_a_residual_add(qresnet):
    """A downsample block's add has a conv on both sides: the 3x3 conv takes it (in-place sum
    and ReLU), the 1x1 downsample writes codes with a zero point (the slower output form for
    oneDNN's AVX2 int8 kernel, cheapest on the small conv)."""
    fused = get_state(qresnet).graph.fused
    assert "residual add" in fused["block2.conv2"]
    assert "residual add" not in fused["block2.down.0"] and "uint8 out" in fused["block2.down.0"]


def test_graph_matches_the_per_layer_path(resnet, qresnet):
    model, _, x = resnet
    per_layer = copy.deepcopy(qresnet)
    remove_int8_graph(per_layer)
    with torch.no_grad():
        ref, fused, unfused = model(x), qresnet(x), per_layer(x)
    assert _rel(unfused, ref) < 0.05
    # uint8 edges add at most one code of rounding per edge: same quality as layer by layer
    assert _rel(fused, ref) < _rel(unfused, ref) * 1.5 + 0.005
    assert _rel(fused, unfused) < 0.03


@pytest.mark.parametrize("size", [(8, 8), (16, 4), (12, 3), (4, 16), (3, 3), (1, 1)])
def test_small_inputs_match_the_per_layer_path_and_float(resnet, qresnet, size):
    """Small images drive strided convs to 1x1 outputs and padding past the input: the sizes
    where oneDNN is routed around (int8_conv._plan), in the fused graph too."""
    model, _, _ = resnet
    x = torch.randn(4, 3, *size)
    per_layer = copy.deepcopy(qresnet)
    remove_int8_graph(per_layer)
    with torch.no_grad():
        ref, fused, unfused = model(x), qresnet(x), per_layer(x)
    assert _rel(unfused, ref) < 0.1
    assert _rel(fused, unfused) < 0.05


def test_batch_sizes_and_unbatched_inputs(resnet, qresnet):
    model, _, x = resnet
    with torch.no_grad():
        for batch in (1, 3):
            assert _rel(qresnet(x[:batch]), model(x[:batch])) < 0.06
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no fallback warning: handled inside the graph
            stem_only = quantwise.quantize(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(),
                                                         nn.Conv2d(4, 4, 3, padding=1)),
                                           "w8a8", [torch.randn(2, 3, 8, 8)], progress=False)
            out = stem_only(torch.randn(3, 8, 8))  # unbatched [C, H, W]
    assert out.shape == (4, 8, 8)


@pytest.mark.parametrize("stride,size", [(1, (9, 9)), (2, (9, 2)), (2, (2, 2)), (1, (1, 1))])
def test_fused_conv_equals_the_quantized_simulation(stride, size):
    """uint8 in -> conv (+ReLU, + uint8 residual) -> uint8 out, against float64 math; also at
    input sizes routed around oneDNN (1-wide outputs under stride 2, padding past the input)."""
    torch.manual_seed(3)
    net = nn.Sequential(nn.Conv2d(8, 8, 3, stride, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
    q = quantwise.quantize(net, "w8a8", [torch.randn(2, 8, 9, 9)], progress=False)
    layer = q[0]
    x = torch.randn(2, 8, *size)
    xs, xzp = layer.input_scale, layer.input_zero_point
    xq = quantize(x, xs, xzp, layer.act_spec).to(torch.uint8).contiguous(memory_format=torch.channels_last)
    w = dequantize(layer.codes().float(), layer.weight_scale.reshape(-1, 1, 1, 1), torch.zeros(()), layer.weight_spec)
    xf = dequantize(xq.float(), xs, xzp, layer.act_spec).double()
    exact = nn.functional.conv2d(xf, w.double(), layer.bias.double(), stride, padding=1)
    out_q = (0.02, 7)
    acc = torch.randint(0, 256, exact.shape, dtype=torch.uint8).contiguous(memory_format=torch.channels_last)
    acc_q = (0.015, 120)
    for relu, accum in ((True, None), (False, acc.clone()), (True, acc.clone())):
        op = FusedConv(layer, relu, out_q, acc_q if accum is not None else None, False)
        y = op(xq, accum) if accum is not None else op(xq)
        ref = exact + ((acc.double() - acc_q[1]) * acc_q[0] if accum is not None else 0)
        ref = ref.clamp(min=0) if relu else ref
        codes = torch.clamp(torch.round(ref / out_q[0]) + out_q[1], 0, 255)
        assert y.dtype == torch.uint8
        assert (y.double() - codes).abs().max() <= 1  # float32 rounding of the requantization


def test_save_load_replays_the_graph_bit_identically(tmp_path, resnet, qresnet):
    model, _, x = resnet
    quantwise.save(qresnet, tmp_path / "q")
    loaded = quantwise.load(tmp_path / "q", model)
    with torch.no_grad():
        assert torch.equal(loaded(x), qresnet(x))
    assert get_state(loaded).graph.applied


def test_deepcopy_keeps_the_graph(resnet, qresnet):
    _, _, x = resnet
    clone = copy.deepcopy(qresnet)
    with torch.no_grad():
        assert torch.equal(clone(x), qresnet(x))
    assert clone.forward.gm is not qresnet.forward.gm


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.conv2 = nn.Conv2d(4, 4, 3)

    def forward(self, x):
        y = torch.relu(self.conv(x))
        if y.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
            y = y * 2
        return self.conv2(y)


def test_untraceable_model_keeps_per_layer_kernels():
    model = Untraceable().eval()
    q = quantwise.quantize(model, "w8a8", [torch.randn(2, 3, 10, 10)], progress=False)
    report = get_state(q).graph
    assert not report.applied and "trace" in report.reason
    x = torch.randn(2, 3, 10, 10)
    with torch.no_grad():
        assert _rel(q(x), model(x)) < 0.05
    assert "not applied" in str(quantwise.summary(q))


class SharedOutput(nn.Module):
    """A conv output that feeds another conv and is also returned: its edge must stay float."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        h = torch.relu(self.a(x))
        return self.b(h), h


def test_values_seen_by_float_ops_stay_float():
    model = SharedOutput().eval()
    q = quantwise.quantize(model, "w8a8", [torch.randn(2, 3, 8, 8)], progress=False)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        (y, h), (ry, rh) = q(x), model(x)
    assert h.dtype == torch.float32 and y.dtype == torch.float32
    assert _rel(h, rh) < 0.05 and _rel(y, ry) < 0.05


class ReusedResidual(nn.Module):
    """The residual input is used again after the fused add: it must not be overwritten."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(4, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 4, 3, padding=1)
        self.c = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        h = torch.relu(self.a(x))
        s = torch.relu(self.b(h) + h)
        return self.c(s) + self.c(h)


def test_a_residual_used_later_is_not_overwritten():
    torch.manual_seed(0)
    model = ReusedResidual().eval()
    q = quantwise.quantize(model, "w8a8", [torch.randn(2, 4, 8, 8) for _ in range(2)], progress=False)
    per_layer = copy.deepcopy(q)
    remove_int8_graph(per_layer)
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        ref, fused, unfused = model(x), q(x), per_layer(x)
    assert _rel(fused, unfused) < 0.03
    assert _rel(fused, ref) < 0.05


def test_a_failing_graph_falls_back_with_a_warning(resnet, monkeypatch):
    model, calib, x = resnet
    q = quantwise.quantize(model, "w8a8", calib, progress=False)
    per_layer = copy.deepcopy(q)
    remove_int8_graph(per_layer)

    def broken(self, *args):
        raise RuntimeError("simulated kernel failure")

    monkeypatch.setattr(FusedConv, "forward", broken)
    with torch.no_grad(), pytest.warns(quantwise.QuantwiseWarning, match="layer by layer"):
        y = q(x)
    with torch.no_grad():
        assert torch.equal(y, per_layer(x))
        with pytest.raises(RuntimeError):  # a bad input still raises the model's own error
            q(torch.randn(2, 5, 32, 32))


def test_graph_can_be_turned_off(resnet):
    model, calib, _ = resnet
    q = quantwise.quantize(model, "w8a8", calib, progress=False, fuse=False)
    assert get_state(q).graph is None and "forward" not in q.__dict__


@pytest.mark.parametrize("k,s,p,ceil", [(3, 2, 1, False), (2, 2, 0, False), (3, 1, 1, False),
                                        (3, 2, 0, True), (5, 3, 2, True), (1, 2, 0, False)])
@pytest.mark.parametrize("size", [(1, 1), (7, 8), (9, 5)])
def test_uint8_max_pool_equals_the_float_pool(k, s, p, ceil, size):
    from quantwise.int8graph import Uint8MaxPool
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (2, 3, *size), dtype=torch.uint8, generator=g)
    x = x.contiguous(memory_format=torch.channels_last)
    try:
        ref = nn.functional.max_pool2d(x.float(), k, s, p, 1, ceil)
    except RuntimeError:
        pytest.skip("geometry torch rejects")
    y = Uint8MaxPool(k, s, p, 1, ceil)(x)
    assert y.dtype == torch.uint8 and torch.equal(y.float(), ref)


def test_small_channel_inputs_quantize_to_the_same_codes():
    from quantwise.kernels.base import StaticAct, StaticU8Quantizer
    quant = StaticU8Quantizer(StaticAct(0.0271, 129, QuantSpec(Format.UINT8, symmetric=False)))
    x = torch.randn(2, 3, 17, 19) * 3
    fast = quant(x, memory_format=torch.channels_last)  # planes quantized, then interleaved
    slow = quant(x.contiguous(memory_format=torch.channels_last), memory_format=torch.channels_last)
    assert fast.is_contiguous(memory_format=torch.channels_last) and torch.equal(fast, slow)


class Zoo(nn.Module):
    """Shapes the graph pass must get right or leave alone: depthwise and dilated convs, a conv
    feeding both a conv and an add, a concat (float consumer), a transposed conv, a functional
    ceil-mode pool, in-place ReLU, and a conv used twice."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.pw = nn.Conv2d(8, 8, 1)
        self.dil = nn.Conv2d(8, 8, 3, padding=2, dilation=2)
        self.up = nn.ConvTranspose2d(16, 8, 2, stride=2)
        self.shared = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        x = nn.functional.relu(self.stem(x), inplace=True)
        y = self.pw(torch.relu(self.dw(x)))
        z = torch.relu(self.dil(x) + y)                      # y: conv output used as residual
        w = nn.functional.max_pool2d(z, 2, 2, 0, ceil_mode=True)
        c = torch.cat([w, nn.functional.avg_pool2d(z, 2)], 1)
        u = torch.relu(self.up(c))
        s = self.shared(u) + self.shared(torch.relu(u))      # one conv called twice
        return self.head(torch.relu(s))


@pytest.mark.parametrize("preset", ["w8a8", "w8a8-dynamic"])
def test_varied_graphs_match_the_per_layer_path(preset):
    torch.manual_seed(0)
    model = Zoo().eval()
    calib = [torch.randn(2, 3, 16, 16) for _ in range(3)]
    q = quantwise.quantize(model, preset, calib, progress=False)
    per_layer = quantwise.quantize(model, preset, calib, progress=False, fuse=False)
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        ref, fused, unfused = model(x), q(x), per_layer(x)
    assert fused.shape == ref.shape
    assert _rel(unfused, ref) < 0.1
    assert _rel(fused, unfused) < 0.05
    if preset == "w8a8":
        assert get_state(q).graph.applied and len(get_state(q).graph.fused) >= 4


class InputResidual(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        return torch.relu(self.conv(x) + x)  # the residual is the caller's own tensor


def test_the_callers_input_is_never_overwritten():
    torch.manual_seed(0)
    model = InputResidual().eval()
    q = quantwise.quantize(model, "w8a8", [torch.randn(2, 4, 8, 8)], progress=False)
    assert get_state(q).graph.applied
    x = torch.randn(2, 4, 8, 8).contiguous(memory_format=torch.channels_last)
    before = x.clone()
    with torch.no_grad():
        y = q(x)
        assert torch.equal(x, before)
        assert _rel(y, model(x)) < 0.05


def test_a_callers_uint8_input_is_read_as_values_not_codes():
    """The float model rejects uint8 input; the graph must at least not mistake it for codes."""
    torch.manual_seed(0)
    model = InputResidual().eval()
    q = quantwise.quantize(model, "w8a8", [torch.rand(2, 4, 8, 8) * 255], progress=False)
    x = (torch.rand(2, 4, 8, 8) * 255).to(torch.uint8)
    with torch.no_grad():
        assert _rel(q(x).float(), model(x.float())) < 0.05
