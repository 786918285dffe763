"""FastBertLayer: the installed forward of one BERT-style layer (the package docstring says
what it fuses)."""

from __future__ import annotations

import math
import threading

import torch
import torch.nn.functional as F
from torch import nn

from quantwise.encoder.parts import Lin, gelu_approximation
from quantwise.kernels import rowquant
from quantwise.kernels.base import TINY
from quantwise.kernels.int8_linear import OneDnnLinear, fbgemm_linear, fbgemm_prepack

_SCRATCH = threading.local()  # reusable temporaries of the fast layers, per thread


class FastBertLayer:
    """The installed forward of one BERT-style layer (see the module docstring)."""

    def __init__(self, layer: nn.Module, parts: dict, original) -> None:
        self.layer, self.original = layer, original
        self.heads = parts["self"].num_attention_heads
        hidden = parts["q"].weight_shape[0]
        self.head_dim = hidden // self.heads
        scaling = float(getattr(parts["self"], "scaling", 1.0 / math.sqrt(self.head_dim)))
        pre_qkv = getattr(parts["self"], "smooth_scale", None)  # SmoothQuant's explicit division
        pre_i = getattr(layer.intermediate, "smooth_scale", None)
        q, k, v = (Lin(parts[n], pre_qkv) for n in "qkv")
        self.o, self.f = Lin(parts["o"]), Lin(parts["f"])
        self.i = Lin(parts["i"], pre_i)
        self.static = any(x.static for x in (q, k, v, self.o, self.i, self.f))
        n = hidden
        zeros = torch.zeros(n)
        # 1/sqrt(head_dim) folded into Q's column scales and bias.
        q.col_scale = q.col_scale * scaling
        q.bias = (zeros if q.bias is None else q.bias) * scaling
        self.qkv_fused = q.same_input(k) and q.same_input(v)
        if self.qkv_fused:
            # One [K, 3N] weight for the three projections. Dynamic: the per-layer kernels keep
            # views into it (no second copy); static: the fast path's own copy.
            fused = torch.cat([q.w_t, k.w_t, v.w_t], dim=1).contiguous()
            if not q.static:
                kq, kk, kv = (parts[x].kernel for x in "qkv")
                kq.w_t, kk.w_t, kv.w_t = fused[:, :n], fused[:, n:2 * n], fused[:, 2 * n:]
            q.w_t, k.w_t, v.w_t = fused[:, :n], fused[:, n:2 * n], fused[:, 2 * n:]
            self.qkv = q
            self.qkv_t = fused
            self.qkv_scale = torch.cat([q.col_scale, k.col_scale, v.col_scale]).contiguous()
            self.qkv_bias = torch.cat([(zeros if x.bias is None else x.bias)
                                       for x in (q, k, v)]).contiguous()
            self._qkv_packed = None  # built on first use (see qkv_packed)
            self._qkv_fb = None
        self.projs = (q, k, v)
        self.ln1, self.ln2 = parts["ln1"], parts["ln2"]
        self.gelu = gelu_approximation(parts["act"])
        # Static intermediate + output Linears on oneDNN: GELU and the requantization to f's
        # uint8 input run in i's GEMM epilogue, and the residual add in f's ("sum" post-op).
        # The modules are kept (not their kernels): deepcopy rebuilds a module's kernel.
        self.i_mod, self.f_mod = parts["i"], parts["f"]
        self.onednn_ffn = all(x.static and isinstance(m.kernel, OneDnnLinear)
                              for x, m in ((self.i, self.i_mod), (self.f, self.f_mod)))
        # Dynamic i and f on FBGEMM (AVX2-only CPUs): i's rescale and bias, GELU and f's input
        # quantization in one C pass over i's output (kernels/rowquant.bias_gelu_quantize)
        self.gelu_pass = (self.gelu == "none" and not self.i.static and not self.f.static
                          and self.i.gemm == self.f.gemm == "fbgemm")
        # ... and with a dynamic output projection there too: o's and f's rescale, bias,
        # residual and LayerNorm in one pass each, the first also quantizing i's input
        # (kernels/rowquant.residual_layernorm)
        self.norm_pass = (self.gelu_pass and not self.o.static and self.o.gemm == "fbgemm"
                          and all(rowquant.residual_layernorm_fits(ln, hidden)
                                  for ln in (self.ln1, self.ln2)))

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_qkv_packed"] = None  # oneDNN's opaque weights cannot be copied: rebuilt on use
        state["_qkv_fb"] = None
        return state

    def qkv_fb(self):
        """The fused [3N, K] weight packed for FBGEMM, when Q/K/V run there (AVX2-only CPUs)."""
        if self.qkv.gemm != "fbgemm":
            return None
        if self._qkv_fb is None:
            self._qkv_fb = fbgemm_prepack(self.qkv_t.t(), self.qkv_scale,
                                          self.qkv_bias if self.qkv.static else None)
        return self._qkv_fb

    @property
    def qkv_packed(self) -> torch.Tensor | None:
        """The fused [3N, K] weight packed for oneDNN, when Q/K/V run there (dynamic, AMX)."""
        if self.qkv.packed is None:
            return None
        if self._qkv_packed is None:
            self._qkv_packed = torch.ops.onednn.qlinear_prepack(self.qkv_t.t().contiguous(), None)
        return self._qkv_packed

    # -- buffers -------------------------------------------------------------------------------
    def _buf(self, key: str, shape: tuple, dtype=torch.float32) -> torch.Tensor:
        # One set per thread, shared by every layer (they run one after another): the memory of
        # one layer's temporaries, allocated once instead of on every call.
        # Keyed by shape too: Linears of different widths sharing a key (the attention output
        # and the intermediate both read "h") each keep theirs instead of reallocating (and
        # page-faulting) a fresh buffer on every call.
        # Two shapes per key at most, so varying input sizes do not accumulate buffers.
        mine = _SCRATCH.__dict__.setdefault("bufs", {}).setdefault(key, {})
        full = (tuple(shape), dtype)
        t = mine.get(full)
        if t is None:
            if len(mine) >= 2:
                del mine[next(iter(mine))]  # the oldest
            t = mine[full] = torch.empty(shape, dtype=dtype)
        return t

    # -- pieces --------------------------------------------------------------------------------
    def _quantize(self, x: torch.Tensor, lin: Lin, key: str, inplace: bool = False):
        """int8 codes of x for `lin` and the per-row scale (None for static inputs).

        Dynamic: per-token symmetric, exactly as kernels.base.dynamic_scale +
        quantize_symmetric_i8. Static: round(x / (x_scale * s)) + zero point, saturated."""
        out = x if inplace else self._buf("div" + key, x.shape)
        if lin.static:
            t = torch.div(x, lin.div, out=out).round_()
            if lin.gemm == "fbgemm":  # float codes minus the zero point
                return t.clamp_(lin.lo - lin.zp, lin.hi - lin.zp), None
            if lin.zp:
                t.add_(lin.zp)
            t.clamp_(lin.lo, lin.hi)
            scale = None
        else:
            if lin.smooth is not None:
                x = torch.div(x, lin.smooth, out=out)
            if rowquant.available() and x.is_contiguous() and out.is_contiguous():
                t, scale = rowquant.row_quantize(x, lin.qmax, out=out)  # the same bits, one pass
            else:
                scale = torch.maximum(x.amax(dim=1, keepdim=True), x.amin(dim=1, keepdim=True).neg_())
                scale = scale.div_(lin.qmax).clamp_(min=TINY)
                t = torch.div(x, scale, out=out).round_()
            if lin.gemm == "fbgemm":
                return t, scale
        codes = self._buf("q" + key, x.shape, torch.int8)
        codes.copy_(t)
        return codes, scale

    def _linear(self, codes, scale, w_t, col_scale, bias, key: str, out=None, packed=None,
                fb=None, zp: int = 128) -> torch.Tensor:
        if packed is not None or fb is not None:
            # dynamic on AMX (oneDNN) or any input on FBGEMM: acc * col_scale; then rows, bias
            if fb is not None:
                y = fbgemm_linear(codes, zp, fb)
                if scale is None:  # static: scales and bias came from FBGEMM's epilogue
                    return y if out is None else out.copy_(y.view(out.shape))
            else:
                y = torch.ops.onednn.qlinear_pointwise(
                    codes.view(torch.uint8).bitwise_xor_(128), 1.0, 128, packed, col_scale,
                    self._no_zero_points(col_scale.numel()), None, 1.0, 0, torch.float32, "none",
                    [], "")
            if out is None:  # y * row scale + bias in one pass
                return torch.addcmul(bias, y, scale, out=y) if bias is not None else y.mul_(scale)
            tail = out.shape[2:]
            if bias is None:
                bias = torch.zeros_like(col_scale)
            rows = scale.view(*out.shape[:2], *[1] * len(tail))
            return torch.addcmul(bias.view(tail), y.view(out.shape), rows, out=out)
        acc = torch._int_mm(codes, w_t, out=self._buf("acc" + key, (codes.shape[0], w_t.shape[1]),
                                                     torch.int32))
        y = acc.view(torch.float32)
        y.copy_(acc)  # int32 -> float32 in place (see int8_linear._as_float_inplace)
        if scale is not None:
            y.mul_(scale)
        if out is None:
            return torch.addcmul(bias, y, col_scale, out=y) if bias is not None else y.mul_(col_scale)
        tail = out.shape[2:]
        if bias is None:
            bias = torch.zeros_like(col_scale)
        torch.addcmul(bias.view(tail), y.view(out.shape), col_scale.view(tail), out=out)
        return out

    def _no_zero_points(self, n: int) -> torch.Tensor:
        z = self.__dict__.get("_zeros")
        if z is None or z.numel() < n:
            z = self._zeros = torch.zeros(n, dtype=torch.int64)
        return z[:n]

    def _run(self, x: torch.Tensor, lin: Lin, key: str, inplace: bool = False) -> torch.Tensor:
        codes, scale = self._quantize(x, lin, key, inplace)
        return self._linear(codes, scale, lin.w_t, lin.col_scale, lin.bias, key, packed=lin.packed,
                            fb=lin.fb_packed(), zp=lin.fb_zp)

    def _onednn_ffn(self, h1: torch.Tensor) -> torch.Tensor:
        """f(GELU(i(h1))) + h1 with two oneDNN calls; the sum is written into h1."""
        ki, kf = self.i_mod.kernel, self.f_mod.kernel
        codes, _ = self._quantize(h1, self.i, "h")
        if codes.dtype == torch.float32:  # FBGEMM's form (float codes minus the zero point)
            u = self._buf("uh", codes.shape, torch.uint8)
            u.copy_(codes.add_(self.i.fb_zp))  # + the zero point: i's uint8 codes, 0..255
        else:
            u = codes.view(torch.uint8).bitwise_xor_(128)  # int8 codes + 128: i's uint8 codes
        y = torch.ops.onednn.qlinear_pointwise(
            u, ki.quant.scale, ki.quant.zero_point, ki.packed, ki.w_scale, ki.w_zero_point,
            ki.bias, kf.quant.scale, kf.quant.zero_point, torch.uint8, "gelu", [],
            "tanh" if self.gelu == "tanh" else "none")
        return torch.ops.onednn.qlinear_pointwise.binary(
            y, kf.quant.scale, kf.quant.zero_point, kf.packed, kf.w_scale, kf.w_zero_point, h1,
            kf.bias, 1.0, 0, torch.float32, 1.0, 0, "sum", 1.0, "none", [], "")

    def _gelu_ffn(self, h1: torch.Tensor) -> torch.Tensor:
        """f(GELU(i(h1))) on FBGEMM, GELU within ~1 float32 step of torch's (rowquant.bias_gelu_quantize)."""
        i, f = self.i, self.f
        codes, scale = self._quantize(h1, i, "h")
        y = fbgemm_linear(codes, i.fb_zp, i.fb_packed())
        codes, scale = rowquant.bias_gelu_quantize(y, scale, i.bias, f.smooth, f.qmax)
        return self._linear(codes, scale, f.w_t, f.col_scale, f.bias, "i", fb=f.fb_packed(), zp=f.fb_zp)

    def _norm_ffn(self, ctx: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """From the attention's output to the layer's: o, LayerNorm 1, the FFN and LayerNorm 2 on
        FBGEMM with three C passes between the four GEMMs (`norm_pass`)."""
        o, i, f = self.o, self.i, self.f
        codes, scale = self._quantize(ctx, o, "h")
        y = fbgemm_linear(codes, o.fb_zp, o.fb_packed())
        h1, codes, scale = rowquant.residual_layernorm(y, scale, o.bias, x, self.ln1, i.smooth, i.qmax,
                                                       codes=self._buf("divh", x.shape))
        y = fbgemm_linear(codes, i.fb_zp, i.fb_packed())
        codes, scale = rowquant.bias_gelu_quantize(y, scale, i.bias, f.smooth, f.qmax)
        y = fbgemm_linear(codes, f.fb_zp, f.fb_packed())
        return rowquant.residual_layernorm(y, scale, f.bias, h1, self.ln2)[0]

    @staticmethod
    def _mask(mask: torch.Tensor | None, b: int, heads: int, t: int):
        """(per-key row mask [B*heads, 1, T] for baddbmm, or a full [B, 1, T, T] mask, or None)."""
        if mask is None:
            return None, None
        if mask.dim() == 4 and mask.shape[1] == 1 and mask.shape[0] in (1, b) and mask.shape[-1] == t:
            if mask.dtype != torch.float32:
                return False, None
            row = mask[:, :, :1, :]
            if mask.shape[2] == 1 or torch.equal(mask, row.expand_as(mask)):
                row = row.expand(b, heads, 1, t).reshape(b * heads, 1, t)
                return row, None
            return None, mask
        return False, None

    # -- forward -------------------------------------------------------------------------------
    def __call__(self, hidden_states, attention_mask=None, encoder_hidden_states=None, *args,
                 **kwargs):
        plain = (not self.layer.training and encoder_hidden_states is None and not args
                 and all(v is None or v is False for v in kwargs.values())
                 and isinstance(hidden_states, torch.Tensor) and hidden_states.dim() == 3
                 and hidden_states.dtype == torch.float32 and not hidden_states.requires_grad)
        if plain:
            b, t, _ = hidden_states.shape
            row, full = self._mask(attention_mask, b, self.heads, t)
            if row is not False:
                with torch.no_grad():
                    return self._fast(hidden_states, row, full)
        return self.original(hidden_states, attention_mask, encoder_hidden_states, *args, **kwargs)

    def _fast(self, hs: torch.Tensor, row, full) -> torch.Tensor:
        b, t, hidden = hs.shape
        m, nh, d = b * t, self.heads, self.head_dim
        x = hs.reshape(m, hidden)
        heads = self._buf("heads", (3, b, nh, t, d))
        if self.qkv_fused:
            codes, scale = self._quantize(x, self.qkv, "h")
            self._linear(codes, scale, self.qkv_t, self.qkv_scale, self.qkv_bias, "qkv",
                         out=heads.permute(1, 3, 0, 2, 4), packed=self.qkv_packed,
                         fb=self.qkv_fb(), zp=self.qkv.fb_zp)
        else:  # Q/K/V quantize their input differently: one quantization and GEMM each
            for j, lin in enumerate(self.projs):
                codes, scale = self._quantize(x, lin, "h")
                self._linear(codes, scale, lin.w_t, lin.col_scale, lin.bias, "qkv",
                             out=heads[j:j + 1].permute(1, 3, 0, 2, 4), packed=lin.packed,
                             fb=lin.fb_packed(), zp=lin.fb_zp)
        q, k, v = (heads[j].view(b * nh, t, d) for j in range(3))
        tokens = self._buf("tokens", (b, t, nh, d))
        if full is None and rowquant.attention_fits(d):  # in C, no [T, T] scores (rowquant)
            rowquant.attention(q, k, v, None if row is None else row.reshape(b * nh, t).contiguous(),
                               tokens, nh)
        else:
            scores = self._buf("scores", (b * nh, t, t))
            if row is not None:
                torch.baddbmm(row, q, k.transpose(1, 2), out=scores)
            else:
                torch.bmm(q, k.transpose(1, 2), out=scores)
                if full is not None:
                    scores.view(b, nh, t, t).add_(full)
            torch.ops.aten._softmax.out(scores, -1, False, out=scores)
            ctx = torch.bmm(scores, v, out=self._buf("ctx", (b * nh, t, d)))
            tokens.permute(0, 2, 1, 3).copy_(ctx.view(b, nh, t, d))
        if self.norm_pass and rowquant.available():
            return self._norm_ffn(tokens.view(m, hidden), x).view(b, t, hidden)
        y = self._run(tokens.view(m, hidden), self.o, "h").add_(x)
        h1 = F.layer_norm(y, (hidden,), self.ln1.weight, self.ln1.bias, self.ln1.eps)
        if self.onednn_ffn:
            y = self._onednn_ffn(h1)
        elif self.gelu_pass and rowquant.available():
            y = self._gelu_ffn(h1).add_(h1)
        else:
            y = self._run(h1, self.i, "h")
            torch.ops.aten.gelu_(y, approximate=self.gelu)
            y = self._run(y, self.f, "i", inplace=True).add_(h1)
        out = F.layer_norm(y, (hidden,), self.ln2.weight, self.ln2.bias, self.ln2.eps)
        return out.view(b, t, hidden)
