"""The row passes of the encoder fast path in C (csrc/rowquant.c, built into the GEMV library):
per-token quantization, the FFN's middle, the residual + LayerNorm, the attention.

`row_quantize`: in torch the same arithmetic is four passes over the input (amax and amin per
row, the division by the row scale, the rounding), which took 28 ms of all-MiniLM-L6-v2's
~780 ms w8a8-dynamic forward on 2 Zen 1 cores; the C loop reads each row once for its maximum
and again from cache for its codes, at about the speed of a copy. It gives the same bits (IEEE
division, round half to even), so a model's outputs do not depend on which path ran.
`bias_gelu_quantize`: a BERT FFN's rescale, bias and GELU fused with the next quantization
(encoder/layer.py), not bit-identical (see there); `attention`: the encoder's softmax(q k^T + mask) v
per head in one pass, written token-major. The plain rescale after a GEMM stays torch's
addcmul: one pass already, at memory speed (a C loop measured no faster). Without the library
(no compiler, not x86-64 with AVX2) callers keep the torch ops; QUANTWISE_ROWQUANT=off forces
them.
"""

from __future__ import annotations

import ctypes
import os
from typing import Optional

import torch

from quantwise.kernels.base import TINY

_F, _I = ctypes.c_void_p, ctypes.c_int


def _lib():
    from quantwise.kernels.gemv import library

    lib = library()[0]
    if lib is not None and not hasattr(lib, "_rowquant_ready"):
        lib.qw_row_quantize.argtypes = [_F, _F, _F, _I, _I, ctypes.c_float, ctypes.c_float, _I]
        lib.qw_bias_gelu_quantize.argtypes = [_F, _F, _F, _F, _F, _I, _I, ctypes.c_float,
                                               ctypes.c_float, _I]
        lib.qw_row_quantize.restype = lib.qw_bias_gelu_quantize.restype = None
        lib.qw_attention.argtypes = [_F, _F, _F, _F, _F, ctypes.c_int64, _I, _I, _I, _F, _I]
        lib.qw_residual_layernorm.argtypes = [_F, _F, _F, _F, _F, _F, ctypes.c_float, _I, _I, _F, _F,
                                              _F, ctypes.c_float, ctypes.c_float, _I]
        lib.qw_attention.restype = lib.qw_residual_layernorm.restype = None
        lib._rowquant_ready = True
    return lib


def available() -> bool:
    return os.environ.get("QUANTWISE_ROWQUANT", "").strip().lower() != "off" and _lib() is not None


def _threads(lib, elements: int) -> int:
    # below ~64K elements waking the second thread costs more than it saves
    return max(1, torch.get_num_threads()) if lib.openmp and elements >= (1 << 16) else 1


def row_quantize(x: torch.Tensor, qmax: int, out: Optional[torch.Tensor] = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """x: contiguous float32 [M, K] -> (codes round(x / s) as float32 [M, K], s [M, 1]) with
    s = max(max|x_row| / qmax, TINY), NaN / Inf for a row holding one (its codes then 0).
    `out`: where the codes go (may be x itself)."""
    lib = _lib()
    m, k = x.shape
    codes, scale = (torch.empty_like(x) if out is None else out), torch.empty(m, 1)
    lib.qw_row_quantize(x.data_ptr(), codes.data_ptr(), scale.data_ptr(), m, k, float(qmax),
                        TINY, _threads(lib, m * k))
    return codes, scale


def bias_gelu_quantize(y: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor],
                       smooth: Optional[torch.Tensor], qmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A BERT FFN's middle, in place: y [M, N] (a GEMM's output before its row scale) becomes the
    codes of GELU(y * scale + bias) / smooth for the next per-token GEMM; returns (codes, their
    row scales [M, 1]). One pass per row instead of torch's four (addcmul, gelu_, then the
    quantization's two): 2048 x 1536 in 3.6 ms on 2 Zen 1 cores, against 1.0 + 4.2 + 2.0 ms.
    Not torch's bits: GELU (erf form, by a rational fit) is within 1.1e-6 of the exact one on
    [-10, 10] (torch's 3.8e-7) and the codes come from x * (1 / s), so a few codes in a million
    differ by one, where a value lands on a rounding boundary (measured: 2-6 in 3.1 M)."""
    lib = _lib()
    m, n = y.shape
    out = torch.empty(m, 1)
    lib.qw_bias_gelu_quantize(y.data_ptr(), scale.data_ptr(), None if bias is None else bias.data_ptr(),
                              None if smooth is None else smooth.data_ptr(), out.data_ptr(), m, n,
                              float(qmax), TINY, _threads(lib, m * n))
    return y, out


def residual_layernorm(y: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor],
                       residual: torch.Tensor, norm: torch.nn.LayerNorm,
                       smooth: Optional[torch.Tensor] = None, qmax: Optional[int] = None,
                       codes: Optional[torch.Tensor] = None
                       ) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """After a per-token GEMM, in place: y [M, N] (before its row scale) becomes
    norm(y * scale + bias + residual); with `qmax`, also the next per-token GEMM's codes of
    that / smooth (into `codes` if given) and their row scales. Returns (y, codes, scales).
    One pass per row instead of torch's five (addcmul, add_, layer_norm, then the next
    quantization's two); the norm's mean and variance are not summed in torch's order, so y
    differs from F.layer_norm by float32 rounding and a code where it lands on a boundary.
    `norm` must have a weight and a bias (`residual_layernorm_fits`)."""
    lib = _lib()
    m, n = y.shape
    cs = None
    if qmax is not None:
        codes = torch.empty_like(y) if codes is None else codes
        cs = torch.empty(m, 1)
    else:
        codes = None
    lib.qw_residual_layernorm(
        y.data_ptr(), scale.data_ptr(), None if bias is None else bias.data_ptr(), residual.data_ptr(),
        norm.weight.data_ptr(), norm.bias.data_ptr(), float(norm.eps), m, n,
        None if smooth is None else smooth.data_ptr(), None if codes is None else codes.data_ptr(),
        None if cs is None else cs.data_ptr(), float(qmax or 0), TINY, _threads(lib, m * n))
    return y, codes, cs


def residual_layernorm_fits(norm: torch.nn.Module, width: int) -> bool:
    """Where `residual_layernorm` can stand in for `norm`: a float32 LayerNorm over the last
    `width` features with a weight and a bias."""
    return (isinstance(norm, torch.nn.LayerNorm) and tuple(norm.normalized_shape) == (width,)
            and norm.weight is not None and norm.bias is not None
            and norm.weight.dtype == norm.bias.dtype == torch.float32
            and norm.weight.is_contiguous() and norm.bias.is_contiguous())


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
              out: torch.Tensor, heads: int) -> torch.Tensor:
    """softmax(q k^T + mask) v for contiguous float32 q, k, v [B * heads, T, d] (q pre-scaled),
    mask [B * heads, T] added to every query's scores (None: no mask), written token-major
    into contiguous `out` [B, T, heads, d]. Two query rows at a time in C: scores, softmax (as
    torch's but e^x by a degree-6 polynomial, relative error < 2e-7; a NaN row stays NaN) and
    P V without the [T, T] matrix or a layout copy. d % 8 == 0 (`attention_fits`)."""
    lib = _lib()
    bh, t, d = q.shape
    threads = _threads(lib, bh * t * t)
    scratch = torch.empty(threads, d * t + 2 * t)  # per thread: K transposed, two score rows
    lib.qw_attention(q.data_ptr(), k.data_ptr(), v.data_ptr(), None if mask is None else mask.data_ptr(),
                     out.data_ptr(), bh, heads, t, d, scratch.data_ptr(), threads)
    return out


def attention_fits(d: int) -> bool:
    """Where `attention` runs: head sizes of whole vectors, on CPUs whose widest vectors are
    AVX2's (measured faster there; on AVX-512 CPUs torch's batched GEMMs use 512-bit FMAs this
    AVX2 code lacks, not measured against, so they keep torch's ops; ONEDNN_MAX_CPU_ISA=AVX2
    counts as AVX2, as for the other AVX2 paths)."""
    from quantwise.kernels.probe import effective_isa

    return d % 8 == 0 and available() and effective_isa() not in ("avx512", "avx512_vnni", "amx")


__all__ = ["available", "row_quantize", "bias_gelu_quantize", "residual_layernorm",
           "residual_layernorm_fits", "attention", "attention_fits"]
