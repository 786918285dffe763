"""Atomic file writes: a temporary file in the same folder, then os.replace (bad-inputs 20)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    mask = os.umask(0)
    os.umask(mask)
    try:
        os.fchmod(fd, 0o666 & ~mask)  # mkstemp makes it private; the result is an ordinary file
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def swap_in(staging: Path, folder: Path) -> None:
    """Replace `folder` by `staging` with renames, so a reader never sees half of it (a checkpoint, an export)."""
    if not folder.exists():
        os.replace(staging, folder)
        return
    backup = Path(tempfile.mkdtemp(prefix=f".{folder.name}.old.", dir=folder.parent))
    os.replace(folder, backup / "old")
    try:
        os.replace(staging, folder)
    except BaseException:
        os.replace(backup / "old", folder)
        raise
    finally:
        shutil.rmtree(backup, ignore_errors=True)
