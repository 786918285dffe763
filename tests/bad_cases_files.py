"""Bad files and paths: cases 1-7, 19-21, 23, 25-29 of tests/test_bad_inputs.py."""

from __future__ import annotations

import json
import os
import pickle
import re
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

import quantwise
from quantwise.errors import CheckpointError, ConfigError, ModelLoadError
from bad_case import Base, Case, case


def _load(folder: Path):
    return lambda: quantwise.load(folder)


def _header(path: Path) -> dict:
    (n,) = struct.unpack("<Q", path.read_bytes()[:8])
    return json.loads(path.read_bytes()[8:8 + n])


def _rewrite_header(path: Path, header: dict, data: bytes | None = None) -> None:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + (raw[8 + n:] if data is None else data))


def _retensor(folder: Path, change) -> None:
    """Rewrite the checkpoint's tensors through `change(dict) -> dict` (metadata kept)."""
    import safetensors.torch

    path = folder / "model.safetensors"
    tensors = safetensors.torch.load_file(str(path))
    safetensors.torch.save_file(change(tensors), str(path), metadata={"format": "quantwise", "version": "1"})


# -- 1: no model -----------------------------------------------------------------------------
@case(1, "a", "model path that does not exist", "usage error naming what to pass, exit 2")
def _(b: Base, tmp: Path) -> Case:
    missing = tmp / "no" / "such-model"
    return Case(["quantize", str(missing), "--out", str(tmp / "out")], r"does not exist.*built-in",
                out=tmp / "out", api=lambda: quantwise.models.load_model(str(missing)), error=ModelLoadError)


@case(1, "b", "a directory without a model in it", "usage error, exit 2")
def _(b: Base, tmp: Path) -> Case:
    folder = tmp / "notes"
    folder.mkdir()
    (folder / "README.txt").write_text("not a model")
    return Case(["quantize", str(folder), "--out", str(tmp / "out")], r"no config\.json",
                inputs=[folder], out=tmp / "out",
                api=lambda: quantwise.models.load_model(str(folder)), error=ModelLoadError)


@case(1, "c", "an unknown option value (usage)", "argparse usage error, exit 2")
def _(b: Base, tmp: Path) -> Case:
    return Case(["quantize", "--objective", "fastest", "--out", str(tmp / "out")],
                r"invalid choice: 'fastest'", out=tmp / "out",
                api=lambda: quantwise.quantize(torch.nn.Linear(2, 2), "no-such-preset"),
                error=ConfigError, api_message=r"unknown preset|valid")


# -- 2: empty / truncated files -----------------------------------------------------------
@case(2, "a", "zero-byte model.safetensors in a checkpoint", "\"the file is empty\", nothing allocated")
def _(b: Base, tmp: Path) -> Case:
    folder = b.copy("ckpt", tmp / "ckpt")
    (folder / "model.safetensors").write_bytes(b"")
    return Case(["benchmark", str(folder)], r"model\.safetensors: the file is empty",
                inputs=[folder], api=_load(folder), error=CheckpointError)


@case(2, "b", "truncated model.safetensors in a checkpoint", "\"truncated\", before any allocation")
def _(b: Base, tmp: Path) -> Case:
    folder = b.copy("ckpt", tmp / "ckpt")
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-1000])
    return Case(["benchmark", str(folder)], r"truncated: its header promises \d+ bytes",
                inputs=[folder], api=_load(folder), error=CheckpointError)


@case(2, "c", "zero-byte .onnx file", "\"the file is empty\"")
def _(b: Base, tmp: Path) -> Case:
    path = tmp / "empty.onnx"
    path.write_bytes(b"")
    return Case(["inspect", str(path)], r"empty\.onnx: the file is empty", inputs=[path],
                api=lambda: _inspect(path), error=CheckpointError)


@case(2, "d", "truncated .onnx file", "\"truncated or not an ONNX file\"")
def _(b: Base, tmp: Path) -> Case:
    path = tmp / "cut.onnx"
    path.write_bytes(b.onnx.read_bytes()[:2000])
    return Case(["inspect", str(path)], r"truncated or not an ONNX file", inputs=[path],
                api=lambda: _inspect(path), error=CheckpointError)


def _inspect(path: Path):
    from quantwise.export.onnx_file import open_onnx

    return open_onnx(path)


# -- 3: hostile safetensors headers --------------------------------------------------------
@case(3, "a", "header length prefix claiming 2**62 bytes", "rejected before allocating")
def _(b: Base, tmp: Path) -> Case:
    folder = b.copy("ckpt", tmp / "ckpt")
    path = folder / "model.safetensors"
    path.write_bytes(struct.pack("<Q", 2 ** 62) + path.read_bytes()[8:])
    return Case(["benchmark", str(folder)], r"header claims \d+ bytes", inputs=[folder],
                api=_load(folder), error=CheckpointError)


@case(3, "b", "a tensor entry claiming a huge shape", "rejected before allocating")
def _(b: Base, tmp: Path) -> Case:
    folder = b.copy("ckpt", tmp / "ckpt")
    path = folder / "model.safetensors"
    header = _header(path)
    header["features.0.weight"]["shape"] = [2 ** 40, 2 ** 20]
    _rewrite_header(path, header)
    return Case(["benchmark", str(folder)], r"'features\.0\.weight'.*should take \d+ bytes",
                inputs=[folder], api=_load(folder), error=CheckpointError)


@case(3, "c", "overlapping data offsets", "rejected")
def _(b: Base, tmp: Path) -> Case:
    folder = b.copy("ckpt", tmp / "ckpt")
    path = folder / "model.safetensors"
    header = _header(path)
    first, second = [k for k in header if k != "__metadata__" and header[k]["dtype"] == "F32"
                     and header[k]["shape"] == []][:2]
    header[second]["data_offsets"] = header[first]["data_offsets"]
    _rewrite_header(path, header)
    return Case(["benchmark", str(folder)], r"overlap|invalid offset", inputs=[folder], api=_load(folder),
                error=CheckpointError)


@case(3, "d", "data offsets past the end of the file", "rejected as truncated")
def _(b: Base, tmp: Path) -> Case:
    folder = b.copy("ckpt", tmp / "ckpt")
    path = folder / "model.safetensors"
    header = _header(path)
    lo, hi = header["classifier.3.bias"]["data_offsets"]
    header["classifier.3.bias"]["data_offsets"] = [lo + 2 ** 30, hi + 2 ** 30]
    _rewrite_header(path, header)
    return Case(["benchmark", str(folder)], r"truncated|past the end", inputs=[folder],
                api=_load(folder), error=CheckpointError)


# -- 4: pickles -----------------------------------------------------------------------------
class _Payload:
    """Unpickling this creates a marker file: the test that no pickle ever runs."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _pickle_folder(b: Base, tmp: Path) -> tuple[Path, Path]:
    folder = tmp / "pickled"
    folder.mkdir()
    (folder / "config.json").write_bytes((b.hf / "config.json").read_bytes())
    marker = tmp / "PAYLOAD-RAN"
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(_Payload(marker)))
    return folder, marker


@case(4, "a", "a bare pickle file (.pt) as the model", "refused: never unpickled")
def _(b: Base, tmp: Path) -> Case:
    path = tmp / "model.pt"
    marker = tmp / "PAYLOAD-RAN"
    path.write_bytes(pickle.dumps(_Payload(marker)))

    def after() -> None:
        assert not marker.exists()
    return Case(["quantize", str(path), "--out", str(tmp / "out")], r"a pickle.*--allow-pickle",
                inputs=[path], out=tmp / "out", api=lambda: quantwise.models.load_model(str(path)),
                error=ModelLoadError, after=after)


@case(4, "b", "a Hugging Face folder with only pytorch_model.bin (a code-running pickle)",
      "refused by default, the message names --allow-pickle; the payload never runs")
def _(b: Base, tmp: Path) -> Case:
    folder, marker = _pickle_folder(b, tmp)

    def api() -> None:
        try:
            quantwise.models.load_model(str(folder))
        finally:
            assert not marker.exists()
    return Case(["quantize", str(folder), "--out", str(tmp / "out")],
                r"pickle weights.*refused by default.*--allow-pickle", inputs=[folder],
                out=tmp / "out", api=api, error=ModelLoadError)


@case(4, "c", "the same folder with --allow-pickle", "torch's weights_only load refuses the payload; "
      "it never runs")
def _(b: Base, tmp: Path) -> Case:
    folder, marker = _pickle_folder(b, tmp)

    def api() -> None:
        try:
            with pytest.warns(quantwise.QuantwiseWarning, match="can run code"):
                quantwise.models.load_model(str(folder), allow_pickle=True)
        finally:
            assert not marker.exists()
    return Case(["quantize", str(folder), "--out", str(tmp / "out"), "--allow-pickle"],
                r"cannot load .*pickled|[Ww]eights only load failed|weights_only", inputs=[folder],
                out=tmp / "out", api=api, error=ModelLoadError)


@case(4, "d", "calibration data as a pickle (.pt)", "refused; names --allow-pickle")
def _(b: Base, tmp: Path) -> Case:
    path = tmp / "calib.pt"
    marker = tmp / "PAYLOAD-RAN"
    path.write_bytes(pickle.dumps(_Payload(marker)))

    def api() -> None:
        try:
            quantwise.data.load_calibration_data(str(path))
        finally:
            assert not marker.exists()
    return Case(["quantize", "bad_models:mlp", "--calib", str(path), "--out", str(tmp / "out")],
                r"pickle.*--allow-pickle", inputs=[path], out=tmp / "out", api=api,
                error=quantwise.DataLoadError)


@case(4, "e", "calibration data.bin that is a torch.save archive (no telling suffix)",
      "detected by content, refused; names --allow-pickle")
def _(b: Base, tmp: Path) -> Case:
    path = tmp / "data.bin"
    torch.save(torch.zeros(4, 16), path)
    return Case(["quantize", "bad_models:mlp", "--calib", str(path), "--out", str(tmp / "out")],
                r"data\.bin is a pickle file.*--allow-pickle", inputs=[path], out=tmp / "out",
                api=lambda: quantwise.data.load_calibration_data(str(path)), error=quantwise.DataLoadError)


@case(4, "f", "a trusted folder with tensor-only pytorch_model.bin and calibration .pt, with "
      "--allow-pickle", "loaded with torch's weights_only loader, a warning that pickles can run code")
def _(b: Base, tmp: Path) -> Case:
    import bad_models

    folder = tmp / "trusted"
    folder.mkdir()
    (folder / "config.json").write_bytes((b.hf / "config.json").read_bytes())
    torch.save(quantwise.models.load_model(str(b.hf))[0].state_dict(), folder / "pytorch_model.bin")
    calib = tmp / "calib.pt"
    torch.save(torch.randn(8, 16), calib)

    def api() -> None:
        with pytest.warns(quantwise.QuantwiseWarning, match="can run code"):
            model, _ = quantwise.models.load_model(str(folder), allow_pickle=True)
        ref, _ = quantwise.models.load_model(str(b.hf))
        ids = torch.randint(0, 100, (2, 8))
        assert torch.equal(model(ids).last_hidden_state, ref(ids).last_hidden_state)
        data = quantwise.data.load_calibration_data(str(calib), allow_pickle=True)
        assert torch.equal(data[0], torch.load(calib, weights_only=True))
        assert quantwise.quantize(bad_models.mlp(), "w8a8", data, progress=False)

    def after() -> None:  # benchmark reloads that float model: the same flag, the same refusal
        import contextlib
        import io

        from quantwise.cli import main

        bench = ["benchmark", str(tmp / "out"), "--data", str(b.tokens), "--json"]
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            assert main(bench) == 2
            assert main(bench + ["--allow-pickle"]) == 0
        assert re.search(r"pickle weights.*refused by default.*--allow-pickle", err.getvalue(), re.S), err.getvalue()
    return Case(["quantize", str(folder), "--calib", str(b.tokens), "--config", "w8", "--out",
                 str(tmp / "out"), "--allow-pickle", "--quiet"], r"note: .*loading pickle weights.*can run code",
                rc=0, inputs=[folder, calib], api=api, after=after)


# -- 5: ONNX external data outside the folder ----------------------------------------------
def _external(b: Base, tmp: Path, location: str) -> Path:
    """The digits graph with one initializer's data "stored" at `location`."""
    import onnx

    folder = tmp / "model"
    folder.mkdir()
    proto = onnx.load(str(b.onnx))
    tensor = max(proto.graph.initializer, key=lambda t: len(t.raw_data))
    size = len(tensor.raw_data)
    tensor.ClearField("raw_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", str(size))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    path = folder / "model.onnx"
    path.write_bytes(proto.SerializeToString())
    return path


@case(5, "a", "ONNX external data at ../secret.bin", "refused, nothing read")
def _(b: Base, tmp: Path) -> Case:
    (tmp / "secret.bin").write_bytes(b"\0" * (1 << 16))
    path = _external(b, tmp, "../secret.bin")
    return Case(["inspect", str(path)], r"'\.\./secret\.bin', outside the model's folder: refused",
                inputs=[path.parent], api=lambda: _inspect(path), error=CheckpointError)


@case(5, "b", "ONNX external data at an absolute path", "refused, nothing read")
def _(b: Base, tmp: Path) -> Case:
    path = _external(b, tmp, "/etc/passwd")
    return Case(["inspect", str(path)], r"'/etc/passwd', outside the model's folder: refused",
                inputs=[path.parent], api=lambda: _inspect(path), error=CheckpointError)


@case(5, "c", "ONNX external data through a symlink out of the folder", "refused, nothing read")
def _(b: Base, tmp: Path) -> Case:
    (tmp / "secret.bin").write_bytes(b"\0" * (1 << 16))
    path = _external(b, tmp, "weights.bin")
    (path.parent / "weights.bin").symlink_to(tmp / "secret.bin")
    return Case(["inspect", str(path)], r"resolves to .*secret\.bin, outside the model's folder",
                inputs=[path.parent], api=lambda: _inspect(path), error=CheckpointError)


# -- 6: wrong file type ---------------------------------------------------------------------
@case(6, "a", "random bytes as model.safetensors", "detected by content")
def _(b: Base, tmp: Path) -> Case:
    folder = b.copy("ckpt", tmp / "ckpt")
    (folder / "model.safetensors").write_bytes(np.random.default_rng(0).bytes(4096))
    return Case(["benchmark", str(folder)], r"not a safetensors file", inputs=[folder],
                api=_load(folder), error=CheckpointError)


@case(6, "b", "an ONNX file renamed model.safetensors", "detected by content")
def _(b: Base, tmp: Path) -> Case:
    folder = b.copy("ckpt", tmp / "ckpt")
    (folder / "model.safetensors").write_bytes(b.onnx.read_bytes())
    return Case(["benchmark", str(folder)], r"not a safetensors file", inputs=[folder],
                api=_load(folder), error=CheckpointError)


@case(6, "c", "an .onnx file where a checkpoint folder is expected", "clear error")
def _(b: Base, tmp: Path) -> Case:
    path = b.copy("onnx", tmp / "digits.onnx")
    return Case(["benchmark", str(path)], r"not a folder", inputs=[path],
                api=_load(path), error=CheckpointError)


@case(6, "d", "random bytes as an .onnx file", "detected by content")
def _(b: Base, tmp: Path) -> Case:
    path = tmp / "noise.onnx"
    path.write_bytes(np.random.default_rng(1).bytes(4096))
    return Case(["inspect", str(path)], r"truncated or not an ONNX file", inputs=[path],
                api=lambda: _inspect(path), error=CheckpointError)


# -- 7: checkpoint keys -----------------------------------------------------------------------
@case(7, "a", "a checkpoint tensor missing", "error listing the missing keys")
def _(b: Base, tmp: Path) -> Case:
    folder = b.copy("ckpt", tmp / "ckpt")
    _retensor(folder, lambda t: {k: v for k, v in t.items() if k != "classifier.3.bias"})
    return Case(["benchmark", str(folder)], r"missing keys \['classifier\.3\.bias'\]",
                inputs=[folder], api=_load(folder), error=CheckpointError)


@case(7, "b", "an unexpected tensor in a checkpoint", "error listing the unexpected keys")
def _(b: Base, tmp: Path) -> Case:
    folder = b.copy("ckpt", tmp / "ckpt")
    _retensor(folder, lambda t: {**t, "extra.weight": torch.zeros(3)})
    return Case(["benchmark", str(folder)], r"unexpected keys \['extra\.weight'\]",
                inputs=[folder], api=_load(folder), error=CheckpointError)


@case(7, "c", "a tensor of the wrong shape", "error naming the tensor and both shapes")
def _(b: Base, tmp: Path) -> Case:
    folder = b.copy("ckpt", tmp / "ckpt")
    _retensor(folder, lambda t: {**t, "classifier.3.bias": torch.zeros(11)})
    return Case(["benchmark", str(folder)], r"'classifier\.3\.bias' is float32 \[11\].*declares "
                r"float32 \[10\]", inputs=[folder], api=_load(folder), error=CheckpointError)
