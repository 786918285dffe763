"""Hugging Face safetensors checkpoints, single-file or sharded, checked before they are trusted
and read one tensor at a time.

`ShardedCheckpoint.open(folder)` reads only the index and each shard's header (no tensor
data), and refuses, naming the file and tensor:
- an index that is not JSON, names a file outside the folder (a path, "..", a symlink out) or a
  pickle (pytorch_model*.bin: unpickling can run code);
- a shard that is missing, empty, truncated (its header promises more bytes than the file has)
  or whose header is not a safetensors header (bad length, bad JSON, offsets out of order);
- a tensor the index names but its shard lacks, or whose byte size disagrees with its shape;
- a non-float tensor (an already quantized checkpoint) and, against config.json, a Llama-family
  weight whose shape disagrees with the config (`check_config`).
Reads go through safetensors' `safe_open` (memory-mapped), converted to float32 by default, so a
caller holds one tensor at a time, never the whole model (issue 15's streaming reads these).
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from quantwise.errors import CheckpointError, ModelLoadError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
MAX_HEADER = 100_000_000  # safetensors' own limit: a larger header is never read (nor allocated)
MAX_DIM = 2 ** 64 - 1  # safetensors' shapes are u64, their element count too
ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8,
            "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1, "U16": 2, "U32": 4, "U64": 8}
FLOAT_DTYPES = {"F32", "F16", "BF16"}
TORCH_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
CONFIG_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shard: Path
    dtype: str                # safetensors dtype name, e.g. "BF16"
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * ITEMSIZE[self.dtype]


class ShardedCheckpoint:
    """The tensors of a Hugging Face folder's safetensors weights, checked (see module doc)."""

    def __init__(self, folder: Path, tensors: dict[str, TensorInfo]) -> None:
        self.folder, self.tensors = folder, tensors
        self._handles: dict[Path, Any] = {}

    @classmethod
    def open(cls, folder: str | os.PathLike, allow_non_float: bool = False) -> "ShardedCheckpoint":
        folder = Path(folder)
        index = folder / INDEX
        if index.is_file():
            weight_map = _read_index(index)
        elif (folder / SINGLE).is_file():
            weight_map = None
        else:
            raise ModelLoadError(f"{folder} has neither {SINGLE} nor {INDEX}: not a safetensors "
                                 "checkpoint (pickle weights are never loaded)")
        shard_names = sorted(set(weight_map.values())) if weight_map is not None else [SINGLE]
        tensors: dict[str, TensorInfo] = {}
        for name in shard_names:
            path = _inside(folder, name, index)
            for info in _read_header(path):
                tensors.setdefault(info.name, info)
        if weight_map is not None:
            for tensor, shard in weight_map.items():
                info = tensors.get(tensor)
                if info is None or info.shard.name != shard:
                    raise CheckpointError(f"{folder / shard}: has no tensor {tensor!r}, which "
                                          f"{INDEX} places there; the shard is incomplete or the "
                                          "index is stale (re-save the model)")
            tensors = {t: tensors[t] for t in weight_map}
        checkpoint = cls(folder, tensors)
        if not allow_non_float:
            checkpoint.check_float()
        return checkpoint

    def check_float(self, allowed: "set[str] | frozenset[str]" = frozenset()) -> None:
        """Every tensor but those `allowed` (integer buffers such as BERT's position ids) is a
        float weight: an integer one means an already quantized checkpoint."""
        for info in self.tensors.values():
            if info.dtype not in FLOAT_DTYPES and info.name not in allowed:
                raise CheckpointError(
                    f"{info.shard}: tensor {info.name!r} is {info.dtype}, not a float weight "
                    f"(bf16, fp16 or fp32): quantize the original float checkpoint, not an "
                    f"already quantized one")

    def names(self, prefix: str = "") -> list[str]:
        return [n for n in self.tensors if n.startswith(prefix)]

    def nbytes(self, prefix: str = "") -> int:
        return sum(self.tensors[n].nbytes for n in self.names(prefix))

    def read(self, name: str, dtype: Optional[torch.dtype] = torch.float32) -> torch.Tensor:
        """One tensor, memory-mapped from its shard, converted to `dtype` (None: as stored)."""
        info = self.tensors.get(name)
        if info is None:
            raise CheckpointError(f"{self.folder}: no tensor {name!r} in the checkpoint")
        from safetensors import SafetensorError, safe_open

        try:
            handle = self._handles.get(info.shard)
            if handle is None:
                handle = self._handles[info.shard] = safe_open(str(info.shard), framework="pt")
            tensor = handle.get_tensor(name)
        except (SafetensorError, OSError, RuntimeError, TypeError) as exc:
            # the file changed since open() checked it, or a dtype this torch cannot hold
            raise CheckpointError(f"{info.shard}: tensor {name!r} cannot be read ({exc}); the "
                                  "file is damaged: download or save it again") from None
        return tensor if dtype is None else tensor.to(dtype)

    def close(self) -> None:
        self._handles.clear()

    def check_config(self, config: dict[str, Any], config_path: Optional[Path] = None) -> None:
        """Shapes (and the projection dtypes) of Llama-family weights against config.json."""
        where = config_path or self.folder / "config.json"
        if not isinstance(config, dict):
            raise CheckpointError(f"{where}: holds {type(config).__name__}, not a JSON object of "
                                  "model settings: save the folder's config again")
        expected = llama_shapes(config)
        want_dtype = CONFIG_DTYPES.get(str(config.get("torch_dtype", "")))
        for name, info in self.tensors.items():
            for pattern, shape in expected.items():
                if _matches(name, pattern):
                    if info.shape != shape:
                        raise CheckpointError(
                            f"{info.shard}: tensor {name!r} has shape {list(info.shape)}, but "
                            f"{where} implies {list(shape)}; the weights and config.json are from "
                            f"different models")
                    if want_dtype and len(shape) == 2 and info.dtype != want_dtype:
                        raise CheckpointError(
                            f"{info.shard}: tensor {name!r} is {info.dtype}, but {where} says "
                            f"torch_dtype {config.get('torch_dtype')}")
        layers = config.get("num_hidden_layers")
        if expected and isinstance(layers, int):
            for i in (0, layers - 1):
                if not self.names(f"model.layers.{i}."):
                    raise CheckpointError(f"{self.folder}: no weights for block {i}, but {where} "
                                          f"says num_hidden_layers {layers}")
            if self.names(f"model.layers.{layers}."):
                raise CheckpointError(f"{self.folder}: weights for block {layers} and more, but "
                                      f"{where} says num_hidden_layers {layers}")


def llama_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Expected shapes of Llama-family (llama, mistral, qwen2) weights by name pattern ("*" is
    the block index); empty for other architectures (nothing is checked for them)."""
    if config.get("model_type") not in ("llama", "mistral", "qwen2"):
        return {}
    def size(key: str, default: Any = None) -> int:
        value = config.get(key) or default
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise CheckpointError(f"config.json's {key} is {config.get(key)!r}, not a positive "
                                  f"integer, for a {config.get('model_type')} model")
        return value

    h, inter, heads = size("hidden_size"), size("intermediate_size"), size("num_attention_heads")
    kv = size("num_key_value_heads", heads)
    hd = size("head_dim", h // heads)
    vocab = size("vocab_size")
    block = "model.layers.*."
    return {"model.embed_tokens.weight": (vocab, h), "lm_head.weight": (vocab, h),
            "model.norm.weight": (h,),
            block + "self_attn.q_proj.weight": (heads * hd, h),
            block + "self_attn.k_proj.weight": (kv * hd, h),
            block + "self_attn.v_proj.weight": (kv * hd, h),
            block + "self_attn.o_proj.weight": (h, heads * hd),
            block + "mlp.gate_proj.weight": (inter, h), block + "mlp.up_proj.weight": (inter, h),
            block + "mlp.down_proj.weight": (h, inter),
            block + "input_layernorm.weight": (h,), block + "post_attention_layernorm.weight": (h,)}


def _matches(name: str, pattern: str) -> bool:
    if "*" not in pattern:
        return name == pattern
    head, tail = pattern.split("*")
    middle = name[len(head):len(name) - len(tail)] if name.startswith(head) and name.endswith(tail) else ""
    return middle.isdigit()


def _read_index(index: Path) -> dict[str, str]:
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise CheckpointError(f"{index}: not a readable JSON index ({exc}); re-save the model "
                              "with save_pretrained") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise CheckpointError(f"{index}: has no \"weight_map\" of tensor names to shard files")
    return weight_map


def _inside(folder: Path, name: str, index: Path) -> Path:
    """The shard file `name` of `folder`, refusing anything that is not a plain file name there."""
    if name.endswith(".bin") or name.endswith(".pt") or name.endswith(".pth"):
        raise ModelLoadError(f"{index}: points at {name!r}, a pickle file; pickle weights are "
                             "never loaded because unpickling can run arbitrary code. Convert the "
                             "model with save_pretrained(..., safe_serialization=True)")
    if (not name or Path(name).name != name or name in (".", "..") or "\\" in name
            or not name.endswith(".safetensors")):
        raise CheckpointError(f"{index}: names the shard {name!r}, which is not a .safetensors "
                              f"file name inside {folder}; refusing to read it")
    path = folder / name
    try:
        outside = folder.resolve() not in path.resolve().parents
    except OSError:
        outside = True
    if outside:
        raise CheckpointError(f"{path}: resolves outside {folder} (a symlink?); refusing to read it")
    if not path.is_file():
        raise CheckpointError(f"{path}: missing, though {index.name} names it as a shard; "
                              "copy the complete model folder")
    return path


def _read_header(path: Path) -> list[TensorInfo]:
    """The tensors of a safetensors file, from its header alone, refused on anything the
    safetensors reader itself would refuse later (so a file that opens here also reads): the
    length prefix, UTF-8 JSON object, entries, offsets contiguous from 0 and the data ending
    exactly at the end of the file."""
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"{path}: the file is empty (an interrupted download or copy?)")
    with path.open("rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: {size} bytes, too short for a safetensors header")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER or 8 + n > size:  # checked before the read: never allocate n bytes
            raise CheckpointError(f"{path}: not a safetensors file, or truncated (its header "
                                  f"claims {n} bytes; the file has {size})")
        raw = handle.read(n)
    try:
        header = json.loads(raw.decode("utf-8")) if raw[:1] == b"{" else None
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise CheckpointError(f"{path}: the safetensors header is not valid JSON "
                              f"({str(exc)[:200] or type(exc).__name__})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: the safetensors header is not a JSON object")
    meta = header.get("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise CheckpointError(f"{path}: the safetensors header's __metadata__ is not a mapping "
                              "of strings")
    infos, spans = [], []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        info, lo, hi = _entry(path, name, entry)
        infos.append(info)
        spans.append((lo, hi, name))
    last = max((hi for _, hi, _ in spans), default=0)
    if 8 + n + last > size:  # first: a tensor past the end is the commonest damage (a cut copy)
        raise CheckpointError(f"{path}: truncated: its header promises {8 + n + last} bytes, the "
                              f"file has {size} (an interrupted download or copy?)")
    end = 0
    for lo, hi, name in sorted(spans):
        if lo != end:
            raise CheckpointError(f"{path}: tensor {name!r} starts at byte {lo} of the data, not "
                                  f"at {end} where the previous tensor ends (overlapping or "
                                  "gapped offsets): not a file safetensors wrote")
        end = hi
    if 8 + n + end != size:
        raise CheckpointError(f"{path}: has trailing bytes: its header accounts for {8 + n + end} "
                              f"bytes, the file has {size}; not a file safetensors wrote")
    return infos


def _entry(path: Path, name: str, entry: Any) -> tuple[TensorInfo, int, int]:
    """One header entry checked: a known dtype, a shape of u64 dims, two offsets that span
    exactly the tensor's bytes."""
    def count(shape: tuple) -> int:  # as safetensors: the element count may not overflow u64
        total = 1
        for d in shape:
            total *= d
            if total > MAX_DIM:
                raise ValueError
        return total

    try:
        dtype, shape, (lo, hi) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
        ok = (isinstance(dtype, str) and dtype in ITEMSIZE
              and all(type(d) is int and 0 <= d <= MAX_DIM for d in shape)
              and type(lo) is int and type(hi) is int and 0 <= lo <= hi and count(shape) >= 0)
    except (KeyError, TypeError, ValueError):
        ok = False
    if not ok:
        raise CheckpointError(f"{path}: tensor {name!r} has a malformed header entry "
                              f"{str(entry)[:200]}: re-save the model")
    info = TensorInfo(name, path, dtype, shape)
    if hi - lo != info.nbytes:
        raise CheckpointError(f"{path}: tensor {name!r} ({dtype} {list(shape)}) should take "
                              f"{info.nbytes} bytes; its header gives {hi - lo}")
    return info, lo, hi


def shard_file_names(count: int) -> list[str]:
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def write_shards(tensors: dict[str, torch.Tensor], folder: Path, shard_bytes: int,
                 metadata: dict[str, str]) -> dict[str, str]:
    """Write `tensors` (in order) as Hugging Face-style shards of at most ~`shard_bytes` each
    plus model.safetensors.index.json into `folder` (a staging folder: the caller publishes it
    atomically); returns the weight map."""
    from safetensors.torch import save_file

    groups: list[dict[str, torch.Tensor]] = [{}]
    size = total = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if groups[-1] and size + nbytes > shard_bytes:
            groups.append({})
            size = 0
        groups[-1][name] = tensor.contiguous()
        size += nbytes
        total += nbytes
    weight_map: dict[str, str] = {}
    for file_name, group in zip(shard_file_names(len(groups)), groups):
        save_file(group, str(folder / file_name), metadata=metadata)
        weight_map.update({name: file_name for name in group})
    write_index(folder, weight_map, total, metadata)
    return weight_map


def write_index(folder: Path, weight_map: dict[str, str], total_bytes: int,
                metadata: Optional[dict[str, str]] = None) -> None:
    """model.safetensors.index.json, as transformers writes it (written atomically)."""
    from quantwise.fileio import atomic_write_text

    atomic_write_text(folder / INDEX, json.dumps(
        {"metadata": {"total_size": total_bytes, **(metadata or {})},
         "weight_map": dict(sorted(weight_map.items()))},
        indent=1) + "\n")


def float32_bytes(folder: str | os.PathLike) -> int | None:
    """Bytes the folder's weights take in float32 (from the headers only); None when it is not a
    readable float safetensors checkpoint (the loader that needs it says why)."""
    try:
        tensors = ShardedCheckpoint.open(folder, allow_non_float=True).tensors
    except (CheckpointError, ModelLoadError):
        return None
    return 4 * sum(math.prod(info.shape) for info in tensors.values())
