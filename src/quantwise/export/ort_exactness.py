"""Is ONNX Runtime's integer GEMM exact on this CPU? Measured, like kernels/probe.py.

ONNX Runtime (MLAS) picks its kernels from the CPU itself. Without VNNI its u8 x s8 kernels add
products in int16 pairs, as oneDNN's do, which saturates for full-range codes (its own docs
recommend reduce_range or u8 x u8 there); its u8 x u8 kernels widen to int16 first and are
exact. A one-node MatMulInteger graph is run on extreme codes and compared with the exact
product. MatMulIntegerToFloat, QGemm and QLinearConv run the same MLAS QGEMM kernels (on an
AVX2-only EPYC MatMulIntegerToFloat's u8 x s8 was measured to saturate and its u8 x u8 to be
exact, as MatMulInteger's). Where u8 x s8 would saturate on a model's weight codes, the export
writes the same weights as uint8 with zero point 128 (`weight_dtype`), which the u8 x u8
kernels sum exactly.
"""

from __future__ import annotations

import functools
from typing import Optional

import numpy as np
import torch
from torch import nn

from quantwise.errors import ConfigError
from quantwise.kernels.probe import EXACT, INEXACT, PAIR_LIMIT, PAIRS
from quantwise.modules import QuantizedLayer
from quantwise.spec import Format

WEIGHT_DTYPES = ("auto", "int8", "uint8")


def _exact_on(ulo: int, uhi: int, wlo: int, whi: int, unsigned: bool = False) -> bool:
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    m, k, n = 8, 256, 48
    rng = np.random.default_rng(0)
    a = np.where(rng.random((m, k)) < 0.5, ulo, uhi).astype(np.uint8)
    b = np.where(rng.random((k, n)) < 0.5, wlo, whi).astype(np.int16)
    inputs, nodes_in = [], ["A", "B"]
    if unsigned:  # the same integers as uint8 codes with zero point 128
        weights = onnx.numpy_helper.from_array((b + 128).astype(np.uint8), "B")
        inputs = [onnx.numpy_helper.from_array(np.array(0, np.uint8), "AZ"),
                  onnx.numpy_helper.from_array(np.array(128, np.uint8), "BZ")]
        nodes_in += ["AZ", "BZ"]
    else:
        weights = onnx.numpy_helper.from_array(b.astype(np.int8), "B")
    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", nodes_in, ["Y"])], "probe",
        [helper.make_tensor_value_info("A", TensorProto.UINT8, [m, k])],
        [helper.make_tensor_value_info("Y", TensorProto.INT32, [m, n])],
        [weights, *inputs])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (y,) = sess.run(None, {"A": a})
    return bool(np.array_equal(y.astype(np.int64), a.astype(np.int64) @ b.astype(np.int64)))


def _installed() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


@functools.cache
def ort_accumulation() -> str:
    """"exact", "int16_pairs" or "inexact" for ONNX Runtime's MatMulInteger u8 x s8 here;
    "unknown" when onnxruntime is not installed (nothing to warn about: it cannot run here)."""
    if not _installed():
        return "unknown"
    if _exact_on(0, 255, -128, 127):
        return EXACT
    if _exact_on(0, 255, -64, 64) and _exact_on(0, 127, -128, 127):
        return PAIRS
    return INEXACT


@functools.cache
def ort_unsigned_exact() -> bool:
    """ONNX Runtime's u8 x u8 MatMulInteger sums full-range codes exactly here."""
    return _installed() and _exact_on(0, 255, -128, 127, unsigned=True)


def widest_code(model: nn.Module) -> int:
    """The largest |code| of the model's 8-bit weights that an integer GEMM multiplies."""
    worst = 0
    for layer in model.modules():
        if (isinstance(layer, QuantizedLayer) and layer.act_spec is not None
                and layer.weight_spec.format == Format.INT8 and layer.kind != "embedding"):
            worst = max(worst, int(layer.codes().to(torch.int16).abs().max()))
    return worst


def saturates(worst: int) -> bool:
    """ONNX Runtime's u8 x s8 kernels here would saturate on weight codes up to |worst|."""
    acc = ort_accumulation()
    return worst > 0 and acc not in (EXACT, "unknown") and not (
        acc == PAIRS and 2 * 255 * worst <= PAIR_LIMIT)


def choose_weight_dtype(model: nn.Module, requested: str = "auto") -> tuple[bool, Optional[str]]:
    """(write 8-bit weights as uint8?, the note the export reports).

    "auto": uint8 only where ONNX Runtime's u8 x s8 kernels here would saturate on the model's
    codes and its u8 x u8 kernels are exact; "int8" / "uint8": as asked (a warning when int8
    would saturate here)."""
    if requested not in WEIGHT_DTYPES:
        raise ConfigError(f"weight_dtype must be one of {', '.join(WEIGHT_DTYPES)}; got {requested!r}")
    worst = widest_code(model)
    if worst == 0:
        return False, None
    if requested == "uint8":
        return True, ("8-bit weights written as uint8 with zero point 128 (the same values), as "
                      "asked: exact in ONNX Runtime's u8 x u8 kernels on every CPU, slower than "
                      "u8 x s8 where the CPU has VNNI")
    if not saturates(worst):
        return False, None
    acc = ort_accumulation()
    if requested == "auto" and ort_unsigned_exact():
        return True, (f"ONNX Runtime's u8 x s8 integer kernels on this CPU add products in int16 "
                      f"pairs ({acc}) and would saturate on this model's weight codes (max |code| "
                      f"{worst} > 64): its 8-bit weights were written as uint8 with zero point 128 "
                      f"(the same values), which its u8 x u8 kernels sum exactly, at about half "
                      f"the speed of u8 x s8 (ResNet-18 on a VNNI CPU: 2.0x slower). Faster and "
                      f"exact here: quantize the model on this CPU (quantwise then uses 7-bit "
                      f"weights); for a CPU with VNNI, pass --weight-dtype int8")
    return False, (f"ONNX Runtime's u8 x s8 integer kernels on this CPU add products in int16 "
                   f"pairs ({acc}), which saturates for this model's weight codes (max |code| "
                   f"{worst} > 64): its outputs may be wrong here. Export with --weight-dtype "
                   f"uint8 (exact u8 x u8 kernels), quantize the model on such a CPU (quantwise "
                   f"then uses 7-bit weights) or run the export on a CPU with VNNI")


def saturation_note(model: nn.Module) -> str | None:
    """A warning when ONNX Runtime on this CPU would saturate on the model's int8 weight codes
    as written with signed weights."""
    return choose_weight_dtype(model, "int8")[1]
