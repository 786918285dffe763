"""Check an exported ONNX file: which kernels ONNX Runtime really runs, and whether it computes
what the quantwise model computes.

A QDQ graph says "quantize here", not "run int8 here": ONNX Runtime fuses DequantizeLinear ->
Conv -> QuantizeLinear into QLinearConv only when the pattern is exactly one it knows, and
otherwise runs the product in float between the Q/DQ nodes, silently. `fusion_report` reads the
graph the session really runs; `parity` compares its output (and, layer by layer, a debugging
copy of it) with the torch model's.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import os
import statistics
import tempfile
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from quantwise.encoder import remove_encoder_fastpath
from quantwise.errors import CheckpointError, DataLoadError, ModelLoadError
from quantwise.int8graph import remove_int8_graph
from quantwise.modules import QuantizedLayer
from quantwise.export.compare import (QUALITY_TOL, SPREAD_EPS, SPREAD_FACTOR, first_tensor,
                                      quality_metric, quality_per_sample, rel_err,
                                      rounding_spread, row_cosines, to_numpy)
from quantwise.workflow import run_model

LAYER_OUTPUTS_KEY = "quantwise.layer_outputs"  # metadata_props key the exporter writes

# Op types of the optimized graph that compute a product in integers (any domain).
WEIGHT_ONLY_OPS = frozenset({"MatMulNBits", "MatMulBnb4", "MatMulFpQ4"})
INT_CONV_OPS = frozenset({"QLinearConv", "ConvInteger", "QLinearConvTranspose"})
INT_MATMUL_OPS = frozenset({"QLinearMatMul", "MatMulInteger", "MatMulIntegerToFloat",
                            "DynamicQuantizeMatMul", "QGemm", "QAttention", "QOrderedMatMul"}) | WEIGHT_ONLY_OPS
INTEGER_OPS = INT_CONV_OPS | INT_MATMUL_OPS
_INT_OTHER = frozenset({"QEmbedLayerNormalization", "GatherBlockQuantized"})  # + every QLinear*
_QDQ = ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear")
_B_INPUT = {"QLinearMatMul": 3, "QGemm": 3}  # index of the second operand; 1 for the others
# A tensor that comes out of these from an initializer is still a constant (a weight).
_PASS_THROUGH = frozenset({"DequantizeLinear", "Transpose", "Reshape", "Cast", "Identity",
                           "Unsqueeze", "Squeeze", "Flatten"})
_NP_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
             "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int8)": np.int8,
             "tensor(uint8)": np.uint8, "tensor(bool)": np.bool_}


def _libs() -> tuple[Any, Any]:
    try:
        import onnx
        import onnxruntime
    except ImportError as exc:  # the same error as quantwise.export's own check
        raise ModelLoadError("quantwise.export.check needs onnx and onnxruntime: "
                             "pip install 'quantwise[onnx]'") from exc
    return onnx, onnxruntime


def _session(ort: Any, model: str, level: str, threads: int, optimized: str | None = None) -> Any:
    if not Path(model).is_file():
        raise CheckpointError(f"no ONNX file at {model}")
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    so.log_severity_level = 3  # the optimizer's "removing initializer" warnings are noise here
    if optimized:
        so.optimized_model_filepath = optimized
    try:
        return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - ORT raises its own exception types
        raise CheckpointError(f"ONNX Runtime cannot load {model}: {exc}") from exc


# -- which kernels run ---------------------------------------------------------------------------
@dataclass
class FusionReport:
    """What ONNX Runtime (CPU, ORT_ENABLE_ALL) really runs. Totals count products with a weight
    operand (Conv, MatMul/Gemm and their fused or integer forms); products of two run-time
    tensors (attention scores) are in `act_matmul` only, as quantwise never quantizes them."""

    op_counts: dict[str, int]
    conv_int8: int
    conv_total: int
    matmul_int8: int  # weight-only MatMulNBits included, also counted in `weight_only`
    matmul_total: int
    float_compute: list[tuple[str, str]]  # (node name, op type) of weight products left in float
    qdq_left: int  # Q/DQ nodes not feeding an integer kernel: float runs between them
    int8_other: dict[str, int]
    weight_only: int = 0
    input_quant: int = 0  # QuantizeLinear nodes whose every consumer is an integer kernel
    int8_products: dict[str, int] = field(default_factory=dict)  # integer kernels among the totals
    act_matmul: dict[str, int] = field(default_factory=dict)

    def line(self) -> str:
        parts = [f"{a}/{b} {noun}" for a, b, noun in ((self.conv_int8, self.conv_total, "convs"),
                                                      (self.matmul_int8, self.matmul_total, "matmuls")) if b]
        text = ("ONNX Runtime runs " + " and ".join(parts) + " as integer kernels" if parts
                else "ONNX Runtime runs no conv or matmul with a weight")
        kernels = [f"{k} x{v}" + (" weight-only" if k in WEIGHT_ONLY_OPS else "")
                   for k, v in {**self.int8_products, **self.int8_other}.items()]
        if kernels:
            text += f" ({', '.join(kernels)})"
        floats = Counter(op for _, op in self.float_compute)
        text += "; float: " + (", ".join(f"{k} x{v}" for k, v in floats.items()) or "none")
        if self.act_matmul:
            acts = ", ".join(f"{k} x{v}" for k, v in self.act_matmul.items())
            text += f"; activation x activation products not counted: {acts}"
        if self.input_quant:
            text += f"; {self.input_quant} activation quantization{'' if self.input_quant == 1 else 's'} into them"
        return text + f"; {self.qdq_left} Q/DQ node{'' if self.qdq_left == 1 else 's'} left"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "float_compute": [list(x) for x in self.float_compute], "line": self.line()}


def fusion_report(path: str | os.PathLike, threads: int = 1) -> FusionReport:
    """Let ONNX Runtime optimize `path` as a CPU session would and count what it will run."""
    onnx, ort = _libs()
    with tempfile.TemporaryDirectory(prefix="quantwise-ort-") as tmp:
        out = os.path.join(tmp, "optimized.onnx")
        _session(ort, str(path), "ORT_ENABLE_ALL", threads, optimized=out)
        try:
            graph = onnx.load(out, load_external_data=False).graph
        except Exception as exc:  # noqa: BLE001 - missing or unreadable: same answer
            raise CheckpointError(f"ONNX Runtime wrote no readable optimized graph for {path}: {exc}") from exc
    return _classify(graph)


_LAYOUT = frozenset({"Transpose", "Reshape", "Squeeze", "Unsqueeze", "Flatten"})


def _input_quantizations(graph: Any) -> int:
    """QuantizeLinear nodes whose every consumer is an integer kernel, also through layout ops
    (ORT puts a Transpose between a QuantizeLinear and its NHWC QLinearConv)."""
    users: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            users.setdefault(name, []).append(node)

    def feeds(name: str, depth: int = 0) -> bool:
        def integer(n: Any) -> bool:
            if n.op_type in _LAYOUT:
                return depth < 4 and feeds(n.output[0], depth + 1)
            return n.op_type in INTEGER_OPS or n.op_type.startswith("QLinear") or n.op_type in _INT_OTHER

        return bool(users.get(name)) and all(integer(n) for n in users[name])

    return sum(1 for n in graph.node if n.op_type == "QuantizeLinear" and feeds(n.output[0]))


def _classify(graph: Any) -> FusionReport:
    consts = {t.name for t in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}

    def constant(name: str, depth: int = 0) -> bool:
        node = producer.get(name)
        if name in consts or (node is not None and node.op_type == "Constant"):
            return True
        return (node is not None and depth < 8 and node.op_type in _PASS_THROUGH
                and bool(node.input) and constant(node.input[0], depth + 1))

    ops, ints, other, act, totals = Counter(), Counter(), Counter(), Counter(), Counter()
    floats: list[tuple[str, str]] = []
    for node in graph.node:
        op = node.op_type
        ops[op if node.domain in ("", "ai.onnx") else f"{node.domain}.{op}"] += 1
        if "Conv" in op:
            kind, integer = "conv", op in INT_CONV_OPS
        elif any(w in op for w in ("MatMul", "Gemm", "Attention")):
            operands = [node.input[i] for i in (0, _B_INPUT.get(op, 1)) if i < len(node.input)]
            if not any(constant(x) for x in operands if x):
                act[op] += 1
                continue
            kind, integer = "matmul", op in INT_MATMUL_OPS
        else:
            if op.startswith("QLinear") or op in _INT_OTHER:
                other[op] += 1
            continue
        totals[kind] += 1
        if integer:
            totals[kind + "_int"] += 1
            ints[op] += 1
        else:
            floats.append((node.name, op))
    feeding = _input_quantizations(graph)
    qdq = sum(v for k, v in ops.items() if k in _QDQ) - feeding
    return FusionReport(dict(ops), totals["conv_int"], totals["conv"], totals["matmul_int"],
                        totals["matmul"], floats, qdq, dict(other), input_quant=feeding,
                        weight_only=sum(v for k, v in ints.items() if k in WEIGHT_ONLY_OPS),
                        int8_products=dict(ints), act_matmul=dict(act))


# -- does it compute the same ----------------------------------------------------------------------
@dataclass
class LayerParity:
    name: str  # torch module name of the QuantizedLayer
    rel_err: float  # max over the samples
    onnx_tensor: str = ""


@dataclass
class ParityReport:
    samples: int  # batches compared
    rows: int
    mean_rel_err: float
    max_rel_err: float  # the gate
    mean_cosine: float
    min_cosine: float
    top1_agreement: float | None  # 2-D [B, C] outputs only
    threshold: float
    ok: bool
    # the torch model's own output change when every quantized layer's input moves by
    # SPREAD_EPS relative (float32 rounding level); measured when the gate is exceeded
    rounding_spread: float | None = None
    # quality vs the fp32 model (mean cosine, or top-1 agreement for [B, C] outputs) of the
    # PyTorch quantized model and of the file, when parity() was given the float model
    quality_metric: str | None = None
    quality_torch: float | None = None
    quality_onnx: float | None = None
    gate: str = "elementwise"  # or "rounding spread": which rule decided `ok` (see parity)
    layers: list[LayerParity] = field(default_factory=list)
    first_jump: str | None = None
    notes: list[str] = field(default_factory=list)

    def line(self) -> str:
        top1 = "" if self.top1_agreement is None else f", top-1 agreement {self.top1_agreement:.2%}"
        text = (f"ONNX vs torch on {self.samples} batches ({self.rows} rows): max rel err "
                f"{self.max_rel_err:.3g} (mean {self.mean_rel_err:.3g}, gate {self.threshold:g}), "
                f"cosine min {self.min_cosine:.6f}{top1}: {'OK' if self.ok else 'FAIL'}")
        if self.rounding_spread is not None:
            text += (f" (the PyTorch model itself moves by {self.rounding_spread:.3g} when its "
                     f"quantized layers' inputs move by {SPREAD_EPS:g}: the difference is "
                     + (f"within {SPREAD_FACTOR:g}x" if self.within_spread else
                        f"more than {SPREAD_FACTOR:g}x") + " that float-rounding spread)")
        if self.quality_metric is not None:
            text += (f"; {self.quality_metric} vs fp32: PyTorch {self.quality_torch:.6f}, ONNX "
                     f"{self.quality_onnx:.6f}")
        if self.gate == "rounding spread":
            text += (f"; gate: rounding spread (error <= {SPREAD_FACTOR:g}x the spread and "
                     f"{self.quality_metric} within {QUALITY_TOL:g} of PyTorch's): "
                     f"{'OK' if self.ok else 'FAIL'}")
        if self.first_jump is not None:
            err = next(x.rel_err for x in self.layers if x.name == self.first_jump)
            text += f"; first jump at layer {self.first_jump} (rel err {err:.3g})"
        return text

    @property
    def within_spread(self) -> bool:
        return (self.rounding_spread is not None
                and self.max_rel_err <= SPREAD_FACTOR * self.rounding_spread)

    @property
    def quality_kept(self) -> bool:
        return (self.quality_onnx is not None and self.quality_torch is not None
                and self.quality_onnx >= self.quality_torch - QUALITY_TOL)

    def table(self) -> str:
        rows = [self.line()] + ([""] + [f"- {n}" for n in self.notes] if self.notes else [])
        if self.layers:
            errs = [math.inf if math.isnan(x.rel_err) else x.rel_err for x in self.layers]
            worst = errs.index(max(errs))
            rows += ["", "| # | layer | ONNX tensor | rel err | |", "|---|---|---|---|---|"]
            for i, x in enumerate(self.layers):
                flag = ", ".join(f for f, on in (("**first jump**", x.name == self.first_jump),
                                                  ("worst", i == worst)) if on)
                err = f"**{x.rel_err:.3g}**" if not x.rel_err <= self.threshold else f"{x.rel_err:.3g}"
                rows.append(f"| {i} | {x.name} | {x.onnx_tensor} | {err} | {flag} |")
        return "\n".join(rows)

    def to_dict(self) -> dict[str, Any]:
        # NaN / Infinity become the strings "NaN" / "Infinity": strict JSON has no such numbers
        return {**json.loads(json.dumps(asdict(self)), parse_constant=str),
                "within_rounding_spread": self.within_spread, "line": self.line()}


def parity(model: nn.Module, path: str | os.PathLike, samples: Iterable[Any], *, per_layer: bool = True,
           max_rel_err: float = 1e-2, threads: int = 1,
           reference: nn.Module | None = None, metric: str | None = None) -> ParityReport:
    """Run `samples` through the quantwise model and through ONNX Runtime on `path` (ORT_ENABLE_ALL,
    the graph a user deploys) and compare the outputs; `ok` when the largest relative error of a
    batch is at most `max_rel_err` (gate "elementwise").

    Where the model's own rounding makes that impossible (a deep per-token model: float32-level
    differences flip integer codes, and the flips grow layer by layer), the gate is stated
    against that: with the float model as `reference`, `ok` also when the error is at most
    SPREAD_FACTOR x `rounding_spread` AND the file's quality vs fp32 (mean cosine, or top-1
    agreement for [B, C] outputs) is within QUALITY_TOL of the PyTorch quantized model's (gate
    "rounding spread", named in the report; a model that agrees elementwise never needs it).
    `metric`: "top1" for classifiers, anything else compares by cosine; default: top-1 for
    [B, C] outputs (an embedding model's [B, D] outputs need "cosine").

    Per layer (when the file names its layer outputs in metadata "quantwise.layer_outputs"), a
    debugging copy of the graph with those tensors as extra outputs runs at ORT_ENABLE_BASIC,
    against a copy of the model with its fused fast paths removed. Extra outputs block the QDQ
    fusions, so that copy runs each product in float on dequantized values: its numerics can
    differ slightly from the fully optimized graph (as in ONNX Runtime's qdq_loss_debug tool).
    `first_jump` is the first layer whose error exceeds max(max_rel_err, 10x the median error
    of the layers before it): where the export starts to compute something else.
    """
    onnx, ort = _libs()
    path, samples = Path(path), list(samples)
    if not samples:
        raise DataLoadError("parity needs at least one sample")
    notes: list[str] = []
    sess = _session(ort, str(path), "ORT_ENABLE_ALL", threads)
    feeds = [_feeds(sess.get_inputs(), s, notes) for s in samples]
    output = sess.get_outputs()[0].name
    rel, cos, agree, n_top1 = [], [], 0, 0
    vs_fp32: dict[str, list[float]] = {"torch": [], "onnx": []}
    with torch.no_grad():
        for sample, feed in zip(samples, feeds):
            ref = to_numpy(first_tensor(run_model(model, sample)))
            got = np.asarray(sess.run([output], feed)[0], dtype=np.float64)
            if got.shape != ref.shape:
                raise CheckpointError(f"the ONNX output {output!r} has shape {got.shape}, the torch "
                                      f"model's output {ref.shape}: the file does not match the model")
            rel.append(rel_err(ref, got))
            cos.extend(row_cosines(ref, got))
            if ref.ndim == 2 and ref.shape[1] > 1 and metric in (None, "top1"):
                agree += int((ref.argmax(1) == got.argmax(1)).sum())
                n_top1 += ref.shape[0]
            if reference is not None:
                f32 = to_numpy(first_tensor(run_model(reference, sample)))
                kind = quality_metric(f32, metric)
                for key, out in (("torch", ref), ("onnx", got)):
                    vs_fp32[key].extend(quality_per_sample(f32, out, kind))
    worst = float(np.max(rel))  # np.max propagates NaN: a NaN batch fails the gate
    report = ParityReport(len(samples), len(cos), float(np.mean(rel)), worst, float(np.mean(cos)),
                          float(np.min(cos)), agree / n_top1 if n_top1 else None, max_rel_err,
                          ok=bool(worst <= max_rel_err), notes=notes)
    if reference is not None:
        report.quality_metric = ("top-1 agreement" if kind == "top1" else "mean cosine")
        report.quality_torch, report.quality_onnx = (float(np.mean(vs_fp32[k]))
                                                     for k in ("torch", "onnx"))
    if not report.ok and math.isfinite(worst):
        # Rounding to integers is discontinuous: in a deep quantized model, float32-level
        # differences (another runtime's softmax or GEMM order) flip some codes, and the flips
        # grow layer by layer. Measure how far the model moves under such noise by itself.
        report.rounding_spread = rounding_spread(model, samples)
        if reference is not None:  # the rule the docstring states; the report names it
            report.gate = "rounding spread"
            report.ok = report.within_spread and report.quality_kept
    if per_layer:
        mapping = _layer_outputs(onnx, path)
        if mapping is None:
            notes.append(f"per-layer: skipped, the file has no {LAYER_OUTPUTS_KEY!r} metadata")
        else:
            report.layers = _layer_parity(onnx, ort, model, path, mapping, samples, feeds, threads, notes)
            report.first_jump = _first_jump(report.layers, max_rel_err)
    return report


def _feeds(inputs: list[Any], sample: Any, notes: list[str]) -> dict[str, np.ndarray]:
    """Torch-form sample -> ORT feeds: dict keys by name, tensors of a tuple by position."""
    names = [i.name for i in inputs]
    if isinstance(sample, Mapping):
        missing = [n for n in names if n not in sample]
        if missing:
            raise DataLoadError(f"the ONNX graph needs input(s) {missing}, which the sample "
                                f"(keys {sorted(sample)}) lacks")
        extra = sorted(set(sample) - set(names))
        _note(notes, f"sample keys {extra} are not inputs of the ONNX graph: not passed", bool(extra))
        values = [sample[n] for n in names]
    else:
        if not isinstance(sample, (torch.Tensor, tuple, list)):
            raise DataLoadError(f"a sample must be a Tensor, a tuple of Tensors or a dict, "
                                f"got {type(sample).__name__}")
        values = [v for v in ([sample] if isinstance(sample, torch.Tensor) else sample)
                  if isinstance(v, (torch.Tensor, np.ndarray))]  # None / flags are not graph inputs
        if len(values) < len(names):
            raise DataLoadError(f"the ONNX graph has {len(names)} inputs {names}, the sample only "
                                f"{len(values)} tensor(s)")
        _note(notes, f"the sample has {len(values)} tensors, the ONNX graph {len(names)} inputs: "
                     f"the last {len(values) - len(names)} not passed", len(values) > len(names))
        values = values[:len(names)]
    return {i.name: _to_input(v, i.type) for i, v in zip(inputs, values)}


def _to_input(value: Any, ort_type: str) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        value = (value.float() if value.dtype == torch.bfloat16 else value).numpy()
    return np.ascontiguousarray(value, dtype=_NP_TYPES.get(ort_type))


def _note(notes: list[str], text: str, when: bool = True) -> None:
    if when and text not in notes:
        notes.append(text)


def _layer_outputs(onnx: Any, path: Path) -> dict[str, str] | None:
    props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    if LAYER_OUTPUTS_KEY not in props:
        return None
    try:
        mapping = json.loads(props[LAYER_OUTPUTS_KEY])
    except json.JSONDecodeError:
        mapping = None
    if not isinstance(mapping, dict) or not all(isinstance(v, str) for v in mapping.values()):
        raise CheckpointError(f"metadata {LAYER_OUTPUTS_KEY!r} of {path} must be a JSON object "
                              f"{{layer name: tensor name}}")
    return mapping


def _layer_parity(onnx: Any, ort: Any, model: nn.Module, path: Path, mapping: dict[str, str],
                  samples: list[Any], feeds: list[dict], threads: int, notes: list[str]) -> list[LayerParity]:
    debug = copy.deepcopy(model)  # the caller's model keeps its fast paths and gets no hooks
    remove_int8_graph(debug)
    remove_encoder_fastpath(debug)
    layers = {n: m for n, m in debug.named_modules() if isinstance(m, QuantizedLayer)}
    unknown = [n for n in mapping if n not in layers]
    _note(notes, f"per-layer: {unknown} are not quantized layers of the model: skipped", bool(unknown))
    wanted = {n: t for n, t in mapping.items() if n in layers}
    names = list(dict.fromkeys(wanted.values()))
    sess = _debug_session(onnx, ort, path, names, threads)

    captured: dict[str, torch.Tensor] = {}
    calls: Counter = Counter()

    def capture(name: str, module: nn.Module, args: Any, out: Any) -> None:
        calls[name] += 1
        captured.setdefault(name, out.detach().clone())  # clone: an in-place ReLU follows; a layer run twice: first call

    errors: dict[str, list[float]] = {n: [] for n in wanted}
    handles = [layers[n].register_forward_hook(functools.partial(capture, n)) for n in wanted]
    try:
        for sample, feed in zip(samples, feeds):
            captured.clear()
            calls.clear()
            with torch.no_grad():
                run_model(debug, sample)
            values = dict(zip(names, sess.run(names, feed)))
            for name, out in captured.items():
                ref, got = to_numpy(out), np.asarray(values[wanted[name]], dtype=np.float64)
                same = ref.shape == got.shape
                _note(notes, f"per-layer: {name} is {ref.shape} in torch, {wanted[name]!r} {got.shape} "
                             f"in ONNX", not same)
                errors[name].append(rel_err(ref, got) if same else math.nan)
            many = sorted(n for n, c in calls.items() if c > 1)
            _note(notes, f"per-layer: {many} run more than once per sample: first call compared", bool(many))
    finally:
        for h in handles:
            h.remove()
    idle = [n for n, e in errors.items() if not e]
    _note(notes, f"per-layer: {idle} never ran in torch: skipped", bool(idle))
    return [LayerParity(n, float(np.max(e)), wanted[n]) for n, e in errors.items() if e]


def _debug_session(onnx: Any, ort: Any, path: Path, names: list[str], threads: int) -> Any:
    """The file with the layer tensors as extra graph outputs, at ORT_ENABLE_BASIC."""
    proto = onnx.load(str(path))
    graph = proto.graph
    known = ({o for n in graph.node for o in n.output} | {i.name for i in graph.input}
             | {t.name for t in graph.initializer})
    absent = [t for t in names if t not in known]
    if absent:
        raise CheckpointError(f"metadata {LAYER_OUTPUTS_KEY!r} names tensors the graph does not have: {absent}")
    outputs = {o.name for o in graph.output}
    graph.output.extend(onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None)
                        for t in names if t not in outputs)
    with tempfile.TemporaryDirectory(prefix="quantwise-parity-") as tmp:
        debug_path = os.path.join(tmp, "debug.onnx")
        onnx.save_model(proto, debug_path, save_as_external_data=proto.ByteSize() > 1 << 30)
        return _session(ort, debug_path, "ORT_ENABLE_BASIC", threads)


def _first_jump(layers: list[LayerParity], floor: float) -> str | None:
    seen: list[float] = []
    for layer in layers:
        limit = max(floor, 10 * statistics.median(seen)) if seen else floor
        if not layer.rel_err <= limit:  # NaN is a jump
            return layer.name
        seen.append(layer.rel_err)
    return None
