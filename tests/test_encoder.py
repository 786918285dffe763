"""The encoder fast path for BERT-style layers with per-token int8 Linears."""

import copy

import pytest
import torch

import quantwise
from quantwise.encoder import FastBertLayer, remove_encoder_fastpath
from quantwise.kernels import rowquant
from quantwise.state import get_state

transformers = pytest.importorskip("transformers")


def _bert(hidden_act="gelu", **kw):
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=128,
                                     max_position_embeddings=32, hidden_act=hidden_act,
                                     attn_implementation="eager", **kw)
    return transformers.BertModel(config, add_pooling_layer=False).eval()


def _inputs(batch=3, length=9, pad=True):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 100, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    if pad:
        mask[0, 5:] = 0
        mask[1, 2:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _hidden(model, batch):
    with torch.no_grad():
        return model(**batch).last_hidden_state


@pytest.fixture(scope="module")
def qbert():
    model = _bert()
    return model, quantwise.quantize(model, "w8a8-dynamic", progress=False)


def test_fast_layers_are_installed_and_reported(qbert):
    _, q = qbert
    report = get_state(q).encoder
    assert report.layers == ["encoder.layer.0", "encoder.layer.1"]
    assert all(isinstance(layer.__dict__["forward"], FastBertLayer) for layer in q.encoder.layer)
    assert "encoder fast path: 2 BERT-style layers fused" in str(quantwise.summary(q))


@pytest.mark.parametrize("pad", [True, False])
def test_fast_path_matches_the_per_layer_path(qbert, pad):
    model, q = qbert
    slow = copy.deepcopy(q)
    remove_encoder_fastpath(slow)
    batch = _inputs(pad=pad)
    fast, per_layer, ref = _hidden(q, batch), _hidden(slow, batch), _hidden(model, batch)
    keep = batch["attention_mask"].bool()  # padded positions are not used downstream
    # same quantized codes; only attention summation order and the folded 1/sqrt(d) differ
    assert (fast - per_layer)[keep].abs().max() < 0.02
    cos = torch.nn.functional.cosine_similarity(fast[keep], ref[keep], dim=-1)
    assert cos.min() > 0.99


@pytest.mark.parametrize("gemm", ["onednn", "int_mm", "fbgemm"])
def test_both_per_token_gemms_agree_fast_and_per_layer(gemm, monkeypatch):
    """Per-token GEMMs run on oneDNN on AMX CPUs, on FBGEMM on AVX2-only CPUs and on
    torch._int_mm elsewhere (kernels.select): each, in the fast path and layer by layer, on any
    machine."""
    monkeypatch.setenv("QUANTWISE_INT8_GEMM", gemm)
    model = _bert()
    q = quantwise.quantize(model, "w8a8-dynamic", progress=False)
    kernel = q.encoder.layer[0].attention.self.query.kernel
    assert kernel.fallback_reason is None, kernel.fallback_reason
    assert ("oneDNN" in kernel.name) == (gemm == "onednn")
    assert ("FBGEMM" in kernel.name) == (gemm == "fbgemm")
    assert len(get_state(q).encoder.layers) == len(q.encoder.layer)
    if gemm == "fbgemm" and rowquant.available():  # the C passes between the FBGEMM GEMMs
        fast_layer = q.encoder.layer[0].__dict__["forward"]
        assert fast_layer.gelu_pass and fast_layer.norm_pass
    slow = copy.deepcopy(q)
    remove_encoder_fastpath(slow)
    batch = _inputs(pad=True)
    fast, per_layer, ref = _hidden(q, batch), _hidden(slow, batch), _hidden(model, batch)
    keep = batch["attention_mask"].bool()
    assert (fast - per_layer)[keep].abs().max() < 0.02
    assert torch.nn.functional.cosine_similarity(fast[keep], ref[keep], dim=-1).min() > 0.99
    again = copy.deepcopy(q)  # the fused Q/K/V weights are repacked in the copy
    assert torch.equal(_hidden(again, batch), fast)


def test_full_attention_masks_and_single_rows(qbert):
    _, q = qbert
    slow = copy.deepcopy(q)
    remove_encoder_fastpath(slow)
    hs = torch.randn(2, 6, 64)
    causal = torch.full((6, 6), torch.finfo(torch.float32).min).triu(1)[None, None].expand(2, 1, 6, 6)
    layer, ref_layer = q.encoder.layer[0], slow.encoder.layer[0]
    with torch.no_grad():
        for mask in (causal.contiguous(), None):
            assert (layer(hs, mask) - ref_layer(hs, mask)).abs().max() < 0.02
        one = torch.randn(1, 1, 64)
        assert (layer(one) - ref_layer(one)).abs().max() < 0.02


def test_training_mode_and_grad_inputs_use_the_layer_forward(qbert):
    _, q = qbert
    layer = q.encoder.layer[0]
    hs = torch.randn(2, 5, 64, requires_grad=True)
    out = layer(hs)  # falls back (input needs grad); must not raise
    assert out.shape == (2, 5, 64)
    slow = copy.deepcopy(q)
    remove_encoder_fastpath(slow)
    x = torch.randn(2, 5, 64)
    q.train()
    try:  # dropout is 0.1 here: training mode must run the layer's own (dropout) forward
        torch.manual_seed(5)
        a = layer(x)
        slow.train()
        torch.manual_seed(5)
        b = slow.encoder.layer[0](x)
    finally:
        q.eval()
    assert torch.equal(a, b)


@pytest.mark.parametrize("gemm", [None, "onednn", "fbgemm"])
def test_static_int8_layers_are_fused_too(gemm, monkeypatch):
    """Static layers on each kernel the probe can pick; "onednn" runs the FFN as two oneDNN calls
    whatever GEMM the fast path's own static Linears use (FBGEMM's float codes on AVX2-only
    CPUs: they crashed oneDNN there, seen with a forced and possible with a timed choice)."""
    if gemm:
        monkeypatch.setenv("QUANTWISE_INT8_GEMM", gemm)
    model = _bert()
    q = quantwise.quantize(model, "w8a8", [_inputs()], progress=False)  # static activations
    assert get_state(q).encoder.layers == ["encoder.layer.0", "encoder.layer.1"]
    if gemm == "onednn":
        assert q.encoder.layer[0].__dict__["forward"].onednn_ffn
    slow = copy.deepcopy(q)
    remove_encoder_fastpath(slow)
    batch = _inputs()
    keep = batch["attention_mask"].bool()
    assert (_hidden(q, batch) - _hidden(slow, batch))[keep].abs().max() < 0.02


def test_other_configs_are_left_alone():
    model = _bert()
    q = quantwise.quantize(model, "w8", [_inputs()], progress=False)  # weight-only
    report = get_state(q).encoder
    assert not report.layers and "per-token" in next(iter(report.skipped.values()))
    assert "forward" not in q.encoder.layer[0].__dict__
    silu = quantwise.quantize(_bert(hidden_act="silu"), "w8a8-dynamic", progress=False)
    assert "not GELU" in next(iter(get_state(silu).encoder.skipped.values()))


def test_other_gelu_variants_run_the_layer_forward():
    model = _bert(hidden_act="gelu_new")  # tanh approximation in transformers' own module
    q = quantwise.quantize(model, "w8a8-dynamic", progress=False)
    assert "not GELU" in next(iter(get_state(q).encoder.skipped.values()))
    batch = _inputs()
    keep = batch["attention_mask"].bool()
    cos = torch.nn.functional.cosine_similarity(_hidden(q, batch)[keep], _hidden(model, batch)[keep], dim=-1)
    assert cos.min() > 0.99


def test_save_load_and_deepcopy_keep_the_fast_path(tmp_path, qbert):
    model, q = qbert
    quantwise.save(q, tmp_path / "q")
    loaded = quantwise.load(tmp_path / "q", model)
    batch = _inputs()
    assert get_state(loaded).encoder.layers == get_state(q).encoder.layers
    assert torch.equal(_hidden(loaded, batch), _hidden(q, batch))
    clone = copy.deepcopy(q)
    assert torch.equal(_hidden(clone, batch), _hidden(q, batch))
