"""quantwise.sensitivity: ranking, weight/activation attribution, calibrators, bookkeeping."""

import json
import math

import pytest
import torch
from torch import nn

import quantwise
from quantwise import CalibrationError, Config, ConfigError, EvaluationError
from quantwise.metrics import relative_error
from quantwise.modules import ObservedLayer
from quantwise.sensitivity import analyze


from small_models import MLP  # noqa: E402


def _outlier_input(model: MLP, index: int, factor: float) -> None:
    """Input channel 0 of fcs[index] `factor` times larger, and read by a zero weight column.

    Per-tensor activation quantization of fcs[index] then breaks (the other channels get
    `factor` times coarser steps), while its weights quantize as well as before (0 is exact).
    """
    with torch.no_grad():
        prev, fc = model.fcs[index - 1], model.fcs[index]
        prev.bias[0] = prev.bias[0].abs() + 1.0  # keep channel 0 active so the range shows it
        prev.weight[0] *= factor
        prev.bias[0] *= factor
        fc.weight[:, 0] = 0.0


def _dead_channel_outlier(model: MLP, index: int, factor: float) -> None:
    """A dead input channel (always 0 after ReLU) whose weight column is `factor` times larger.

    The function and the input range are unchanged (0 is exact), but every per-channel weight
    scale is set by the outlier column: weight quantization breaks, activations stay fine.
    """
    with torch.no_grad():
        prev, fc = model.fcs[index - 1], model.fcs[index]
        prev.weight[1].zero_()
        prev.bias[1] = -1.0
        fc.weight[:, 1] *= factor


def _mlp(act_broken=None, weight_broken=None, seed=0) -> MLP:
    torch.manual_seed(seed)
    model = MLP().eval()
    if act_broken is not None:
        _outlier_input(model, act_broken, 300.0)
    if weight_broken is not None:
        _dead_channel_outlier(model, weight_broken, 1000.0)
    return model


def _data(n=4, seed=1, shape=(32, 16)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g) for _ in range(n)]


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    pass


def _closeness(eval_data):
    """eval_fn: minus the relative error of the model's output against the fp32 output."""
    def build(reference_model):
        with torch.no_grad():
            refs = [reference_model(x) for x in eval_data]

        def eval_fn(model):
            with torch.no_grad():
                return -sum(relative_error(r, model(x)) for r, x in zip(refs, eval_data))
        return eval_fn
    return build


def test_sensitive_layer_ranked_first_and_reverting_it_recovers_more():
    model, calib, evald = _mlp(act_broken=2), _data(), _data(2, seed=2)
    eval_fn = _closeness(evald)(model)
    calls = []

    def counted(m):
        calls.append(1)
        return eval_fn(m)

    report = quantwise.sensitivity(model, "w8a8", calib, evald, counted, proxy_batches=2, top_k=2,
                                   progress=False)
    names = [r.name for r in report.rows]
    assert names[0] == "fcs.2", str(report)
    assert [r.rank for r in report.rows] == [1, 2, 3, 4]
    assert report.rows[0].gain_db > report.rows[-1].gain_db + 10
    assert report.evaluations == len(calls) == 2 + 2
    assert report.rows[0].metric_gain > 0 and report.rows[-1].metric_gain is None
    assert report.fp32_metric == pytest.approx(0.0, abs=1e-5) and report.quantized_metric < -0.1
    # The claim checked with the real kernels: revert the top layer vs the bottom one.
    scores = {}
    for name in (names[0], names[-1]):
        config = Config.preset("w8a8")
        config.exclude.append(name)
        scores[name] = eval_fn(quantwise.quantize(model, config, calib, progress=False))
    assert scores[names[0]] > scores[names[-1]] + 0.1, scores


def test_attribution_points_at_weight_or_activation():
    model = _mlp(act_broken=3, weight_broken=2)
    report = quantwise.sensitivity(model, "w8a8", _data(), proxy_batches=2, progress=False)
    rows = {r.name: r for r in report.rows}
    w_broken, a_broken = rows["fcs.2"], rows["fcs.3"]
    assert w_broken.worse_side == "weight", str(report)
    assert w_broken.weight_only_sqnr < w_broken.act_only_sqnr - 10
    assert a_broken.worse_side == "activation", str(report)
    assert a_broken.act_only_sqnr < a_broken.weight_only_sqnr - 10
    assert {r.name for r in report.rows[:2]} == {"fcs.2", "fcs.3"}


def test_per_calibrator_errors_clipping_beats_max_on_outliers():
    torch.manual_seed(0)
    model = MLP((64, 32, 8)).eval()
    calib = _data(4, seed=3, shape=(4096, 64))
    calib[1][5, 7] = 30.0  # one rare outlier in calibration; the evaluation data has none
    report = quantwise.sensitivity(model, "w8a8", calib, _data(2, seed=4, shape=(256, 64)),
                                   proxy_batches=2, progress=False)
    rows = {r.name: r for r in report.rows}
    first = rows["fcs.0"]
    assert set(first.calibrator_sqnr) == {"max", "percentile", "entropy", "mse"}
    assert first.calibrator == "max"
    assert first.calibrator_sqnr["max"] == first.act_only_sqnr  # the configured one, reused
    for name in ("percentile", "entropy", "mse"):
        assert first.calibrator_sqnr[name] > first.calibrator_sqnr["max"] + 3, first.calibrator_sqnr
    assert first.best_calibrator != "max"
    assert set(rows["fcs.1"].calibrator_sqnr) == {"max", "percentile", "entropy", "mse"}


def test_dynamic_and_weight_only_configs():
    model, calib = _mlp(), _data()
    dyn = quantwise.sensitivity(model, "w8a8-dynamic", calib, proxy_batches=1, progress=False)
    assert all(r.calibrator == "dynamic" and r.calibrator_sqnr is None for r in dyn.rows)
    assert all(r.act_only_sqnr is not None for r in dyn.rows)
    w8 = quantwise.sensitivity(model, "w8", calib, proxy_batches=1, progress=False)
    for r in w8.rows:
        assert r.act_only_sqnr is None and r.calibrator is None and r.worse_side == "weight"
        assert r.weight_only_sqnr == r.only_sqnr


def test_modes_training_flags_restored_and_model_untouched():
    model, calib = _mlp(act_broken=2), _data()
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    quantwise.sensitivity(model, "w8a8", calib, proxy_batches=1, progress=False)
    assert model.training and not any(isinstance(m, ObservedLayer) for m in model.modules())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())

    prepared = quantwise.prepare(model, "w8a8")
    quantwise.calibrate(prepared, calib, progress=False)
    layers = [m for m in prepared.modules() if isinstance(m, ObservedLayer)]
    layers[1].mode = "fake"
    prepared.train()
    report = analyze(prepared, calib[:1], lambda m: 1.0, top_k=1, progress=False)
    assert [m.mode for m in layers] == ["observe", "fake", "observe", "observe"]
    assert all(m.input_range is None and m._fake_weight is None for m in layers)
    assert all(m.training for m in prepared.modules())
    assert report.rows and report.rows[0].calibrator_sqnr is None  # no side statistics attached


def test_json_round_trip_table_and_infinite_sqnr():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 4)).eval()  # one layer: all-but-this is fp32, SQNR inf
    report = quantwise.sensitivity(model, "w8a8", _data(shape=(16, 8)), progress=False)
    data = json.loads(report.to_json())
    assert data["rows"][0]["all_but_sqnr"] == "inf" and data["rows"][0]["gain_db"] == "inf"
    assert math.isinf(report.rows[0].gain_db)
    assert data["proxy_batches"] == 4 and data["evaluations"] == 0
    assert data["rows"][0]["calibrator_sqnr"].keys() == {"max", "percentile", "entropy", "mse"}
    assert set(report.to_dict()) >= {"rows", "skipped", "all_quantized_sqnr", "seconds"}


def test_outputs_flattened_and_skipped_layers_listed(tiny):
    class DictOut(nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x):
            y = self.net(x)
            return {"logits": y, "argmax": y.argmax(-1), "aux": (y * 2, None)}

    model, data = tiny
    report = quantwise.sensitivity(DictOut(model), "w8a8", data, proxy_batches=2, progress=False)
    assert {r.name for r in report.rows} == {"net.conv", "net.fc1", "net.fc2"}
    skipped = {s["name"]: s["reason"] for s in report.skipped}
    assert "LayerNorm" in skipped["net.norm"] and "folded" in skipped["net.bn"]
    text = str(report)
    assert "net.fc1" in text and "kept float" in text and "net.norm" in text
    assert math.isfinite(report.all_quantized_sqnr)


def test_digits_cnn(digits):
    model, calib, images, labels = digits

    def accuracy(m):
        with torch.no_grad():
            return float((m(images[:256]).argmax(-1) == labels[:256]).float().mean())

    report = quantwise.sensitivity(model, "w8a8", calib[:4], eval_fn=accuracy, proxy_batches=1,
                                   top_k=1, progress=False)
    assert len(report.rows) >= 3 and report.evaluations == 3
    assert report.fp32_metric >= 0.95 and all(r.calibrator_sqnr for r in report.rows)


def test_bad_inputs_are_clear_errors():
    model, calib = _mlp(), _data()
    with pytest.raises(CalibrationError, match="empty"):
        quantwise.sensitivity(model, "w8a8", [], progress=False)
    with pytest.raises(CalibrationError, match="required"):
        quantwise.sensitivity(model, "w8a8", progress=False)
    with pytest.raises(CalibrationError, match="evaluation data is empty"):
        quantwise.sensitivity(model, "w8a8", calib, [], progress=False)
    with pytest.raises(EvaluationError, match="callable"):
        quantwise.sensitivity(model, "w8a8", calib, eval_fn=0.5, progress=False)
    with pytest.raises(EvaluationError, match="not finite"):
        quantwise.sensitivity(model, "w8a8", calib, eval_fn=lambda m: float("nan"), progress=False)
    with pytest.raises(EvaluationError, match="must return a number"):
        quantwise.sensitivity(model, "w8a8", calib, eval_fn=lambda m: "good", progress=False)
    with pytest.raises(ConfigError, match="proxy_batches"):
        quantwise.sensitivity(model, "w8a8", calib, proxy_batches=0, progress=False)
    config = Config.preset("w8a8")
    config.exclude.append("*")
    with pytest.raises(ConfigError, match="nothing to analyse"):
        quantwise.sensitivity(model, config, calib, progress=False)


def test_one_shot_iterator_calibrates_and_feeds_the_proxy():
    model, calib = _mlp(), _data()
    report = quantwise.sensitivity(model, "w8a8", iter(calib), proxy_batches=2, progress=False)
    assert report.proxy_batches == 2 and report.forwards > 0
