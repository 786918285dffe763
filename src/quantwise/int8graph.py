"""The int8 graph path for CNNs: uint8 activations flow between fused int8 convolutions.

After convert(), every static int8 conv quantizes its float input and returns float32. For a
model that torch.fx can trace, this pass rewrites the forward so that

- conv -> ReLU runs as one oneDNN call (ReLU fused into the requantizing epilogue);
- conv -> add(other) [-> ReLU] (a residual connection) runs as one call that adds `other`
  inside the conv's epilogue (oneDNN's in-place sum post-op);
- a conv whose every consumer is a static int8 conv calibrated with the same input qparams
  (directly, through max-pools, or as the residual input of a fused add) writes uint8 codes
  with those qparams instead of float32: the consumer skips its quantization pass, and 4x
  fewer bytes move between layers. Max-pool commutes with a monotone quantizer, so it runs on
  the codes and is exact;
- everything else (pooling to float, flatten, Linear...) sees float32, as before.

The rewrite changes only `model.forward` (the model keeps its class, modules and state_dict),
so save/load are unaffected; load() replays this pass. Fused outputs differ from the per-layer
path by float rounding in oneDNN's requantization (at most one code on an edge), and the
residual input of a fused add is the consumer-quantized tensor rather than the float one.
"""

from __future__ import annotations

import operator
import warnings
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import fx, nn

from quantwise.errors import QuantwiseWarning
from quantwise.modules import QuantizedLayer
from quantwise.state import QuantState

Q = tuple[float, int]  # (scale, zero point) of uint8 codes on an edge

_NOTHING = "no static int8 conv to fuse"
_RELU_FUNCS = (F.relu, torch.relu, torch.relu_)
_ADD_FUNCS = (operator.add, operator.iadd, torch.add)


@dataclass
class GraphReport:
    """What the pass did, for summary(): applied or why not, and counts."""

    applied: bool
    reason: str = ""
    fused: dict[str, str] = field(default_factory=dict)  # layer name -> what runs fused
    uint8_edges: int = 0
    uint8_pools: int = 0
    uses_output_range: set = field(default_factory=set)  # layers whose observed output range is used

    def line(self) -> str:
        if not self.applied:
            return "" if self.reason == _NOTHING else f"int8 graph path: not applied ({self.reason})"
        adds = sum("add" in v for v in self.fused.values())
        relus = sum("ReLU" in v for v in self.fused.values())
        return (f"int8 graph path: {_count(len(self.fused), 'conv')} fused ({relus} with ReLU, "
                f"{adds} with the residual add), {_count(self.uint8_edges, 'uint8 output')} "
                f"between layers, {_count(self.uint8_pools, 'max-pool')} on uint8 codes")


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, QuantizedLayer) or super().is_leaf_module(m, qualname)


def _fusable(layer: Any) -> bool:
    kernel = getattr(layer, "kernel", None)
    return (isinstance(layer, QuantizedLayer) and layer.kind == "conv"
            and getattr(kernel, "fusable", False) and kernel.fallback_reason is None)


# -- runtime ops (call_module targets in the rewritten graph) ------------------------------------

class FusedConv(nn.Module):
    """relu?(conv(x) + accum?) of one QuantizedLayer; uint8 or float32 in, out and accum."""

    def __init__(self, layer: QuantizedLayer, relu: bool, out_q: Optional[Q],
                 accum_q: Optional[Q], accum_reused: bool, codes_in: bool = True) -> None:
        super().__init__()
        object.__setattr__(self, "layer", layer)  # not a submodule: the model owns it
        self.relu, self.out_q, self.accum_q, self.accum_reused = relu, out_q, accum_q, accum_reused
        self.codes_in = codes_in  # uint8 input means codes only when an int8 op produced it

    def forward(self, x: torch.Tensor, accum: Optional[torch.Tensor] = None) -> torch.Tensor:
        kernel = self.layer.kernel
        if x.dtype == torch.uint8 and not self.codes_in:
            x = x.float()  # e.g. a caller's uint8 image: values, as the per-layer path reads them
        if accum is not None and accum.dtype == torch.uint8 and self.accum_q is None:
            accum = accum.float()
        if x.dim() != 4 or (accum is not None and tuple(accum.shape) != kernel.output_size(x)):
            return self._unfused(x, accum)  # e.g. an unbatched input or a broadcasting add
        xq = x if x.dtype == torch.uint8 else kernel.quantize_input(x)
        if accum is not None:
            accum = self._accum(accum)
        return kernel.run_fused(xq.contiguous(memory_format=torch.channels_last), self.out_q,
                                self.relu, accum, self.out_q if self.accum_q is None else self.accum_q)

    def _accum(self, a: torch.Tensor) -> torch.Tensor:
        cl = torch.channels_last
        if self.out_q is None:  # float output: oneDNN wants a float accumulator (scale 1)
            if a.dtype == torch.uint8:
                return _dequantize(a, self.accum_q).contiguous(memory_format=cl)
            # oneDNN writes the result into the accumulator: never into a tensor someone else
            # holds (it may be the caller's input)
            return a.to(torch.float32, memory_format=cl, copy=True)
        if a.dtype != torch.uint8:  # a float residual feeding a uint8 output: codes of out_q
            return _quantize(a, self.out_q).contiguous(memory_format=cl)
        if not a.is_contiguous(memory_format=cl):
            return a.contiguous(memory_format=cl)  # a copy, so overwriting it is harmless
        if self.accum_reused:
            return a.clone(memory_format=cl)  # read again after this op: keep the original
        return a  # consumed: oneDNN writes the result into it

    def _unfused(self, x: torch.Tensor, accum: Optional[torch.Tensor]) -> torch.Tensor:
        """The same computation in float, op by op (rare shapes only)."""
        kernel = self.layer.kernel
        if x.dtype == torch.uint8:
            x = _dequantize(x, kernel.input_qparams)
        y = self.layer(x)
        if accum is not None:
            y = y + (_dequantize(accum, self.accum_q or self.out_q) if accum.dtype == torch.uint8 else accum)
        if self.relu:
            y = torch.relu(y)
        return y if self.out_q is None else _quantize(y, self.out_q)


class Uint8MaxPool(nn.Module):
    """Max-pool on uint8 codes (exact: quantization is monotone); float input passes through.

    Separable, on the NHWC view of channels_last codes: for each spatial dim, the output is the
    element-wise max of k strided views of the input (one per tap), so every pass reads and
    writes whole contiguous channel vectors. Padding contributes nothing: 0 is the smallest
    code. 0.2 ms for ResNet-18's 8x64x112x112 stem output, against 1.3 ms for torch's quantized
    max-pool (which also needs copies in and out of a quantized tensor) - measured.
    """

    def __init__(self, kernel_size, stride, padding, dilation, ceil_mode: bool) -> None:
        super().__init__()
        pair = nn.modules.utils._pair
        self.kernel, self.padding, self.dilation = pair(kernel_size), pair(padding), pair(dilation)
        self.stride = pair(stride if stride else kernel_size)
        self.ceil_mode = bool(ceil_mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.uint8 or x.dim() != 4 or not x.is_contiguous(memory_format=torch.channels_last):
            x = x if x.dtype != torch.uint8 else x.float()  # not expected; stay correct
            return F.max_pool2d(x, self.kernel, self.stride, self.padding, self.dilation, self.ceil_mode)
        v = x.permute(0, 2, 3, 1)  # [N, H, W, C], contiguous
        for dim in (2, 1):
            v = self._pool_dim(v, dim, self.kernel[dim - 1], self.stride[dim - 1],
                               self.padding[dim - 1], self.dilation[dim - 1])
        return v.permute(0, 3, 1, 2)

    def _pool_dim(self, v: torch.Tensor, dim: int, k: int, s: int, p: int, d: int) -> torch.Tensor:
        n = v.shape[dim]
        span = n + 2 * p - d * (k - 1) - 1
        length = (-(-span // s) if self.ceil_mode else span // s) + 1
        if self.ceil_mode and (length - 1) * s >= n + p:
            length -= 1  # the last window must start inside the input or its left padding
        taps = []
        for t in range(k):
            off = t * d - p  # output i reads input i * s + off
            lo = max(0, (-off + s - 1) // s)
            hi = min(length - 1, (n - 1 - off) // s)
            if hi >= lo:
                index = [slice(None)] * v.dim()
                index[dim] = slice(lo * s + off, hi * s + off + 1, s)
                taps.append((lo, hi, v[tuple(index)]))
        full = [tap for tap in taps if tap[0] == 0 and tap[1] == length - 1]
        if len(full) >= 2:  # start from taps that cover every output: no zero fill
            out = torch.maximum(full[0][2], full[1][2])
            taps = [tap for tap in taps if tap is not full[0] and tap is not full[1]]
        elif full:
            out = full[0][2].clone(memory_format=torch.contiguous_format)  # never a view of v
            taps.remove(full[0])
        else:
            shape = list(v.shape)
            shape[dim] = length
            out = torch.zeros(shape, dtype=torch.uint8)  # 0: the smallest code
        for lo, hi, src in taps:
            dst = out.narrow(dim, lo, hi - lo + 1)
            torch.maximum(dst, src, out=dst)
        return out


def _dequantize(codes: torch.Tensor, q: Q) -> torch.Tensor:
    return (codes.float() - q[1]) * q[0]


def _quantize(x: torch.Tensor, q: Q) -> torch.Tensor:
    t = torch.div(x.float(), torch.tensor(q[0], dtype=torch.float32)).round_().add_(q[1])
    return t.clamp_(0, 255).to(torch.uint8)


# -- pattern matching ----------------------------------------------------------------------------

def _is_relu(node: fx.Node, modules: dict) -> bool:
    if node.op == "call_module":
        return type(modules.get(node.target)) is nn.ReLU
    if node.op == "call_function":
        return node.target in _RELU_FUNCS
    return node.op == "call_method" and node.target in ("relu", "relu_")


def _is_add(node: fx.Node) -> bool:
    if len(node.args) != 2 or any(k not in ("inplace",) for k in node.kwargs):
        return False
    if node.op == "call_function":
        return node.target in _ADD_FUNCS
    return node.op == "call_method" and node.target in ("add", "add_", "__add__", "__iadd__")


def _pool_args(node: fx.Node, modules: dict) -> Optional[tuple]:
    """(kernel, stride, padding, dilation, ceil_mode) of a 2-D max-pool node, else None.
    Dilated pools are left in float: their windows can lie wholly in the padding (-inf)."""
    args = _pool_args_any(node, modules)
    if args is None or nn.modules.utils._pair(args[3]) != (1, 1):
        return None
    return args


def _pool_args_any(node: fx.Node, modules: dict) -> Optional[tuple]:
    if node.op == "call_module":
        m = modules.get(node.target)
        if type(m) is nn.MaxPool2d and not m.return_indices:
            return m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode
        return None
    if node.op == "call_function" and node.target in (F.max_pool2d, torch.max_pool2d):
        names = ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")
        values = dict(zip(("input", *names), node.args)) | dict(node.kwargs)
        if values.get("return_indices") or "kernel_size" not in values:
            return None
        if not all(isinstance(values.get(k, 0), (int, tuple, list, bool, type(None))) for k in names):
            return None
        return (values["kernel_size"], values.get("stride"), values.get("padding", 0),
                values.get("dilation", 1), values.get("ceil_mode", False))
    return None


def _single_user(node: fx.Node) -> Optional[fx.Node]:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


@dataclass
class _Group:
    conv: fx.Node
    layer: QuantizedLayer
    tail: fx.Node                 # the node whose value the fused op produces
    relu: bool = False
    add: Optional[fx.Node] = None
    accum: Optional[fx.Node] = None
    nodes: list = field(default_factory=list)  # matched nodes, conv first


def _groups(graph: fx.Graph, modules: dict) -> dict[fx.Node, _Group]:
    """conv [-> ReLU] or conv -> add(other) [-> ReLU] chains; keyed by their tail node."""
    groups: dict[fx.Node, _Group] = {}
    claimed: set[fx.Node] = set()
    owner = _add_owners(graph, modules)
    for node in graph.nodes:
        if node.op != "call_module" or not _fusable(modules.get(node.target)) or node in claimed:
            continue
        if len(node.args) != 1 or node.kwargs:
            continue
        g = _Group(node, modules[node.target], node, nodes=[node])
        user = _single_user(node)
        if user is not None and _is_relu(user, modules) and user.args[0] is node:
            g.relu, g.tail = True, user
            g.nodes.append(user)
        elif user is not None and _is_add(user) and user not in claimed and owner.get(user) is node:
            other = user.args[1] if user.args[0] is node else user.args[0]
            if isinstance(other, fx.Node) and other is not node:
                g.add, g.accum, g.tail = user, other, user
                g.nodes.append(user)
                claimed.add(user)
                relu = _single_user(user)
                if relu is not None and _is_relu(relu, modules) and relu.args[0] is user:
                    g.relu, g.tail = True, relu
                    g.nodes.append(relu)
        claimed.update(g.nodes)
        groups[g.tail] = g
    return groups


def _add_owners(graph: fx.Graph, modules: dict) -> dict[fx.Node, fx.Node]:
    """For each add fed by a fusable conv (its only user): the conv that absorbs it. Where both
    operands are such convs (a ResNet block with a downsample), the one with more weights:
    the other then writes codes with a zero point, which made oneDNN's AVX2 int8 kernel
    13-25% slower on ResNet-18's 3x3 convs, and costs least on the small 1x1 conv."""
    owner: dict[fx.Node, fx.Node] = {}
    for node in graph.nodes:
        if node.op != "call_module" or not _fusable(modules.get(node.target)):
            continue
        user = _single_user(node)
        if user is None or not _is_add(user) or len(node.args) != 1 or node.kwargs:
            continue
        rival = owner.get(user)
        if rival is None or _weight_count(modules[node.target]) > _weight_count(modules[rival.target]):
            owner[user] = node
    return owner


def _weight_count(layer: QuantizedLayer) -> int:
    return int(layer.weight.numel())


def _decide(graph: fx.Graph, groups: dict[fx.Node, _Group], pools: dict[fx.Node, tuple],
            uses_output_range: set) -> dict[fx.Node, Optional[Q]]:
    """Which values travel as uint8 codes, and with which qparams (None: float32). Layers whose
    own observed output range is needed are added to `uses_output_range`."""
    by_conv = {g.conv: g for g in groups.values()}
    by_add = {g.add: g for g in groups.values() if g.add is not None}
    decision: dict[fx.Node, Optional[Q]] = {}
    any_q = object()
    for node in reversed(list(graph.nodes)):
        if node not in groups and node not in pools:
            continue
        wants = []
        for user in node.users:
            if user in by_conv and user.args[0] is node:
                kernel = by_conv[user].layer.kernel
                wants.append(kernel.input_qparams if kernel.takes_full_range_codes else None)
            elif user in by_add and by_add[user].accum is node:
                wants.append(any_q)
            elif user in pools:
                wants.append(decision.get(user))
            else:
                wants.append(None)
        fixed = {w for w in wants if w is not any_q}
        if None in fixed or len(fixed) > 1:
            decision[node] = None
        elif fixed:
            decision[node] = fixed.pop()
        elif node in groups and not groups[node].relu and groups[node].add is None:
            decision[node] = groups[node].layer.output_qparams  # observed at calibration
            if decision[node] is not None:
                uses_output_range.add(groups[node].conv.target)
        else:
            decision[node] = None
    for node in graph.nodes:  # a pool runs on codes only if its input arrives as codes
        if node in pools:
            source = node.args[0]
            if decision.get(node) is not None and decision.get(source) != decision[node]:
                decision[node] = None
    return decision


# -- the pass ------------------------------------------------------------------------------------

def apply_int8_graph(model: nn.Module, state: QuantState) -> GraphReport:
    """Rewrite `model.forward` into the int8 graph (in place); say what was done or why not."""
    if not any(_fusable(m) for m in model.modules()):
        report = GraphReport(False, _NOTHING)
    else:
        try:
            report = _rewrite(model, state)
        except Exception as exc:  # noqa: BLE001 - tracing fails on dynamic control flow: keep per-layer
            first = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
            report = GraphReport(False, f"torch.fx could not trace the model ({first}); "
                                        "every layer runs on its own kernel")
    state.graph = report
    return report


def _rewrite(model: nn.Module, state: QuantState) -> GraphReport:
    graph = _Tracer().trace(model)
    gm = fx.GraphModule(model, graph, class_name=type(model).__name__ + "Int8Graph")
    graph, modules = gm.graph, dict(gm.named_modules())
    for node in list(graph.nodes):  # folded BatchNorms left nn.Identity behind
        if node.op == "call_module" and type(modules.get(node.target)) is nn.Identity and not node.kwargs:
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
    groups = _groups(graph, modules)
    if not groups:
        return GraphReport(False, "no conv in the traced graph can run fused")
    pools = {n: a for n in graph.nodes if (a := _pool_args(n, modules)) is not None}
    uses_output_range: set = set()
    decision = _decide(graph, groups, pools, uses_output_range)
    order = {n: i for i, n in enumerate(graph.nodes)}
    plans = []  # everything read from the original graph before it changes
    for tail, g in groups.items():
        reused = g.accum is not None and any(
            order[u] > order[g.add] for u in g.accum.users if u is not g.add)
        accum_q = decision.get(g.accum) if g.accum is not None else None
        codes_in = decision.get(g.conv.args[0]) is not None
        plans.append((tail, g, FusedConv(g.layer, g.relu, decision[tail], accum_q, reused, codes_in)))
    report = GraphReport(True, uses_output_range=uses_output_range)
    for tail, g, op in plans:
        name = "int8_" + g.conv.name  # node names are unique; a layer may be called twice
        gm.add_submodule(name, op)
        args = (g.conv.args[0],)  # current args: earlier rewrites replaced their producers
        if g.add is not None:
            args += (g.add.args[1] if g.add.args[0] is g.conv else g.add.args[0],)
        with graph.inserting_after(tail):
            new = graph.call_module(name, args)
        tail.replace_all_uses_with(new)
        for node in reversed(g.nodes):
            graph.erase_node(node)
        report.fused[g.conv.target] = _describe(op, g)
        report.uint8_edges += op.out_q is not None
    for node, args in pools.items():
        if decision.get(node) is None:
            continue
        name = "uint8_pool_" + node.name
        gm.add_submodule(name, Uint8MaxPool(*args))
        with graph.inserting_after(node):
            new = graph.call_module(name, (node.args[0],))
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        report.uint8_pools += 1
    graph.lint()
    gm.recompile()
    _install(model, gm)
    for name, what in report.fused.items():
        record = state.records.get(name)
        if record is not None:
            record.kernel = f"[int8 graph: {what}] {model.get_submodule(name).kernel_name}"
    return report


def _describe(op: FusedConv, g: _Group) -> str:
    parts = ["+ residual add" if g.add is not None else "", "+ ReLU" if g.relu else ""]
    fused = " ".join(p for p in parts if p)
    out = "uint8 out" if op.out_q is not None else "float32 out"
    return f"conv {fused} fused, {out}".replace("  ", " ")


class _GraphForward:
    """model.forward: the rewritten graph; on any error, warn once and run per layer again."""

    def __init__(self, gm: fx.GraphModule, original) -> None:
        self.gm, self.original, self.failed = gm, original, False

    def __call__(self, *args, **kwargs):
        if self.failed:
            return self.original(*args, **kwargs)
        try:
            return self.gm(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - never worse than the per-layer path
            out = self.original(*args, **kwargs)  # a bad input raises here, as it would anyway
            self.failed = True
            warnings.warn(f"the int8 graph path failed ({str(exc).splitlines()[0][:200]}) where "
                          "the per-layer path works; this model runs layer by layer from now on",
                          QuantwiseWarning, stacklevel=2)
            return out


def _install(model: nn.Module, gm: fx.GraphModule) -> None:
    original = type(model).forward.__get__(model)
    # An instance attribute shadows the class's forward; nn.Module.__call__ (hooks included)
    # calls it. Not a submodule: state_dict and named_modules stay those of the model.
    object.__setattr__(model, "forward", _GraphForward(gm, original))


def remove_int8_graph(model: nn.Module) -> None:
    """Back to layer-by-layer execution (the model's own forward)."""
    model.__dict__.pop("forward", None)

