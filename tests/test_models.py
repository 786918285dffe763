"""Built-in models (digits CNN, MiniLM embedder) and model reference resolution."""

from __future__ import annotations

import json
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from quantwise.errors import ModelLoadError
from quantwise.models import BUILTIN_MODELS, DEFAULT_MODEL, load_model
from quantwise.models.digits import (WEIGHTS_DIR, WEIGHTS_FILE, DigitsCNN, digits_calib_batches,
                                     digits_data, load_digits_model)
from quantwise.models.minilm import SentenceEmbedder, load_hf_folder, load_tokenizer, tokenize


@pytest.fixture(scope="module")
def minilm():
    model, info = load_model("minilm")
    return model, info, load_tokenizer(info.source)


def embed(model, tokenizer, sentences, max_length=64):
    with torch.no_grad():
        return model(**tokenize(tokenizer, sentences, max_length=max_length))


# ---------------------------------------------------------------- digits

def test_committed_digits_model_accuracy():
    model = load_digits_model()
    x, y = digits_data("test")
    with torch.no_grad():
        acc = (model(x).argmax(1) == y).float().mean().item()
    assert not model.training
    assert acc >= 0.97
    meta = json.loads((WEIGHTS_DIR / "digits_cnn.json").read_text())
    assert meta["architecture"] == "DigitsCNN" and abs(meta["test_top1"] - acc) < 1e-6


def test_digits_state_dict_loads_strictly():
    state = load_file(str(WEIGHTS_FILE))
    model = DigitsCNN()
    assert set(state) == set(model.state_dict())
    model.load_state_dict(state, strict=True)
    # BN running statistics were trained, not left at their initial values.
    assert not torch.allclose(state["features.1.running_var"], torch.ones(32))
    del state["classifier.3.bias"]
    with pytest.raises(RuntimeError, match="Missing key"):
        DigitsCNN().load_state_dict(state, strict=True)


def test_digits_stale_weights_file_fails(tmp_path):
    bad = tmp_path / "bad.safetensors"
    save_file({"features.0.weight": torch.zeros(32, 1, 3, 3)}, str(bad))
    with pytest.raises(RuntimeError):
        load_digits_model(bad)
    with pytest.raises(ModelLoadError, match="train_digits.py"):
        load_digits_model(tmp_path / "missing.safetensors")


def test_digits_splits_are_fixed_stratified_and_scaled():
    (xtr, ytr), (xc, yc), (xte, yte) = (digits_data(s) for s in ("train", "calib", "test"))
    assert (len(ytr), len(yc), len(yte)) == (1437, 256, 360)
    assert xtr.shape[1:] == (1, 8, 8) and xtr.dtype == torch.float32
    assert 0.0 <= xtr.min() and xtr.max() <= 1.0 and xtr.max() > 0.9
    assert torch.bincount(yte, minlength=10).min() >= 35  # stratified: every class ~36 times
    rows = lambda x: {tuple(r.flatten().tolist()) for r in x}  # noqa: E731
    assert rows(xc) <= rows(xtr)  # calib comes from train ...
    assert not any(torch.equal(a, b) for a in xte[:20] for b in xc)  # ... never from test
    assert torch.equal(digits_data("calib")[0], xc)
    batches = list(digits_calib_batches(100))
    assert [len(b) for b in batches] == [100, 100, 56] and torch.equal(torch.cat(batches), xc)


# ---------------------------------------------------------------- MiniLM

def test_minilm_embeddings_unit_norm_and_semantic(minilm):
    model, info, tok = minilm
    assert isinstance(model, SentenceEmbedder) and info.kind == "embedder" and info.metric == "cosine"
    assert model.encoder.config._attn_implementation == "eager"
    emb = embed(model, tok, ["A man is playing a guitar.", "Someone is playing an instrument.",
                             "The stock market fell sharply today."])
    assert emb.shape == (3, 384)
    assert torch.allclose(emb.norm(dim=1), torch.ones(3), atol=1e-5)
    sim = emb @ emb.T
    assert sim[0, 1] > 0.5 and sim[0, 1] > sim[0, 2] + 0.3 and sim[1, 0] > sim[1, 2] + 0.3


def test_minilm_padding_is_masked(minilm):
    model, _, tok = minilm
    sentence = ["Padding tokens must not change this sentence's embedding."]
    short, long = embed(model, tok, sentence, 24), embed(model, tok, sentence, 64)
    assert (short - long).abs().max() < 1e-5
    # Without the mask the padding leaks into attention and pooling: the mask really matters.
    batch = tokenize(tok, sentence, max_length=64)
    with torch.no_grad():
        unmasked = model(batch["input_ids"], torch.ones_like(batch["attention_mask"]))
    assert (unmasked - long).abs().max() > 1e-2


def test_minilm_matches_sentence_transformers(minilm):
    st = pytest.importorskip("sentence_transformers")
    model, info, tok = minilm
    sentences = ["Quantization maps floats to integers.", "A short one."]
    ref = st.SentenceTransformer(info.source, device="cpu").encode(sentences, convert_to_tensor=True)
    assert (embed(model, tok, sentences) - ref.cpu()).abs().max() < 1e-4


# ---------------------------------------------------------------- registry

def test_builtins_and_default():
    assert set(BUILTIN_MODELS) == {"digits", "minilm", "stdlib-lm"} and DEFAULT_MODEL == "digits"
    model, info = load_model("digits")
    assert isinstance(model, DigitsCNN) and not model.training
    assert (info.kind, info.calib_data, info.eval_data, info.metric) == ("classifier", "digits", "digits", "top1")


def test_module_function_reference(tmp_path, monkeypatch):
    (tmp_path / "qw_helper_models.py").write_text(textwrap.dedent("""
        import torch
        def tiny():
            return torch.nn.Sequential(torch.nn.Linear(4, 2), torch.nn.Dropout(0.5))
        def not_a_model():
            return 42
        def broken():
            raise RuntimeError("boom")
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    model, info = load_model("qw_helper_models:tiny")
    assert isinstance(model[0], nn.Linear) and not model.training
    assert (info.name, info.kind, info.calib_data) == ("qw_helper_models:tiny", "custom", None)
    with pytest.raises(ModelLoadError, match="returned int, not a torch.nn.Module"):
        load_model("qw_helper_models:not_a_model")
    with pytest.raises(ModelLoadError, match="boom"):
        load_model("qw_helper_models:broken")
    with pytest.raises(ModelLoadError, match="no function 'missing'"):
        load_model("qw_helper_models:missing")
    with pytest.raises(ModelLoadError, match="cannot import module 'no_such_pkg_qw.mod'.*digits, minilm"):
        load_model("no_such_pkg_qw.mod:build")


def test_load_model_path_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist.*digits, minilm"):
        load_model(str(tmp_path / "nope"))
    with pytest.raises(ModelLoadError, match="unknown model 'resnet'.*digits, minilm"):
        load_model("resnet")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelLoadError, match="empty directory"):
        load_model(str(empty))
    (empty / "notes.txt").write_text("hi")
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(str(empty))


def test_file_path_is_never_executed(tmp_path):
    marker = tmp_path / "ran"
    script = tmp_path / "evil.py"
    script.write_text(f"open({str(marker)!r}, 'w').write('x')\nimport torch\nmodel = torch.nn.Linear(1, 1)\n")
    with pytest.raises(ModelLoadError, match="does not run files as code"):
        load_model(str(script))
    assert not marker.exists()


def test_pickle_only_hf_folder_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ModelLoadError, match="no \\*.safetensors"):
        load_model(str(tmp_path))
    torch.save({"w": torch.zeros(1)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="refused by default; pass --allow-pickle"):
        load_model(str(tmp_path))
    with pytest.raises(ModelLoadError, match="refused by default; pass --allow-pickle"):
        load_hf_folder(tmp_path)


def test_plain_hf_folder_loads_automodel(tmp_path):
    from transformers import BertConfig, BertModel

    cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=32)
    torch.manual_seed(0)
    BertModel(cfg).save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    model, info = load_model(str(tmp_path))
    assert isinstance(model, BertModel) and not model.training
    assert (info.kind, info.source) == ("custom", str(tmp_path))
    assert model.config._attn_implementation == "eager"
