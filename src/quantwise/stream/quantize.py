"""Stream a Hugging Face causal LM folder through quantization, one block in memory at a time.

1. The folder is checked (formats/shards.py: index, shard headers and lengths, shapes against
   config.json) before any work; the output folder is checked before anything is written.
2. The model is built on the meta device; the embeddings, final norm and head are read in
   float32 (folder.py). The layer records come from prepare() on a second meta skeleton, so
   they are those of the in-memory path.
3. The layers outside the blocks are converted (the same workflow._convert_layer as convert()),
   written as the last shard and freed: first for round-to-nearest configs, and for GPTQ / AWQ
   as soon as block 0's inputs are captured (they need the rounded embeddings).
4. GPTQ / AWQ run through the block runner (methods/blocks.py BlockStream) with `load` reading
   block i from the shards and `finish` converting its Linears, writing them as block i's
   shard into a staging folder and dropping the block; round-to-nearest configs (w8, w4,
   w8a8-dynamic) run the same load / convert / write loop without calibration.
5. The index, quantwise.json (layers in model order), config.json with its quantization_config
   and the tokenizer files follow, and the staging folder replaces the output in one rename.
Memory: the larger of (embeddings + head in float32, with their conversion's temporaries) and
(one block in float32 + the calibration hidden states + the method's working set).
Static activation configs need every layer's calibrated range and are refused (quantize the
model in memory).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import nn

from quantwise.config import Config
from quantwise.errors import ConfigError, ModelLoadError
from quantwise.formats.shards import ShardedCheckpoint, shard_file_names, write_index
from quantwise.io import (META_FILE, _copy_hf_files, _metadata,
                          available_memory, check_output_dir)
from quantwise.fileio import atomic_write_text, current_umask, swap_in
from quantwise.methods import apply_method
from quantwise.methods.blocks import BlockStream, find_blocks, release_free_memory
from quantwise.modules import ObservedLayer, QuantizedLayer, is_supported, unsupported_reason
from quantwise.state import LayerRecord, QuantState, get_state, set_state
from quantwise.stream.folder import (load_block, materialize_rest, meta_skeleton, release_rest,
                                     stored_prefix)
from quantwise.stream.progress import Progress, partial_dir, run_key
from quantwise.workflow import (_code_limits, _convert_layer, _needs_calibration, nonempty,
                                prepare, record_kernel)

_SHARD_META = {"format": "quantwise"}  # one key: see io._write_weights
# Carried hidden states above this share of the available memory are mapped from the progress
# file instead of held (64 x 256 tokens of a 2048-wide model: 134 MB, held)
CARRY_FRACTION = 0.125


def quantize_folder(folder: str | os.PathLike, config: "Config | str", calib_data:
                    Iterable[Any] | None, out: str | os.PathLike, *, overwrite: bool = False,
                    progress: bool = True, source: str | None = None, resume: bool = False) -> Path:
    """Quantize the Hugging Face folder `folder` with `config` into `out`, holding one block's
    float32 weights at a time (see the module docstring); returns the output folder.
    `source` is recorded as the model's origin (default: the folder). An interrupted run
    leaves its finished blocks in `.OUT.partial` (stream/progress.py); `resume=True` continues
    from the first unfinished block, with the result of an uninterrupted run."""
    folder = Path(folder)
    config = Config.resolve(config)
    checkpoint = ShardedCheckpoint.open(folder, allow_non_float=True)  # checked below
    try:
        config_json = json.loads((folder / "config.json").read_text())
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:  # deep nesting too
        raise ModelLoadError(f"{folder / 'config.json'}: not readable JSON ({type(exc).__name__}: "
                             f"{str(exc)[:200]})") from None
    checkpoint.check_config(config_json, folder / "config.json")
    out = check_output_dir(out, overwrite)
    model = meta_skeleton(folder)
    strip = stored_prefix(model)
    checkpoint.check_float({n[len(strip):] for n, b in model.named_buffers()
                            if not b.is_floating_point()})
    found = find_blocks(model)
    if found is None:
        raise ModelLoadError(f"{folder}: no repeated transformer blocks in its model; streaming "
                             "runs block by block (quantize it in memory instead)")
    if config.method not in (None, "rtn", "gptq", "awq") or _needs_calibration(model, config):
        raise ConfigError(f"config {config.name!r}: streaming runs weight-only and dynamic "
                          "configs (round-to-nearest, GPTQ, AWQ); static activations and "
                          "SmoothQuant need the whole model's calibration: quantize in memory")
    if config.method in ("gptq", "awq"):
        calib_data = list(nonempty(calib_data, f"calibration data (method {config.method!r} needs it)"))
    else:
        calib_data = None  # nothing to calibrate: the blocks need no inputs
    blocks_name, blocks = found
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    state = get_state(prepare(meta_skeleton(folder), config, source=source or str(folder),
                              inplace=True))
    materialize_rest(model, blocks_name, checkpoint)
    checkpoint.close()

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = partial_dir(out)
    run = Progress.begin(staging, run_key(checkpoint, config, calib_data), resume)
    staging.chmod(0o777 & ~current_umask())
    files = shard_file_names(len(blocks) + 1)
    available = available_memory()
    carry_budget = CARRY_FRACTION * available if available is not None else float("inf")
    writer = _Writer(staging, config, state)
    writer.restore(run.saved)
    try:
        def read(index: int) -> nn.Module:
            block = load_block(blocks[index], f"{blocks_name}.{index}.", checkpoint, strip)
            # unmap the shards: their pages read so far stay resident while mapped, and would
            # grow the process by every block read (measured: +25 MB per bf16 block of 22 MB)
            checkpoint.close()
            return block

        def finish(index: int, block: nn.Module, outputs: list | None = None) -> list | None:
            prefix = f"{blocks_name}.{index}."
            writer.convert(block, prefix)
            writer.write(block.state_dict(), prefix, files[index])
            held = sum(h.numel() * h.element_size() for h in outputs or ())
            # hidden states past the budget are carried in the progress file, mapped
            return run.save(index + 1, writer.state_dict(), outputs, spill=held > carry_budget)

        def write_rest() -> None:
            # the layers outside the blocks (embeddings, final norm, head) are converted and
            # written first, as the last shard, then freed: the blocks run without them (GPTQ
            # and AWQ once block 0's inputs are captured, after the embeddings' rounding)
            if files[-1] not in writer.weight_map.values():  # else a resumed run wrote it
                writer.convert(model, "", skip=blocks_name)
                writer.write({k: v for k, v in model.state_dict().items()
                              if not k.startswith(blocks_name + ".")}, "", files[-1])
            release_rest(model, blocks_name)
            release_free_memory()

        if config.method in ("gptq", "awq"):
            apply_method(model, config, calib_data, progress=progress,
                         stream=BlockStream(read, finish, run.done, run.carried, write_rest))
        else:
            from tqdm.auto import tqdm
            write_rest()
            for index in tqdm(range(run.done, len(blocks)), desc="blocks", disable=not progress,
                              initial=run.done, total=len(blocks)):
                finish(index, read(index))
                release_free_memory()
        writer.finish(model, order)
        run.clear()
        swap_in(staging, out)
    except BaseException:
        if run.done == 0:  # nothing worth resuming
            shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        checkpoint.close()
    return out


class _Writer:
    """Converts modules as convert() does and writes their tensors as shards into staging."""

    def __init__(self, staging: Path, config: Config, state: QuantState) -> None:
        self.staging, self.config, self.state = staging, config, state
        self.layers: dict[str, dict] = {}
        self.weight_map: dict[str, str] = {}
        self.total = 0
        self.tied: dict = {}  # shared by the parts outside the blocks (embedding / head ties)

    def state_dict(self) -> dict[str, Any]:
        """What a resume needs of the finished blocks (stream/progress.py)."""
        return {"layers": self.layers, "weight_map": self.weight_map, "total": self.total,
                "records": [r.to_dict() for r in self.state.records.values()]}

    def restore(self, saved: dict[str, Any]) -> None:
        if not saved:
            return
        self.layers, self.weight_map = dict(saved["layers"]), dict(saved["weight_map"])
        self.total = int(saved["total"])
        self.state.records = {r["name"]: LayerRecord(**r) for r in saved["records"]}

    def convert(self, root: nn.Module, prefix: str, skip: str | None = None) -> None:
        observed: list[tuple[str, ObservedLayer]] = []
        taken: list[str] = []
        for name, module in list(root.named_modules()):
            if not name or (skip is not None and (name == skip or name.startswith(skip + "."))):
                continue
            if any(name.startswith(p + ".") for p in taken) or not is_supported(module):
                continue
            taken.append(name)
            full = prefix + name
            layer_config, origin = self.config.layer_config(full, type(module).__name__)
            if layer_config.is_float:
                continue
            reason = unsupported_reason(module)  # now on the real weight (NaN / Inf)
            if reason:
                self.state.records[full] = LayerRecord(full, type(module).__name__, origin=origin,
                                                       reason=reason)
                continue
            observed.append((name, ObservedLayer(module, full, layer_config, origin)))
        limits = _code_limits([obs for _, obs in observed])
        block_tied: dict = {}
        converted: list[tuple[str, QuantizedLayer]] = []
        observed.reverse()
        while observed:  # popped: each float layer is freed once its replacement is in place
            name, obs = observed.pop()
            # ties by id(weight): only within one part (a freed block's ids get reused)
            tied = self.tied if skip is not None else block_tied
            release_free_memory()  # freed temporaries of the layer before (an embedding's)
            qlayer = _convert_layer(obs, self.state.records[obs.qname], tied, limits, build=False)
            root.set_submodule(name, qlayer if qlayer is not None else obs.module)
            if qlayer is not None:
                converted.append((obs.qname, qlayer))
                self.layers[obs.qname] = qlayer.meta()
        obs = None  # the last float layer's last reference
        # kernels only for the records (which kernel, any fallback: as convert() notes them),
        # one at a time once the float layers are gone; nothing runs them before the write
        for qname, qlayer in converted:
            release_free_memory()
            record_kernel(qlayer, self.state.records[qname])
            qlayer.kernel = None

    def write(self, state_dict: dict[str, torch.Tensor], prefix: str, file_name: str) -> None:
        tensors = {prefix + k: v for k, v in state_dict.items()}
        for removed in safetensors.torch._remove_duplicate_names(tensors).values():
            for name in removed:  # tied tensors stored once, as quantwise.save does
                del tensors[name]
        tensors = {k: v.contiguous() for k, v in tensors.items()}
        tmp = self.staging / f".{file_name}.tmp"
        safetensors.torch.save_file(tensors, str(tmp), metadata=_SHARD_META)
        tmp.chmod(0o666 & ~current_umask())
        os.replace(tmp, self.staging / file_name)
        self.weight_map.update({name: file_name for name in tensors})
        self.total += sum(t.numel() * t.element_size() for t in tensors.values())

    def finish(self, model: nn.Module, order: dict[str, int]) -> None:
        self.state.stage = "converted"
        set_state(model, self.state)
        meta = _metadata(model, self.state)
        meta["layers"] = dict(sorted(self.layers.items(), key=lambda kv: order.get(kv[0], 0)))
        write_index(self.staging, self.weight_map, self.total, _SHARD_META)
        atomic_write_text(self.staging / META_FILE, json.dumps(meta, separators=(",", ":")))
        _copy_hf_files(self.state, self.staging)
