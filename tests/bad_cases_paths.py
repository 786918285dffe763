"""Output paths, configs, exported graphs and the four cases of issue 17: cases 19-21, 23, 25-29
of tests/test_bad_inputs.py."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import torch

import quantwise
from quantwise.errors import CheckpointError, ConfigError, ModelLoadError, OutputPathError
from bad_case import Base, Case, case
from bad_cases_files import _load, _retensor

import bad_models


# -- 19: output path is the input, or exists --------------------------------------------------
@case(19, "a", "--out equal to the input folder", "refused, input untouched")
def _(b: Base, tmp: Path) -> Case:
    folder = b.copy("hf", tmp / "bert")
    return Case(["quantize", str(folder), "--out", str(folder), "--calib", str(b.tokens)],
                r"is \(or contains\) the input", inputs=[folder],
                api=lambda: quantwise.io.check_output_dir(folder, inputs=(folder,)), error=OutputPathError)


@case(19, "b", "--out a symlink to the input folder", "refused, input untouched")
def _(b: Base, tmp: Path) -> Case:
    folder = b.copy("hf", tmp / "bert")
    link = tmp / "link"
    link.symlink_to(folder)
    return Case(["quantize", str(folder), "--out", str(link), "--calib", str(b.tokens), "--overwrite"],
                r"is \(or contains\) the input", inputs=[folder],
                api=lambda: quantwise.io.check_output_dir(link, True, inputs=(folder,)),
                error=OutputPathError)


@case(19, "c", "--out an existing folder without --overwrite", "refused before any work, folder intact")
def _(b: Base, tmp: Path) -> Case:
    out = tmp / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    qmodel = quantwise.load(b.ckpt)
    return Case(["quantize", "digits", "--out", str(out)], r"already exists: pass --overwrite",
                out=out, api=lambda: quantwise.save(qmodel, out), error=OutputPathError)


# -- 20: interrupted writes ---------------------------------------------------------------------
def _disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@case(20, "a", "disk full while the checkpoint is written (over a previous output)",
      "the previous output intact, no temporary files, exit 2")
def _(b: Base, tmp: Path) -> Case:
    out = b.copy("ckpt", tmp / "out")
    qmodel = quantwise.load(b.ckpt)

    def api() -> None:
        with _full_disk():
            quantwise.save(qmodel, out, overwrite=True)
    return Case(["quantize", "digits", "--out", str(out), "--overwrite", "--quiet"],
                r"No space left on device.*previous content is unchanged", out=out, api=api,
                error=OutputPathError, patch=_full_disk)


@contextlib.contextmanager
def _full_disk():
    """Every fsync of quantwise's atomic writes fails with ENOSPC, as on a full disk."""
    import quantwise.fileio

    real = quantwise.fileio.os.fsync
    quantwise.fileio.os.fsync = _disk_full
    try:
        yield
    finally:
        quantwise.fileio.os.fsync = real


# -- 21: read-only output folder --------------------------------------------------------------
@case(21, "a", "a read-only output folder", "detected before the long calibration starts")
def _(b: Base, tmp: Path) -> Case:
    parent = tmp / "ro"
    parent.mkdir()
    _read_only(parent)
    out = parent / "out"
    return Case(["quantize", "digits", "--out", str(out)], r"cannot write under", out=out,
                api=lambda: quantwise.io.check_output_dir(out), error=OutputPathError)


def _read_only(folder: Path) -> None:
    """chmod for ordinary users; root ignores modes, so a read-only tmpfs mount for root."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        return
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(folder)],
                          capture_output=True)
    if done.returncode != 0:
        import pytest

        pytest.skip(f"root cannot make a read-only folder here (mount: {done.stderr.decode().strip()})")


def unmount_read_only(tmp: Path) -> None:
    folder = tmp / "ro"
    if os.path.ismount(folder):
        subprocess.run(["umount", str(folder)], capture_output=True)


# -- 23: exported graph with other batch sizes / sequence lengths ---------------------------------
def _run_onnx(path: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


@case(23, "a", "the exported digits model run with batch sizes 1 and 7",
      "works (dynamic batch axis), outputs within tolerance of PyTorch")
def _(b: Base, tmp: Path) -> Case:
    folder = b.copy("ckpt", tmp / "ckpt")
    path = tmp / "digits.onnx"

    def check(onnx_path: Path) -> None:
        qmodel = quantwise.load(folder)
        for n in (1, 7):
            x = torch.rand(n, 1, 8, 8) * 16
            got = _run_onnx(onnx_path, x.numpy())
            want = qmodel(x).detach().numpy()
            assert got.shape == want.shape
            assert np.abs(got - want).max() <= 0.05 * np.abs(want).max()

    return Case(["export", str(folder), "--out", str(path), "--no-per-layer"],
                r"ONNX Runtime runs 2/2 convs and 2/2 matmuls as integer kernels", rc=0,
                inputs=[folder], api=lambda: check(b.onnx), after=lambda: check(path))


@case(23, "b", "an exported sequence model run with other sequence lengths",
      "works (dynamic sequence axis)")
def _(b: Base, tmp: Path) -> Case:
    def api() -> None:
        from quantwise.export import export_onnx

        model = bad_models.mlp()
        qmodel = quantwise.quantize(model, "w8a8", [torch.randn(4, 5, 16) for _ in range(3)], progress=False)
        path = tmp / "seq.onnx"
        export_onnx(qmodel, torch.randn(2, 5, 16), path)
        for shape in ((1, 3, 16), (3, 11, 16)):
            x = torch.randn(*shape)
            got, want = _run_onnx(path, x.numpy()), qmodel(x).detach().numpy()
            assert got.shape == want.shape
            assert np.abs(got - want).max() <= 0.05 * np.abs(want).max()
    folder = tmp / "q"
    return Case(["quantize", "bad_models:mlp", "--calib", str(b.seq), "--out", str(folder), "--quiet"],
                r"2 layers quantized", rc=0, inputs=[b.seq], api=api)


# -- 25: config typos -----------------------------------------------------------------------------
@case(25, "a", "a config file with an unknown key", "error listing the valid keys")
def _(b: Base, tmp: Path) -> Case:
    path = tmp / "c.yaml"
    path.write_text("preset: w8a8\ncalibrater: entropy\n")
    return Case(["quantize", "--config", str(path), "--out", str(tmp / "out")],
                r"unknown .*keys \['calibrater'\]; valid keys", inputs=[path], out=tmp / "out",
                api=lambda: quantwise.Config.resolve(str(path)), error=ConfigError)


@case(25, "b", "a typo in a format name", "error listing the valid formats")
def _(b: Base, tmp: Path) -> Case:
    path = tmp / "c.json"
    path.write_text(json.dumps({"preset": "w8a8", "default": {"weight": {"format": "int3"}}}))
    return Case(["quantize", "--config", str(path), "--out", str(tmp / "out")],
                r"unknown format 'int3'; valid formats: int8, uint8", inputs=[path], out=tmp / "out",
                api=lambda: quantwise.Config.resolve(str(path)), error=ConfigError)


# -- 26-29: issue 17 ------------------------------------------------------------------------------
@case(26, "a", "a Hugging Face folder whose model.safetensors is empty", "\"the file is empty\", exit 2")
def _(b: Base, tmp: Path) -> Case:
    folder = b.copy("hf", tmp / "bert")
    (folder / "model.safetensors").write_bytes(b"")
    return Case(["quantize", str(folder), "--calib", str(b.tokens), "--out", str(tmp / "out")],
                r"model\.safetensors: the file is empty", inputs=[folder], out=tmp / "out",
                api=lambda: quantwise.models.load_model(str(folder)), error=CheckpointError)


@case(26, "b", "a Hugging Face folder whose model.safetensors is truncated", "\"truncated\", exit 2")
def _(b: Base, tmp: Path) -> Case:
    folder = b.copy("hf", tmp / "bert")
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return Case(["quantize", str(folder), "--calib", str(b.tokens), "--out", str(tmp / "out")],
                r"truncated: its header promises", inputs=[folder], out=tmp / "out",
                api=lambda: quantwise.models.load_model(str(folder)), error=CheckpointError)


@case(27, "a", "model.safetensors.index.json pointing at pytorch_model.bin",
      "refused (a pickle), the output folder not created")
def _(b: Base, tmp: Path) -> Case:
    folder = b.copy("hf", tmp / "bert")
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04K\x01.")
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"embeddings.word_embeddings.weight": "pytorch_model.bin"}}))
    return Case(["quantize", str(folder), "--calib", str(b.tokens), "--out", str(tmp / "out")],
                r"points at 'pytorch_model\.bin', a pickle file", inputs=[folder], out=tmp / "out",
                api=lambda: quantwise.models.load_model(str(folder)), error=ModelLoadError)


@case(28, "a", "quantwise.json without \"layers\"", "error naming the file, no KeyError")
def _(b: Base, tmp: Path) -> Case:
    folder = b.copy("ckpt", tmp / "ckpt")
    meta = json.loads((folder / "quantwise.json").read_text())
    del meta["layers"]
    (folder / "quantwise.json").write_text(json.dumps(meta))
    return Case(["benchmark", str(folder)], r"quantwise\.json has no \"layers\" mapping",
                inputs=[folder], api=_load(folder), error=CheckpointError)


@case(28, "b", "a layer entry of quantwise.json without \"kind\"", "error naming the layer")
def _(b: Base, tmp: Path) -> Case:
    folder = b.copy("ckpt", tmp / "ckpt")
    meta = json.loads((folder / "quantwise.json").read_text())
    del meta["layers"]["classifier.1"]["kind"]
    (folder / "quantwise.json").write_text(json.dumps(meta))
    return Case(["benchmark", str(folder)], r"layer 'classifier\.1': \"kind\" missing",
                inputs=[folder], api=_load(folder), error=CheckpointError)


@case(28, "c", "quantwise.json whose source names a Python function (os:abort)",
      "refused: a checkpoint never makes quantwise import or run code")
def _(b: Base, tmp: Path) -> Case:
    folder = b.copy("ckpt", tmp / "ckpt")
    meta = json.loads((folder / "quantwise.json").read_text())
    meta["source"] = "os:abort"
    (folder / "quantwise.json").write_text(json.dumps(meta))
    return Case(["benchmark", str(folder)], r"records its source model as 'os:abort', a Python function",
                inputs=[folder], api=_load(folder), error=CheckpointError)


@case(29, "a", "int8 codes rewritten as int32 values out of int8's range",
      "refused: the dtype quantwise.json declares")
def _(b: Base, tmp: Path) -> Case:
    folder = b.copy("ckpt", tmp / "ckpt")
    _retensor(folder, lambda t: {k: (v.to(torch.int32) * 3 if v.dtype == torch.int8 else v)
                                 for k, v in t.items()})
    return Case(["benchmark", str(folder)], r"'\S+\.weight' is int32 .*declares int8", inputs=[folder],
                api=_load(folder), error=CheckpointError)


@case(29, "b", "int8 codes rewritten as floats", "refused: the dtype quantwise.json declares")
def _(b: Base, tmp: Path) -> Case:
    folder = b.copy("ckpt", tmp / "ckpt")
    _retensor(folder, lambda t: {k: (v.float() * 1.7 if v.dtype == torch.int8 else v)
                                 for k, v in t.items()})
    return Case(["benchmark", str(folder)], r"'\S+\.weight' is float32 .*declares int8", inputs=[folder],
                api=_load(folder), error=CheckpointError)


@case(29, "c", "a code outside the narrow int8 range (-128)", "refused: codes out of range")
def _(b: Base, tmp: Path) -> Case:
    folder = b.copy("ckpt", tmp / "ckpt")

    def change(t):
        w = t["classifier.1.weight"].clone()
        w[0, 0] = -128
        return {**t, "classifier.1.weight": w}
    _retensor(folder, change)
    return Case(["benchmark", str(folder)], r"'classifier\.1\.weight' holds codes -128\.\.\d+, outside",
                inputs=[folder], api=_load(folder), error=CheckpointError)


@case(29, "d", "a NaN or negative scale", "refused: scales must be finite and positive")
def _(b: Base, tmp: Path) -> Case:
    folder = b.copy("ckpt", tmp / "ckpt")

    def change(t):
        s = t["features.3.weight_scale"].clone()
        s[1] = float("nan")
        return {**t, "features.3.weight_scale": s}
    _retensor(folder, change)
    return Case(["benchmark", str(folder)], r"'features\.3\.weight_scale' holds scales that are not "
                r"finite and positive", inputs=[folder], api=_load(folder), error=CheckpointError)


@case(29, "e", "a zero point outside the activation format's range", "refused")
def _(b: Base, tmp: Path) -> Case:
    folder = b.copy("ckpt", tmp / "ckpt")
    _retensor(folder, lambda t: {**t, "classifier.1.input_zero_point": torch.tensor(300, dtype=torch.int32)})
    return Case(["benchmark", str(folder)], r"'classifier\.1\.input_zero_point' holds zero points "
                r"300\.\.300, outside 0\.\.255", inputs=[folder], api=_load(folder), error=CheckpointError)

