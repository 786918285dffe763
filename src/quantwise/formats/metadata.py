"""quantwise.json, the metadata of a saved checkpoint: read and checked here, below io.py, so the
exporters in formats/ and io.load trust the same checks."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from quantwise.errors import CheckpointError

META_FILE = "quantwise.json"
FORMAT_VERSION = 1


def read_quantwise_json(folder: str | Path, hint: str = "pass a folder written by quantwise.save",
                        error: type[Exception] = CheckpointError) -> dict[str, Any]:
    """The folder's quantwise.json, checked: JSON, format "quantwise", this format version, a
    "layers" mapping. `error` (a QuantwiseError) is raised with `hint` saying what to pass."""
    folder = Path(folder)
    path = folder / META_FILE
    if not folder.is_dir() or not path.is_file():
        raise error(f"{folder} is not a quantwise checkpoint (no {META_FILE}): {hint}")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError, RecursionError) as exc:  # RecursionError: "[[[[..." nested deep
        raise error(f"{path} is not valid JSON ({str(exc)[:200] or type(exc).__name__})") from None
    if not isinstance(meta, dict) or meta.get("format") != "quantwise":
        raise error(f"{path} is not a quantwise metadata file: {hint}")
    if meta.get("format_version") != FORMAT_VERSION:
        raise error(f"{path} has format version {meta.get('format_version')}; this quantwise "
                    f"reads version {FORMAT_VERSION}")
    if not isinstance(meta.get("layers"), dict):
        raise error(f"{path} has no \"layers\" mapping: {hint}")
    return meta
