"""The partial output of a streamed quantization, so that a crash or Ctrl-C at block k keeps
blocks < k and `resume` continues from block k with identical results.

The partial folder (`.OUT.partial` beside the output) holds each finished block's shard,
`carried.safetensors` (the hidden states block k will be fed: a pure function of blocks < k,
saved in float32, exactly) and `progress.json` (the finished block count, the layer metadata
and records so far, and a key over the source checkpoint's tensor list and shard sizes, the
config and the calibration data). Each is written atomically, progress.json last: a crash
between them redoes one block. A resume with another source, config or calibration data is
refused (its blocks would not fit together).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterable

import torch
from safetensors.torch import load_file, save_file

from quantwise.config import Config
from quantwise.errors import CheckpointError
from quantwise.fileio import atomic_write_text
from quantwise.formats.shards import ShardedCheckpoint

PROGRESS = "progress.json"
CARRIED = "carried.safetensors"


def partial_dir(out: Path) -> Path:
    return out.parent / f".{out.name}.partial"


def _tensors_of(sample: Any) -> Iterable[torch.Tensor]:
    if isinstance(sample, torch.Tensor):
        yield sample
    elif isinstance(sample, dict):
        for key in sorted(sample):
            yield from _tensors_of(sample[key])
    elif isinstance(sample, (list, tuple)):
        for item in sample:
            yield from _tensors_of(item)


def run_key(checkpoint: ShardedCheckpoint, config: Config, calib: list | None) -> str:
    h = hashlib.sha256()
    for info in checkpoint.tensors.values():
        h.update(f"{info.name}|{info.dtype}|{info.shape}|{info.shard.name}|"
                 f"{info.shard.stat().st_size}\n".encode())
    h.update(json.dumps(config.to_dict(), sort_keys=True, default=str).encode())
    for sample in calib or []:
        for t in _tensors_of(sample):
            t = t.detach().contiguous().cpu()
            h.update(f"{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class Progress:
    def __init__(self, folder: Path, key: str) -> None:
        self.folder, self.key = folder, key
        self.done = 0
        self.saved: dict[str, Any] = {}
        self.carried: list[torch.Tensor] | None = None

    @classmethod
    def begin(cls, folder: Path, key: str, resume: bool) -> "Progress":
        progress = cls(folder, key)
        path = folder / PROGRESS
        if not resume:
            if folder.exists():
                shutil.rmtree(folder)
            folder.mkdir(parents=True)
            return progress
        if not path.is_file():
            raise CheckpointError(f"nothing to resume: {folder} holds no interrupted run of this "
                                  "output; run without --resume")
        saved = json.loads(path.read_text())
        if saved.get("key") != key:
            raise CheckpointError(f"{folder} was started from another source checkpoint, config "
                                  "or calibration data: run without --resume to start again")
        progress.saved, progress.done = saved, int(saved["done"])
        if (folder / CARRIED).is_file():
            state = load_file(str(folder / CARRIED))
            progress.carried = [state[f"h{i}"] for i in range(len(state))]
        return progress

    def save(self, done: int, state: dict[str, Any], carried: list[torch.Tensor] | None,
             spill: bool = False) -> list[torch.Tensor] | None:
        """Record `done` finished blocks. `spill`: return the carried hidden states mapped from
        the file just written (file-backed pages the kernel may drop and read again, instead
        of memory of their own: for calibration sets too large to hold)."""
        if carried is not None:
            tmp = self.folder / f".{CARRIED}.tmp"
            save_file({f"h{i}": h.contiguous() for i, h in enumerate(carried)}, str(tmp))
            os.replace(tmp, self.folder / CARRIED)
        self.done = done
        atomic_write_text(self.folder / PROGRESS,
                          json.dumps({"key": self.key, "done": done, **state}))
        if carried is None or not spill:
            return None
        mapped = load_file(str(self.folder / CARRIED))  # copy-on-write views of the file
        return [mapped[f"h{i}"] for i in range(len(carried))]

    def clear(self) -> None:
        """The run finished: only the checkpoint's own files stay."""
        for name in (PROGRESS, CARRIED):
            (self.folder / name).unlink(missing_ok=True)
