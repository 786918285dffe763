"""Tiny Hugging Face models built from configs with random weights (offline, seeded, eval mode).

Each factory returns (model, example_inputs): a dict of keyword inputs with batch 2 and
sequence 16 (ViT: pixel_values 2x3x32x32). `example_inputs(name, seed)` makes more batches of
the same shape for calibration. Imported by tests like calib_common / small_models.
"""

from __future__ import annotations

import torch

BATCH, SEQ, IMAGE = 2, 16, 32
VOCAB = 256
# Weights ~ N(0, 1/sqrt(hidden)) instead of the configs' default 0.02: with 0.02 the attention
# and MLP blocks barely change the residual stream (a 10% error in every Linear weight still
# gives BERT an output cosine of 0.99998), so an output comparison would test little more
# than the embeddings. At 0.125 the same error gives cosine 0.97-0.99.
INIT = 0.125


def _eager(model_cls, config, seed: int):
    torch.manual_seed(seed)
    return model_cls(config).eval()


def _tokens(seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen)
    mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    mask[1, -4:] = 0  # the second sequence is right-padded: the masks take part too
    return {"input_ids": ids, "attention_mask": mask}


def _pixels(seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {"pixel_values": torch.randn(BATCH, 3, IMAGE, IMAGE, generator=gen)}


def _common(overrides: dict) -> dict:
    return {"initializer_range": INIT, "attn_implementation": "eager", **overrides}


def gpt2_config(**overrides):
    from transformers import GPT2Config
    return GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=VOCAB, n_positions=128,
                      bos_token_id=0, eos_token_id=0, **_common(overrides))


def llama_config(**overrides):
    from transformers import LlamaConfig
    return LlamaConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128,
                       num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                       max_position_embeddings=128, **_common(overrides))


def vit_config(**overrides):
    from transformers import ViTConfig
    return ViTConfig(image_size=IMAGE, patch_size=8, num_channels=3, hidden_size=64,
                     num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                     **_common(overrides))


def bert_config(**overrides):
    from transformers import BertConfig
    return BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=128, max_position_embeddings=128, **_common(overrides))


def build(name: str, seed: int = 0, **config_overrides) -> torch.nn.Module:
    """A fresh model of `name` ("gpt2", "llama", "vit", "bert") with seeded random weights;
    `config_overrides` go to the config (e.g. tie_word_embeddings=True for Llama)."""
    from transformers import BertModel, GPT2LMHeadModel, LlamaForCausalLM, ViTModel
    cls, config = {"gpt2": (GPT2LMHeadModel, gpt2_config), "llama": (LlamaForCausalLM, llama_config),
                   "vit": (ViTModel, vit_config), "bert": (BertModel, bert_config)}[name]
    return _eager(cls, config(**config_overrides), seed)


def example_inputs(name: str, seed: int = 0) -> dict:
    return _pixels(seed) if name == "vit" else _tokens(seed)


def tiny_gpt2():
    return build("gpt2"), example_inputs("gpt2")


def tiny_llama():
    return build("llama"), example_inputs("llama")


def tiny_vit():
    return build("vit"), example_inputs("vit")


def tiny_bert():
    return build("bert"), example_inputs("bert")


def main_output(out) -> torch.Tensor:
    """The tensor to compare: logits for LM heads, else last_hidden_state."""
    logits = getattr(out, "logits", None)
    return logits if logits is not None else out.last_hidden_state
