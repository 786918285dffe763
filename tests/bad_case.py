"""The table behind tests/test_bad_inputs.py: a Case says what to run and what must hold; Base
holds the valid files the cases start from (built once per session, copied before damage)."""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch


@dataclass
class Case:
    argv: list[str]                       # the command line (without "quantwise")
    message: str                          # regex: in stderr for errors, in stdout + stderr else
    rc: int = 2
    inputs: list[Path] = field(default_factory=list)  # byte-identical afterwards
    out: Path | None = None               # an error leaves it absent, or as it was
    api: Callable[[], Any] | None = None  # raises `error`, or asserts the property itself
    error: type | None = None
    api_message: str | None = None        # regex for the API's message (default: message)
    after: Callable[[], None] | None = None  # more checks after a successful command
    patch: Callable[[], Any] | None = None  # a context manager around the in-process command
    interrupt_after: str | None = None    # run as a process, SIGINT once stderr shows this


@dataclass(frozen=True)
class Entry:
    number: int
    variant: str
    given: str      # the bad input, in words
    expected: str   # what quantwise does
    build: Callable[["Base", Path], Case]

    @property
    def id(self) -> str:
        return f"{self.number:02d}{self.variant}"


REGISTRY: list[Entry] = []


def case(number: int, variant: str, given: str, expected: str):
    def register(build: Callable[["Base", Path], Case]) -> Callable[["Base", Path], Case]:
        REGISTRY.append(Entry(number, variant, given, expected, build))
        return build
    return register


@dataclass
class Base:
    """Valid inputs the cases copy and damage (never damaged in place)."""

    root: Path
    ckpt: Path = None       # digits w8a8 checkpoint folder
    hf: Path = None         # a tiny BERT Hugging Face folder (safetensors)
    onnx: Path = None       # digits w8a8 exported to ONNX
    vec: Path = None        # calibration folder: .npy [8, 16] float32
    img: Path = None        # .npy [4, 3, 8, 8]
    img4: Path = None       # .npy [4, 4, 8, 8]
    seq: Path = None        # .npy [4, 5, 16]
    ids: Path = None        # .npy int64 [4, 8] below 64
    tokens: Path = None     # .safetensors input_ids / attention_mask for the BERT folder

    def copy(self, name: str, dst: Path) -> Path:
        src = getattr(self, name)
        if src.is_dir():
            shutil.copytree(src, dst)
        else:
            shutil.copy2(src, dst)
        return dst


def npy_folder(folder: Path, arrays: list[np.ndarray]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, array in enumerate(arrays):
        np.save(folder / f"{i:02d}.npy", array)
    return folder


def build_base(root: Path) -> Base:
    import safetensors.torch

    import quantwise
    from quantwise.models.digits import digits_calib_batches, load_digits_model

    import hf_models

    rng = np.random.default_rng(0)
    b = Base(root)
    b.vec = npy_folder(root / "vec", [rng.standard_normal((8, 16), dtype=np.float32) for _ in range(3)])
    b.img = npy_folder(root / "img", [rng.standard_normal((4, 3, 8, 8), dtype=np.float32) for _ in range(3)])
    b.img4 = npy_folder(root / "img4", [rng.standard_normal((4, 4, 8, 8), dtype=np.float32) for _ in range(3)])
    b.seq = npy_folder(root / "seq", [rng.standard_normal((4, 5, 16), dtype=np.float32) for _ in range(3)])
    b.ids = npy_folder(root / "ids", [rng.integers(0, 64, (4, 8)) for _ in range(3)])
    model = load_digits_model()
    qmodel = quantwise.quantize(model, "w8a8", list(digits_calib_batches(32))[:4], progress=False,
                                source="digits")
    b.ckpt = quantwise.save(qmodel, root / "ckpt")
    from quantwise.export import export_onnx

    b.onnx = root / "onnx" / "digits.onnx"
    b.onnx.parent.mkdir()
    export_onnx(qmodel, torch.zeros(2, 1, 8, 8), b.onnx)
    bert = hf_models.build("bert")
    b.hf = root / "bert"
    bert.save_pretrained(b.hf)
    b.tokens = root / "tokens"
    b.tokens.mkdir()
    for i in range(2):
        ids = torch.randint(0, 100, (4, 12), generator=torch.Generator().manual_seed(i))
        safetensors.torch.save_file({"input_ids": ids, "attention_mask": torch.ones_like(ids)},
                                    b.tokens / f"{i}.safetensors")
    return b
