"""Text generation with a causal LM, float or quantized, greedy or sampled, with a KV cache.
Llama-family models (runtime/decoder.py's list) run on quantwise's lean loop, whose tokens are
transformers' (greedy: the same argmax; sampled: its temperature / top-k / top-p warpers in
its order and one torch.multinomial draw per token, so a seed gives the same text); any other
causal LM, or engine="transformers", runs transformers' own generate. The result names the loop.

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
    engine: str = "transformers"  # the loop that ran: "quantwise" (lean) or "transformers"

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
             seed: int = 0, engine: str = "auto") -> Generation:
    """Continue `prompt` with `model` (a transformers causal LM, float or quantized).
    temperature 0: greedy; above 0: sampled (top_k / top_p if given) from torch's generator
    seeded with `seed`, so a run repeats exactly. engine: "auto" (the lean loop where it can
    run the model, else transformers'), "quantwise" (the lean loop or ConfigError saying why
    not) or "transformers"."""
    if engine not in ENGINES:
        raise ConfigError(f"engine {engine!r}: choose one of {', '.join(ENGINES)}")
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
    new, prefill_s, decode_s, used = _timed(model, inputs, settings, engine)
    text = tokenizer.decode(new, skip_special_tokens=True) if hasattr(tokenizer, "model_input_names") \
        else tokenizer.decode(new)
    return Generation(prompt, text, int(inputs["input_ids"].shape[1]), int(new.numel()),
                      prefill_s, decode_s, sampled, used)


ENGINES = ("auto", "quantwise", "transformers")
# generation-config settings the lean loop does not apply: any of them set sends the model to
# transformers' generate (engine "auto") rather than giving other tokens
_OTHER_PROCESSORS = {"repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "bad_words_ids": None,
                     "forced_bos_token_id": None, "forced_eos_token_id": None, "min_p": None,
                     "typical_p": 1.0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0,
                     "encoder_repetition_penalty": 1.0, "suppress_tokens": None,
                     "begin_suppress_tokens": None, "sequence_bias": None, "num_beams": 1}


def _lean(model: nn.Module, inputs: dict[str, torch.Tensor], settings: dict[str, Any]):
    """(the lean decoder for this call, "") or (None, why not)."""
    from quantwise.runtime.decoder import LeanDecoder

    ids = inputs["input_ids"]
    mask = inputs.get("attention_mask")
    if ids.shape[0] != 1 or (mask is not None and not bool(mask.all())):
        return None, "a batch of several sequences or a padded prompt"
    gen = getattr(model, "generation_config", None)
    for name, default in _OTHER_PROCESSORS.items():
        value = getattr(gen, name, default)
        if value not in (default, None):
            return None, f"generation setting {name}={value!r}"
    return LeanDecoder.of(model, ids.shape[1] + settings["max_new_tokens"])


def _pick(logits: torch.Tensor, settings: dict[str, Any], suppress: list[int]) -> int:
    """The next token: argmax, or one draw after transformers' warpers (in their order)."""
    if suppress:  # min_new_tokens: end-of-sequence not yet allowed (MinNewTokensLength...)
        logits = logits.clone()
        logits[suppress] = float("-inf")
    if not settings.get("do_sample"):
        return int(logits.argmax())
    scores = logits.unsqueeze(0)
    temperature, top_k, top_p = (settings.get(k) for k in ("temperature", "top_k", "top_p"))
    if temperature is not None and temperature != 1.0:
        scores = scores / temperature
    if top_k:
        kth = torch.topk(scores, min(top_k, scores.shape[-1]))[0][..., -1, None]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        ordered, order = torch.sort(scores, descending=False)
        drop = ordered.softmax(dim=-1).cumsum(dim=-1) <= (1 - top_p)
        drop[..., -1:] = False
        scores = scores.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return int(torch.multinomial(scores.softmax(dim=-1), num_samples=1)[0, 0])


def _eos_ids(model: nn.Module, settings: dict[str, Any]) -> list[int]:
    eos = settings.get("eos_token_id", getattr(getattr(model, "generation_config", None),
                                               "eos_token_id", None))
    return [] if eos is None else [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]


def _timed_lean(decoder, model: nn.Module, ids: torch.Tensor, settings: dict[str, Any]
                ) -> tuple[torch.Tensor, float, float]:
    new_max, new_min = settings["max_new_tokens"], settings.get("min_new_tokens") or 0
    eos = _eos_ids(model, settings)
    start = time.perf_counter()
    decoder.reset(ids.shape[1] + new_max)
    logits = decoder.forward(ids[0])
    new: list[int] = []
    first = None
    while True:
        token = _pick(logits, settings, eos if len(new) < new_min else [])
        new.append(token)
        first = first or time.perf_counter()
        if len(new) >= new_max or token in eos:
            break
        logits = decoder.forward(torch.tensor([token]))
    return torch.tensor(new), first - start, time.perf_counter() - first


def _timed(model: nn.Module, inputs: dict[str, torch.Tensor], settings: dict[str, Any],
           engine: str = "auto") -> tuple[torch.Tensor, float, float, str]:
    """(new token ids, prefill seconds, decode seconds, engine used) of one generation."""
    if engine != "transformers":
        decoder, why = _lean(model, inputs, settings)
        if decoder is not None:
            return (*_timed_lean(decoder, model, inputs["input_ids"], settings), "quantwise")
        if engine == "quantwise":
            raise ConfigError(f"quantwise's lean decoding loop cannot run this model: {why}; "
                              "use engine 'transformers' (or 'auto')")
    clock = _Clock()
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(**inputs, streamer=clock, **settings)
    first = clock.times[1] if len(clock.times) > 1 else time.perf_counter()
    last = clock.times[-1] if len(clock.times) > 1 else first
    return out[0, inputs["input_ids"].shape[1]:], first - start, last - first, "transformers"


def time_decode(model: nn.Module, input_ids: torch.Tensor, new_tokens: int,
                engine: str = "auto") -> tuple[float, float]:
    """(prefill tokens / s, decode tokens / s) of greedy generation of exactly `new_tokens`
    after the [1, T] prompt `input_ids` (end-of-sequence ignored): the benchmarks' measure."""
    new, prefill_s, decode_s, _ = _timed(model, {"input_ids": input_ids}, {
        "do_sample": False, "max_new_tokens": new_tokens, "min_new_tokens": new_tokens,
        "temperature": None, "top_k": None, "top_p": None, "pad_token_id": 0}, engine)
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
