"""Hugging Face folders in and out: a model quantized from an HF folder saves a self-contained
folder (config.json with its quantization_config, tokenizer files) that loads without the
original weights, from Python and from the command line."""

import json
import shutil

import pytest
import torch

import quantwise
from quantwise.models.registry import load_model
import hf_models


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_folder_out_reloads_without_the_source(name, tmp_path):
    src = tmp_path / "src"
    hf_models.build(name).save_pretrained(src)
    model, _ = load_model(str(src))
    assert type(model).__name__.endswith(("ForCausalLM", "LMHeadModel"))  # the LM head is kept
    calib = [hf_models.example_inputs(name, seed) for seed in range(2)]
    qmodel = quantwise.quantize(model, "w8a8-dynamic", calib, progress=False, source=str(src))
    out = quantwise.save(qmodel, tmp_path / "q")
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "quantwise"
    assert config["quantization_config"]["config"]["name"] == "w8a8-dynamic"
    shutil.rmtree(src)  # the saved folder must not need it
    reloaded = quantwise.load(out)
    x = hf_models.example_inputs(name, 5)
    with torch.no_grad():
        assert torch.equal(hf_models.main_output(reloaded(**x)), hf_models.main_output(qmodel(**x)))
    with pytest.raises(quantwise.ModelLoadError, match="quantized quantwise checkpoint"):
        load_model(str(out))  # not mistaken for a float model folder


def test_minilm_folder_keeps_its_tokenizer_and_pooling(tmp_path):
    from quantwise.models.minilm import load_tokenizer, tokenize

    model, _ = load_model("minilm")
    qmodel = quantwise.quantize(model, "w8", progress=False, source="minilm")
    out = quantwise.save(qmodel, tmp_path / "minilm-w8")
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "tokenizer.json", "modules.json", "1_Pooling"} <= names
    batch = tokenize(load_tokenizer(out), ["a sentence", "another one"])  # its own tokenizer
    reloaded = quantwise.load(out)  # from the folder's own config.json
    with torch.no_grad():
        assert torch.equal(reloaded(**batch), qmodel(**batch))
