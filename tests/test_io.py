import json
import os

import pytest
import torch

import quantwise
from quantwise import CheckpointError, OutputPathError
from quantwise.io import META_FILE, WEIGHTS_FILE


@pytest.fixture
def qdigits(digits):
    model, calib, images, _ = digits
    return model, quantwise.quantize(model, "w8a8", calib[:4], progress=False), images[:64]


@pytest.mark.parametrize("preset", ["w8a8", "w8a8-dynamic", "w4", "bf16"])
def test_reload_is_bit_identical(tmp_path, digits, preset):
    model, calib, images, _ = digits
    qmodel = quantwise.quantize(model, preset, calib[:4], progress=False)
    quantwise.save(qmodel, tmp_path / "q")
    reloaded = quantwise.load(tmp_path / "q", model=model)
    with torch.no_grad():
        assert torch.equal(qmodel(images[:64]), reloaded(images[:64]))
    assert [r.kernel for r in quantwise.summary(reloaded).rows] == \
        [r.kernel for r in quantwise.summary(qmodel).rows]


def test_checkpoint_holds_integer_weights_and_no_pickle(tmp_path, qdigits):
    model, qmodel, _ = qdigits
    folder = quantwise.save(qmodel, tmp_path / "q")
    assert sorted(p.name for p in folder.iterdir()) == [WEIGHTS_FILE, META_FILE]
    from safetensors import safe_open

    with safe_open(str(folder / WEIGHTS_FILE), "pt") as f:
        dtypes = {k: f.get_tensor(k).dtype for k in f.keys()}
    quantized = [r.name for r in quantwise.summary(qmodel).quantized]
    assert len(quantized) == 4
    for name in quantized:
        assert dtypes[f"{name}.weight"] == torch.int8
        assert dtypes[f"{name}.weight_scale"] == torch.float32
    meta = json.loads((folder / META_FILE).read_text())
    assert meta["config"]["name"] == "w8a8" and meta["torch_version"] and meta["layers"]


def test_int8_checkpoint_size_ratio(tmp_path, qdigits):
    from quantwise.evaluate import float_checkpoint_bytes, folder_bytes

    model, qmodel, _ = qdigits
    folder = quantwise.save(qmodel, tmp_path / "q")
    ratio = folder_bytes(folder) / float_checkpoint_bytes(model)
    assert ratio <= 0.27, ratio


def test_seven_bit_weights_are_recorded_as_a_field_and_explained(tmp_path, digits, monkeypatch):
    """On int16-pair CPUs int8 weights get codes within +-64: the record keeps that as a number
    (the checkpoint stays as small as elsewhere: digits w8a8 must stay <= 0.26 of fp32), the
    summary explains it, and a reload keeps it."""
    from quantwise import workflow
    from quantwise.evaluate import float_checkpoint_bytes, folder_bytes

    model, calib, images, _ = digits
    monkeypatch.setattr(workflow, "weight_code_limit", lambda kind, bits: 64)
    qmodel = quantwise.quantize(model, "w8a8", calib[:4], progress=False)
    quantized = quantwise.summary(qmodel).quantized
    assert len(quantized) == 4 and all(r.code_limit == 64 for r in quantized)
    assert all(int(qmodel.get_submodule(r.name).codes().abs().max()) <= 64 for r in quantized)
    assert "limited to +-64 (7 bits)" in str(quantwise.summary(qmodel))
    folder = quantwise.save(qmodel, tmp_path / "q")
    assert folder_bytes(folder) / float_checkpoint_bytes(model) <= 0.26
    reloaded = quantwise.load(folder, model=model)
    assert [r.code_limit for r in quantwise.summary(reloaded).quantized] == [64] * 4


def test_sharded_save_reloads_bit_identically(tmp_path, qdigits):
    model, qmodel, images = qdigits
    folder = quantwise.save(qmodel, tmp_path / "q", shard_bytes=50_000)
    assert len(list(folder.glob("model-*-of-*.safetensors"))) >= 3
    assert not (folder / WEIGHTS_FILE).exists() and (folder / "model.safetensors.index.json").is_file()
    reloaded = quantwise.load(folder, model=model)
    with torch.no_grad():
        assert torch.equal(qmodel(images), reloaded(images))


def test_existing_output_refused_without_overwrite_and_kept(tmp_path, qdigits):
    _, qmodel, _ = qdigits
    out = tmp_path / "q"
    quantwise.save(qmodel, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(OutputPathError, match="overwrite"):
        quantwise.save(qmodel, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    quantwise.save(qmodel, out, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]  # no temp folders left behind


def test_interrupted_write_keeps_previous_output(tmp_path, qdigits, monkeypatch):
    _, qmodel, _ = qdigits
    out = tmp_path / "q"
    quantwise.save(qmodel, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("quantwise.io.atomic_write_text", boom)
    with pytest.raises(OutputPathError, match="disk full.*previous content is unchanged"):
        quantwise.save(qmodel, out, overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]


def test_truncated_and_foreign_files_rejected(tmp_path, qdigits):
    model, qmodel, _ = qdigits
    folder = quantwise.save(qmodel, tmp_path / "q")
    weights = folder / WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="truncated"):
        quantwise.load(folder, model=model)
    weights.write_bytes(os.urandom(4096))
    with pytest.raises(CheckpointError, match="safetensors"):
        quantwise.load(folder, model=model)
    with pytest.raises(CheckpointError, match="no quantwise checkpoint"):
        quantwise.load(tmp_path, model=model)


def test_wrong_model_lists_the_problem(tmp_path, qdigits):
    _, qmodel, _ = qdigits
    folder = quantwise.save(qmodel, tmp_path / "q")
    other = torch.nn.Sequential(torch.nn.Linear(3, 3))
    with pytest.raises(CheckpointError, match="from the given model|in the given model"):
        quantwise.load(folder, model=other)


def test_save_needs_a_converted_model(tmp_path, digits):
    model = digits[0]
    with pytest.raises(quantwise.QuantwiseError):
        quantwise.save(model, tmp_path / "x")
    prepared = quantwise.prepare(model, "w8a8")
    with pytest.raises(CheckpointError, match="converted"):
        quantwise.save(prepared, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_read_only_output_detected(tmp_path, qdigits, monkeypatch):
    _, qmodel, _ = qdigits
    locked = tmp_path / "locked"
    locked.mkdir()
    # CI runs as root, which ignores permission bits: simulate the read-only folder instead.
    monkeypatch.setattr("quantwise.io.os.access", lambda path, mode: False)
    with pytest.raises(OutputPathError, match="writable"):
        quantwise.save(qmodel, locked / "q")
    assert list(locked.iterdir()) == []


def test_saved_files_have_ordinary_permissions(tmp_path, qdigits):
    _, qmodel, _ = qdigits
    old = os.umask(0o022)
    try:
        folder = quantwise.save(qmodel, tmp_path / "q")
    finally:
        os.umask(old)
    assert folder.stat().st_mode & 0o777 == 0o755
    for path in folder.iterdir():
        assert path.stat().st_mode & 0o777 == 0o644, path


def test_int4_conv_weights_pack_two_per_byte(tmp_path):
    model = torch.nn.Sequential(torch.nn.Conv2d(4, 6, 3)).eval()
    cfg = quantwise.Config.from_dict({"default": {"weight": {"format": "int4", "granularity": "per_channel"}}})
    qmodel = quantwise.quantize(model, cfg, None, progress=False)
    assert qmodel[0].weight.dtype == torch.uint8 and qmodel[0].weight.numel() == 6 * 18  # 36 codes -> 18 B
    quantwise.save(qmodel, tmp_path / "q")
    x = torch.randn(2, 4, 7, 7)
    assert torch.equal(quantwise.load(tmp_path / "q", model=model)(x), qmodel(x))


def test_load_without_model_rebuilds_the_recorded_source(tmp_path, digits):
    model, calib, images, _ = digits
    qmodel = quantwise.quantize(model, "w8a8", calib[:2], progress=False, source="digits")
    quantwise.save(qmodel, tmp_path / "q")
    reloaded = quantwise.load(tmp_path / "q")  # the float model comes from the built-in name
    assert torch.equal(qmodel(images[:16]), reloaded(images[:16]))


def test_load_without_model_or_source_says_what_to_pass(tmp_path, qdigits):
    _, qmodel, _ = qdigits
    quantwise.save(qmodel, tmp_path / "q")
    with pytest.raises(CheckpointError, match="pass model="):
        quantwise.load(tmp_path / "q")
