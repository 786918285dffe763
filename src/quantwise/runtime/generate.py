"""Text generation with a causal LM, float or quantized: transformers' own generation loop
(KV cache, greedy or sampled) runs quantwise's modules as they are, so this adds only the
tokenizer of the folder, the sampling settings, and the timing of prefill and decode.

Prefill is the forward over the prompt up to the first new token; decode is every token after
it (tokens per second over those), both taken from the generation's own streamer callbacks.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from quantwise.errors import ConfigError, ModelLoadError


@dataclass
class Generation:
    prompt: str
    text: str                 # the new text only
    prompt_tokens: int
    new_tokens: int
    prefill_s: float          # prompt forward through the first new token
    decode_s: float           # the tokens after the first
    sampled: bool

    @property
    def decode_tokens_per_s(self) -> float | None:
        return (self.new_tokens - 1) / self.decode_s if self.new_tokens > 1 and self.decode_s > 0 else None

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else float("inf")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "decode_tokens_per_s": self.decode_tokens_per_s,
                "prefill_tokens_per_s": self.prefill_tokens_per_s}


class _Clock:
    """A transformers streamer that records when the prompt and each new token arrive."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value: torch.Tensor) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def load_tokenizer(folder: str | Path) -> Any:
    """The folder's tokenizer: quantwise's byte tokenizer (tokenizer.json of type "bytes", as
    stdlib-lm's), else the transformers tokenizer; ModelLoadError when there is none."""
    folder = Path(folder)
    path = folder / "tokenizer.json"
    if path.is_file():
        try:
            kind = json.loads(path.read_text()).get("type")
        except (OSError, UnicodeDecodeError, ValueError, AttributeError):
            kind = None
        if kind == "bytes":
            from quantwise.models.stdlib_lm import ByteTokenizer

            return ByteTokenizer()
    from quantwise.models.hf import folder_tokenizer

    tokenizer = folder_tokenizer(folder)
    if tokenizer is None:
        raise ModelLoadError(f"{folder} has no tokenizer (tokenizer.json / tokenizer_config.json): "
                             "generation needs one to turn the prompt into tokens")
    return tokenizer


def _encode(tokenizer: Any, prompt: str) -> dict[str, torch.Tensor]:
    out = tokenizer(prompt) if not hasattr(tokenizer, "model_input_names") else \
        tokenizer(prompt, return_tensors="pt")
    return {k: v for k, v in dict(out).items() if k in ("input_ids", "attention_mask")}


def generate(model: nn.Module, tokenizer: Any, prompt: str, max_new_tokens: int = 64,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
             seed: int = 0) -> Generation:
    """Continue `prompt` with `model` (a transformers causal LM, float or quantized).
    temperature 0: greedy; above 0: sampled (top_k / top_p if given) from torch's generator
    seeded with `seed`, so a run repeats exactly."""
    if not hasattr(model, "generate") or not hasattr(model, "generation_config"):
        raise ConfigError(f"{type(model).__name__} is not a causal LM that can generate "
                          "(a transformers ...ForCausalLM model)")
    if max_new_tokens < 1 or temperature < 0 or (top_p is not None and not 0 < top_p <= 1) \
            or (top_k is not None and top_k < 1):
        raise ConfigError("generation needs max_new_tokens >= 1, temperature >= 0, top_k >= 1 "
                          "and 0 < top_p <= 1")
    inputs = _encode(tokenizer, prompt)
    if inputs["input_ids"].shape[1] == 0:
        raise ConfigError("the prompt is empty after tokenization: pass some text")
    sampled = temperature > 0
    settings: dict[str, Any] = {"do_sample": sampled, "max_new_tokens": max_new_tokens}
    if sampled:
        settings.update(temperature=temperature, top_k=top_k or 0, top_p=top_p or 1.0)
    else:  # greedy: drop any sampling defaults of the model's generation config
        settings.update(temperature=None, top_k=None, top_p=None)
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            settings[name] = value
    torch.manual_seed(seed)
    new, prefill_s, decode_s = _timed(model, inputs, settings)
    text = tokenizer.decode(new, skip_special_tokens=True) if hasattr(tokenizer, "model_input_names") \
        else tokenizer.decode(new)
    return Generation(prompt, text, int(inputs["input_ids"].shape[1]), int(new.numel()),
                      prefill_s, decode_s, sampled)


def _timed(model: nn.Module, inputs: dict[str, torch.Tensor], settings: dict[str, Any]
           ) -> tuple[torch.Tensor, float, float]:
    """(new token ids, prefill seconds, decode seconds) of one generate() call."""
    clock = _Clock()
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(**inputs, streamer=clock, **settings)
    first = clock.times[1] if len(clock.times) > 1 else time.perf_counter()
    last = clock.times[-1] if len(clock.times) > 1 else first
    return out[0, inputs["input_ids"].shape[1]:], first - start, last - first


def time_decode(model: nn.Module, input_ids: torch.Tensor, new_tokens: int) -> tuple[float, float]:
    """(prefill tokens / s, decode tokens / s) of greedy generation of exactly `new_tokens`
    after the [1, T] prompt `input_ids` (end-of-sequence ignored): the benchmarks' measure."""
    new, prefill_s, decode_s = _timed(model, {"input_ids": input_ids}, {
        "do_sample": False, "max_new_tokens": new_tokens, "min_new_tokens": new_tokens,
        "temperature": None, "top_k": None, "top_p": None, "pad_token_id": 0})
    if new.numel() != new_tokens:
        raise RuntimeError(f"generated {new.numel()} tokens, not {new_tokens}")
    return input_ids.shape[1] / prefill_s, (new_tokens - 1) / decode_s


def load_generator(ref: str) -> tuple[nn.Module, Any]:
    """(model, tokenizer) of a quantwise checkpoint folder (quantwise.load: its packed weights,
    never the float model where the folder is self-contained; the tokenizer from the folder, or
    from the source model it records) or of a float model reference (a built-in name such as
    stdlib-lm, or a Hugging Face folder)."""
    from quantwise.io import META_FILE, load, read_metadata
    from quantwise.models.registry import load_model

    path = Path(ref)
    if (path / META_FILE).is_file():
        model = load(path)
        try:
            return model, load_tokenizer(path)
        except ModelLoadError:
            source = read_metadata(path).get("source")
            if not source:
                raise
            return model, _source_tokenizer(source)
    model, _ = load_model(ref)
    return model, _source_tokenizer(ref)


def _source_tokenizer(ref: str) -> Any:
    if ref == "stdlib-lm":
        from quantwise.models.stdlib_lm import WEIGHTS_DIR

        return load_tokenizer(WEIGHTS_DIR)
    return load_tokenizer(ref)
