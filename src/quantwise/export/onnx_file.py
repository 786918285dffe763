"""An ONNX file given by the user, checked before any runtime reads it (bad-inputs 2, 5, 6).

ONNX Runtime follows a tensor's external-data location wherever it points; a crafted file
could make it read `../../secret` or `/etc/shadow` into a weight. So the graph is parsed
without its external data, every external location must name a file inside the model's
folder (no absolute path, no "..", no symlink out, offset and length inside the file), and
only then is the file handed to a runtime.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from quantwise.errors import CheckpointError

MAX_ONNX_BYTES = 2 ** 31  # protobuf's own limit: larger graphs keep their weights as external data


def open_onnx(path: str | os.PathLike) -> Any:
    """The ModelProto of `path` (external data not loaded), refused with a clear message when the
    file is empty, truncated, not ONNX, or points at data outside its folder."""
    import onnx
    from onnx.external_data_helper import ExternalDataInfo, _get_all_tensors, uses_external_data

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} is not a file: pass an .onnx file")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"{path}: the file is empty (an interrupted download or copy?)")
    if size > MAX_ONNX_BYTES:
        raise CheckpointError(f"{path}: {size} bytes, more than an ONNX protobuf can hold: not an "
                              "ONNX file (large models keep their weights as external data)")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - DecodeError and friends: one answer
        raise _not_onnx(path, exc) from None
    folder = path.resolve().parent
    for tensor in _get_all_tensors(proto):  # before the checker, which opens those files
        if uses_external_data(tensor):
            try:
                info = ExternalDataInfo(tensor)
            except ValueError as exc:  # an offset / length that is no integer, or negative
                raise CheckpointError(f"{path}: tensor {tensor.name!r} has malformed external "
                                      f"data ({exc}): re-export the model") from None
            _check_external(path, folder, tensor.name, info)
    try:
        onnx.checker.check_model(proto)
    except Exception as exc:  # noqa: BLE001 - ValidationError: a parse that is no model
        raise _not_onnx(path, exc) from None
    if not proto.graph.node and not proto.graph.output:
        raise CheckpointError(f"{path}: not an ONNX model (its graph is empty)")
    return proto


def _not_onnx(path: Path, exc: Exception) -> CheckpointError:
    first = str(exc).splitlines()[0] if str(exc) else ""
    return CheckpointError(f"{path}: truncated or not an ONNX file ({type(exc).__name__}: {first})")


def _check_external(path: Path, folder: Path, name: str, info: Any) -> None:
    location = str(info.location or "")
    where = f"{path}: tensor {name!r} keeps its data in {location!r}"
    if not location or os.path.isabs(location) or ".." in Path(location).parts or "\\" in location:
        raise CheckpointError(f"{where}, outside the model's folder: refused (nothing was read); "
                              "external data must be a file name beside the .onnx file")
    target = folder / location
    try:
        resolved = target.resolve(strict=True)
    except (OSError, RuntimeError, ValueError):  # ValueError: a NUL byte in the location
        raise CheckpointError(f"{where}, which does not exist: copy the data file beside the "
                              ".onnx file") from None
    if not resolved.is_relative_to(folder) or not resolved.is_file():
        raise CheckpointError(f"{where}, which resolves to {resolved}, outside the model's folder "
                              "(a symlink?): refused (nothing was read)")
    offset, length = int(info.offset or 0), info.length
    if offset < 0 or (length is not None and (length < 0 or offset + length > resolved.stat().st_size)):
        raise CheckpointError(f"{where} at bytes {offset}..{offset + (length or 0)}, past the end "
                              f"of that file ({resolved.stat().st_size} bytes): truncated")
