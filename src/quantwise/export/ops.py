"""The quantized pieces of an export, as torch custom ops with an ONNX translation each.

torch.onnx's exporter traces the export twin (twin.py) with torch.export; each quantized step
is one custom op here, so it reaches ONNX as exactly the nodes runtimes pattern-match:

| op                        | torch (reference)                      | ONNX                                   |
|---------------------------|----------------------------------------|----------------------------------------|
| quantwise::qdq            | fake-quantize, ONNX-exact rounding     | QuantizeLinear -> DequantizeLinear     |
| quantwise::dq_weight      | (codes - zp) * scale along an axis     | DequantizeLinear of the int8 initializer |
| quantwise::dynamic_matmul | run-time symmetric int8 (per token or per tensor) x int8 weight | ReduceMax/ReduceMin, Div, QuantizeLinear, com.microsoft MatMulIntegerToFloat |
| quantwise::matmul_nbits   | int4 per-group weight-only matmul      | com.microsoft MatMulNBits              |
| quantwise::dq_int4        | 4-bit codes -> float (axis or blocks)  | INT4 initializer -> DequantizeLinear (opset 21) |

The torch implementations are the reference the tests compare the runtime with; the exporter
never runs them on real data (torch.export uses the fake kernels for shapes).
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import onnx
import torch
from onnxscript import opset17 as op17
from onnxscript import opset18 as op
from onnxscript import opset21 as op21
from onnxscript.values import Opset

from quantwise.numerics import TINY

_MS = Opset("com.microsoft", 1)
OPSET = {"version": 18}  # the opset being exported (set by export_onnx for the translations)


def _register_matmul_nbits() -> None:
    """onnx ships no schema for ONNX Runtime's contrib ops; onnxscript needs one to emit a node."""
    if "MatMulNBits" in _MS:
        return
    S = onnx.defs.OpSchema
    param = S.FormalParameter
    attr = S.Attribute
    schema = S(
        "MatMulNBits", "com.microsoft", 1, doc="ONNX Runtime's blocked low-bit weight MatMul",
        inputs=[param("A", "T1"), param("B", "T2"), param("scales", "T1")],
        outputs=[param("Y", "T1")],
        type_constraints=[("T1", ["tensor(float)", "tensor(float16)"], "activations"),
                          ("T2", ["tensor(uint8)"], "packed weights")],
        attributes=[attr("K", S.AttrType.INT, "K"), attr("N", S.AttrType.INT, "N"),
                    attr("bits", S.AttrType.INT, "bits"), attr("block_size", S.AttrType.INT, "block")])
    onnx.defs.register_schema(schema)


_register_matmul_nbits()


def _register_matmul_integer_to_float() -> None:
    """ONNX Runtime's integer GEMM with the float rescale (and zero points) in the kernel."""
    if "MatMulIntegerToFloat" in _MS:
        return
    S = onnx.defs.OpSchema
    param = S.FormalParameter
    opt = S.FormalParameterOption.Optional
    schema = S(
        "MatMulIntegerToFloat", "com.microsoft", 1, doc="ONNX Runtime's u8/s8 GEMM -> float",
        inputs=[param("A", "T1"), param("B", "T2"), param("a_scale", "T3"), param("b_scale", "T3"),
                param("a_zero_point", "T1", param_option=opt),
                param("b_zero_point", "T2", param_option=opt),
                param("bias", "T3", param_option=opt)],
        outputs=[param("Y", "T3")],
        type_constraints=[("T1", ["tensor(uint8)", "tensor(int8)"], "A"),
                          ("T2", ["tensor(uint8)", "tensor(int8)"], "B"),
                          ("T3", ["tensor(float)"], "scales, bias and output")])
    onnx.defs.register_schema(schema)


_register_matmul_integer_to_float()


def _const(value, dtype) -> "op.Constant":
    return op.Constant(value=onnx.numpy_helper.from_array(np.asarray(value, dtype=dtype)))


def _qdtype(qmin: int):
    return np.uint8 if qmin >= 0 else np.int8


# -- qdq: activations with calibrated (static) parameters -----------------------------------------

@torch.library.custom_op("quantwise::qdq", mutates_args=())
def qdq(x: torch.Tensor, scale: float, zero_point: int, qmin: int, qmax: int) -> torch.Tensor:
    s = torch.tensor(scale, dtype=torch.float32)
    q = torch.div(x.float(), s).round_().add_(zero_point).clamp_(qmin, qmax)
    return q.sub_(zero_point).mul_(s).to(x.dtype)


@qdq.register_fake
def _(x, scale, zero_point, qmin, qmax):
    return torch.empty_like(x)


def qdq_onnx(x, scale: float, zero_point: int, qmin: int, qmax: int):
    # QuantizeLinear saturates to the type's range: callers only pass full-range uint8/int8.
    s = _const(scale, np.float32)
    z = _const(zero_point, _qdtype(qmin))
    return op.DequantizeLinear(op.QuantizeLinear(x, s, z), s, z)


# -- dq_weight: integer weights stay integer in the file ------------------------------------------

@torch.library.custom_op("quantwise::dq_weight", mutates_args=())
def dq_weight(codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
              axis: int) -> torch.Tensor:
    shape = [1] * codes.dim()
    if scale.dim() == 1:
        shape[axis] = -1
    return (codes.to(torch.int32) - zero_point.to(torch.int32).reshape(shape)).float() * scale.reshape(shape)


@dq_weight.register_fake
def _(codes, scale, zero_point, axis):
    return torch.empty(codes.shape, dtype=torch.float32)


def dq_weight_onnx(codes, scale, zero_point, axis: int):
    if len(scale.shape) == 1:
        return op.DequantizeLinear(codes, scale, zero_point, axis=axis)
    return op.DequantizeLinear(codes, scale, zero_point)  # per-tensor: scalar scale


# -- dynamic_matmul: run-time activation scales, integer GEMM -------------------------------------

@torch.library.custom_op("quantwise::dynamic_matmul", mutates_args=())
def dynamic_matmul(x: torch.Tensor, codes_kn: torch.Tensor, w_scale: torch.Tensor,
                   bias: Optional[torch.Tensor], per_token: bool, qmax: int,
                   w_zero_point: int = 0) -> torch.Tensor:
    """codes_kn: int8 codes, or uint8 codes + 128 with w_zero_point 128 (ort_exactness)."""
    k, n = codes_kn.shape
    x2 = x.reshape(-1, k).float()
    dims = 1 if per_token else (0, 1)
    s = x2.abs().amax(dim=dims, keepdim=True).div(qmax).clamp(min=TINY)
    q = torch.div(x2, s).round().clamp(-qmax, qmax)
    acc = (q.double() @ (codes_kn.double() - w_zero_point)).float()  # exact for any K an int32 GEMM can hold
    y = acc * s * w_scale
    if bias is not None:
        y = y + bias
    return y.reshape(*x.shape[:-1], n)


@dynamic_matmul.register_fake
def _(x, codes_kn, w_scale, bias, per_token, qmax, w_zero_point=0):
    return x.new_empty(*x.shape[:-1], codes_kn.shape[1], dtype=torch.float32)


def dynamic_matmul_onnx(x, codes_kn, w_scale, bias, per_token: bool, qmax: int,
                        w_zero_point: int = 0):
    """Four passes over the activations (max, min, divide, quantize) and one fused GEMM.

    ONNX Runtime's MatMulIntegerToFloat takes an [..., M, 1] A scale and an [N] B scale and
    applies both in the kernel (measured exact, 1.32), on the N-D input as it is: no Reshape,
    so shape inference keeps the rank and ONNX Runtime can fuse the bias Add that follows into
    BiasGelu / SkipLayerNormalization. The bias stays outside the kernel, which would scale it by
    the row scale. x / s is quantized by QuantizeLinear with scale 1 (rounds half to even,
    saturates, casts in one pass): a per-axis QuantizeLinear with the row scales would save the
    Div, but OpenVINO broadcasts a run-time per-axis scale along the wrong axis.
    """
    keep = 1 if per_token else 0
    if OPSET["version"] >= 18:
        axes = (_const([-1], np.int64),) if per_token else ()
        top = op.ReduceMax(x, *axes, keepdims=keep)
        bottom = op.ReduceMin(x, *axes, keepdims=keep)
    else:  # axes were an attribute before opset 18
        axes = {"axes": [-1]} if per_token else {}
        top = op17.ReduceMax(x, keepdims=keep, **axes)
        bottom = op17.ReduceMin(x, keepdims=keep, **axes)
    amax = op.Max(top, op.Neg(bottom))  # max |x| without an Abs pass over the activations
    s = op.Max(op.Div(amax, _const(float(qmax), np.float32)), _const(TINY, np.float32))
    # codes + 128 as uint8 with zero point 128: the same integers, and ONNX Runtime's fast
    # (VNNI) integer GEMM is u8 x s8 (s8 x s8 measured 2.6x slower on MiniLM)
    zp = _const(128, np.uint8)
    q = op.QuantizeLinear(op.Div(x, s), _const(1.0, np.float32), zp)
    w_zp = (_const(w_zero_point, np.uint8),) if w_zero_point else ()
    y = _MS.MatMulIntegerToFloat(q, codes_kn, s, w_scale, zp, *w_zp)
    return y if bias is None else op.Add(y, bias)


# -- matmul_nbits: int4 weight-only, ONNX Runtime's blocked kernel ---------------------------------

@torch.library.custom_op("quantwise::matmul_nbits", mutates_args=())
def matmul_nbits(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor,
                 bias: Optional[torch.Tensor], k: int, n: int, block: int) -> torch.Tensor:
    """packed: [N, K/block, block/2] uint8, element 2j in the low nibble, unsigned codes with an
    implicit zero point of 8 (MatMulNBits' layout); scales: [N * K/block]."""
    low, high = packed & 0x0F, packed >> 4
    codes = torch.stack([low, high], dim=-1).reshape(n, k).to(torch.float32) - 8
    w = (codes.reshape(n, -1, block) * scales.reshape(n, -1, 1)).reshape(n, k)
    y = x.float() @ w.t()
    if bias is not None:
        y = y + bias
    return y


@matmul_nbits.register_fake
def _(x, packed, scales, bias, k, n, block):
    return x.new_empty(*x.shape[:-1], n, dtype=torch.float32)


def matmul_nbits_onnx(x, packed, scales, bias, k: int, n: int, block: int):
    y = _MS.MatMulNBits(x, packed, scales, K=k, N=n, bits=4, block_size=block)
    return y if bias is None else op.Add(y, bias)


# -- dq_int4: 4-bit weights, int4 in the file (opset 21: INT4 tensors, blocked DequantizeLinear) ---

@torch.library.custom_op("quantwise::dq_int4", mutates_args=())
def dq_int4(codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, axis: int,
            block: int, signed: bool) -> torch.Tensor:
    """codes (int8/uint8 holding 4-bit values) -> float: per tensor (scalar scale), per axis
    (1-D scale along `axis`) or in blocks of `block` along `axis` (scale shaped like codes
    with that dim divided by `block`)."""
    values = codes.to(torch.int32)
    if block:
        scale = scale.repeat_interleave(block, dim=axis)
        zero_point = zero_point.repeat_interleave(block, dim=axis)
    elif scale.dim() == 1:
        shape = [1] * codes.dim()
        shape[axis] = -1
        scale, zero_point = scale.reshape(shape), zero_point.reshape(shape)
    return (values - zero_point.to(torch.int32)).float() * scale


@dq_int4.register_fake
def _(codes, scale, zero_point, axis, block, signed):
    return torch.empty(codes.shape, dtype=torch.float32)


def dq_int4_onnx(codes, scale, zero_point, axis: int, block: int, signed: bool):
    four = onnx.TensorProto.INT4 if signed else onnx.TensorProto.UINT4
    # The Casts of constant codes become INT4 initializers after export (int4_initializers).
    x, z = op21.Cast(codes, to=four), op21.Cast(zero_point, to=four)
    if block:
        return op21.DequantizeLinear(x, scale, z, axis=axis, block_size=block)
    return op21.DequantizeLinear(x, scale, z, axis=axis)


def int4_initializers(model) -> int:
    """Replace Cast(int8 initializer -> INT4/UINT4) by an INT4/UINT4 initializer (two codes per
    byte in the file); returns how many. `model` is the exporter's onnx_ir Model."""
    import ml_dtypes
    import onnx_ir as ir

    kinds = {int(ir.DataType.INT4): (ir.DataType.INT4, ml_dtypes.int4),
             int(ir.DataType.UINT4): (ir.DataType.UINT4, ml_dtypes.uint4)}
    graph, done = model.graph, 0
    for node in list(graph):
        if node.op_type != "Cast" or node.domain not in ("", "ai.onnx"):
            continue
        to = node.attributes.get("to")
        source = node.inputs[0]
        if to is None or int(to.value) not in kinds or source is None or source.const_value is None:
            continue
        dtype, np_type = kinds[int(to.value)]
        array = source.const_value.numpy().astype(np_type)
        value = ir.Value(name=f"{source.name}_int4", shape=ir.Shape(array.shape),
                         type=ir.TensorType(dtype), const_value=ir.Tensor(array, dtype=dtype))
        graph.register_initializer(value)
        ir.convenience.replace_all_uses_with(node.outputs[0], value)
        graph.remove(node, safe=True)
        if not source.uses() and source.name in graph.initializers:
            del graph.initializers[source.name]
        done += 1
    return done


def translation_table() -> dict:
    """custom_translation_table for torch.onnx.export."""
    ops = torch.ops.quantwise
    return {ops.qdq.default: qdq_onnx, ops.dq_weight.default: dq_weight_onnx,
            ops.dynamic_matmul.default: dynamic_matmul_onnx,
            ops.matmul_nbits.default: matmul_nbits_onnx, ops.dq_int4.default: dq_int4_onnx}


def pack_nbits(codes: torch.Tensor, block: int) -> torch.Tensor:
    """Signed int4 codes [N, K] -> MatMulNBits' [N, K/block, block/2] uint8 (code + 8 per nibble)."""
    n, k = codes.shape
    u = (codes.to(torch.int16) + 8).to(torch.uint8).reshape(n, k // 2, 2)
    return (u[..., 0] | (u[..., 1] << 4)).reshape(n, k // block, block // 2).contiguous()
