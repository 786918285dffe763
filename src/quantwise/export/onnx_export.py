"""export_onnx: a quantized model -> an ONNX QDQ file that ONNX Runtime runs with integer kernels.

    twin (twin.py) -> torch.onnx.export (torch.export-based, custom ops translated by ops.py)
    -> metadata (quantwise version, per-layer output tensors for the parity check)
    -> onnx.checker -> written atomically (external data past 2 GB)
"""

from __future__ import annotations

import ast
import json
import logging
import os
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx
import torch
from torch import nn

from quantwise._version import __version__
from quantwise.errors import ModelLoadError, OutputPathError
from quantwise.export import ops
from quantwise.export.ort_exactness import choose_weight_dtype
from quantwise.export.twin import LayerTwin, build_twin, layer_count
from quantwise.fileio import new_staging, output_lock, record_output, write_failure
from quantwise.modules import QuantizedLayer

TWO_GB = 2 ** 31
MIN_OPSET = 17
# 20: the first with Gelu, one node that ONNX Runtime runs fused (with the bias Add before it,
# BiasGelu); at 18 the erf decomposition costs MiniLM 25 ms more in ONNX Runtime (Zen 1)
DEFAULT_OPSET = 20


@dataclass
class ExportResult:
    path: Path
    opset: int
    layers: dict[str, str]            # quantized layer name -> ONNX tensor of its output
    notes: dict[str, str] = field(default_factory=dict)  # layer -> what was exported in float
    external_data: bool = False
    dynamic_axes: dict[str, list[int]] = field(default_factory=dict)
    fusion: Any = None                # check.FusionReport, when asked for
    parity: Any = None                # check.ParityReport, when asked for
    openvino: Any = None              # openvino.OpenVINOReport, when openvino is installed
    openvino_note: str | None = None  # why OpenVINO could not compile the file, if it could not
    runtime_note: str | None = None   # ONNX Runtime's u8 x s8 kernels saturate here (ort_exactness)
    weight_dtype: str = "int8"        # how 8-bit integer weights are stored: int8 or uint8 (+128)

    def line(self) -> str:
        float_layers = f"; {len(self.notes)} in float (see notes)" if self.notes else ""
        return (f"exported {self.path} (opset {self.opset}, {len(self.layers)} quantized layers"
                f"{float_layers}{', external data' if self.external_data else ''})")

    def to_dict(self) -> dict:
        out = {"path": str(self.path), "opset": self.opset, "layers": len(self.layers),
               "notes": self.notes, "external_data": self.external_data,
               "dynamic_axes": self.dynamic_axes, "runtime_note": self.runtime_note,
               "weight_dtype": self.weight_dtype, "openvino_note": self.openvino_note}
        for key in ("fusion", "parity", "openvino"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value.to_dict()
        return out


def _as_call(example: Any) -> tuple[tuple, dict]:
    if isinstance(example, dict):
        return (), dict(example)
    if isinstance(example, (tuple, list)):
        return tuple(example), {}
    if isinstance(example, torch.Tensor):
        return (example,), {}
    raise ModelLoadError(f"example_inputs must be a tensor, a tuple of tensors or a dict of "
                         f"keyword tensors; got {type(example).__name__}")


def _dynamic_shapes(args: tuple, kwargs: dict) -> tuple[Any, dict[str, list[int]]]:
    """Batch (dim 0) dynamic for every tensor input; the sequence (dim 1) too for 2-D+ integer
    inputs (token ids, masks) and 3-D float inputs (embeddings): image sizes stay fixed."""
    dyn = torch.export.Dim.DYNAMIC
    axes: dict[str, list[int]] = {}

    def spec(name: str, t: Any):
        if not isinstance(t, torch.Tensor) or t.dim() == 0:
            return None
        dims = [0]
        if t.dim() >= 2 and (not t.dtype.is_floating_point or t.dim() == 3):
            dims.append(1)
        axes[name] = dims
        return {d: dyn for d in dims}

    if kwargs:
        return {k: spec(k, v) for k, v in kwargs.items()}, axes
    return tuple(spec(f"input_{i}", a) for i, a in enumerate(args)), axes


def export_onnx(model: nn.Module, example_inputs: Any, path: str | os.PathLike, *,
                opset: int = DEFAULT_OPSET, dynamic: bool = True, overwrite: bool = False,
                weight_dtype: str = "auto") -> ExportResult:
    """Export a quantwise-quantized model as an ONNX QDQ graph (see the module docstring).

    `example_inputs`: one batch as the model takes it (tensor, tuple, or dict of keyword
    tensors). 4-bit weights that are not a MatMulNBits case (embeddings, convs, asymmetric)
    are stored as INT4 tensors, which needs opset 21: the opset is raised to 21 for them. With
    `dynamic`, batch and sequence axes are left free. `weight_dtype`: "int8", "uint8" (codes +
    128, zero point 128: the same values, exact in ONNX Runtime's u8 x u8 kernels on CPUs whose
    u8 x s8 kernels saturate) or "auto" (uint8 only where ONNX Runtime here is measured to
    saturate on the model's codes; see ort_exactness). The file is written atomically; an
    existing file is replaced only with `overwrite`.
    """
    path = Path(path)
    if path.suffix != ".onnx":
        raise OutputPathError(f"{path}: the output file must end in .onnx")
    if path.exists() and not overwrite:
        raise OutputPathError(f"{path} already exists; pass overwrite=True (--overwrite) to replace it")
    if not path.parent.exists():
        raise OutputPathError(f"{path.parent} does not exist; create the folder first")
    if opset < MIN_OPSET:
        raise OutputPathError(f"opset {opset} is too old for per-channel QDQ export; use {MIN_OPSET}+")
    if layer_count(model) == 0:
        raise ModelLoadError("the model has no quantized layer: quantize it first "
                             "(quantwise.quantize) or export the float model with torch.onnx.export")
    with output_lock(path):  # a second export to the same file fails at once, clearly
        return _export_to(model, example_inputs, path, opset, dynamic, weight_dtype)


def _export_to(model: nn.Module, example_inputs: Any, path: Path, opset: int, dynamic: bool,
               weight_dtype: str) -> ExportResult:
    args, kwargs = _as_call(example_inputs)
    unsigned, runtime_note = choose_weight_dtype(model, weight_dtype)
    twin, paths, notes = build_twin(model)
    if unsigned:
        for m in twin.modules():
            if isinstance(m, LayerTwin):
                m.unsigned_weights()
    if opset < 21 and any(getattr(m, "mode", None) == "dq4" for m in twin.modules()):
        opset = 21  # INT4 tensors and blocked DequantizeLinear
    shapes, axes = _dynamic_shapes(args, kwargs) if dynamic else (None, {})
    program = _export(twin, args, kwargs, shapes, opset)
    ops.int4_initializers(program.model)
    layers = _layer_outputs(program.model, paths)
    for node in program.model.graph:  # the exporter's per-node stack traces and scopes: not shipped
        node.metadata_props.clear()
    program.model.metadata_props["quantwise.version"] = __version__
    program.model.metadata_props["quantwise.layer_outputs"] = json.dumps(layers)
    if notes:
        program.model.metadata_props["quantwise.float_layers"] = json.dumps(notes)
    external = _save(program, path)
    return ExportResult(path, opset, layers, notes, external, axes, runtime_note=runtime_note,
                        weight_dtype="uint8" if unsigned else "int8")


def _export(twin: nn.Module, args: tuple, kwargs: dict, shapes: Any, opset: int):
    ops.OPSET["version"] = opset
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        return torch.onnx.export(twin, args, kwargs=kwargs or None, dynamo=True, opset_version=opset,
                                 dynamic_shapes=shapes, custom_translation_table=ops.translation_table(),
                                 verbose=False, optimize=True)


def _scopes(node) -> list[str]:
    """The module paths a node sits in, outermost first (the exporter's name_scopes metadata
    lists the full path at each depth, then the op's own name)."""
    raw = node.metadata_props.get("pkg.torch.onnx.name_scopes")
    try:
        return [p for p in ast.literal_eval(raw) if p] if raw else []
    except (ValueError, SyntaxError):
        return []


def _layer_outputs(model, paths: dict[str, str]) -> dict[str, str]:
    """For each LayerTwin (by module path): the last value its nodes produce that is read outside
    them or is a graph output, i.e. the layer's output tensor, in graph order."""
    owner: dict[int, str] = {}
    order = list(model.graph)
    for node in order:
        inside = [p for p in _scopes(node) if p in paths]
        if inside:
            owner[id(node)] = inside[-1]
    outputs: dict[str, str] = {}
    graph_outputs = {id(v) for v in model.graph.outputs}
    for node in order:
        path = owner.get(id(node))
        if path is None:
            continue
        for value in node.outputs:
            used_outside = any(owner.get(id(user)) != path for user, _ in value.uses())
            if used_outside or id(value) in graph_outputs:
                outputs[paths[path]] = value.name  # later nodes of the same layer overwrite
    return outputs


def _save(program, path: Path) -> bool:
    """Write into a staging folder beside `path` (named for fileio's clean-up of what a killed
    writer leaves), check, then move into place with one rename. Called holding the lock."""
    tmp = new_staging(path)
    try:
        target = tmp / path.name
        proto = program.model_proto
        external = proto.ByteSize() > TWO_GB - 64 * 2 ** 20 if _fits(proto) else True
        del proto
        program.save(str(target), external_data=external)
        onnx.checker.check_model(str(target))
        data = target.with_name(path.name + ".data")
        if external and data.exists():
            os.replace(data, path.with_name(data.name))
        os.replace(target, path)
        record_output(path)
        return external
    except OSError as exc:  # a full disk: the previous file is unchanged
        raise write_failure(exc, path) from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _fits(proto) -> bool:
    try:
        proto.ByteSize()
        return True
    except Exception:  # noqa: BLE001 - protobuf refuses messages past 2 GB
        return False


def quantized_layer_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, QuantizedLayer)]


__all__ = ["export_onnx", "ExportResult", "LayerTwin", "quantized_layer_names"]
