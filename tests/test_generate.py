"""quantwise.generate / `quantwise generate`: transformers' KV-cache generation on quantized
causal LMs gives what a full forward per token gives; sampling repeats per seed."""

from __future__ import annotations

import json

import pytest
import torch

import quantwise
from quantwise.data import load_calibration_data
from quantwise.errors import ConfigError
from quantwise.models.stdlib_lm import WEIGHTS_DIR, ByteTokenizer, load_stdlib_lm
from quantwise.runtime import load_tokenizer


@pytest.fixture(scope="module")
def w4():
    return quantwise.quantize(load_stdlib_lm(), "w4", load_calibration_data("stdlib-code")[:2],
                              progress=False, source="stdlib-lm")


def _greedy_without_cache(model, ids, n):
    with torch.no_grad():
        for _ in range(n):
            step = model(input_ids=ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, step], 1)
    return ids


def test_greedy_with_the_kv_cache_equals_a_full_forward_per_token(w4):
    tok = ByteTokenizer()
    out = quantwise.generate(w4, tok, "import os\ndef ", max_new_tokens=24)
    ids = tok("import os\ndef ")["input_ids"]
    ref = _greedy_without_cache(w4, ids, 24)
    assert out.new_tokens == 24 and out.prompt_tokens == ids.shape[1]
    assert out.text == tok.decode(ref[0, ids.shape[1]:])
    assert out.prefill_s > 0 and out.decode_tokens_per_s > 0 and not out.sampled


def test_sampling_repeats_per_seed_and_differs_from_greedy(w4):
    tok = ByteTokenizer()
    a = quantwise.generate(w4, tok, "class ", 48, temperature=1.5, top_k=50, seed=3)
    b = quantwise.generate(w4, tok, "class ", 48, temperature=1.5, top_k=50, seed=3)
    greedy = quantwise.generate(w4, tok, "class ", 48)
    assert a.text == b.text and a.sampled
    assert a.text != greedy.text  # 48 draws at temperature 1.5 on a 259-token vocabulary


def test_bad_settings_and_models_are_refused(w4):
    tok = ByteTokenizer()
    with pytest.raises(ConfigError, match="temperature"):
        quantwise.generate(w4, tok, "x", temperature=-1)
    with pytest.raises(ConfigError, match="empty"):
        quantwise.generate(w4, lambda prompt: {"input_ids": torch.zeros(1, 0, dtype=torch.long)}, "x")
    with pytest.raises(ConfigError, match="causal LM"):
        quantwise.generate(torch.nn.Linear(2, 2), tok, "x")


def test_command_line_generates_from_a_saved_checkpoint(w4, tmp_path, capsys):
    from quantwise.cli import main

    folder = quantwise.save(w4, tmp_path / "w4")
    assert isinstance(load_tokenizer(WEIGHTS_DIR), ByteTokenizer)
    assert main(["generate", str(folder), "--prompt", "def f(x):", "--max-new-tokens", "16",
                 "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    expected = quantwise.generate(quantwise.load(folder), ByteTokenizer(), "def f(x):", 16)
    assert report["new_tokens"] == 16 and report["text"] == expected.text
    assert main(["generate", str(folder), "--prompt", "x", "--max-new-tokens", "0"]) == 2
    assert "max_new_tokens" in capsys.readouterr().err
