"""Verify before trust: a checkpoint's quantwise.json entries and tensors are checked against each
other before a byte of them reaches a layer (issue 17).

A file edited by hand, a bad conversion or a hostile upload could otherwise load silently: int32
or float values where quantwise.json declares int8 codes are cast by load_state_dict, codes out of
range or a NaN scale give garbage outputs, and a layer entry without "kind" is a KeyError. Each
check names the file, the layer or tensor, and what was expected.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping

import torch

from quantwise.errors import CheckpointError, ConfigError
from quantwise.numerics import unpack_int4
from quantwise.spec import Format, PerChannel, PerGroup, PerTensor, QuantSpec

KINDS = ("linear", "conv", "conv_transpose", "embedding")  # modules/layers.py kind_of
_PACKED = (Format.INT4, Format.UINT4)
# modules/layers.py conv_args: what make_conv_kernel takes; linear / embedding take none
_CONV_ARGS = {"stride", "padding", "dilation", "groups", "transposed", "output_padding"}
_LAYER_ARGS = {"conv": _CONV_ARGS, "conv_transpose": _CONV_ARGS}
_RECORD_KEYS = {"name", "module_type", "status", "config", "origin", "calibrator", "kernel",
                "reason", "seen", "nonfinite", "code_limit"}
_REDO = "the checkpoint is damaged or was edited: quantize the float model again"


def check_metadata(meta: dict[str, Any], path: Path) -> None:
    """Every layer entry, record and fold of quantwise.json well-formed (types, known keys,
    positive shapes, parseable specs, ties and records naming existing layers)."""
    layers = meta["layers"]
    for name, entry in layers.items():
        _check_layer_entry(name, entry, path)
        tied = entry.get("tied_to")
        if tied is not None and (tied not in layers or layers[tied].get("tied_to")):
            raise CheckpointError(f"{path}: layer {name!r} is tied to {tied!r}, which is not an "
                                  f"untied quantized layer of the checkpoint; {_REDO}")
    records = meta.get("records")
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise CheckpointError(f"{path}: \"records\" must be a list of per-layer objects; {_REDO}")
    names = set()
    for record in records:
        unknown = set(record) - _RECORD_KEYS
        if unknown or not isinstance(record.get("name"), str) or not isinstance(
                record.get("module_type"), str):
            raise CheckpointError(f"{path}: record {record.get('name')!r} has unknown keys "
                                  f"{sorted(unknown)} or no name / module_type; {_REDO}")
        limit = record.get("code_limit")
        if limit is not None and (type(limit) is not int or not 1 <= limit <= 127):
            raise CheckpointError(f"{path}: record {record['name']!r} has code_limit {limit!r}, "
                                  f"not an integer in 1..127; {_REDO}")
        names.add(record["name"])
    missing = sorted(set(layers) - names)
    if missing:
        raise CheckpointError(f"{path}: no record for the quantized layers {missing[:5]}; {_REDO}")
    folded = meta.get("folded", [])
    if not isinstance(folded, list) or not all(
            isinstance(p, list) and len(p) == 2 and all(isinstance(n, str) for n in p) and p[1] in names
            for p in folded):
        raise CheckpointError(f"{path}: \"folded\" must list [conv, batchnorm] name pairs that have "
                              f"records; {_REDO}")
    if not isinstance(meta.get("config"), dict):
        raise CheckpointError(f"{path}: \"config\" must be an object; {_REDO}")
    if not isinstance(meta.get("prescaled", {}), dict):
        raise CheckpointError(f"{path}: \"prescaled\" must be an object; {_REDO}")
    if not isinstance(meta.get("source"), (str, type(None))):
        raise CheckpointError(f"{path}: \"source\" must be a string or null; {_REDO}")


def _check_layer_entry(name: str, entry: Any, path: Path) -> None:
    where = f"{path}: layer {name!r}"
    if not isinstance(entry, dict):
        raise CheckpointError(f"{where}: its entry is {type(entry).__name__}, not an object; {_REDO}")
    required = {"kind": str, "weight_spec": dict, "dynamic": bool, "weight_shape": list,
                "scale_shape": list, "layer_args": dict}
    for key, kind in required.items():
        if not isinstance(entry.get(key), kind):
            raise CheckpointError(f"{where}: \"{key}\" missing or not a {kind.__name__}; {_REDO}")
    if entry["kind"] not in KINDS:
        raise CheckpointError(f"{where}: kind {entry['kind']!r} is not one of {', '.join(KINDS)}; {_REDO}")
    for key in ("weight_shape", "scale_shape"):
        dims = entry[key]
        low = 1 if key == "weight_shape" else 0
        if not all(type(d) is int and low <= d < 2 ** 40 for d in dims) or len(dims) > 8:
            raise CheckpointError(f"{where}: {key} {dims!r} is not a list of sizes; {_REDO}")
    if not entry["weight_shape"]:
        raise CheckpointError(f"{where}: weight_shape is empty; {_REDO}")
    for key in ("act_spec", "bias_size"):  # may be null, never absent
        if key not in entry:
            raise CheckpointError(f"{where}: \"{key}\" missing; {_REDO}")
    allowed = _LAYER_ARGS.get(entry["kind"], set())
    args = entry["layer_args"]
    if set(args) - allowed or (entry["kind"] in ("conv", "conv_transpose") and
                               not {"stride", "padding", "dilation", "groups"} <= set(args)):
        raise CheckpointError(f"{where}: layer_args keys {sorted(args)} are not those of a "
                              f"{entry['kind']} layer ({sorted(allowed) or 'none'}); {_REDO}")
    bias = entry.get("bias_size")
    if bias is not None and (type(bias) is not int or not 0 < bias < 2 ** 40):
        raise CheckpointError(f"{where}: bias_size {bias!r} is not a positive integer or null; {_REDO}")
    if not isinstance(entry.get("act_spec"), (dict, type(None))):
        raise CheckpointError(f"{where}: act_spec must be an object or null; {_REDO}")
    if not isinstance(entry.get("tied_to"), (str, type(None))):
        raise CheckpointError(f"{where}: tied_to must be a layer name; {_REDO}")
    try:
        spec = QuantSpec.from_dict(entry["weight_spec"])
        if entry["act_spec"] is not None:
            act = QuantSpec.from_dict(entry["act_spec"])
            if not act.format.is_integer:
                raise ConfigError(f"activation format {act.format.value} is not an integer format")
    except (ConfigError, TypeError) as exc:
        raise CheckpointError(f"{where}: {exc}; {_REDO}") from None
    if spec.format is Format.FP32:
        raise CheckpointError(f"{where}: an fp32 weight is not a quantized layer; {_REDO}")
    want = _scale_shape(spec, tuple(entry["weight_shape"]))
    if want is None or tuple(entry["scale_shape"]) != want:
        raise CheckpointError(f"{where}: scale_shape {entry['scale_shape']} does not fit "
                              f"{spec.granularity.to_dict()} of a {entry['weight_shape']} weight; {_REDO}")
    for value in entry["layer_args"].values():
        if not _json_scalar_or_ints(value):
            raise CheckpointError(f"{where}: layer_args hold {value!r}, not numbers or flags; {_REDO}")


def _scale_shape(spec: QuantSpec, shape: tuple[int, ...]) -> tuple[int, ...] | None:
    """The scale shape numerics.tensor_range gives a weight of `shape` (None: impossible)."""
    g = spec.granularity
    if isinstance(g, PerTensor):
        return ()
    if isinstance(g, PerChannel):
        return (shape[g.axis],) if -len(shape) <= g.axis < len(shape) else None
    if isinstance(g, PerGroup):
        return shape[:-1] + (shape[-1] // g.size,) if shape[-1] % g.size == 0 else None
    return None  # per-token is an activation granularity


def _json_scalar_or_ints(value: Any) -> bool:
    if isinstance(value, list):
        return len(value) <= 8 and all(type(v) is int and abs(v) < 2 ** 31 for v in value)
    return value is None or isinstance(value, (bool, str)) or (
        isinstance(value, (int, float)) and math.isfinite(value) and abs(value) < 2 ** 31)


def _expected(entry: dict[str, Any]) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """dtype and shape of every buffer a layer entry implies (QuantizedLayer's buffers)."""
    spec = QuantSpec.from_dict(entry["weight_spec"])
    shape = tuple(entry["weight_shape"])
    if spec.format in _PACKED:
        weight = (torch.uint8, (shape[0], (math.prod(shape[1:]) + 1) // 2))
    else:
        weight = (spec.format.storage_dtype, shape)
    scale = tuple(entry["scale_shape"])
    out = {"weight": weight, "weight_scale": (torch.float32, scale)}
    if not spec.symmetric:
        out["weight_zero_point"] = (torch.int32, scale)
    if entry.get("bias_size") is not None:
        out["bias"] = (torch.float32, (entry["bias_size"],))
    if entry.get("act_spec") is not None and not entry["dynamic"]:
        out.update(input_scale=(torch.float32, ()), input_zero_point=(torch.int32, ()))
    if entry.get("output_qparams"):
        out.update(output_scale=(torch.float32, ()), output_zero_point=(torch.int32, ()))
    return out


def check_tensors(state: Mapping[str, torch.Tensor], meta: dict[str, Any], where: Path) -> None:
    """Each quantized layer's stored tensors: the dtype and shape quantwise.json implies, codes
    in their format's range (and within a recorded 7-bit code limit), scales finite and
    positive, zero points in range, biases finite."""
    limits = {r["name"]: r.get("code_limit") for r in meta.get("records", [])}
    for name, entry in meta["layers"].items():
        if entry.get("tied_to"):
            continue  # its weight is its owner's (stored once), checked there
        spec = QuantSpec.from_dict(entry["weight_spec"])
        act = QuantSpec.from_dict(entry["act_spec"]) if entry.get("act_spec") else None
        for buffer, (dtype, shape) in _expected(entry).items():
            key = f"{name}.{buffer}"
            tensor = state.get(key)
            if tensor is None:
                continue  # a missing key is listed with the others by the strict load
            if tensor.dtype != dtype or tuple(tensor.shape) != shape:
                raise CheckpointError(
                    f"{where}: tensor {key!r} is {_dtype(tensor.dtype)} {list(tensor.shape)}, but "
                    f"quantwise.json declares {_dtype(dtype)} {list(shape)} for a layer of "
                    f"{spec.format.value} weights; {_REDO}")
            _check_values(key, buffer, tensor, spec, act, limits.get(name), where)


def _check_values(key: str, buffer: str, tensor: torch.Tensor, spec: QuantSpec,
                  act: QuantSpec | None, limit: int | None, where: Path) -> None:
    bad = None
    if buffer == "weight" and spec.format.is_integer:
        low, high = spec.qmin, spec.qmax
        if limit is not None and spec.symmetric and spec.format is Format.INT8:
            low, high = -limit, limit
        bits = spec.format.bits
        full = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if spec.format.is_signed else (0, 2 ** bits - 1)
        if (low, high) == full:
            return  # every value of the storage is a valid code: nothing to scan
        codes = tensor
        if spec.format in _PACKED:  # the pad nibble of an odd row is a zero code: in range
            codes = unpack_int4(tensor, 2 * tensor.shape[1], signed=spec.format.is_signed)
        if codes.numel() and (int(codes.min()) < low or int(codes.max()) > high):
            bad = (f"holds codes {int(codes.min())}..{int(codes.max())}, outside "
                   f"{spec.format.value}'s {low}..{high}")
    elif buffer == "weight" or buffer == "bias":
        if not bool(torch.isfinite(tensor.float()).all()):
            bad = "holds NaN or infinite values"
    elif buffer.endswith("_scale"):
        if tensor.numel() and not bool((torch.isfinite(tensor) & (tensor > 0)).all()):
            bad = f"holds scales that are not finite and positive (min {float(tensor.min())})"
    elif buffer.endswith("zero_point"):
        fmt = spec if buffer == "weight_zero_point" else act
        if buffer == "output_zero_point":
            low, high = 0, 255  # the int8 graph's uint8 outputs
        elif fmt is not None and fmt.format.is_integer:
            low, high = fmt.qmin, fmt.qmax
        else:
            low, high = -2 ** 31, 2 ** 31 - 1
        if tensor.numel() and (int(tensor.min()) < low or int(tensor.max()) > high):
            bad = f"holds zero points {int(tensor.min())}..{int(tensor.max())}, outside {low}..{high}"
    if bad:
        raise CheckpointError(f"{where}: tensor {key!r} {bad}; {_REDO}")


def check_against_model(state: Mapping[str, torch.Tensor], model: torch.nn.Module, where: Path) -> None:
    """The float tensors of the checkpoint fit the model: same shapes, and a float tensor only
    where the model holds a float (an integer buffer such as position ids stays integer)."""
    wrong = []
    for name, target in model.state_dict(keep_vars=True).items():
        tensor = state.get(name)
        if tensor is None:
            continue
        if tuple(tensor.shape) != tuple(target.shape) or (
                tensor.dtype.is_floating_point != target.dtype.is_floating_point):
            wrong.append(f"{name} ({_dtype(tensor.dtype)} {list(tensor.shape)}, the model needs "
                         f"{_dtype(target.dtype)} {list(target.shape)})")
    if wrong:
        raise CheckpointError(f"{where}: tensors of the wrong shape or dtype for the model: "
                              f"{'; '.join(wrong[:5])}{' ...' if len(wrong) > 5 else ''}: pass the "
                              "float model the checkpoint was made from")


def _dtype(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
