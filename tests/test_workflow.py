import copy
import warnings

import pytest
import torch

import quantwise
from quantwise import CalibrationError, Config, QuantwiseWarning, Rule
from quantwise.evaluate import evaluate
from quantwise.modules import QuantizedLayer
from quantwise.state import get_state


def _float_kernels(qmodel):
    return [m.kernel_name for m in qmodel.modules()
            if isinstance(m, QuantizedLayer) and m.fallback_reason is not None]


def test_digits_w8a8_keeps_accuracy(digits):
    model, calib, images, labels = digits
    qmodel = quantwise.quantize(model, "w8a8", calib, progress=False)
    test = [(images, labels)]
    fp32 = evaluate(model, test, "top1").value
    int8 = evaluate(qmodel, test, "top1").value
    assert fp32 >= 0.97
    assert int8 >= fp32 - 0.005, (fp32, int8)
    rows = quantwise.summary(qmodel).quantized
    assert {r.module_type for r in rows} >= {"Conv2d", "Linear"}
    assert not _float_kernels(qmodel), "a w8a8 layer fell back to float"


def test_input_model_untouched_and_bn_statistics_unchanged(tiny):
    model, data = tiny
    model.train()  # calibration must switch to eval and restore the mode
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = Config.preset("w8a8")
    config.exclude.append("conv")  # keeps the BatchNorm unfolded, so its statistics can be checked
    prepared = quantwise.prepare(model, config)
    prepared.train()
    quantwise.calibrate(prepared, data, progress=False)
    assert prepared.training and prepared.bn.training  # modes restored
    assert torch.equal(prepared.bn.running_mean, before["bn.running_mean"])
    assert prepared.bn.num_batches_tracked == before["bn.num_batches_tracked"]
    quantwise.convert(prepared)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert not any(isinstance(m, QuantizedLayer) for m in model.modules())


def test_unsupported_layers_listed_float_not_crashing(tiny):
    model, data = tiny
    qmodel = quantwise.quantize(model, "w8a8", data, progress=False)
    rows = {r.name: r for r in quantwise.summary(qmodel).rows}
    assert rows["norm"].status == "float" and "LayerNorm" in rows["norm"].reason
    assert rows["bn"].status == "folded" and "conv" in rows["bn"].reason
    assert isinstance(qmodel.bn, torch.nn.Identity)
    assert rows["fc1"].status == "quantized" and rows["fc1"].calibrator == "max"
    text = str(quantwise.summary(qmodel))
    assert "fc1" in text and "LayerNorm" in text
    out = qmodel(data[0])
    ref = model(data[0])
    assert torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0) > 0.98


@pytest.mark.parametrize("data", [[], iter([])])
def test_empty_calibration_data_errors_before_anything(tiny, data):
    model, _ = tiny
    with pytest.raises(CalibrationError, match="empty"):
        quantwise.quantize(model, "w8a8", data)


def test_wrong_shape_and_dtype_name_expected_vs_got(tiny):
    model, _ = tiny
    with pytest.raises(CalibrationError, match=r"conv.*expects input \[N, 3"):
        quantwise.quantize(model, "w8a8", [torch.randn(2, 5, 8, 8)], progress=False)
    with pytest.raises(CalibrationError, match="floating-point"):
        quantwise.quantize(model, "w8a8", [torch.ones(2, 3, 8, 8, dtype=torch.int64)], progress=False)


def test_nonfinite_activations_counted_excluded_reported():
    model = torch.nn.Sequential(torch.nn.Linear(6, 4)).eval()
    x = torch.randn(8, 6)
    x[0, 0], x[1, 1], x[2, 2] = float("-inf"), float("inf"), float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", QuantwiseWarning)
        qmodel = quantwise.quantize(model, "w8a8", [x], progress=False)
    record = quantwise.summary(qmodel).rows[0]
    assert record.nonfinite == 3 and record.seen == 48
    layer = qmodel[0]
    assert torch.isfinite(layer.input_scale) and layer.input_scale > 0
    assert "non-finite" in str(quantwise.summary(qmodel))


class Branchy(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.used = torch.nn.Linear(4, 4)
        self.unused = torch.nn.Linear(4, 4)

    def forward(self, x, branch: bool = False):
        return self.unused(x) if branch else self.used(x)


def test_layer_no_sample_reaches_stays_float_with_reason():
    model = Branchy().eval()
    with pytest.warns(QuantwiseWarning, match="no calibration sample reached"):
        qmodel = quantwise.quantize(model, "w8a8", [torch.randn(3, 4)], progress=False)
    rows = {r.name: r for r in quantwise.summary(qmodel).rows}
    assert rows["unused"].status == "float" and "no calibration sample" in rows["unused"].reason
    assert isinstance(qmodel.unused, torch.nn.Linear)
    assert torch.equal(qmodel(torch.ones(2, 4), branch=True), model(torch.ones(2, 4), branch=True))


class TiedLM(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(50, 16)
        self.head = torch.nn.Linear(16, 50, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids):
        return self.head(self.embed(ids))


def test_tied_weights_quantized_once_and_shared():
    model = TiedLM().eval()
    qmodel = quantwise.quantize(model, "w8", None, progress=False)
    assert qmodel.head.weight is qmodel.embed.weight  # one storage for both
    assert "tied" in get_state(qmodel).records["head"].reason
    ids = torch.randint(0, 50, (2, 7))
    ref = model(ids)
    assert torch.nn.functional.cosine_similarity(qmodel(ids).flatten(), ref.flatten(), dim=0) > 0.99


@pytest.mark.parametrize("symmetric", [True, False])
def test_embedding_with_one_scale_per_tensor(symmetric):
    """A per-tensor weight config reaches embeddings too: the lookup dequantizes with the one
    scale (it used to index the 0-d scale by token id and fail)."""
    model = torch.nn.Sequential(torch.nn.Embedding(50, 16)).eval()
    cfg = Config.from_dict({"default": {"weight": {"format": "int8", "symmetric": symmetric,
                                                   "granularity": "per_tensor"}}})
    qmodel = quantwise.quantize(model, cfg, None, progress=False)
    layer = qmodel[0]
    assert layer.weight_scale.dim() == 0
    ids = torch.randint(0, 50, (3, 7))
    w = (layer.codes().to(torch.int32) - layer.zero_points()).float() * layer.weight_scale
    assert torch.equal(qmodel(ids), w[ids])
    assert (qmodel(ids) - model(ids)).abs().max() <= float(layer.weight_scale) * 0.51


def test_dict_inputs_and_rules_select_calibrators(tiny):
    class KwNet(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(8, 8)
            self.b = torch.nn.Linear(8, 2)

        def forward(self, features, scale=1.0):
            return self.b(torch.relu(self.a(features))) * scale

    model = KwNet().eval()
    cfg = Config.preset("w8a8").with_rule(Rule("b", overrides={"calibrator": "entropy"}))
    data = [{"features": torch.randn(16, 8), "scale": 2.0} for _ in range(3)]
    qmodel = quantwise.quantize(model, cfg, data, progress=False)
    rows = {r.name: r for r in quantwise.summary(qmodel).rows}
    assert rows["a"].calibrator == "max" and rows["b"].calibrator == "entropy"
    out = qmodel(**data[0])
    assert out.shape == (16, 2) and torch.isfinite(out).all()


@pytest.mark.parametrize("preset", ["w8a8-dynamic", "w8", "w4", "fp16", "bf16"])
def test_every_preset_runs_and_stays_close(tiny, preset):
    model, data = tiny
    qmodel = quantwise.quantize(model, preset, data, progress=False)
    ref, out = model(data[0]), qmodel(data[0])
    cos = torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0)
    assert cos > (0.95 if preset == "w4" else 0.99), (preset, float(cos))
    assert all(r.status == "quantized" for r in quantwise.summary(qmodel).rows
               if r.module_type in ("Linear", "Conv2d"))


def test_conv_variants_get_the_right_axis_and_scale_count():
    model = torch.nn.Sequential(
        torch.nn.Conv2d(4, 8, 3, padding=1, groups=2),
        torch.nn.Conv2d(8, 8, 3, padding=1, groups=8),        # depthwise
        torch.nn.ConvTranspose2d(8, 6, 2, stride=2),
    ).eval()
    data = [torch.randn(2, 4, 6, 6) for _ in range(2)]
    qmodel = quantwise.quantize(model, "w8a8", data, progress=False)
    assert qmodel[0].weight_scale.shape == (8,)
    assert qmodel[1].weight_scale.shape == (8,)
    assert qmodel[2].weight_scale.shape == (6,)  # ConvTranspose: output channels on axis 1
    ref, out = model(data[0]), qmodel(data[0])
    assert out.shape == ref.shape
    assert torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0) > 0.99


def test_conv1d_quantized():
    model = torch.nn.Sequential(torch.nn.Conv1d(3, 6, 3, padding=1), torch.nn.ReLU(),
                                torch.nn.Conv1d(6, 4, 1)).eval()
    data = [torch.randn(2, 3, 20) for _ in range(2)]
    qmodel = quantwise.quantize(model, "w8a8", data, progress=False)
    assert [r.status for r in quantwise.summary(qmodel).rows] == ["quantized", "quantized"]
    ref, out = model(data[0]), qmodel(data[0])
    assert torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0) > 0.99


def test_unsigned_symmetric_on_negative_inputs_switches_to_signed_aloud():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3)).eval()
    cfg = Config.from_dict({"default": {"weight": {"format": "int8", "granularity": "per_channel"},
                                        "activation": {"format": "uint8", "symmetric": True}}})
    data = [-torch.rand(8, 4) - 0.5]  # all negative
    with pytest.warns(QuantwiseWarning, match="using int8 symmetric"):
        qmodel = quantwise.quantize(model, cfg, data, progress=False)
    record = quantwise.summary(qmodel).rows[0]
    assert "a int8" in record.config and "int8 symmetric" in record.reason
    out, ref = qmodel(data[0]), model(data[0])
    assert (out - ref).abs().max() < 0.05  # not clamped to zero


def test_denormal_weights_give_finite_outputs():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3)).eval()
    with torch.no_grad():
        model[0].weight.fill_(1e-40)
        model[0].weight[0].zero_()
    qmodel = quantwise.quantize(model, "w8a8", [torch.randn(5, 4)], progress=False)
    assert torch.isfinite(qmodel[0].weight_scale).all() and (qmodel[0].weight_scale > 0).all()
    out = qmodel(torch.randn(5, 4))
    assert torch.isfinite(out).all()
    assert torch.allclose(out, model[0].bias.detach().expand_as(out), atol=1e-6)  # weights ~ 0


def test_fp8_is_simulated_and_says_so():
    model = torch.nn.Sequential(torch.nn.Linear(8, 4)).eval()
    cfg = Config.from_dict({"default": {"weight": {"format": "fp8_e4m3"}}})
    qmodel = quantwise.quantize(model, cfg, None, progress=False)
    record = quantwise.summary(qmodel).rows[0]
    assert record.status == "quantized" and record.reason and "fp8" in record.reason
    x = torch.randn(3, 8)
    rel = (qmodel(x) - model(x)).norm() / model(x).norm()
    assert rel < 0.1


def test_weight_nan_layer_stays_float_with_reason():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2)).eval()
    with torch.no_grad():
        model[1].weight[0, 0] = float("nan")
    qmodel = quantwise.quantize(model, "w8a8", [torch.randn(3, 4)], progress=False)
    rows = {r.name: r for r in quantwise.summary(qmodel).rows}
    assert rows["0"].status == "quantized"
    assert rows["1"].status == "float" and "NaN" in rows["1"].reason


def test_batchnorm_folding_is_exact_in_float(tiny):
    from quantwise.fold import find_conv_bn_pairs, fold_conv_bn

    model, data = tiny
    with torch.no_grad():  # non-trivial statistics
        model.bn.running_mean.uniform_(-1, 1)
        model.bn.running_var.uniform_(0.5, 2)
        model.bn.weight.uniform_(0.5, 1.5)
    folded = copy.deepcopy(model)
    pairs = find_conv_bn_pairs(folded)
    assert pairs == [("conv", "bn")]
    fold_conv_bn(folded, pairs)
    assert isinstance(folded.bn, torch.nn.Identity) and folded.conv.bias is not None
    torch.testing.assert_close(folded(data[0]), model(data[0]), rtol=1e-5, atol=1e-5)


def test_sequential_fallback_when_tracing_fails():
    from quantwise.fold import find_conv_bn_pairs

    class Untraceable(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2))

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
                return self.body(x)
            return self.body(-x)

    assert find_conv_bn_pairs(Untraceable()) == [("body.0", "body.1")]


def test_dynamic_preset_runs_convs_on_a_real_kernel(tiny):
    model, data = tiny
    qmodel = quantwise.quantize(model, "w8a8-dynamic", None, progress=False)
    rows = {r.name: r for r in quantwise.summary(qmodel).rows}
    assert "per_tensor dynamic" in rows["conv"].config and "per_token" in rows["fc1"].config
    assert not _float_kernels(qmodel)


def test_quantized_convs_keep_channels_last_and_values(tiny):
    model, data = tiny
    qmodel = quantwise.quantize(model, "w8a8", data, progress=False)
    out = qmodel.conv(data[0])  # an NCHW input
    assert out.is_contiguous(memory_format=torch.channels_last)
    ref = quantwise.quantize(model, "w8a8", data, progress=False).conv(
        data[0].contiguous(memory_format=torch.channels_last))
    assert torch.equal(out, ref)  # the layout changes nothing but speed
