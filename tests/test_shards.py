"""Sharded Hugging Face checkpoints (formats/shards.py): read one tensor at a time, and every
bad folder refused before any weights are read, with the file and tensor named."""

import json
import struct

import pytest
import torch

import quantwise
from quantwise.cli import main
from quantwise.formats.shards import INDEX, ShardedCheckpoint
from quantwise.formats.synthetic import write_llama_folder

TINY = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=300, num_hidden_layers=3)


@pytest.fixture
def folder(tmp_path):
    return write_llama_folder(tmp_path / "llama", shard_bytes=100_000, **TINY)


def _shards(folder):
    return sorted(folder.glob("model-*.safetensors"))


def test_synthetic_folder_is_what_transformers_loads(folder):
    from transformers import LlamaForCausalLM

    assert len(_shards(folder)) == 3
    ck = ShardedCheckpoint.open(folder)
    ck.check_config(json.loads((folder / "config.json").read_text()))
    assert len(ck.names("model.layers.1.")) == 9 and ck.tensors["lm_head.weight"].dtype == "BF16"
    model = LlamaForCausalLM.from_pretrained(str(folder), torch_dtype=torch.float32).eval()
    for name, value in model.state_dict().items():
        if name in ck.tensors:
            assert torch.equal(ck.read(name), value), name
    assert ck.read("model.norm.weight", dtype=None).dtype == torch.bfloat16


def test_same_seed_same_bytes(tmp_path):
    a = write_llama_folder(tmp_path / "a", shard_bytes=100_000, seed=3, **TINY)
    b = write_llama_folder(tmp_path / "b", shard_bytes=100_000, seed=3, **TINY)
    assert [p.read_bytes() for p in _shards(a)] == [p.read_bytes() for p in _shards(b)]


def _edit_index(folder, fn):
    index = json.loads((folder / INDEX).read_text())
    fn(index["weight_map"])
    (folder / INDEX).write_text(json.dumps(index))


def _truncate(folder):
    shard = _shards(folder)[1]
    shard.write_bytes(shard.read_bytes()[:-100])
    return shard.name


def _empty(folder):
    _shards(folder)[0].write_bytes(b"")
    return _shards(folder)[0].name


def _missing(folder):
    _shards(folder)[2].unlink()
    return "model-00003-of-00003.safetensors"


def _outside(folder):
    _edit_index(folder, lambda m: m.update({"model.norm.weight": "../elsewhere.safetensors"}))
    return "elsewhere"


def _pickle(folder):
    (folder / "pytorch_model.bin").write_bytes(b"not loaded")
    _edit_index(folder, lambda m: m.update({"model.norm.weight": "pytorch_model.bin"}))
    return "pickle"


def _garbage_header(folder):
    shard = _shards(folder)[0]
    data = shard.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    shard.write_bytes(data[:8] + b"{" * n + data[8 + n:])
    return "not valid JSON"


def _stale_index(folder):
    _edit_index(folder, lambda m: m.update({"model.layers.0.mlp.up_proj.weight": _shards(folder)[2].name}))
    return "model.layers.0.mlp.up_proj.weight"


def _wrong_shape(folder):
    config = json.loads((folder / "config.json").read_text())
    config["intermediate_size"] = 96
    (folder / "config.json").write_text(json.dumps(config))
    return "mlp.down_proj.weight"  # the first MLP tensor in (sorted) index order


def _fewer_layers(folder):
    config = json.loads((folder / "config.json").read_text())
    config["num_hidden_layers"] = 2
    (folder / "config.json").write_text(json.dumps(config))
    return "num_hidden_layers 2"


BAD = {"truncated": _truncate, "empty": _empty, "missing": _missing, "outside": _outside,
       "pickle": _pickle, "garbage header": _garbage_header, "stale index": _stale_index,
       "wrong shape": _wrong_shape, "fewer layers": _fewer_layers}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_folders_are_refused_naming_what_is_wrong(folder, case, capsys, tmp_path):
    word = BAD[case](folder)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    with pytest.raises(quantwise.QuantwiseError, match=word.replace("(", r"\(")) as err:
        ck = ShardedCheckpoint.open(folder)
        ck.check_config(json.loads((folder / "config.json").read_text()))
    assert str(folder) in str(err.value) or "pickle" in str(err.value)
    # the command line: exit 2, the same message, nothing written, the input untouched
    out = tmp_path / "out"
    assert main(["quantize", str(folder), "--config", "w8", "--out", str(out), "--quiet"]) == 2
    assert word in capsys.readouterr().err
    assert not out.exists()
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_already_quantized_tensors_are_refused_for_streaming(tmp_path):
    from safetensors.torch import save_file

    folder = tmp_path / "q"
    folder.mkdir()
    save_file({"w": torch.zeros(4, 4, dtype=torch.int8)}, str(folder / "model.safetensors"))
    with pytest.raises(quantwise.CheckpointError, match="already quantized"):
        ShardedCheckpoint.open(folder)
    assert ShardedCheckpoint.open(folder, allow_non_float=True).read("w").dtype == torch.float32


@pytest.mark.parametrize("damage", ["empty", "truncated"])
def test_single_file_folder_with_a_damaged_model_safetensors(tmp_path, capsys, damage):
    """The common Hugging Face layout (one model.safetensors, no index): an empty or truncated
    file is named with exit code 2, not a transformers traceback."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path / "single"
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**TINY)).save_pretrained(str(folder))
    weights = folder / "model.safetensors"
    assert weights.is_file() and not (folder / INDEX).exists()
    ShardedCheckpoint.open(folder).check_config(json.loads((folder / "config.json").read_text()))
    weights.write_bytes(b"" if damage == "empty" else weights.read_bytes()[:-64])
    out = tmp_path / "out"
    assert main(["quantize", str(folder), "--config", "w8", "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "model.safetensors" in err and damage in err and not out.exists()
