"""Is ONNX Runtime's u8 x s8 integer GEMM exact on this CPU? Measured, like kernels/probe.py.

ONNX Runtime (MLAS) picks its kernels from the CPU itself. Without VNNI its u8 x s8 kernels add
products in int16 pairs, as oneDNN's do, which saturates for full-range codes (its own docs
recommend reduce_range, i.e. 7-bit weights, there). A one-node MatMulInteger graph is run on
extreme codes and compared with the exact product; an export whose int8 weight codes exceed
what the measured kernel sums exactly is reported, with what to do.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from torch import nn

from quantwise.kernels.probe import EXACT, INEXACT, PAIR_LIMIT, PAIRS
from quantwise.modules import QuantizedLayer
from quantwise.spec import Format


def _exact_on(ulo: int, uhi: int, wlo: int, whi: int) -> bool:
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    m, k, n = 8, 256, 48
    rng = np.random.default_rng(0)
    a = np.where(rng.random((m, k)) < 0.5, ulo, uhi).astype(np.uint8)
    b = np.where(rng.random((k, n)) < 0.5, wlo, whi).astype(np.int8)
    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["A", "B"], ["Y"])], "probe",
        [helper.make_tensor_value_info("A", TensorProto.UINT8, [m, k])],
        [helper.make_tensor_value_info("Y", TensorProto.INT32, [m, n])],
        [onnx.numpy_helper.from_array(b, "B")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (y,) = sess.run(None, {"A": a})
    return bool(np.array_equal(y.astype(np.int64), a.astype(np.int64) @ b.astype(np.int64)))


@functools.cache
def ort_accumulation() -> str:
    """"exact", "int16_pairs" or "inexact" for ONNX Runtime's MatMulInteger u8 x s8 here;
    "unknown" when onnxruntime is not installed (nothing to warn about: it cannot run here)."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return "unknown"
    if _exact_on(0, 255, -128, 127):
        return EXACT
    if _exact_on(0, 255, -64, 64) and _exact_on(0, 127, -128, 127):
        return PAIRS
    return INEXACT


def saturation_note(model: nn.Module) -> str | None:
    """A warning when ONNX Runtime on this CPU would saturate on the model's int8 weight codes."""
    worst = 0
    for layer in model.modules():
        if (isinstance(layer, QuantizedLayer) and layer.act_spec is not None
                and layer.weight_spec.format == Format.INT8 and layer.kind != "embedding"):
            worst = max(worst, int(layer.codes().to(torch.int16).abs().max()))
    acc = ort_accumulation()
    if worst == 0 or acc in (EXACT, "unknown") or (acc == PAIRS and 2 * 255 * worst <= PAIR_LIMIT):
        return None
    return (f"ONNX Runtime's u8 x s8 integer kernels on this CPU add products in int16 pairs "
            f"({acc}), which saturates for this model's weight codes (max |code| {worst} > 64): "
            f"its outputs may be wrong there. Quantize the model on such a CPU (quantwise then "
            f"uses 7-bit weights) or run the export on a CPU with VNNI")
