"""A Hugging Face causal LM folder as a meta-device skeleton whose parts are read on demand.

The skeleton is the model of config.json built on the meta device (no memory for weights).
`materialize_rest` reads every tensor outside the repeated blocks (embeddings, final norm,
head) from the shards in float32 and rebuilds modules whose buffers are not stored (rotary
tables); `load_block(i)` returns a float32 copy of block i read tensor by tensor, so one block's
weights are in memory at a time. Tied weights (embedding / head) stay one tensor.
"""

from __future__ import annotations

import copy
import inspect
from pathlib import Path

import torch
from torch import nn

from quantwise.errors import ModelLoadError
from quantwise.formats.shards import ShardedCheckpoint


def meta_skeleton(folder: Path) -> nn.Module:
    """The folder's model class from config.json, on the meta device, float32, eager attention
    (as models/minilm.py loads it: the block outputs, hence GPTQ's statistics, are the same)."""
    from transformers import AutoConfig

    from quantwise.models.hf import model_class

    try:
        config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - transformers' errors on a config it cannot read
        raise ModelLoadError(f"cannot read {folder / 'config.json'} ({type(exc).__name__}: "
                             f"{str(exc).splitlines()[0][:300] if str(exc) else ''})") from None
    cls = model_class(config)
    if not hasattr(cls, "_from_config"):
        raise ModelLoadError(f"{folder}: config.json names no transformers model class "
                             "(\"architectures\"); streaming needs e.g. LlamaForCausalLM")
    try:
        with torch.device("meta"):
            model = cls._from_config(config, attn_implementation="eager", dtype=torch.float32)
    except Exception as exc:  # noqa: BLE001 - a config transformers cannot build a model from
        raise ModelLoadError(f"{folder}: transformers cannot build a model from its config.json "
                             f"({type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''})") from None
    if (folder / "modules.json").is_file():  # sentence-transformers: as io.load rebuilds it
        from quantwise.models.minilm import SentenceEmbedder, _wants_normalize

        model = SentenceEmbedder(model, normalize=_wants_normalize(folder))
    return model.eval()


def stored_prefix(model: nn.Module) -> str:
    """What the model's tensor names carry before the stored names (a wrapper's attribute)."""
    from quantwise.models.minilm import SentenceEmbedder

    return "encoder." if isinstance(model, SentenceEmbedder) else ""


def _tensor_name(checkpoint: ShardedCheckpoint, name: str, tied: dict[str, str],
                 strip: str = "") -> str:
    stored = name[len(strip):] if name.startswith(strip) else name
    if stored in checkpoint.tensors:
        return stored
    if name in tied:
        return _tensor_name(checkpoint, tied[name], {}, strip)
    raise ModelLoadError(f"{checkpoint.folder}: the checkpoint has no tensor {name!r}, which the "
                         "model of its config.json needs; is the folder complete?")


def _tied_names(model: nn.Module) -> dict[str, str]:
    """parameter name -> the first name of the same (tied) parameter."""
    first: dict[int, str] = {}
    out: dict[str, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        out[name] = first.setdefault(id(param), name)
    return out


def fill(module: nn.Module, prefix: str, checkpoint: ShardedCheckpoint, tied: dict[str, str],
         skip: str | None = None, strip: str = "") -> None:
    """Replace `module`'s meta parameters and persistent buffers (except under `skip`) by the
    checkpoint's tensors in float32; parameters shared inside `module` stay shared. `strip`:
    the model names' prefix that the stored names lack (stored_prefix)."""
    real: dict[int, nn.Parameter] = {}
    for name, sub in module.named_modules():
        if skip is not None and (name == skip or name.startswith(skip + ".")):
            continue
        for pname, param in list(sub._parameters.items()):
            if param is None:
                continue
            if id(param) not in real:
                full = prefix + (f"{name}.{pname}" if name else pname)
                value = checkpoint.read(_tensor_name(checkpoint, full, tied, strip))
                if tuple(value.shape) != tuple(param.shape):
                    raise ModelLoadError(f"{checkpoint.folder}: tensor {full!r} has shape "
                                         f"{tuple(value.shape)}, the model needs {tuple(param.shape)}")
                real[id(param)] = nn.Parameter(value, requires_grad=param.requires_grad)
            sub._parameters[pname] = real[id(param)]
        for bname, buf in list(sub._buffers.items()):
            if buf is None or not buf.is_meta or bname in sub._non_persistent_buffers_set:
                continue
            full = prefix + (f"{name}.{bname}" if name else bname)
            sub._buffers[bname] = checkpoint.read(_tensor_name(checkpoint, full, tied, strip),
                                                  dtype=buf.dtype)  # int64 ids stay int64


def _rebuild_unstored_buffers(model: nn.Module, skip: str) -> None:
    """Buffers outside the blocks that are still meta (not in any checkpoint: the rotary inverse
    frequencies, BERT's position and token-type ids) are taken from the module built again on
    the CPU from the config; its parameters, already read, stay."""
    config = next(m.config for m in model.modules() if hasattr(m, "config"))  # or a wrapper's
    for name, sub in list(model.named_modules()):
        if not name or name == skip or name.startswith(skip + "."):
            continue
        meta = [b for b, t in sub._buffers.items() if t is not None and t.is_meta]
        if not meta:
            continue
        params = inspect.signature(type(sub)).parameters
        if "config" not in params:
            raise ModelLoadError(f"cannot rebuild {name} ({type(sub).__name__}) off the meta device: "
                                 "its buffers are not stored in the checkpoint")
        with torch.device("cpu"):
            fresh = type(sub)(config=config)
        for bname in meta:
            sub._buffers[bname] = fresh._buffers[bname]


def materialize_rest(model: nn.Module, blocks_name: str, checkpoint: ShardedCheckpoint) -> None:
    """Everything outside the blocks, read from the checkpoint in float32."""
    fill(model, "", checkpoint, _tied_names(model), skip=blocks_name, strip=stored_prefix(model))
    _rebuild_unstored_buffers(model, blocks_name)


def load_block(meta_block: nn.Module, prefix: str, checkpoint: ShardedCheckpoint,
               strip: str = "") -> nn.Module:
    """A float32 copy of a block read from the checkpoint (the meta block stays as it is)."""
    block = copy.deepcopy(meta_block)
    fill(block, prefix, checkpoint, {}, strip=strip)
    left = [n for n, t in list(block.named_parameters()) + list(block.named_buffers()) if t.is_meta]
    if left:
        raise ModelLoadError(f"{checkpoint.folder}: block {prefix[:-1]} has tensors the checkpoint "
                             f"does not fill: {left[:3]}")
    return block


def release_rest(model: nn.Module, blocks_name: str) -> None:
    """Everything outside the blocks back on the meta device (it was written): frees the
    embeddings and the head while the blocks run. Shapes stay, so the metadata still reads."""
    for name, sub in model.named_modules():
        if name == blocks_name or name.startswith(blocks_name + "."):
            continue
        for pname, param in list(sub._parameters.items()):
            if param is not None and not param.is_meta:
                sub._parameters[pname] = nn.Parameter(param.to("meta"), requires_grad=False)
        for bname, buf in list(sub._buffers.items()):
            if buf is not None and not buf.is_meta:
                sub._buffers[bname] = buf.to("meta")
