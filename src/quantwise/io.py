"""save / load: a folder with model.safetensors (integer weights, scales, zero points, float
params) and quantwise.json (config, per-layer metadata, versions). No pickle anywhere. Weights
past `shard_bytes` (2 GiB by default) go to Hugging Face-style shards with an index instead
(model-00001-of-0000N.safetensors + model.safetensors.index.json).

    quantwise.save(qmodel, "out/digits-w8a8")
    qmodel = quantwise.load("out/digits-w8a8", model=float_model)
"""

from __future__ import annotations

import copy
import json
import os
import platform
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch
from torch import nn

from quantwise._version import __version__
from quantwise.config import Config
from quantwise.errors import CheckpointError, OutputPathError, QuantwiseError
from quantwise.fileio import atomic_write_bytes, atomic_write_text, current_umask, staged_folder, write_failure
from quantwise.fold import fold_conv_bn
from quantwise.formats.metadata import FORMAT_VERSION, META_FILE, read_quantwise_json
from quantwise.formats.shards import INDEX, ShardedCheckpoint, write_shards
from quantwise.formats.verify import check_against_model, check_metadata, check_tensors
from quantwise.encoder import apply_encoder_fastpath
from quantwise.int8graph import apply_int8_graph
from quantwise.kernels import LEAN_REASON
from quantwise.methods.smoothquant import prescaled_modules, restore_prescale
from quantwise.models.hf import hf_files, is_hf_folder, skeleton_from_folder, with_quantization_config
from quantwise.models.registry import BUILTIN_MODELS, builtin_info, load_model
from quantwise.modules import QuantizedLayer
from quantwise.modules.layers import conv_args, float_weight, kind_of
from quantwise.spec import Format, PerGroup
from quantwise.state import LayerRecord, QuantState, get_state, set_state

WEIGHTS_FILE = "model.safetensors"
SHARD_BYTES = 2 * 2 ** 30


def check_output_dir(folder: str | Path, overwrite: bool = False,
                     inputs: tuple[str | Path, ...] = ()) -> Path:
    """Refuse an output folder that is an input, exists without `overwrite`, or is not writable.

    Called before any long work (bad-inputs 19 and 21)."""
    folder = Path(folder)
    resolved = folder.resolve()
    for item in inputs:
        item_path = Path(item).resolve()
        if resolved == item_path or item_path.is_relative_to(resolved):
            raise OutputPathError(f"output {folder} is (or contains) the input {item}: "
                                  "choose another --out folder")
    if folder.exists():
        if not folder.is_dir():
            raise OutputPathError(f"output {folder} exists and is not a folder")
        if any(folder.iterdir()) and not overwrite:
            raise OutputPathError(f"output folder {folder} already exists: pass --overwrite "
                                  "(overwrite=True) or choose another folder")
    parent = _existing_parent(resolved)
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputPathError(f"cannot write under {parent}: choose a writable --out folder")
    return folder


def _existing_parent(path: Path) -> Path:
    while not path.exists():
        path = path.parent
    return path if path.is_dir() else path.parent


def save(model: nn.Module, folder: str | Path, overwrite: bool = False,
         shard_bytes: int = SHARD_BYTES) -> Path:
    """Write the quantized model to `folder` atomically: all of it, or the old content stays.
    Weights over `shard_bytes` are written as shards with an index."""
    state = get_state(model)
    if state.stage != "converted":
        raise CheckpointError("only a converted model can be saved: call quantwise.convert() first")
    folder = check_output_dir(folder, overwrite)
    try:
        with staged_folder(folder) as staging:  # holds folder's lock; swapped in whole, or removed
            check_output_dir(folder, overwrite)  # again under the lock: no writer in between
            _write_weights(model, staging, shard_bytes)
            atomic_write_text(staging / META_FILE, json.dumps(_metadata(model, state), separators=(",", ":")))
            _copy_hf_files(state, staging)
    except (OSError, safetensors.SafetensorError) as exc:  # disk full, quota, I/O error
        raise write_failure(exc, folder) from exc
    return folder


def _write_weights(model: nn.Module, staging: Path, shard_bytes: int) -> None:
    # one key: safetensors writes its metadata from a Rust HashMap, so two keys come out in a
    # random order and the same model would give different bytes (the version is in quantwise.json)
    metadata = {"format": "quantwise"}
    state = model.state_dict()
    # tied tensors are stored once, as safetensors.save_model does (load restores the ties)
    for removed in safetensors.torch._remove_duplicate_names(state).values():
        for name in removed:
            del state[name]
    if sum(t.numel() * t.element_size() for t in state.values()) <= shard_bytes:
        safetensors.torch.save_model(model, str(staging / WEIGHTS_FILE), metadata=metadata)
        written = [staging / WEIGHTS_FILE]
    else:
        written = [staging / n for n in set(write_shards(state, staging, shard_bytes, metadata).values())]
    for path in written:
        path.chmod(0o666 & ~current_umask())


def _hf_source(source: str | None) -> Path | None:
    """The Hugging Face folder the model came from (a path, or a built-in that is one)."""
    if source in BUILTIN_MODELS:
        source = builtin_info(source).source
    return Path(source) if is_hf_folder(source) else None


def _copy_hf_files(state: QuantState, staging: Path) -> None:
    """A model from a Hugging Face folder leaves a self-contained folder: its config.json (with
    a "quantization_config" entry) and tokenizer files travel with the quantized weights."""
    source = _hf_source(state.source)
    if source is None:
        return
    for path in hf_files(source):
        target = staging / path.relative_to(source)
        target.parent.mkdir(parents=True, exist_ok=True)
        if path.name == "config.json" and path.parent == source:
            text = with_quantization_config(path.read_text(), {"quantwise_version": __version__,
                                                               "config": state.config.to_dict()})
            atomic_write_text(target, text)
        else:  # bytes: a SentencePiece tokenizer.model is binary
            atomic_write_bytes(target, path.read_bytes())


def _metadata(model: nn.Module, state: QuantState) -> dict[str, Any]:
    layers = {name: m.meta() for name, m in model.named_modules() if isinstance(m, QuantizedLayer)}
    return {"format": "quantwise", "format_version": FORMAT_VERSION,
            "quantwise_version": __version__, "torch_version": torch.__version__,
            "python": platform.python_version(),
            "source": state.source, "config": state.config.to_dict(), "layers": layers,
            "folded": [list(pair) for pair in state.folded],
            **({"prescaled": prescaled} if (prescaled := prescaled_modules(model)) else {}),
            # No timestamp: the same command writes the same bytes (tests/test_determinism.py).
            # The kernel is not stored: load names the one it rebuilds on that machine.
            # Fields at their defaults are left out (LayerRecord restores them): the metadata of
            # a small model is a visible part of its checkpoint.
            "records": [_compact(r) for r in state.records.values()]}


_RECORD_DEFAULTS = LayerRecord("", "").to_dict()


def _compact(record: LayerRecord) -> dict[str, Any]:
    return {k: v for k, v in record.to_dict().items()
            if k in ("name", "module_type") or (k != "kernel" and v != _RECORD_DEFAULTS[k])}


def read_metadata(folder: str | Path) -> dict[str, Any]:
    """The parsed quantwise.json of a saved folder, with clear errors for anything else."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is not a folder: pass a folder written by quantwise.save")
    meta_path, weights = folder / META_FILE, folder / WEIGHTS_FILE
    if not meta_path.is_file() or not (weights.is_file() or (folder / INDEX).is_file()):
        raise CheckpointError(f"{folder} has no quantwise checkpoint ({META_FILE} and "
                              f"{WEIGHTS_FILE}): pass a folder written by quantwise.save")
    return read_quantwise_json(folder)


def load(folder: str | Path, model: nn.Module | None = None, fuse: bool = True,
         max_memory: int | None = None) -> nn.Module:
    """Rebuild a saved quantized model on a copy of its float model (`model` is untouched).

    `model` may be omitted when the folder holds its Hugging Face config.json (saved from a
    Hugging Face model: the model is then built with its parameters on the meta device and
    filled from the checkpoint, never as a float model) or the checkpoint records a built-in
    or loadable source. `max_memory` (bytes; default 80% of what the machine has available):
    when the fastest kernels would take more, 8-bit weight-only Linears keep only their codes
    (no fp16 copy: 1 byte per weight instead of 3; kernels.LEAN_REASON says so per layer).
    """
    folder = Path(folder)
    meta = read_metadata(folder)
    check_metadata(meta, folder / META_FILE)
    try:
        config = Config.from_dict(meta["config"])
    except QuantwiseError as exc:
        raise CheckpointError(f"{folder / META_FILE}: its \"config\" is not valid ({exc})") from None
    empty = model is None and is_hf_folder(folder)
    if empty:
        # a self-contained folder (saved from a Hugging Face model) rebuilds from its own
        # config.json with its parameters on the meta device: the float model is never made
        # (a 1.1B LM would take 4.4 GB), the checkpoint's tensors are assigned as they are read
        qmodel = skeleton_from_folder(folder, empty=True)
    else:  # the given model, or the recorded source model, copied
        qmodel = copy.deepcopy(model if model is not None else _model_from_source(meta.get("source")))
    folded = [tuple(pair) for pair in meta.get("folded", [])]
    try:
        fold_conv_bn(qmodel, folded)  # the same structure as at save time (convs gain a bias)
    except AttributeError as exc:
        raise CheckpointError(f"a folded layer of the checkpoint is missing from the given model "
                              f"({exc}): pass the float model the checkpoint was made from") from None
    layers: dict[str, QuantizedLayer] = {}
    for name, layer_meta in meta["layers"].items():
        try:
            original = qmodel.get_submodule(name)
        except AttributeError:
            raise CheckpointError(f"checkpoint layer {name!r} does not exist in the given model: "
                                  "pass the float model the checkpoint was made from") from None
        _check_layer_fits(name, layer_meta, original, folder)
        try:
            layer = QuantizedLayer.from_meta(layer_meta)
        except (TypeError, ValueError, KeyError, RuntimeError) as exc:
            raise CheckpointError(f"{folder / META_FILE}: layer {name!r} cannot be rebuilt ({exc}); "
                                  "the checkpoint is damaged or was edited") from None
        layer.qname = name
        layers[name] = layer
        qmodel.set_submodule(name, layer)
    for layer in layers.values():
        if layer.tied_to:
            layer.tie_weight(layers[layer.tied_to])
    restore_prescale(qmodel, meta.get("prescaled", {}))  # SmoothQuant's explicit divisions
    _load_state(qmodel, _read_checked(qmodel, folder, meta), folder, assign=empty)
    if empty:
        _check_filled(qmodel, folder)
    lean = _needs_lean_kernels(layers, folder, max_memory)
    for name, layer in layers.items():
        try:
            layer.build_kernel(lean=lean)
        except (TypeError, ValueError, RuntimeError) as exc:  # values verify could not judge
            raise CheckpointError(f"{folder}: layer {name!r}: no kernel can be built from its "
                                  f"tensors and quantwise.json entry ({exc}); the checkpoint is "
                                  "damaged or was edited") from None
    records = {r["name"]: LayerRecord(**r) for r in meta["records"]}
    for name, layer in layers.items():
        records[name].kernel = layer.kernel_name
        if lean and layer.fallback_reason == LEAN_REASON:
            records[name].reason = "; ".join(filter(None, (records[name].reason, LEAN_REASON)))
    for conv_name, bn_name in folded:
        records[bn_name].kernel = f"folded into {conv_name}"
    state = QuantState(config, records, meta.get("source"),
                       stage="converted", folded=folded)
    set_state(qmodel, state)
    if fuse:
        apply_int8_graph(qmodel, state)
        apply_encoder_fastpath(qmodel, state)
    return qmodel.eval()


def _check_layer_fits(name: str, entry: dict[str, Any], module: nn.Module, folder: Path) -> None:
    """The layer quantwise.json describes is the model's layer at that name: same kind, weight
    shape and convolution geometry (an edited entry would otherwise run the wrong op)."""
    kind = kind_of(module)
    problem = None
    if kind != entry["kind"]:
        problem = f"is a {type(module).__name__} in the model, an entry of kind {entry['kind']!r} here"
    elif tuple(float_weight(module).shape) != tuple(entry["weight_shape"]):
        problem = (f"has weight shape {list(float_weight(module).shape)} in the model, "
                   f"{entry['weight_shape']} here")
    elif kind in ("conv", "conv_transpose"):
        stored = {k: tuple(v) if isinstance(v, list) else v for k, v in entry["layer_args"].items()}
        if stored != conv_args(module):
            problem = f"has geometry {conv_args(module)} in the model, {stored} here"
    if problem:
        raise CheckpointError(f"{folder / META_FILE}: layer {name!r} {problem}: pass the float model "
                              "the checkpoint was made from, or quantize it again")


def _read_checked(model: nn.Module, folder: Path, meta: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors, its headers checked before anything is read (formats/shards.py:
    sizes, offsets, names inside the folder) and every tensor checked against quantwise.json and
    the model before it is trusted (formats/verify.py)."""
    checkpoint = ShardedCheckpoint.open(folder, allow_non_float=True)
    try:
        # as stored (no float conversion): copy-on-write views of the mapped files
        state = {name: checkpoint.read(name, dtype=None) for name in checkpoint.tensors}
    except (safetensors.SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{folder}: a tensor cannot be read ({exc}); the file is damaged: "
                              "save the model again") from None
    finally:
        checkpoint.close()
    where = folder / INDEX if (folder / INDEX).is_file() else folder / WEIGHTS_FILE
    check_tensors(state, meta, where)
    check_against_model(state, model, where)
    return state


def _load_state(model: nn.Module, state: dict[str, torch.Tensor], where: Path,
                assign: bool = True) -> None:
    if assign:  # a tensor stored once for tied names (embedding / head) goes to every name
        names: dict[int, list[str]] = {}
        for name, tensor in model.state_dict(keep_vars=True).items():
            names.setdefault(id(tensor), []).append(name)
        for group in names.values():
            stored = [n for n in group if n in state]
            for name in group if stored else ():
                state.setdefault(name, state[stored[0]])
    ties = safetensors.torch._remove_duplicate_names(model.state_dict(), preferred_names=state.keys())
    missing, unexpected = model.load_state_dict(state, strict=False, assign=assign)
    missing = set(missing) - {name for group in ties.values() for name in group}
    if missing or unexpected:
        raise CheckpointError(f"{where}: its tensors do not match the model: missing keys "
                              f"{sorted(missing)}, unexpected keys {sorted(unexpected)}")


def _needs_lean_kernels(layers: dict[str, QuantizedLayer], folder: Path,
                        max_memory: int | None) -> bool:
    """Whether the checkpoint plus the fp16 copies of its 8-bit weight-only Linears (2 bytes
    per weight) would exceed `max_memory` (default: 80% of the available memory)."""
    extra = sum(2 * layer.weight.numel() for layer in layers.values()
                if layer.kind == "linear" and layer.act_spec is None
                and layer.weight_spec.format in (Format.INT8, Format.UINT8)
                and not isinstance(layer.weight_spec.granularity, PerGroup))
    if not extra:
        return False
    if max_memory is None:
        available = available_memory()
        if available is None:
            return False
        max_memory = int(0.8 * available)
    stored = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    return stored + extra > max_memory


def available_memory() -> int | None:
    """Bytes this process may still use: MemAvailable, or less under a cgroup (v2) limit;
    None where neither can be read (not Linux)."""
    found = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text())
            found.append(max(0, int(limit) - used))
    except (OSError, ValueError):
        pass
    return min(found) if found else None


def _check_filled(model: nn.Module, folder: Path) -> None:
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise CheckpointError(f"{folder}: the checkpoint does not hold {left[:3]} (and "
                              f"{max(0, len(left) - 3)} more) that its config.json's model needs: "
                              "is the folder complete?")


def _model_from_source(source: str | None) -> nn.Module:
    if not source:
        raise CheckpointError("this checkpoint records no source model: pass model=<the float model>")
    refuse_code_source(source)
    return load_model(source)[0]


def refuse_code_source(source: str) -> None:
    """A checkpoint's recorded source is data from a file: a built-in name or a folder is
    rebuilt from it, but a `module:function` would import and run code a downloaded checkpoint
    names, so the caller must name that function itself."""
    if source not in BUILTIN_MODELS and ":" in source and not Path(source).exists():
        raise CheckpointError(f"this checkpoint records its source model as {source!r}, a Python "
                              "function: quantwise does not run code a checkpoint names; pass "
                              f"model={source.split(':')[-1]}() in Python, or --model {source} on "
                              "the command line if you trust it")
