"""The export twin: the quantized model rewritten with exportable ops (export/ops.py).

Each QuantizedLayer becomes a LayerTwin computing the same thing in ONNX terms: calibrated
input Q/DQ, integer weight initializers behind DequantizeLinear, run-time int8 activations
with MatMulInteger, int4 weights as MatMulNBits. Where the int8 graph path (int8graph.py) is
installed, its decisions are mirrored: Q/DQ pairs sit exactly where the PyTorch model carries
uint8 codes (after a fused ReLU, around max-pools), and convs add a Q/DQ on their own output
with the calibrated output range, so that ONNX Runtime's QDQ fusions turn every quantized conv
into QLinearConv (which needs a quantized output) and residual adds into QLinearAdd.

What cannot be expressed exactly is exported in float and listed in `notes` (never silently).
"""

from __future__ import annotations

import copy
from typing import Optional

import torch
import torch.nn.functional as F
from torch import fx, nn

from quantwise.encoder import remove_encoder_fastpath
from quantwise.export import ops  # noqa: F401 - registers the custom ops
from quantwise.int8graph import FusedConv, Uint8MaxPool, _GraphForward
from quantwise.modules import QuantizedLayer
from quantwise.spec import Format, PerChannel, PerGroup, PerTensor, PerToken

_QDQ = torch.ops.quantwise
NBITS_BLOCKS = (16, 32, 64, 128, 256)


def _relu_range(q: tuple[float, int]) -> tuple[float, int]:
    """uint8 (scale, zp) for relu(y) from y's calibrated (scale, zp): [0, max] onto 0..255, so
    that ONNX Runtime can drop the ReLU into the quantization (zero point 0)."""
    scale, zp = q
    top = (255 - zp) * scale
    return (top / 255 if top > 0 else scale), 0


class LayerTwin(nn.Module):
    """One QuantizedLayer, float in and float out, as exportable ops."""

    def __init__(self, layer: QuantizedLayer, name: str, quantize_input: bool = True,
                 notes: Optional[dict] = None) -> None:
        super().__init__()
        self.kind, self.args, self.layer_name = layer.kind, dict(layer.layer_args), name
        spec, act = layer.weight_spec, layer.act_spec
        self.in_q = None
        if act is not None and not layer.dynamic and quantize_input:
            self.in_q = (float(layer.input_scale), int(layer.input_zero_point), act.qmin, act.qmax)
        self.register_buffer("bias", None if layer.bias is None else layer.bias.detach().float().clone())
        self.mode, note = self._weights(layer, spec, act)
        if note and notes is not None:
            notes[name] = note

    # -- weights -------------------------------------------------------------------------------
    def _weights(self, layer: QuantizedLayer, spec, act) -> tuple[str, Optional[str]]:
        fmt, g = spec.format, spec.granularity
        codes = layer.codes()
        linear = self.kind == "linear"
        if self.kind == "embedding":
            return self._embedding(layer, codes, fmt, g)
        if fmt in (Format.FP16, Format.BF16):
            # half in the file, Cast at run time
            self.register_buffer("weight", codes.t().contiguous() if linear else codes.clone())
            return "cast", None
        if fmt in (Format.FP8_E4M3, Format.FP8_E5M2) or fmt == Format.FP32:
            return self._float(layer, f"{fmt.value} weights exported as float32")
        if layer.dynamic:
            if linear and act is not None and layer.weight_zero_point is None \
                    and isinstance(g, (PerChannel, PerTensor)) and codes.dtype == torch.int8:
                self.register_buffer("codes", codes.t().contiguous())  # [K, N] for MatMulInteger
                self.register_buffer("w_scale", layer.weight_scale.float().expand(codes.shape[0]).contiguous())
                self.per_token = isinstance(act.granularity, PerToken)
                self.qmax = act.qmax
                return "dynamic", None
            return self._float(layer, "dynamic activations here need a Linear with symmetric "
                                      "int8 weights; exported with float activations")
        block = _nbits_block(layer, codes, fmt, g, act)
        if block:  # int4 weight-only Linear: ONNX Runtime's MatMulNBits keeps it packed
            n, k = codes.shape
            scale = layer.weight_scale.float().reshape(n, -1)
            self.register_buffer("packed", ops.pack_nbits(codes, block))
            self.register_buffer("scales", scale.repeat_interleave(k // block // scale.shape[1], dim=1)
                                 .reshape(-1).contiguous())
            self.nbits = (k, n, block)
            return "nbits", None
        if fmt.bits == 4:
            return self._int4(layer, codes, fmt, g)
        if isinstance(g, PerGroup):
            return self._float(layer, f"per-group ({g.size}) {fmt.value} weights of this layer are "
                                      "not a MatMulNBits case; exported as float32")
        # integer codes, per tensor or per channel: int8 initializer + DequantizeLinear
        storage = torch.uint8 if not fmt.is_signed else torch.int8
        zp = layer.zero_points().to(storage)
        scale = layer.weight_scale.float()
        axis = g.axis % codes.dim() if isinstance(g, PerChannel) else 0
        if linear:
            codes, axis = codes.t(), 1  # [K, N]: MatMul's layout, no Transpose node
        self.register_buffer("codes", codes.to(storage).contiguous())
        self.register_buffer("w_scale", scale.contiguous())
        self.register_buffer("w_zero_point", zp.reshape(scale.shape).contiguous())
        self.axis = axis
        if linear and self.in_q is not None and self.bias is not None:
            # ONNX Runtime turns MatMul + Add of a 2-D input into Gemm, and runs that as QGemm
            # only with an int32 bias (scale = input scale x weight scale): quantize it so (a
            # 3-D MatMul keeps its float bias: MatMulIntegerToFloat takes it as it is)
            bias_scale = (self.in_q[0] * scale).expand(codes.shape[1]).contiguous()
            self.register_buffer("bias_codes", torch.round(self.bias / bias_scale)
                                 .clamp(-2 ** 31, 2 ** 31 - 128).to(torch.int32))
            self.register_buffer("bias_scale", bias_scale)
            self.register_buffer("bias_zero_point", torch.zeros_like(self.bias_codes))
        note = None if fmt.bits == 8 else f"{fmt.value} codes stored as 8-bit in the ONNX file"
        return "dq", note

    def _int4(self, layer: QuantizedLayer, codes: torch.Tensor, fmt, g) -> tuple[str, None]:
        """4-bit codes kept 4-bit in the file: INT4/UINT4 initializer + DequantizeLinear, per
        axis or in blocks along the input dim (opset 21)."""
        storage = torch.int8 if fmt.is_signed else torch.uint8
        scale, zp = layer.weight_scale.float(), layer.zero_points().to(storage)
        axis, block = 0, 0
        if isinstance(g, PerGroup):
            axis, block = 1, g.size
            scale, zp = scale.reshape(codes.shape[0], -1), zp.reshape(codes.shape[0], -1)
        elif isinstance(g, PerChannel):
            axis = g.axis % codes.dim()
        if self.kind == "linear":  # [K, N] for MatMul: the blocked / channel axis moves
            codes = codes.t()
            axis = 1 - axis if (block or isinstance(g, PerChannel)) else 0
            if block:
                scale, zp = scale.t(), zp.t()
        self.register_buffer("codes", codes.to(storage).contiguous())
        self.register_buffer("w_scale", scale.contiguous())
        self.register_buffer("w_zero_point", zp.reshape(scale.shape).contiguous())
        self.int4 = (axis, block, fmt.is_signed)
        return "dq4", None

    def _float(self, layer: QuantizedLayer, note: str) -> tuple[str, str]:
        w = _dequantized_weight(layer)
        self.register_buffer("weight", w.t().contiguous() if self.kind == "linear" else w)
        return "float", note

    def _embedding(self, layer, codes, fmt, g) -> tuple[str, Optional[str]]:
        if fmt.is_integer and fmt.bits == 8 and not isinstance(g, PerGroup):
            self.register_buffer("codes", codes)
            scale = layer.weight_scale.float()
            self.register_buffer("w_scale", scale.expand(codes.shape[0]).contiguous())
            self.register_buffer("w_zero_point", layer.zero_points().to(torch.float32)
                                 .expand(codes.shape[0]).contiguous())
            return "gather", None
        if fmt.bits == 4:
            return self._int4(layer, codes, fmt, g)
        w = _dequantized_weight(layer)
        self.register_buffer("weight", w)
        return "float", f"{fmt.value} embedding exported as a float32 table"

    # -- forward -------------------------------------------------------------------------------
    def unsigned_weights(self) -> bool:
        """Rewrite signed 8-bit integer weights as uint8 codes + 128 with zero point + 128: the
        same values, for runtimes whose u8 x s8 kernels saturate (ort_exactness)."""
        if self.mode not in ("dq", "dynamic") or self.codes.dtype != torch.int8:
            return False
        self.codes = (self.codes.to(torch.int16) + 128).to(torch.uint8)
        if self.mode == "dynamic":
            self.w_offset = 128
        else:
            self.w_zero_point = (self.w_zero_point.to(torch.int16) + 128).to(torch.uint8)
        return True

    def weight_value(self) -> torch.Tensor:
        if self.mode == "dq":
            return _QDQ.dq_weight(self.codes, self.w_scale, self.w_zero_point, self.axis)
        if self.mode == "dq4":
            return _QDQ.dq_int4(self.codes, self.w_scale, self.w_zero_point, *self.int4)
        return self.weight.float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "embedding":
            return self._embed(x)
        if self.mode == "dynamic":
            return _QDQ.dynamic_matmul(x, self.codes, self.w_scale, self.bias, self.per_token,
                                       self.qmax, getattr(self, "w_offset", 0))
        if self.mode == "nbits":
            return _QDQ.matmul_nbits(x, self.packed, self.scales, self.bias, *self.nbits)
        if self.in_q is not None:
            x = _QDQ.qdq(x, *self.in_q)
        w = self.weight_value()
        if self.kind == "linear":
            y = torch.matmul(x, w)
            if hasattr(self, "bias_codes") and x.dim() == 2:  # only Gemm (2-D) needs it
                return y + _QDQ.dq_weight(self.bias_codes, self.bias_scale, self.bias_zero_point, 0)
            return y if self.bias is None else y + self.bias
        a = self.args
        if a.get("transposed"):
            return F.conv_transpose2d(x, w, self.bias, a["stride"], a["padding"],
                                      a.get("output_padding", 0), a["groups"], a["dilation"])
        conv = F.conv1d if w.dim() == 3 else F.conv2d
        return conv(x, w, self.bias, a["stride"], a["padding"], a["dilation"], a["groups"])

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        if self.mode in ("float", "dq4"):
            return F.embedding(ids, self.weight_value())
        rows = F.embedding(ids, self.codes).float()
        zp = F.embedding(ids, self.w_zero_point.unsqueeze(-1))
        scale = F.embedding(ids, self.w_scale.unsqueeze(-1))
        return (rows - zp) * scale


def _nbits_block(layer: QuantizedLayer, codes: torch.Tensor, fmt, g, act) -> int:
    """MatMulNBits' block size for this layer, or 0: symmetric int4 Linear weights, weight-only,
    per group (a power-of-two group of 16+) or per output channel (blocks of K's largest
    power-of-two divisor up to 256, each carrying its row's scale)."""
    if (layer.kind != "linear" or act is not None or fmt != Format.INT4
            or layer.weight_zero_point is not None):
        return 0
    k = codes.shape[1]
    if isinstance(g, PerGroup):
        return g.size if g.size in NBITS_BLOCKS and k % g.size == 0 else 0
    if isinstance(g, PerChannel) and g.axis % 2 == 0:
        return next((b for b in reversed(NBITS_BLOCKS) if k % b == 0), 0)
    return 0


def _dequantized_weight(layer: QuantizedLayer) -> torch.Tensor:
    """The weight the layer's kernel multiplies by, in float32 (for float-exported layers)."""
    codes = layer.codes()
    spec = layer.weight_spec
    if not spec.format.is_integer:
        if spec.format in (Format.FP8_E4M3, Format.FP8_E5M2):
            scale = layer.weight_scale.float()
            return codes.float() * (scale.reshape(-1, *[1] * (codes.dim() - 1)) if scale.dim() else scale)
        return codes.float()
    zp, scale = layer.zero_points().float(), layer.weight_scale.float()
    values = codes.float()
    g = spec.granularity
    if isinstance(g, PerGroup):
        n, k = values.shape
        grouped = values.reshape(n, k // g.size, g.size)
        return ((grouped - zp.reshape(n, -1, 1)) * scale.reshape(n, -1, 1)).reshape(n, k)
    if isinstance(g, PerChannel):
        shape = [1] * values.dim()
        shape[g.axis % values.dim()] = -1
        return (values - zp.reshape(shape)) * scale.reshape(shape)
    return (values - zp) * scale


class FusedTwin(nn.Module):
    """The twin of int8graph.FusedConv: relu?(conv(x) + accum?), Q/DQ where it carries codes."""

    def __init__(self, op: FusedConv, name: str, notes: dict) -> None:
        super().__init__()
        layer = op.layer
        self.layer = LayerTwin(layer, name, quantize_input=not op.codes_in, notes=notes)
        self.relu, self.out_q = op.relu, op.out_q
        self.conv_q = layer.output_qparams  # the conv's own calibrated output range

    def forward(self, x: torch.Tensor, accum: Optional[torch.Tensor] = None) -> torch.Tensor:
        y = self.layer(x)
        if accum is not None:
            if self.conv_q is not None:
                y = _QDQ.qdq(y, self.conv_q[0], self.conv_q[1], 0, 255)
            y = y + accum
        if self.relu:
            y = torch.relu(y)
        if self.out_q is not None:
            return _QDQ.qdq(y, self.out_q[0], self.out_q[1], 0, 255)
        if accum is None and self.conv_q is not None:
            q = _relu_range(self.conv_q) if self.relu else self.conv_q
            return _QDQ.qdq(y, q[0], q[1], 0, 255)
        return y


class OutputQTwin(nn.Module):
    """A static int8 conv outside the fused graph: its output gets its calibrated Q/DQ too, so
    ONNX Runtime runs it as QLinearConv (which needs a quantized output; Linears do not)."""

    def __init__(self, layer: QuantizedLayer, name: str, notes: dict) -> None:
        super().__init__()
        self.layer = LayerTwin(layer, name, notes=notes)
        self.out_q = layer.output_qparams

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _QDQ.qdq(self.layer(x), self.out_q[0], self.out_q[1], 0, 255)


class MaxPoolTwin(nn.Module):
    """int8graph.Uint8MaxPool: max-pool between Q/DQ pairs of the same codes (ONNX Runtime then
    pools the int8 tensor directly)."""

    def __init__(self, pool: Uint8MaxPool, q: tuple[float, int]) -> None:
        super().__init__()
        self.pool, self.q = pool, q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.pool
        y = F.max_pool2d(x, p.kernel, p.stride, p.padding, p.dilation, p.ceil_mode)
        return _QDQ.qdq(y, self.q[0], self.q[1], 0, 255)


class QdqTwin(nn.Module):
    """Q/DQ with fixed uint8 parameters on one edge of the graph."""

    def __init__(self, q: tuple[float, int]) -> None:
        super().__init__()
        self.q = q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _QDQ.qdq(x, self.q[0], self.q[1], 0, 255)


def _input_q(module: nn.Module) -> Optional[tuple[float, int]]:
    """The uint8 (scale, zp) a static int8 layer quantizes its input with, else None."""
    layer = module.layer if isinstance(module, FusedConv) else module
    if not isinstance(layer, QuantizedLayer) or layer.act_spec is None or layer.dynamic:
        return None
    shift = 128 if layer.act_spec.format.is_signed else 0
    if layer.act_spec.qmin + shift != 0 or layer.act_spec.qmax + shift != 255:
        return None
    return float(layer.input_scale), int(layer.input_zero_point) + shift


def _relu_user(node: fx.Node, modules: dict) -> Optional[fx.Node]:
    users = list(node.users)
    if len(users) != 1:
        return None
    user = users[0]
    if user.op == "call_module" and isinstance(modules.get(user.target), nn.ReLU):
        return user
    if user.op == "call_function" and user.target in (F.relu, torch.relu):
        return user
    return None


def _consumers_q(node: fx.Node, modules: dict) -> Optional[tuple[float, int]]:
    """The input qparams every consumer of `node` agrees on (all static int8 layers), else None."""
    qs = {_input_q(modules[u.target]) if u.op == "call_module" else None for u in node.users}
    return qs.pop() if len(qs) == 1 and None not in qs else None


def _make_twin(layer: QuantizedLayer, name: str, notes: dict) -> nn.Module:
    static_conv = layer.kind == "conv" and layer.act_spec is not None and not layer.dynamic
    if static_conv and layer.output_qparams is not None:
        return OutputQTwin(layer, name, notes)
    return LayerTwin(layer, name, notes=notes)


def build_twin(model: nn.Module) -> tuple[nn.Module, dict[str, str], dict[str, str]]:
    """(twin, {twin module path of each LayerTwin: quantized layer name}, notes per layer).

    The model is deep-copied; the caller's model is not touched."""
    model = copy.deepcopy(model)
    remove_encoder_fastpath(model)
    notes: dict[str, str] = {}
    graph = model.__dict__.get("forward")
    if isinstance(graph, _GraphForward) and not graph.failed:
        twin = _graph_twin(graph.gm, notes)
    else:
        model.__dict__.pop("forward", None)
        twin = model
        for name, module in list(model.named_modules()):
            if isinstance(module, QuantizedLayer):
                model.set_submodule(name, _make_twin(module, name, notes))
    config = getattr(twin, "config", None)
    if getattr(config, "use_cache", None):
        config.use_cache = False  # a graph of one forward pass: no key/value cache in or out
    paths = {path: m.layer_name for path, m in twin.named_modules() if isinstance(m, LayerTwin)}
    return twin.eval(), paths, notes


def _graph_twin(gm: fx.GraphModule, notes: dict) -> fx.GraphModule:
    modules = dict(gm.named_modules())
    layer_names = {id(m): n for n, m in gm.named_modules() if isinstance(m, QuantizedLayer)}
    # a fused op's layer is not a submodule of the graph module: find its name in the model
    for n, m in modules.items():
        if isinstance(m, FusedConv) and id(m.layer) not in layer_names:
            layer_names[id(m.layer)] = m.layer.qname or n
    codes_q: dict[fx.Node, tuple] = {}  # nodes whose value the PyTorch graph carries as codes
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or node.target not in modules:
            continue
        m = modules[node.target]
        if isinstance(m, FusedConv):
            gm.set_submodule(node.target, FusedTwin(m, layer_names[id(m.layer)], notes))
            if m.out_q is not None:
                codes_q[node] = m.out_q
        elif isinstance(m, Uint8MaxPool):
            source = node.args[0]
            q = codes_q.get(source)
            if q is None:
                raise RuntimeError(f"max-pool {node.target} runs on codes of an unknown producer")
            gm.set_submodule(node.target, MaxPoolTwin(m, q))
            codes_q[node] = q
        elif isinstance(m, QuantizedLayer):
            relu = _relu_user(node, modules)
            if relu is None or m.kind != "conv" or m.output_qparams is None or _input_q(m) is None:
                gm.set_submodule(node.target, _make_twin(m, layer_names[id(m)], notes))
                continue
            # an unfused conv -> ReLU: quantize after the ReLU (zero point 0, so ONNX Runtime
            # folds the ReLU into QLinearConv), with the consumers' own qparams when they agree
            gm.set_submodule(node.target, LayerTwin(m, layer_names[id(m)], notes=notes))
            q = _consumers_q(relu, modules) or _relu_range(m.output_qparams)
            name = f"qdq_{node.name}"
            gm.add_submodule(name, QdqTwin(q))
            with gm.graph.inserting_after(relu):
                new_node = gm.graph.call_module(name, (relu,))
            relu.replace_all_uses_with(new_node, delete_user_cb=lambda user: user is not new_node)
    gm.recompile()
    return gm


def layer_count(model: nn.Module) -> int:
    return sum(isinstance(m, QuantizedLayer) for m in model.modules())


__all__ = ["build_twin", "LayerTwin", "layer_count"]
