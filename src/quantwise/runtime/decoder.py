"""A lean batch-1 decoding loop for Llama-family causal LMs (Llama, Mistral, Qwen2): the
transformers model's own modules (quantwise's quantized Linears, its norm weights, its rotary
embedding), run by one loop over a preallocated KV cache.

Why: at batch 1 on a CPU, transformers' generate spent ~15 ms per token of TinyLlama-1.1B's
shape outside the Linears (its cache objects, masks, ~230 small ops per token and the Python
around them) against ~21 ms in quantwise's int4 GEMVs, so the framework, not the weights' bytes,
set the speed. Here a token costs ~30 torch ops per block and the Linears' own calls.

Numerics follow transformers' eager Llama: float32 RMSNorm, rotary cos / sin from the model's
own rotary module (its scaling types and attention factor included), softmax in float32 over
q k^T / sqrt(head_dim), grouped-query attention without copying the shared K / V heads.
One-token steps on x86-64 CPUs with AVX2 run the float glue of a block (RMSNorm; rotary, cache
write and attention) in kernels/csrc/decode.c, ~5 us where torch's ~25 small ops took ~100,
and quantwise's GEMVs of q / k / v and of gate / up as one call each (kernels/gemv.py
fuse_rows: the layers then view one buffer, nothing is stored twice).
`LeanDecoder.of(model)` says why a model cannot take this path (another architecture, a
sliding window inside the requested length, a RoPE type whose frequencies depend on the
length, non-float32 activations); generate() then uses transformers' loop.
"""

from __future__ import annotations

import ctypes
import weakref
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

SUPPORTED = ("llama", "mistral", "qwen2")
_STATIC_ROPE = ("default", "linear", "llama3", "yarn", "longrope")


def _linear(module: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """The call a Linear makes on float32 rows without autograd: a quantized layer's kernel
    itself (QuantizedLayer.forward's own fast path, one Python frame less per call)."""
    kernel = getattr(module, "kernel", None)
    if getattr(module, "kind", None) == "linear" and kernel is not None:
        return kernel
    return module


def _rope_type(config) -> str:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    return params.get("rope_type", params.get("type", "default")) if isinstance(params, dict) else "default"


def _fused(kernels: list) -> Optional[Callable[[torch.Tensor], torch.Tensor]]:
    """One GEMV for Linears that share an input, where all of them are quantwise GEMVs."""
    from quantwise.kernels.gemv import FewRowsLinear, fuse_rows

    if not all(isinstance(k, FewRowsLinear) for k in kernels):
        return None
    return fuse_rows([k.gemv for k in kernels])


class _Attn(ctypes.Structure):  # kernels/csrc/decode.c qw_attn
    _fields_ = [("keys", ctypes.c_void_p), ("values", ctypes.c_void_p), ("heads", ctypes.c_int),
                ("kv_heads", ctypes.c_int), ("d", ctypes.c_int), ("max_len", ctypes.c_int),
                ("scale", ctypes.c_float)]


def _glue():
    """kernels/csrc/decode.c's functions (in the GEMV library), or None without it."""
    from quantwise.kernels.gemv import library

    lib = library()[0]
    if lib is not None and not hasattr(lib, "_decode_ready"):
        lib.qw_rmsnorm.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_float,
                                   ctypes.c_void_p, ctypes.c_int]
        lib.qw_attend.argtypes = [ctypes.c_void_p] * 6 + [ctypes.c_int, ctypes.c_void_p, ctypes.c_int]
        lib.qw_rmsnorm.restype = lib.qw_attend.restype = None
        lib._decode_ready = True
    return lib


class _Block:
    def __init__(self, layer: nn.Module):
        attn, mlp = layer.self_attn, layer.mlp
        self.q, self.k, self.v = _linear(attn.q_proj), _linear(attn.k_proj), _linear(attn.v_proj)
        self.o = _linear(attn.o_proj)
        self.gate, self.up, self.down = _linear(mlp.gate_proj), _linear(mlp.up_proj), _linear(mlp.down_proj)
        self.qkv = _fused([self.q, self.k, self.v])
        self.gate_up = _fused([self.gate, self.up])
        self.inner = mlp.gate_proj.out_features if hasattr(mlp.gate_proj, "out_features") else \
            getattr(self.gate, "out_features", None)
        self.norm1 = layer.input_layernorm.weight.detach().float().contiguous()
        self.eps1 = layer.input_layernorm.variance_epsilon
        self.norm2 = layer.post_attention_layernorm.weight.detach().float().contiguous()
        self.eps2 = layer.post_attention_layernorm.variance_epsilon


def _modules(model: nn.Module) -> list[int]:
    """The identities of the modules and kernels a decoder holds (a replaced one: rebuild)."""
    return [id(m) for layer in model.model.layers for m in layer.modules()] + \
        [id(getattr(m, "kernel", None)) for m in model.model.modules()] + [id(model.lm_head)]


_DECODERS: "weakref.WeakKeyDictionary[nn.Module, LeanDecoder]" = weakref.WeakKeyDictionary()


class LeanDecoder:
    """prefill(ids) then step(token) -> next-token logits, for one sequence."""

    def __init__(self, model: nn.Module):
        cfg, core = model.config, model.model
        self.config = cfg
        self.heads, self.kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.scale = self.head_dim ** -0.5
        self.blocks = [_Block(layer) for layer in core.layers]
        self.embed, self.rotary = core.embed_tokens, core.rotary_emb
        self.norm = core.norm.weight.detach().float().contiguous()
        self.norm_eps = core.norm.variance_epsilon
        self.head = _linear(model.lm_head)
        self.modules = _modules(model)
        self.length = 0
        self.lib = _glue() if self.head_dim % 16 == 0 and cfg.hidden_size % 8 == 0 else None

    @staticmethod
    def why_not(model: nn.Module, max_length: int) -> Optional[str]:
        """None if the loop can run `model` for sequences up to max_length, else why not."""
        cfg = getattr(model, "config", None)
        kind = getattr(cfg, "model_type", None)
        if kind not in SUPPORTED:
            return f"model type {kind!r} (the lean loop knows {', '.join(SUPPORTED)})"
        core = getattr(model, "model", None)
        if core is None or not all(hasattr(core, a) for a in ("layers", "embed_tokens", "norm", "rotary_emb")):
            return "not the Llama module layout (model.layers / embed_tokens / norm / rotary_emb)"
        if getattr(cfg, "hidden_act", "silu") != "silu":
            return f"activation {cfg.hidden_act!r} (the loop computes SiLU-gated MLPs)"
        window = getattr(cfg, "sliding_window", None)
        if window is not None and getattr(cfg, "use_sliding_window", True) and max_length > window:
            return f"a sliding window of {window} tokens inside the {max_length} requested"
        if _rope_type(cfg) not in _STATIC_ROPE:
            return f"RoPE type {_rope_type(cfg)!r}, whose frequencies depend on the sequence length"
        if core.embed_tokens(torch.zeros(1, 1, dtype=torch.long)).dtype != torch.float32:
            return "activations that are not float32"
        return None

    @classmethod
    def of(cls, model: nn.Module, max_length: int) -> tuple[Optional["LeanDecoder"], str]:
        """(the model's decoder, "") or (None, why not). One per model while its Linears stay
        the same objects: building one fuses GEMVs, which copies their weights once."""
        reason = cls.why_not(model, max_length)
        if reason:
            return None, reason
        decoder = _DECODERS.get(model)
        if decoder is None or decoder.modules != _modules(model):
            decoder = _DECODERS[model] = cls(model)
        return decoder, ""

    # -- the loop ------------------------------------------------------------------------------
    def reset(self, max_length: int) -> None:
        shape = (len(self.blocks), self.kv_heads, max_length, self.head_dim)
        self.keys, self.values = torch.empty(shape), torch.empty(shape)
        dummy = torch.zeros(1, 1, self.head_dim)
        cos, sin = self.rotary(dummy, torch.arange(max_length).unsqueeze(0))
        self.cos, self.sin = cos[0].float().contiguous(), sin[0].float().contiguous()  # [max_length, d]
        self.length, self.max_length = 0, max_length
        self.attn = [_Attn(self.keys[n].data_ptr(), self.values[n].data_ptr(), self.heads,
                           self.kv_heads, self.head_dim, max_length, self.scale)
                     for n in range(len(self.blocks))]

    @torch.no_grad()
    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids: [T] the next tokens; returns the logits [vocab] after the last of them."""
        t, start = ids.shape[0], self.length
        end = start + t
        if end > self.max_length:
            raise ValueError(f"sequence of {end} tokens past the cache of {self.max_length}")
        if t == 1 and self.lib is not None:
            return self._step(ids)
        h = self.embed(ids.unsqueeze(0))[0]
        cos, sin = self.cos[start:end], self.sin[start:end]
        half = self.head_dim // 2
        group = self.heads // self.kv_heads
        mask = None
        if t > 1:  # causal: query i (position start + i) sees keys 0 .. start + i
            mask = torch.ones(t, end, dtype=torch.bool).tril(start).logical_not()
        for n, b in enumerate(self.blocks):
            x = F.rms_norm(h, (h.shape[-1],), b.norm1, b.eps1)
            q = b.q(x).view(t, self.heads, self.head_dim).transpose(0, 1)
            k = b.k(x).view(t, self.kv_heads, self.head_dim).transpose(0, 1)
            v = b.v(x).view(t, self.kv_heads, self.head_dim).transpose(0, 1)
            q = q * cos + torch.cat((-q[..., half:], q[..., :half]), -1) * sin
            k = k * cos + torch.cat((-k[..., half:], k[..., :half]), -1) * sin
            self.keys[n, :, start:end] = k
            self.values[n, :, start:end] = v
            keys, values = self.keys[n, :, :end], self.values[n, :, :end]
            # grouped-query attention: the `group` query heads of a K / V head as one batch
            qg = q.reshape(self.kv_heads, group * t, self.head_dim)
            scores = torch.bmm(qg, keys.transpose(1, 2)).mul_(self.scale)
            if mask is not None:
                scores = scores.view(self.kv_heads, group, t, end).masked_fill(mask, float("-inf"))
                scores = scores.view(self.kv_heads, group * t, end)
            attn = torch.bmm(torch.softmax(scores, dim=-1), values)  # [kv, group * t, d]
            attn = attn.view(self.heads, t, self.head_dim).transpose(0, 1).reshape(t, -1)
            h = h + b.o(attn)
            x = F.rms_norm(h, (h.shape[-1],), b.norm2, b.eps2)
            h = h + b.down(F.silu(b.gate(x)) * b.up(x))
        self.length = end
        last = F.rms_norm(h[-1:], (h.shape[-1],), self.norm, self.norm_eps)
        return self.head(last)[0]

    def _rms(self, h: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
        y = torch.empty_like(h)
        self.lib.qw_rmsnorm(h.data_ptr(), w.data_ptr(), eps, y.data_ptr(), h.shape[-1])
        return y

    def _step(self, ids: torch.Tensor) -> torch.Tensor:
        """One token: the float glue in csrc/decode.c, the fused GEMVs where the block has them."""
        pos, lib = self.length, self.lib
        qd, kd = self.heads * self.head_dim, self.kv_heads * self.head_dim
        row = self.head_dim * 4  # bytes of one position's cos / sin
        cos, sin = self.cos.data_ptr() + pos * row, self.sin.data_ptr() + pos * row
        threads = torch.get_num_threads()
        h = self.embed(ids.unsqueeze(0))[0].contiguous()
        for b, attn in zip(self.blocks, self.attn):
            x = self._rms(h, b.norm1, b.eps1)
            if b.qkv is not None:
                y = b.qkv(x)
                q, k, v = y[:, :qd], y[:, qd:qd + kd], y[:, qd + kd:]
            else:  # rotary is applied in place: own copies of what the Linears returned
                q, k = b.q(x).contiguous().clone(), b.k(x).contiguous().clone()
                v = b.v(x).contiguous()
            out = torch.empty(1, qd)
            lib.qw_attend(ctypes.addressof(attn), q.data_ptr(), k.data_ptr(), v.data_ptr(),
                          cos, sin, pos, out.data_ptr(), threads)
            h = h + b.o(out)
            x = self._rms(h, b.norm2, b.eps2)
            if b.gate_up is not None:
                y = b.gate_up(x)
                gate, up = y[:, :b.inner], y[:, b.inner:]
            else:
                gate, up = b.gate(x), b.up(x)
            h = h + b.down(F.silu(gate) * up)
        self.length = pos + 1
        return self.head(self._rms(h, self.norm, self.norm_eps))[0]
