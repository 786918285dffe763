"""What the encoder fast path needs of a model: a BERT-style layer's submodules, why a layer
does not qualify, and `Lin`, the view of one quantized Linear the fast forward runs."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from quantwise.kernels.base import f32, shifted_weight_max
from quantwise.kernels.int8_linear import FbgemmLinear, IntMMLinear, fbgemm_prepack
from quantwise.kernels.select import fbgemm_fits, int_mm_fits
from quantwise.modules import QuantizedLayer
from quantwise.spec import Format, PerTensor


def per_token_kernel(module: Any) -> IntMMLinear | FbgemmLinear | None:
    kernel = getattr(module, "kernel", None)
    if (isinstance(module, QuantizedLayer) and module.kind == "linear"
            and isinstance(kernel, (IntMMLinear, FbgemmLinear)) and not kernel.static
            and kernel.per_token
            and kernel.w_zero_point is None):
        return kernel
    return None


def static_int8(module: Any) -> bool:
    """A Linear with static per-tensor int8/uint8 input and symmetric int8 per-output-channel
    weights (whatever kernel the per-layer path picked: the fast path uses the codes)."""
    if not (isinstance(module, QuantizedLayer) and module.kind == "linear" and not module.dynamic
            and module.act_spec is not None and module.weight_zero_point is None
            and module.weight_spec.format == Format.INT8 and module.tied_to is None
            and module.kernel is not None and module.fallback_reason is None):
        return False
    act = module.act_spec
    if not (act.format in (Format.INT8, Format.UINT8) and isinstance(act.granularity, PerTensor)
            and module.weight_scale.numel() == module.weight_shape[0]):
        return False
    # the fast path runs static Linears on _int_mm or FBGEMM (or oneDNN for the FFN pair): only
    # where the probe found one exact for these codes and not slower than float (kernels.select)
    return static_gemm(module) is not None


def static_gemm(module: QuantizedLayer) -> str | None:
    n, k = module.weight_shape
    wmax = shifted_weight_max(module.weight)
    if int_mm_fits(255, wmax, k, n):
        return "int_mm"
    return "fbgemm" if fbgemm_fits(255, wmax) else None


class Lin:
    """What the fast path needs of one Linear: int8 weight [K, N] (a view), the float scale
    per output column, the bias, and for static inputs the quantization constants.

    Static: y = acc * (w_scale * x_scale) + (bias - zx * colsum(W) * w_scale * x_scale), where
    acc = _int_mm(codes - 0, W) with codes = clamp(round(x / (x_scale * s)) + zx) in int8
    (uint8 inputs shifted by -128 together with their zero point); `s` is the explicit
    SmoothQuant division (or 1). Dynamic (per-token): the per-layer IntMMLinear arithmetic.
    On FBGEMM (`gemm == "fbgemm"`, AVX2-only CPUs) the codes stay float32 minus their zero
    point, FBGEMM takes the zero point itself (no bias correction), and static layers get the
    scales and bias in its epilogue; its packed weights are built on first use (`fb_packed`)."""

    def __init__(self, module: QuantizedLayer, smooth: torch.Tensor | None = None) -> None:
        kernel = per_token_kernel(module)
        self.static = kernel is None
        self.smooth = None if smooth is None else smooth.detach().to(torch.float32).contiguous()
        self.module = None if self.static else module
        self._fb = None
        self.fb_zp = 128  # FBGEMM's uint8 zero point (dynamic codes: symmetric int8 + 128)
        if not self.static:
            self.gemm = "fbgemm" if isinstance(kernel, FbgemmLinear) else "int_mm"
            w_t = module.weight.to(torch.int8).t() if self.gemm == "fbgemm" else kernel.w_t
            self.w_t, self.col_scale, self.bias = w_t, kernel.w_scale, kernel.bias
            self.qmax = kernel.qmax
            return
        self.gemm = static_gemm(module)
        act = module.act_spec
        shift = 0 if act.format.is_signed else -128
        codes = module.weight.to(torch.int8)
        self.w_t = codes.t()
        x_scale = f32(module.input_scale)
        self.zp = int(module.input_zero_point) + shift
        self.lo, self.hi = act.qmin + shift, act.qmax + shift
        self.x_scale = x_scale
        self.div = (torch.tensor(x_scale, dtype=torch.float32) if self.smooth is None
                    else (self.smooth * x_scale).contiguous())
        self.col_scale = (module.weight_scale.to(torch.float32) * x_scale).contiguous()
        bias = (torch.zeros(codes.shape[0]) if module.bias is None
                else module.bias.detach().to(torch.float32))
        self.fb_zp = self.zp + 128
        if self.zp and self.gemm == "int_mm":
            colsum = codes.sum(dim=1, dtype=torch.int32).to(torch.float64)
            bias = (bias.double() - self.zp * colsum * self.col_scale.double()).float()
        self.bias = bias.contiguous()

    @property
    def packed(self) -> torch.Tensor | None:
        """Dynamic on AMX CPUs: the layer kernel's oneDNN weights (int8_linear.IntMMLinear),
        read through the module, whose copies rebuild their kernel (opaque tensors don't copy)."""
        if self.module is None or self.gemm == "fbgemm":
            return None
        return getattr(self.module.kernel, "packed", None)

    def fb_packed(self):
        """FBGEMM's weights with this Lin's final column scales (and, static, bias)."""
        if self.gemm != "fbgemm":
            return None
        if self._fb is None:
            self._fb = fbgemm_prepack(self.w_t.t(), self.col_scale,
                                      self.bias if self.static else None)
        return self._fb

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_fb": None}  # FBGEMM's packed weights: rebuilt on use

    def same_input(self, other: Lin) -> bool:
        if self.static != other.static:
            return False
        if self.gemm != other.gemm:
            return False
        if not self.static:
            return self.qmax == other.qmax
        return (self.zp, self.lo, self.hi) == (other.zp, other.lo, other.hi) and torch.equal(
            self.div, other.div)


def bert_parts(layer: nn.Module) -> dict | None:
    """The submodules of a BERT-style layer, or None if `layer` does not look like one."""
    try:
        att = layer.attention
        parts = {"self": att.self, "q": att.self.query, "k": att.self.key, "v": att.self.value,
                 "o": att.output.dense, "ln1": att.output.LayerNorm,
                 "i": layer.intermediate.dense, "act": layer.intermediate.intermediate_act_fn,
                 "f": layer.output.dense, "ln2": layer.output.LayerNorm}
    except AttributeError:
        return None
    if not all(isinstance(parts[k], nn.LayerNorm) for k in ("ln1", "ln2")):
        return None
    return parts


def why_not(layer: nn.Module, parts: dict) -> str | None:
    if getattr(layer, "is_decoder", False) or getattr(layer, "add_cross_attention", False):
        return "decoder / cross-attention layer"
    if getattr(layer, "chunk_size_feed_forward", 0):
        return "chunked feed-forward"
    if not all(per_token_kernel(parts[k]) or static_int8(parts[k])
               for k in ("q", "k", "v", "o", "i", "f")):
        return ("its Linears are not all int8 (per-token dynamic, or static per-tensor) with "
                "symmetric per-channel weights")
    heads = getattr(parts["self"], "num_attention_heads", None)
    if not heads or parts["q"].weight_shape[0] % heads:
        return "unknown number of attention heads"
    if gelu_approximation(parts["act"]) is None:
        return f"activation {type(parts['act']).__name__} is not GELU"
    return None


def gelu_approximation(act: nn.Module) -> str | None:
    if isinstance(act, nn.GELU):
        return act.approximate
    inner = getattr(act, "act", None)  # transformers' GELUActivation wraps F.gelu
    if type(act).__name__ == "GELUActivation" and inner is F.gelu:
        return "none"
    return None
