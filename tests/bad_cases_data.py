"""Bad calibration data and awkward models: cases 8-18, 22, 24 of tests/test_bad_inputs.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

import quantwise
from quantwise.errors import CalibrationError, DataLoadError
from quantwise.numerics import TINY
from quantwise.state import get_state
from bad_case import Base, Case, case, npy_folder

import bad_models


def _quantized_layers(model) -> dict:
    from quantwise.modules import QuantizedLayer

    return {n: m for n, m in model.named_modules() if isinstance(m, QuantizedLayer)}


def _scales_finite(model) -> None:
    layers = _quantized_layers(model)
    assert layers
    for name, layer in layers.items():
        for buffer in ("weight_scale", "input_scale"):
            value = getattr(layer, buffer, None)
            if value is not None:
                assert torch.isfinite(value).all() and (value >= TINY).all(), (name, buffer, value)


def _reload_finite(out: Path, model_fn):
    def check() -> None:
        _scales_finite(quantwise.load(out, model=model_fn()))
    return check


def _calib(folder: Path) -> list:
    return quantwise.data.load_calibration_data(str(folder))


# -- 8: empty calibration data ------------------------------------------------------------------
@case(8, "a", "an empty calibration folder", "error before the model is changed")
def _(b: Base, tmp: Path) -> Case:
    folder = tmp / "empty"
    folder.mkdir()

    def api() -> None:
        model = bad_models.mlp()
        before = {k: v.clone() for k, v in model.state_dict().items()}
        try:
            quantwise.quantize(model, "w8a8", [], progress=False)
        finally:
            assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    return Case(["quantize", "bad_models:mlp", "--calib", str(folder), "--out", str(tmp / "out")],
                r"empty calibration data", inputs=[folder], out=tmp / "out", api=api,
                error=CalibrationError, api_message=r"calibration data is empty")


# -- 9: NaN / Inf ----------------------------------------------------------------------------------
def _nan_folder(tmp: Path, fill_all: bool) -> Path:
    rng = np.random.default_rng(0)
    arrays = []
    for _ in range(3):
        x = rng.standard_normal((8, 16), dtype=np.float32)
        if fill_all:
            x[:] = np.nan
        else:
            x[0, :4], x[1, 2], x[2, 3] = np.nan, -np.inf, np.inf
        arrays.append(x)
    return npy_folder(tmp / "nan", arrays)


@case(9, "a", "NaN, +Inf and -Inf in calibration data", "counted, excluded, reported; scales finite")
def _(b: Base, tmp: Path) -> Case:
    folder, out = _nan_folder(tmp, False), tmp / "out"

    def api() -> None:
        qmodel = quantwise.quantize(bad_models.mlp(), "w8a8", _calib(folder), progress=False)
        _scales_finite(qmodel)
        record = get_state(qmodel).records["0"]
        assert record.nonfinite == 18 and record.status == "quantized", record
    return Case(["quantize", "bad_models:mlp", "--calib", str(folder), "--out", str(out), "--quiet"],
                r"18 of 384 values were NaN or infinite.*counted and excluded", rc=0, inputs=[folder],
                api=api, after=_reload_finite(out, bad_models.mlp))


@case(9, "b", "calibration data that is all NaN (a job that quantizes nothing)",
      "one line saying why, non-zero exit, nothing written")
def _(b: Base, tmp: Path) -> Case:
    folder = _nan_folder(tmp, True)

    def api() -> None:
        qmodel = quantwise.quantize(bad_models.mlp(), "w8a8", _calib(folder), progress=False)
        records = get_state(qmodel).records
        assert all(r.status == "float" and "no calibration sample" in r.reason
                   for n, r in records.items() if n in ("0", "2"))
    return Case(["quantize", "bad_models:mlp", "--calib", str(folder), "--out", str(tmp / "out")],
                r"nothing was quantized.*NaN or infinite.*no output was written", inputs=[folder],
                out=tmp / "out", api=api)


# -- 10: wrong shape / dtype --------------------------------------------------------------------------
@case(10, "a", "calibration samples of the wrong shape", "error naming expected vs got")
def _(b: Base, tmp: Path) -> Case:
    folder = npy_folder(tmp / "shape", [np.zeros((4, 8, 9), np.float32)])
    return Case(["quantize", "digits", "--calib", str(folder), "--out", str(tmp / "out")],
                r"has shape \(4, 8, 9\); expected one sample \(1, 8, 8\)", inputs=[folder],
                out=tmp / "out", api=lambda: quantwise.data.load_calibration_data(
                    str(folder), quantwise.models.builtin_info("digits")), error=DataLoadError)


@case(10, "b", "calibration samples of the wrong dtype (complex)", "error naming the dtype")
def _(b: Base, tmp: Path) -> Case:
    folder = npy_folder(tmp / "dtype", [np.zeros((4, 16), np.complex64)])
    return Case(["quantize", "bad_models:mlp", "--calib", str(folder), "--out", str(tmp / "out")],
                r"holds a complex64 array; save numeric", inputs=[folder], out=tmp / "out",
                api=lambda: _calib(folder), error=DataLoadError)


@case(10, "c", "samples the model cannot take (16 features expected, 15 given)",
      "error naming the layer, expected vs got")
def _(b: Base, tmp: Path) -> Case:
    folder = npy_folder(tmp / "width", [np.zeros((4, 15), np.float32)])
    return Case(["quantize", "bad_models:mlp", "--calib", str(folder), "--out", str(tmp / "out")],
                r"layer '0' \(Linear\) expects input \[\.\.\., 16\], got \(4, 15\)", inputs=[folder], out=tmp / "out",
                api=lambda: quantwise.quantize(bad_models.mlp(), "w8a8", _calib(folder), progress=False),
                error=CalibrationError)


# -- 11: constant / all-zero tensors --------------------------------------------------------------
@case(11, "a", "all-zero weights and all-zero calibration data", "finite scales; zero exactly representable")
def _(b: Base, tmp: Path) -> Case:
    folder, out = npy_folder(tmp / "zeros", [np.zeros((8, 16), np.float32)] * 2), tmp / "out"

    def api() -> None:
        qmodel = quantwise.quantize(bad_models.zero_mlp(), "w8a8", _calib(folder), progress=False)
        _scales_finite(qmodel)
        assert torch.equal(qmodel(torch.zeros(3, 16)), torch.zeros(3, 4))
        assert torch.equal(qmodel(torch.randn(3, 16)), torch.zeros(3, 4))  # zero weights stay 0
    return Case(["quantize", "bad_models:zero_mlp", "--calib", str(folder), "--out", str(out), "--quiet"],
                r"2 layers quantized", rc=0, inputs=[folder], api=api,
                after=_reload_finite(out, bad_models.zero_mlp))


# -- 12: negative values with an unsigned symmetric format ----------------------------------------
@case(12, "a", "all-negative activations with a symmetric uint8 config",
      "a switch to int8 symmetric, said aloud in the summary and a warning; never a silent clamp")
def _(b: Base, tmp: Path) -> Case:
    folder = npy_folder(tmp / "neg", [-np.abs(np.random.default_rng(0).standard_normal((8, 16))).astype(
        np.float32) - 0.1])
    config = tmp / "u8.yaml"
    config.write_text("preset: w8a8\ndefault:\n  activation: {format: uint8, symmetric: true}\n")

    def api() -> None:
        import pytest

        with pytest.warns(quantwise.QuantwiseWarning, match="uint8 symmetric cannot hold them"):
            qmodel = quantwise.quantize(bad_models.mlp(), str(config), _calib(folder), progress=False)
        layer = _quantized_layers(qmodel)["0"]
        assert layer.act_spec.format.value == "int8"
        x = torch.from_numpy(np.load(folder / "00.npy"))
        want = bad_models.mlp()(x)
        assert (qmodel(x) - want).abs().max() <= 0.05 * want.abs().max()  # negatives kept
    return Case(["quantize", "bad_models:mlp", "--config", str(config), "--calib", str(folder),
                 "--out", str(tmp / "out")], r"uint8 symmetric cannot hold them; using int8 symmetric",
                rc=0, inputs=[folder, config], api=api)


# -- 13: huge outliers ------------------------------------------------------------------------------
@case(13, "a", "an outlier of 1e30 and float32's max in calibration data",
      "float64 range arithmetic, finite scales, an outlier warning")
def _(b: Base, tmp: Path) -> Case:
    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal((8, 16), dtype=np.float32) for _ in range(3)]
    arrays[0][0, 0], arrays[1][3, 5] = 1e30, np.finfo(np.float32).max
    folder, out = npy_folder(tmp / "outlier", arrays), tmp / "out"

    def api() -> None:
        import pytest

        with pytest.warns(quantwise.QuantwiseWarning, match="outlier"):
            qmodel = quantwise.quantize(bad_models.mlp(), "w8a8", _calib(folder), progress=False)
        _scales_finite(qmodel)
        assert torch.isfinite(qmodel(torch.randn(4, 16))).all()
    return Case(["quantize", "bad_models:mlp", "--calib", str(folder), "--out", str(out), "--quiet"],
                r"outlier", rc=0, inputs=[folder], api=api, after=_reload_finite(out, bad_models.mlp))


# -- 14: denormal weights -----------------------------------------------------------------------------
@case(14, "a", "denormal weights (1e-40)", "scale floored at the smallest normal, no NaN")
def _(b: Base, tmp: Path) -> Case:
    out = tmp / "out"

    def api() -> None:
        qmodel = quantwise.quantize(bad_models.denormal_mlp(), "w8a8", _calib(b.vec), progress=False)
        _scales_finite(qmodel)
        assert float(_quantized_layers(qmodel)["0"].weight_scale.min()) >= TINY
        assert torch.isfinite(qmodel(torch.randn(4, 16))).all()
    return Case(["quantize", "bad_models:denormal_mlp", "--calib", str(b.vec), "--out", str(out),
                 "--quiet"], r"2 layers quantized", rc=0, api=api,
                after=_reload_finite(out, bad_models.denormal_mlp))


# -- 15: a layer no sample reaches ----------------------------------------------------------------
@case(15, "a", "a layer that no calibration sample reaches", "reported and kept in float, never scale 0")
def _(b: Base, tmp: Path) -> Case:
    def api() -> None:
        qmodel = quantwise.quantize(bad_models.unreached(), "w8a8", _calib(b.vec), progress=False)
        record = get_state(qmodel).records["spare"]
        assert record.status == "float" and "no calibration sample reached" in record.reason
        assert "spare" not in _quantized_layers(qmodel) and "fc" in _quantized_layers(qmodel)
    return Case(["quantize", "bad_models:unreached", "--calib", str(b.vec), "--out", str(tmp / "out"),
                 "--quiet"], r"'spare' stays float: no calibration sample reached", rc=0, api=api)


# -- 16: tied weights ---------------------------------------------------------------------------------
@case(16, "a", "tied weights (embedding and lm_head)", "quantized once; reload keeps outputs equal")
def _(b: Base, tmp: Path) -> Case:
    out = tmp / "out"
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))

    def api() -> None:
        qmodel = quantwise.quantize(bad_models.tied_lm(), "w8", _calib(b.ids), progress=False)
        layers = _quantized_layers(qmodel)
        assert layers["head"].weight is layers["embed"].weight
        folder = quantwise.save(qmodel, tmp / "api")
        again = quantwise.load(folder, model=bad_models.tied_lm())
        assert torch.equal(again(ids), qmodel(ids))

    def after() -> None:
        from safetensors import safe_open

        with safe_open(str(out / "model.safetensors"), "pt") as f:
            assert len([k for k in f.keys() if k.endswith(".weight") and f.get_tensor(k).shape == (64, 32)]) == 1
        quantwise.load(out, model=bad_models.tied_lm())(ids)
    return Case(["quantize", "bad_models:tied_lm", "--config", "w8", "--calib", str(b.ids), "--out",
                 str(out), "--quiet"], r"quantized", rc=0, api=api, after=after)


# -- 17: train mode ----------------------------------------------------------------------------------
@case(17, "a", "BatchNorm and dropout in train mode during calibration",
      "calibrated in eval mode, running statistics unchanged, the mode restored")
def _(b: Base, tmp: Path) -> Case:
    def api() -> None:
        model = bad_models.train_mode_cnn()
        stats = (model.bn.running_mean.clone(), model.bn.running_var.clone())
        calib = [torch.randn(4, 3, 8, 8) for _ in range(3)]
        quantwise.calibrate(quantwise.prepare(model, "w8a8"), calib, progress=False)
        qmodel = quantwise.quantize(model, "w8a8", calib, progress=False)
        assert model.training and model.bn.training and model.drop.training
        assert torch.equal(model.bn.running_mean, stats[0]) and torch.equal(model.bn.running_var, stats[1])
        x = torch.randn(4, 3, 8, 8)
        qmodel.eval()  # the copy keeps the mode it was given; in eval mode dropout is off
        assert torch.equal(qmodel(x), qmodel(x))
    return Case(["quantize", "bad_models:train_mode_cnn", "--calib", str(b.img), "--out", str(tmp / "out"),
                 "--quiet"], r"folded into conv", rc=0, api=api)


# -- 18: grouped, depthwise, transposed convs --------------------------------------------------------
def _check_conv_scales(model) -> None:
    layers = _quantized_layers(model)
    assert tuple(layers["grouped"].weight_scale.shape) == (8,)
    assert tuple(layers["depthwise"].weight_scale.shape) == (8,)
    assert tuple(layers["up"].weight_scale.shape) == (6,)  # ConvTranspose: [in, out/groups, k, k]


@case(18, "a", "grouped, depthwise and transposed convolutions, per channel",
      "one scale per output channel on the right axis")
def _(b: Base, tmp: Path) -> Case:
    out = tmp / "out"

    def api() -> None:
        model = bad_models.grouped_convs()
        qmodel = quantwise.quantize(model, "w8a8", _calib(b.img4), progress=False)
        _check_conv_scales(qmodel)
        x = torch.randn(2, 4, 8, 8)
        want = model(x)
        assert (qmodel(x) - want).abs().max() <= 0.1 * want.abs().max()
    return Case(["quantize", "bad_models:grouped_convs", "--calib", str(b.img4), "--out", str(out),
                 "--quiet"], r"3 layers quantized", rc=0, api=api,
                after=lambda: _check_conv_scales(quantwise.load(out, model=bad_models.grouped_convs())))


# -- 22: Ctrl-C ----------------------------------------------------------------------------------------
@case(22, "a", "Ctrl-C during calibration", "exit 130, nothing half-written")
def _(b: Base, tmp: Path) -> Case:
    folder = npy_folder(tmp / "many", [np.random.default_rng(i).standard_normal((32, 3, 8, 8)).astype(
        np.float32) for i in range(60)])
    out = tmp / "out"

    def api() -> None:
        import pytest

        import quantwise.workflow

        calls = []
        model = bad_models.train_mode_cnn().eval()
        before = {k: v.clone() for k, v in model.state_dict().items()}

        def data():
            for x in _calib(folder):
                calls.append(1)
                if len(calls) == 2:
                    raise KeyboardInterrupt
                yield x
        with pytest.raises(KeyboardInterrupt):
            quantwise.workflow.quantize(model, "w8a8", data(), progress=False)
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    return Case(["quantize", "bad_models:slow_cnn", "--calib", str(folder), "--out", str(out)],
                r"interrupted; nothing was written", rc=130, inputs=[folder], out=out, api=api,
                interrupt_after="quantizing with")


# -- 24: unsupported layers --------------------------------------------------------------------------
@case(24, "a", "a layer type quantwise does not quantize (LSTM)", "left in float and listed in the summary")
def _(b: Base, tmp: Path) -> Case:
    def api() -> None:
        qmodel = quantwise.quantize(bad_models.with_lstm(), "w8a8", _calib(b.seq), progress=False)
        text = str(quantwise.summary(qmodel))
        assert "rnn" in text and "LSTM" in text and "fc" in _quantized_layers(qmodel)
    return Case(["quantize", "bad_models:with_lstm", "--calib", str(b.seq), "--out", str(tmp / "out"),
                 "--quiet"], r"rnn\s+LSTM", rc=0, api=api)
