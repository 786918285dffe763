"""What OpenVINO really runs for an exported file: its CPU plugin compiles the ONNX QDQ graph and
decides per op whether to execute in int8; the runtime model's execution info says what it chose.

OpenVINO reads DequantizeLinear -> MatMul / Conv patterns (static QDQ) as int8 FullyConnected /
Convolution, and the per-token pattern the export writes (QuantizeLinear -> com.microsoft
MatMulIntegerToFloat: all-MiniLM-L6-v2 w8a8-dynamic 36/36 FullyConnected in int8), but the
older MatMulInteger -> Cast -> Mul pattern it ran in float32 (0/36), so the report is the only
way to know.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from quantwise.errors import ModelLoadError

# runtime layer types that carry a weight (OpenVINO turns MatMul with a constant into FullyConnected)
_CONV = frozenset({"Convolution", "GroupConvolution", "Deconvolution"})
_FC = frozenset({"FullyConnected"})
_INT8 = frozenset({"u8", "i8"})


@dataclass
class OpenVINOReport:
    version: str
    conv_int8: int
    conv_total: int
    fc_int8: int
    fc_total: int
    layer_types: dict[str, int] = field(default_factory=dict)  # "type precision" -> count

    def line(self) -> str:
        parts = [f"{i}/{n} {what}" for i, n, what in ((self.conv_int8, self.conv_total, "convs"),
                                                     (self.fc_int8, self.fc_total,
                                                      "fully-connected layers")) if n]
        floats = sorted(k for k in self.layer_types
                        if k.split()[0] in _CONV | _FC and k.split()[1] not in _INT8)
        return (f"OpenVINO {self.version} runs {' and '.join(parts) or 'no weight layers'} in "
                f"int8" + (f"; float: {', '.join(f'{k} x{self.layer_types[k]}' for k in floats)}"
                           if floats else ""))

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version, "conv_int8": self.conv_int8, "conv_total": self.conv_total,
                "fc_int8": self.fc_int8, "fc_total": self.fc_total,
                "layer_types": dict(self.layer_types), "line": self.line()}


def available() -> bool:
    try:
        import openvino  # noqa: F401  (only whether it imports)
    except ImportError:
        return False
    return True


def runtime_layers(compiled: Any) -> Counter:
    """("layerType runtimePrecision" -> count) of a compiled model's execution graph."""
    counts: Counter = Counter()
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        kind = info["layerType"].astype(str) if "layerType" in info else op.get_type_name()
        precision = info["runtimePrecision"].astype(str) if "runtimePrecision" in info else "?"
        counts[f"{kind} {precision}"] += 1
    return counts


def report_from_compiled(compiled: Any) -> OpenVINOReport:
    import openvino as ov

    counts = runtime_layers(compiled)

    def count(kinds: frozenset, int8: bool) -> int:
        return sum(v for k, v in counts.items()
                   if k.split()[0] in kinds and (not int8 or k.split()[1] in _INT8))

    return OpenVINOReport(ov.__version__.split("-")[0], count(_CONV, True), count(_CONV, False),
                          count(_FC, True), count(_FC, False), dict(sorted(counts.items())))


def openvino_report(path: str | os.PathLike, threads: int = 1) -> OpenVINOReport:
    """Compile `path` (ONNX or OpenVINO IR) for the CPU in float32 precision (so int8 is
    OpenVINO's own choice, not a bf16 hint) and count which weight layers run in int8."""
    try:
        import openvino as ov
    except ImportError:
        raise ModelLoadError("the OpenVINO report needs the openvino package: "
                             "pip install 'quantwise[openvino]'") from None
    core = ov.Core()
    core.set_property("CPU", {"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": "f32"})
    try:
        compiled = core.compile_model(str(path), "CPU")
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"OpenVINO could not compile {path}: {first}") from None
    return report_from_compiled(compiled)
