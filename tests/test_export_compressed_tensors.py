"""compressed-tensors export of weight-only quantized stdlib-lm checkpoints (issue 16).

Each checkpoint is exported, loaded back by transformers with the compressed-tensors package
(`AutoModelForCausalLM.from_pretrained`, CPU) and compared with `quantwise.load` of the same
folder: held-out perplexity within 0.5 %, logits of the first 64 tokens within 1e-2 relative
error, and the dequantized weights of every Linear equal to quantwise's.
"""

import hashlib
import json
import shutil

import pytest
import torch

pytest.importorskip("compressed_tensors")

import quantwise  # noqa: E402
from quantwise.config import Config  # noqa: E402
from quantwise.errors import OutputPathError, QuantwiseError  # noqa: E402
from quantwise.formats import compressed_tensors as ct_export  # noqa: E402
from quantwise.formats.compressed_tensors import ExportError, export_compressed_tensors  # noqa: E402
from quantwise.models.stdlib_lm import WEIGHTS_DIR, lm_batches, load_stdlib_lm  # noqa: E402
from quantwise.modules import QuantizedLayer  # noqa: E402
from quantwise.numerics import dequantize  # noqa: E402

PPL_TOLERANCE = 0.005
LOGITS_TOLERANCE = 1e-2


def _w8_float_head() -> Config:
    config = Config.preset("w8")
    config.exclude.append("lm_head")
    config.name = "w8-float-head"
    return config


# name -> (config, quantwise.save shard_bytes (None: default), quantized_head)
CASES = {
    "w4": ("w4", None, False),
    "w8": ("w8", None, False),
    "w4-gptq": ("w4-gptq", None, True),
    # lm_head kept float by quantwise (ignore list), sharded input and output
    "w8-float-head": (_w8_float_head, 400_000, False),
}


@pytest.fixture(scope="module")
def calib():
    return quantwise.data.load_calibration_data("stdlib-code")[:4]


@pytest.fixture(scope="module")
def heldout():
    return lm_batches("heldout", 16, batch_size=8)


def _quantized_folder(tmp_path_factory, calib, config, shard_bytes=None, batches=4):
    config = config() if callable(config) else config
    model = quantwise.quantize(load_stdlib_lm(), config, calib[:batches], progress=False,
                               source=str(WEIGHTS_DIR))
    folder = tmp_path_factory.mktemp("qw") / "model"
    quantwise.save(model, folder, **({"shard_bytes": shard_bytes} if shard_bytes else {}))
    return folder


def _digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module", params=list(CASES))
def exported(request, tmp_path_factory, calib):
    config, shard_bytes, quantized_head = CASES[request.param]
    folder = _quantized_folder(tmp_path_factory, calib, config, shard_bytes)
    before = _digest(folder)
    out = folder.parent / "ct"
    if shard_bytes:  # small output shards too: model-0000i-of-0000N + index
        patch = pytest.MonkeyPatch()
        patch.setattr(ct_export, "SHARD_BYTES", shard_bytes)
    try:
        assert export_compressed_tensors(folder, out, quantized_head=quantized_head) == out
    finally:
        if shard_bytes:
            patch.undo()
    assert _digest(folder) == before, "the input folder was modified"
    return request.param, folder, out


def _load_ct(out):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(out), device_map="cpu").eval()


def test_config_and_files(exported):
    name, folder, out = exported
    config = json.loads((out / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    assert qc["quantization_status"] == "compressed"
    (group,) = qc["config_groups"].values()
    weights = group["weights"]
    assert group["targets"] == ["Linear"] and group["input_activations"] is None
    assert weights["type"] == "int" and weights["symmetric"] is True
    if name.startswith("w4"):
        assert (weights["num_bits"], weights["strategy"], weights["group_size"]) == (4, "group", 128)
    else:
        assert (weights["num_bits"], weights["strategy"]) == (8, "channel")
    head_quantized = name == "w4-gptq"  # quantized_head=True; otherwise float, ignored
    assert qc["ignore"] == ([] if head_quantized else ["lm_head"])
    assert (out / "tokenizer.json").read_bytes() == (folder / "tokenizer.json").read_bytes()
    assert not (out / "quantwise.json").exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")], "staging left behind"
    from safetensors import safe_open

    files = sorted(out.glob("*.safetensors"))
    assert (len(files) > 1) == (name == "w8-float-head") == (out / "model.safetensors.index.json").is_file()
    keys = {}
    for path in files:
        with safe_open(str(path), "pt") as handle:
            keys.update({k: handle.get_slice(k).get_dtype() for k in handle.keys()})
    q = "model.layers.0.self_attn.q_proj."
    assert keys[q + "weight_packed"] == "I32" and q + "weight" not in keys
    assert q + "weight_zero_point" not in keys  # symmetric: no zero points
    assert keys["model.embed_tokens.weight"] == "F32"
    assert ("lm_head.weight_packed" in keys) == head_quantized
    assert ("lm_head.weight" in keys) == (not head_quantized)


def test_transformers_load_matches_quantwise(exported, heldout):
    name, folder, out = exported
    reference = quantwise.load(folder)
    model = _load_ct(out)
    ids = heldout[0]["input_ids"][:, :64]
    with torch.no_grad():
        got, want = model(input_ids=ids).logits, reference(input_ids=ids).logits
    rel = float((got - want).norm() / want.norm())
    ppl = quantwise.evaluate(model, heldout, "perplexity").value
    ppl_ref = quantwise.evaluate(reference, heldout, "perplexity").value
    print(f"{name}: logits rel err {rel:.3g}, perplexity {ppl:.5f} vs quantwise {ppl_ref:.5f}")
    assert rel <= LOGITS_TOLERANCE
    assert abs(ppl / ppl_ref - 1) <= PPL_TOLERANCE
    assert 1.5 < ppl_ref < 4.0  # a working model, not two equally broken ones
    # every Linear decompressed by compressed-tensors holds quantwise's dequantized weights
    for lname, layer in reference.named_modules():
        if isinstance(layer, QuantizedLayer):
            w = dequantize(layer.codes(), layer.weight_scale, layer.zero_points(), layer.weight_spec)
            torch.testing.assert_close(model.get_submodule(lname).weight, w, rtol=0, atol=1e-6)


def test_refuses_w8a8(tmp_path_factory, calib):
    folder = _quantized_folder(tmp_path_factory, calib, "w8a8", batches=1)
    out = folder.parent / "ct"
    with pytest.raises(ExportError, match=r"(?s)layer 'model\.layers\.0\.self_attn\.q_proj'.*"
                                          r"static activation.*supported: weight-only"):
        export_compressed_tensors(folder, out)
    assert not out.exists() and sorted(p.name for p in folder.parent.iterdir()) == ["model"]


def test_refuses_existing_output_and_non_causal_lm(exported, tmp_path):
    name, folder, out = exported
    if name != "w8":
        pytest.skip("checked once")
    before = _digest(out)
    with pytest.raises(OutputPathError, match="already exists"):
        export_compressed_tensors(folder, out)
    assert _digest(out) == before
    with pytest.raises(OutputPathError):
        export_compressed_tensors(folder, folder)  # the input itself, even with overwrite
    assert export_compressed_tensors(folder, out, overwrite=True) == out
    assert json.loads((out / "config.json").read_text())["quantization_config"]["format"] == "pack-quantized"
    # an encoder checkpoint (not a causal LM) and a plain float folder are refused
    bert = tmp_path / "bert"
    shutil.copytree(folder, bert)
    config = json.loads((bert / "config.json").read_text())
    config["architectures"] = ["BertModel"]
    (bert / "config.json").write_text(json.dumps(config))
    with pytest.raises(ExportError, match="not a causal LM"):
        export_compressed_tensors(bert, tmp_path / "bert-ct")
    with pytest.raises(QuantwiseError, match="quantwise.json"):
        export_compressed_tensors(WEIGHTS_DIR, tmp_path / "float-ct")
    assert not (tmp_path / "bert-ct").exists() and not (tmp_path / "float-ct").exists()
