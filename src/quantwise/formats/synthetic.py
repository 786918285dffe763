"""Llama-architecture Hugging Face folders with random weights, written shard by shard.

For tests and benchmarks at model sizes that cannot be downloaded here (issue 15: the
TinyLlama-1.1B shape at 4 and 22 layers, and a model whose float32 size exceeds the memory
limit): only one shard's tensors are ever in memory, so a folder larger than RAM can be made.
config.json comes from transformers' LlamaConfig, so transformers loads the folder as written.
Weights are N(0, 0.02) like transformers' initialisation, norms are ones; `seed` makes a folder
reproducible byte for byte.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterator

import torch

from quantwise.formats.shards import shard_file_names, write_index

TINYLLAMA = {"hidden_size": 2048, "intermediate_size": 5632, "num_attention_heads": 32,
             "num_key_value_heads": 4, "vocab_size": 32000, "num_hidden_layers": 22}


def llama_tensors(cfg: dict[str, Any]) -> Iterator[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every weight of a LlamaForCausalLM with config `cfg`, in model order."""
    h, inter, heads = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_attention_heads"]
    kv, vocab = cfg.get("num_key_value_heads", heads), cfg["vocab_size"]
    hd = cfg.get("head_dim") or h // heads
    yield "model.embed_tokens.weight", (vocab, h)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        yield p + "input_layernorm.weight", (h,)
        yield p + "self_attn.q_proj.weight", (heads * hd, h)
        yield p + "self_attn.k_proj.weight", (kv * hd, h)
        yield p + "self_attn.v_proj.weight", (kv * hd, h)
        yield p + "self_attn.o_proj.weight", (h, heads * hd)
        yield p + "post_attention_layernorm.weight", (h,)
        yield p + "mlp.gate_proj.weight", (inter, h)
        yield p + "mlp.up_proj.weight", (inter, h)
        yield p + "mlp.down_proj.weight", (h, inter)
    yield "model.norm.weight", (h,)
    if not cfg.get("tie_word_embeddings", False):
        yield "lm_head.weight", (vocab, h)


def write_llama_folder(folder: str | os.PathLike, *, shard_bytes: int = 2 ** 30,
                       dtype: torch.dtype = torch.bfloat16, seed: int = 0, **config: Any) -> Path:
    """Write config.json, the shards and model.safetensors.index.json into a new `folder`.
    `config`: LlamaConfig fields (hidden_size, num_hidden_layers, ...; defaults: TinyLlama's
    shape). Shards close once they pass `shard_bytes`."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=False)
    cfg = LlamaConfig(**{**TINYLLAMA, "torch_dtype": str(dtype).removeprefix("torch."),
                         "tie_word_embeddings": False, **config})
    cfg.architectures = ["LlamaForCausalLM"]
    cfg.save_pretrained(str(folder))
    gen = torch.Generator().manual_seed(seed)
    shards: list[list[str]] = [[]]
    pending: dict[str, torch.Tensor] = {}
    size = total = 0

    def flush() -> None:
        nonlocal pending, size
        if pending:
            save_file(pending, str(folder / f".shard-{len(shards)}.tmp"), metadata={"format": "pt"})
            shards[-1:] = [list(pending), []]
            pending, size = {}, 0

    for name, shape in llama_tensors(cfg.to_dict()):
        if len(shape) == 1:
            t = torch.ones(shape, dtype=dtype)
        else:
            t = torch.empty(shape, dtype=torch.float32).normal_(0.0, 0.02, generator=gen).to(dtype)
        pending[name] = t
        size += t.numel() * t.element_size()
        total += t.numel() * t.element_size()
        if size >= shard_bytes:
            flush()
    flush()
    shards = [s for s in shards if s]
    weight_map = {}
    for i, (names, final) in enumerate(zip(shards, shard_file_names(len(shards))), 1):
        os.replace(folder / f".shard-{i}.tmp", folder / final)
        weight_map.update({n: final for n in names})
    write_index(folder, weight_map, total)
    return folder
