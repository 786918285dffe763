"""runtime/decoder.py's lean decoding loop against transformers' own KV-cache forward, for
float and quantized Llama-family models; its C glue (csrc/decode.c) and the fused GEMVs."""

from __future__ import annotations

import pytest
import torch
import transformers

import quantwise
from quantwise.errors import ConfigError
from quantwise.kernels.gemv import WeightOnlyGemv, fuse_rows, library
from quantwise.runtime.decoder import LeanDecoder
from quantwise.runtime.generate import generate

needs_glue = pytest.mark.skipif(library()[0] is None, reason="no compiled GEMV / glue here")
VOCAB = 96


def _model(kind: str = "llama", heads: int = 8, kv: int = 2, hidden: int = 128, seed: int = 0,
           **extra) -> torch.nn.Module:
    cls, cfg = {"llama": (transformers.LlamaForCausalLM, transformers.LlamaConfig),
                "qwen2": (transformers.Qwen2ForCausalLM, transformers.Qwen2Config),
                "mistral": (transformers.MistralForCausalLM, transformers.MistralConfig)}[kind]
    torch.manual_seed(seed)
    config = cfg(num_hidden_layers=2, hidden_size=hidden, intermediate_size=2 * hidden,
                 num_attention_heads=heads, num_key_value_heads=kv, vocab_size=VOCAB,
                 max_position_embeddings=512, attn_implementation="eager", **extra)
    return cls(config).eval()


def _hf_steps(model, ids: torch.Tensor, prompt: int) -> torch.Tensor:
    """Logits after the prompt, then after each later token one at a time (transformers)."""
    with torch.no_grad():
        out = model(ids[:, :prompt], use_cache=True)
        cache, logits = out.past_key_values, [out.logits[0, -1]]
        for i in range(prompt, ids.shape[1]):
            out = model(ids[:, i:i + 1], cache=cache, use_cache=True)
            cache = out.past_key_values
            logits.append(out.logits[0, -1])
    return torch.stack(logits)


def _lean_steps(model, ids: torch.Tensor, prompt: int) -> torch.Tensor:
    decoder, why = LeanDecoder.of(model, ids.shape[1] + 1)
    assert decoder is not None, why
    decoder.reset(ids.shape[1] + 1)
    logits = [decoder.forward(ids[0, :prompt])]
    logits += [decoder.forward(ids[0, i:i + 1]) for i in range(prompt, ids.shape[1])]
    return torch.stack(logits)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _ids(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (1, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind,extra", [("llama", {}), ("qwen2", {}), ("mistral", {"sliding_window": 4096}),
                                        ("llama", {"tie_word_embeddings": True})])
def test_float_models_match_transformers_step_for_step(kind, extra):
    model = _model(kind, **extra)
    ids = _ids(40)
    assert _rel(_lean_steps(model, ids, 24), _hf_steps(model, ids, 24)) < 1e-5


@needs_glue
def test_long_context_attention_in_c_matches_transformers():
    """300 cached positions, 8 heads of 32: the C attention's threaded path, its exp and the
    padding of the scores to 8 (300 is not a multiple of 8), against transformers."""
    model = _model(heads=4, kv=1, hidden=128)
    ids = _ids(301, seed=2)
    assert _rel(_lean_steps(model, ids, 290), _hf_steps(model, ids, 290)) < 1e-5


@needs_glue
@pytest.mark.parametrize("preset", ["w4", "w8"])
def test_quantized_models_take_the_fused_gemvs_and_match_transformers(preset, monkeypatch):
    monkeypatch.setenv("QUANTWISE_GEMV", "on")  # whatever the probe would time on this CPU
    model = quantwise.quantize(_model(hidden=128), preset, [{"input_ids": _ids(32, seed=s)}
                                                            for s in range(2)], progress=False)
    decoder, _ = LeanDecoder.of(model, 64)
    assert all(b.qkv is not None and b.gate_up is not None for b in decoder.blocks)
    ids = _ids(30)
    # the GEMV rounds activations to int16 per row: float-level differences move a code now
    # and then, so agreement is at that rounding's level, not float32's
    assert _rel(_lean_steps(model, ids, 20), _hf_steps(model, ids, 20)) < 2e-3
    assert LeanDecoder.of(model, 64)[0] is decoder  # built once per model: no second fusion


@pytest.mark.parametrize("sampling", [{}, {"temperature": 0.9, "top_k": 20, "top_p": 0.9, "seed": 4},
                                      {"temperature": 1.4, "seed": 7}])
def test_generated_tokens_equal_transformers_generate(sampling):
    model = _model()

    class Tok:
        def __call__(self, text):
            return {"input_ids": torch.tensor([[ord(c) % VOCAB for c in text]])}

        def decode(self, ids):
            return " ".join(str(int(i)) for i in ids)

    a = generate(model, Tok(), "hello world", 24, engine="quantwise", **sampling)
    b = generate(model, Tok(), "hello world", 24, engine="transformers", **sampling)
    assert (a.engine, b.engine) == ("quantwise", "transformers")
    assert a.text == b.text and a.new_tokens == b.new_tokens


def test_models_the_loop_cannot_run_are_named_and_fall_back():
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=1, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=64)).eval()
    assert "gpt2" in LeanDecoder.why_not(gpt2, 10)
    window = _model("mistral", sliding_window=16)
    assert "sliding window" in LeanDecoder.why_not(window, 40)
    assert LeanDecoder.why_not(window, 12) is None

    def tok(text):
        return {"input_ids": torch.tensor([[1, 2, 3]])}
    tok.decode = lambda ids: ""
    assert generate(gpt2, tok, "x", 3).engine == "transformers"
    with pytest.raises(ConfigError, match="lean decoding loop cannot run this model.*gpt2"):
        generate(gpt2, tok, "x", 3, engine="quantwise")
    with pytest.raises(ConfigError, match="engine"):
        generate(gpt2, tok, "x", 3, engine="fast")


@needs_glue
def test_fused_rows_are_the_parts_side_by_side_and_the_parts_are_unchanged():
    g = torch.Generator().manual_seed(0)
    parts = [WeightOnlyGemv(torch.randint(-8, 8, (n, 256), generator=g), torch.rand(n, 2) + 0.1,
                            4, 128, torch.randn(n) if n == 12 else None) for n in (16, 12, 6)]
    x = torch.randn(1, 256)
    before = [p(x) for p in parts]
    fused = fuse_rows(parts)
    assert fused is not None and fused.out_features == 34
    assert torch.equal(fused(x), torch.cat(before, 1))
    assert all(torch.equal(p(x), b) for p, b in zip(parts, before))
    assert parts[0].codes.data_ptr() == fused.codes.data_ptr()  # views: no second copy
    odd = WeightOnlyGemv(torch.randint(-8, 8, (6, 256)), torch.rand(6, 2) + 0.1, 4, 128, None)
    assert fuse_rows([odd, parts[0]]) is None  # 6 rows do not fill whole tiles of 4
    assert fuse_rows([parts[0], WeightOnlyGemv(torch.randint(-8, 8, (4, 256)), torch.rand(4, 4) + 0.1,
                                               4, 64, None)]) is None  # another group size

