"""Choosing an integer kernel from the probe (kernels/probe.py): exact first, then fastest.

A candidate may run a layer only if the probe showed it exact for the layer's codes: always
for "exact" kernels, and for "int16_pairs" kernels (no VNNI) only while
2 * max(u8 activation code) * max(|weight code|) <= 32767. Among those, the fastest measured
at the layer's shape wins; one measured over 2x slower than float32 is not used (an exact but
scalar loop: the float simulation is as exact and faster, and says it is a fallback).

7-bit weights. Where the fast kernels only sum int16 pairs, quantize() limits symmetric int8
weight codes of layers with 8-bit activations to +-64 (scale = absmax / 64), so the fast
kernels are exact. Measured on a w8a8 MLP (Linear 256-1024-1024-256, GELU/ReLU, static
per-tensor uint8): 8-bit 35.98 dB output SQNR, 7-bit weights 34.25 dB, 7-bit activations
30.71 dB: the weights are per channel and lose less than the per-tensor activations (the same
choice as ONNX Runtime's reduce_range and NNCF's overflow fix). A checkpoint with 8-bit codes
loaded on such a CPU runs exactly on the float simulation, and says why.
"""

from __future__ import annotations

import os
from typing import Optional

from quantwise.kernels.probe import EXACT, PAIR_LIMIT, PAIRS, isa_label, probe

LINEAR = ("onednn_linear", "int_mm", "fbgemm_linear")
SLOWER_THAN_FLOAT = 2.0   # a kernel this much slower than float32 is not used
TIE = 0.9                 # another candidate must be 10% faster to replace the default order
SMALL_LAYER = 1 << 16     # K * N below this: timed at the representative shape instead


_FORCED = {"onednn": "onednn_linear", "int_mm": "int_mm", "fbgemm": "fbgemm_linear"}


def _forced() -> Optional[list[str]]:
    forced = os.environ.get("QUANTWISE_INT8_GEMM", "").strip().lower()
    return [_FORCED[forced]] if forced in _FORCED else None


def default_per_token_order() -> list[str]:
    """Preference before timing: oneDNN on AMX CPUs (it uses the tiles), _int_mm elsewhere (2x
    faster at M=1 on AVX-512 VNNI, measured); FBGEMM first where oneDNN's int8 GEMM only sums
    int16 pairs (no VNNI, or ONEDNN_MAX_CPU_ISA below it): there FBGEMM was as fast or faster at
    every MiniLM shape, while oneDNN's time at the probe's 128 rows is bimodal within one
    machine (2.2 or 4.4 ms at 128 x 1536 x 384 on Zen 1, by process history), so a lucky probe
    sent some layers to it and cost the encoder its fused FFN pass (encoder/layer.py).
    QUANTWISE_INT8_GEMM=onednn|int_mm|fbgemm forces one."""
    from quantwise.kernels.probe import cpu_isa
    forced = _forced()
    if forced:
        return forced
    if cpu_isa() == "amx":
        return ["onednn_linear", "int_mm", "fbgemm_linear"]
    if probe().saturates("onednn_linear"):
        return ["fbgemm_linear", "int_mm", "onednn_linear"]
    return ["int_mm", "onednn_linear", "fbgemm_linear"]


def default_affine_order() -> list[str]:
    """Weights with zero points: the explicit-correction _int_mm path, or FBGEMM's (oneDNN
    assumes symmetric weights)."""
    forced = _forced()
    return forced if forced and forced != ["onednn_linear"] else ["int_mm", "fbgemm_linear"]


def default_static_order() -> list[str]:
    """Static per-tensor inputs: oneDNN first (rescale and bias fused), then _int_mm, FBGEMM."""
    return _forced() or ["onednn_linear", "int_mm", "fbgemm_linear"]


def activation_u8_max(fmt_bits: int) -> int:
    """Largest u8 code an activation of `fmt_bits` bits reaches once shifted to start at 0."""
    return 2 ** fmt_bits - 1


def weight_code_limit(kind: str, act_bits: Optional[int]) -> Optional[int]:
    """Largest |weight code| that keeps this CPU's fast int8 kernels exact for a layer of
    `kind` ("linear" or "conv") with `act_bits`-bit activations; None when 8 bits are fine."""
    if act_bits is None:
        return None
    limit = PAIR_LIMIT // (2 * activation_u8_max(act_bits))
    if limit >= 127:
        return None
    p = probe()
    family = ["onednn_conv"] if kind == "conv" else list(LINEAR)
    if any(p.accumulation.get(c) == EXACT and not _too_slow(c) for c in family):
        return None
    if any(p.accumulation.get(c) == PAIRS for c in family):
        return limit
    return None  # nothing exact either way: the layer falls back to the simulation


def _too_slow(kind: str, k: int = 384, n: int = 1536) -> bool:
    ratio = probe().int8_vs_fp32(kind, k, n)
    return ratio is not None and ratio < 1 / SLOWER_THAN_FLOAT


class NoExactKernel(Exception):
    """No candidate computes this layer's codes exactly (and fast enough) on this CPU."""


def choose_linear(order: list[str], umax: dict[str, int], wmax: int, k: int, n: int
                  ) -> tuple[str, Optional[float]]:
    """(candidate, speed vs float32 at this shape) for a Linear; raises NoExactKernel."""
    p = probe()
    exact = [c for c in order if p.exact_for(c, umax[c], wmax)]
    if not exact:
        raise NoExactKernel(saturation_reason(order, umax, wmax))
    # an exact but scalar loop (_int_mm on AVX2-only CPUs) is judged at a representative shape:
    # at tiny shapes call overhead, not arithmetic, decides
    # QUANTWISE_INT8_GEMM forces one kernel: used if exact, however slow (tests run every path)
    forced = _forced() is not None and len(order) == 1
    fast = exact if forced else [c for c in exact if not _too_slow(c)]
    if not fast:
        ratio = probe().int8_vs_fp32(exact[0])
        raise NoExactKernel(f"the exact int8 GEMMs here ({', '.join(exact)}) measured "
                            f"{1 / ratio:.1f}x slower than float32 on this CPU ({isa_label()})")
    small = k * n < SMALL_LAYER
    times = p.gemm_ms(384, 1536) if small else p.gemm_ms(k, n)
    timed = [c for c in fast if c in times]
    choice = fast[0]
    if len(timed) > 1:
        fastest = min(timed, key=lambda c: times[c])
        if choice not in times or times[fastest] < TIE * times[choice]:
            choice = fastest
    ratio = times["fp32"] / times[choice] if choice in times and "fp32" in times else None
    return choice, ratio


def check_conv(umax: int, wmax: int) -> Optional[float]:
    """Speed of oneDNN's int8 conv vs float32 (representative shape), or NoExactKernel."""
    p = probe()
    if not p.exact_for("onednn_conv", umax, wmax):
        raise NoExactKernel(saturation_reason(["onednn_conv"], {"onednn_conv": umax}, wmax))
    return p.int8_vs_fp32("onednn_conv")


def saturation_reason(order: list[str], umax: dict[str, int], wmax: int) -> str:
    p = probe()
    if all(p.accumulation.get(c) == PAIRS for c in order):
        return (f"this CPU's int8 kernels ({isa_label()}) add u8 x s8 products in int16 pairs, "
                f"which saturates for these codes (max |weight code| {wmax} with u8 codes up to "
                f"{max(umax.values())}; exact needs 2*u*w <= 32767): quantize on this CPU to get "
                f"7-bit weights")
    return (f"no int8 kernel was measured exact for these codes on this CPU ({isa_label()}: "
            + ", ".join(f"{c} {p.accumulation.get(c)}" for c in order) + ")")


def speed_note(ratio: Optional[float]) -> str:
    """'' or a warning that the int8 kernel is measured no faster than float32 here."""
    if ratio is None or ratio >= 1.05:
        return ""
    return (f"int8 kernel measured {ratio:.2f}x float32 on this CPU ({isa_label()}): "
            f"no int8 speedup here")


def int_mm_fits(umax: int, wmax: int, k: int, n: int) -> bool:
    """Whether _int_mm is exact for these codes here and not over 2x slower than float32."""
    p = probe()
    if not p.exact_for("int_mm", umax, wmax):
        return False
    return not _too_slow("int_mm")


def fbgemm_fits(umax: int, wmax: int) -> bool:
    """Whether FBGEMM is exact for these codes here and not over 2x slower than float32."""
    return probe().exact_for("fbgemm_linear", umax, wmax) and not _too_slow("fbgemm_linear")
