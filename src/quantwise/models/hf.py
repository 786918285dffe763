"""Hugging Face folders around a quantized checkpoint: which files travel with it, and the model
skeleton rebuilt from its config.json alone (the quantized weights then come from the checkpoint).

A folder saved from a Hugging Face model is self-contained: config.json (with a
"quantization_config" entry saying how it was quantized), the tokenizer files and, for
sentence-transformers models, their pooling description; `quantwise.load(folder)` rebuilds the
model from those without the original weights.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from torch import nn

from quantwise.errors import CheckpointError

# Files (and sentence-transformers module folders) copied beside the quantized weights.
HF_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "special_tokens_map.json", "vocab.txt", "vocab.json", "merges.txt", "spiece.model",
            "tokenizer.model", "added_tokens.json", "modules.json", "sentence_bert_config.json",
            "config_sentence_transformers.json")
HF_DIRS = ("1_Pooling", "2_Normalize")


def is_hf_folder(path: str | Path | None) -> bool:
    return path is not None and Path(path).is_dir() and (Path(path) / "config.json").is_file()


def hf_files(folder: Path) -> list[Path]:
    """The files of `folder` that describe the model and its tokenizer (no weights)."""
    found = [folder / name for name in HF_FILES if (folder / name).is_file()]
    for sub in HF_DIRS:
        if (folder / sub).is_dir():
            found += [p for p in sorted((folder / sub).iterdir()) if p.is_file() and p.suffix == ".json"]
    return found


def with_quantization_config(config_text: str, quantization: dict[str, Any]) -> str:
    """config.json text with a "quantization_config" entry (how quantwise quantized it)."""
    try:
        config = json.loads(config_text)
    except ValueError as exc:
        raise CheckpointError(f"the source model's config.json is not valid JSON ({exc})") from None
    config["quantization_config"] = {"quant_method": "quantwise", **quantization}
    return json.dumps(config, indent=2, sort_keys=True) + "\n"


def model_class(config: Any) -> Any:
    """The class a folder is loaded as: the first of config.json's "architectures" that
    transformers has (e.g. LlamaForCausalLM, so an LM keeps its head), else AutoModel."""
    import transformers

    names = getattr(config, "architectures", None) or []
    first = names[0] if isinstance(names, (list, tuple)) and names else None
    cls = getattr(transformers, first, None) if isinstance(first, str) else None
    return cls if cls is not None else transformers.AutoModel


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Modules built inside hold their parameters on the meta device (no memory, no random
    initialisation) and their buffers for real: buffers computed at construction (rotary
    frequencies, position ids) are usually not in a checkpoint, parameters always are."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None and not param.is_meta:
            module._parameters[name] = nn.Parameter(param.to("meta"),
                                                    requires_grad=param.requires_grad)

    nn.Module.register_parameter = on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


def skeleton_from_folder(folder: str | Path, empty: bool = False) -> nn.Module:
    """The model architecture of an HF folder, randomly initialised (no weights read), of the
    class its weights were loaded as (model_class; AutoModel wrapped as a SentenceEmbedder
    for sentence-transformers folders). `empty`: parameters on the meta device instead
    (parameters_on_meta), for a checkpoint that fills them all (io.load)."""
    if empty:
        with parameters_on_meta():
            return skeleton_from_folder(folder)
    from transformers import AutoConfig, AutoModel

    folder = Path(folder)
    try:
        config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - transformers' errors on a config it cannot read
        raise CheckpointError(f"cannot read {folder / 'config.json'} ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0][:300] if str(exc) else ''})") from None
    sentence = (folder / "modules.json").is_file()
    cls = AutoModel if sentence else model_class(config)
    try:
        model = (cls.from_config(config, attn_implementation="eager") if cls is AutoModel
                 else cls._from_config(config, attn_implementation="eager"))
    except Exception as exc:  # noqa: BLE001 - a config transformers cannot build a model from
        raise CheckpointError(f"{folder}: transformers cannot build a model from its config.json "
                              f"({type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''})") from None
    if sentence:
        from quantwise.models.minilm import SentenceEmbedder, _wants_normalize

        model = SentenceEmbedder(model, normalize=_wants_normalize(folder))
    return model.eval()


def folder_tokenizer(folder: Path) -> Any:
    """The folder's transformers tokenizer, or None (none there, or not one transformers reads)."""
    if not any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        return None
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, KeyError):  # a byte-level folder without a transformers tokenizer
        return None
