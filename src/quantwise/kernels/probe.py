"""Which integer kernels are exact on this CPU, and how fast: measured, not read from CPU flags.

Without VNNI (AVX2-only CPUs, AVX-512 without VNNI) oneDNN and fbgemm multiply u8 x s8 with
vpmaddubsw, which adds each PAIR of products into an int16 and saturates: full-range codes
(u8 0..255 x s8 +-127) give wrong sums, silently. `torch._int_mm` (s8 x s8) goes through oneDNN
on CPUs torch considers VNNI-capable and saturates the same way there when oneDNN is capped
(ONEDNN_MAX_CPU_ISA=AVX2); on real AVX2-only CPUs it takes an exact but 20-25x slower loop.

So the first time a process needs an integer kernel, each candidate runs on codes at the
extremes of both operands and is compared with the exact int64 product:

| accumulation  | meaning                                                           |
|---------------|-------------------------------------------------------------------|
| "exact"       | full-range codes are exact                                        |
| "int16_pairs" | exact only while 2 * max(u8 code) * max(|s8 code|) <= 32767       |
| "inexact"     | wrong even inside that bound: never used                          |

"int16_pairs" is classified only after both sides of the bound are shown exact (u8 0..255 with
s8 +-64, and u8 0..127 with s8 -128..127) at several row counts (GEMV and blocked GEMM paths).
Kernels also get timed: the int8 GEMM and conv against float32 at representative shapes (for
honest reports), and, per Linear shape, the exact candidates against each other (the fastest
wins). Results are cached per CPU model, flags, torch version and ONEDNN_MAX_CPU_ISA in the
user's cache folder (QUANTWISE_CACHE_DIR, else $XDG_CACHE_HOME/quantwise, else
~/.cache/quantwise); a cache that cannot be written is only a lost speed-up.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import threading
import time
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from quantwise.fileio import atomic_write_text

EXACT, PAIRS, INEXACT = "exact", "int16_pairs", "inexact"
PAIR_LIMIT = 32767  # int16 max: two u8 x s8 products must fit
CANDIDATES = ("onednn_linear", "int_mm", "fbgemm_linear", "onednn_conv")
_VERSION = 3  # 2: first calls under 50 ms are warm-ups, not timings; 3: FBGEMM
_LOCK = threading.RLock()

# oneDNN's ISA cap names (ONEDNN_MAX_CPU_ISA) -> the integer ISA class they leave
_CAP_CLASS = {"SSE41": "sse4.1", "AVX": "avx", "AVX2": "avx2", "AVX2_VNNI": "avx_vnni",
              "AVX2_VNNI_2": "avx_vnni", "AVX512_CORE": "avx512", "AVX512_CORE_VNNI": "avx512_vnni",
              "AVX512_CORE_BF16": "avx512_vnni", "AVX10_1_512": "avx512_vnni",
              "AVX512_CORE_FP16": "avx512_vnni", "AVX10_1_512_AMX": "amx",
              "AVX512_CORE_AMX": "amx", "AVX10_1_512_AMX_FP16": "amx",
              "AVX512_CORE_AMX_FP16": "amx", "AVX10_2_512_AMX_2": "amx"}
_ORDER = ["baseline", "sse4.1", "avx", "avx2", "avx512", "avx_vnni", "avx512_vnni", "amx"]


@functools.cache
def _cpuinfo() -> tuple[str, frozenset]:
    model, flags = "unknown CPU", frozenset()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and model == "unknown CPU":
                    model = value.strip()
                elif key == "flags" and not flags:
                    flags = frozenset(value.split())
                if flags and model != "unknown CPU":
                    break
    except OSError:  # not Linux: the probe still decides; only the labels are vaguer
        pass
    return model, flags


def cpu_model() -> str:
    return _cpuinfo()[0]


def cpu_isa() -> str:
    """The CPU's integer ISA class from its flags: amx, avx512_vnni, avx_vnni, avx512, avx2..."""
    flags = _cpuinfo()[1]
    for flag, name in (("amx_int8", "amx"), ("avx512_vnni", "avx512_vnni"),
                       ("avx_vnni", "avx_vnni"), ("avx512bw", "avx512"), ("avx2", "avx2"),
                       ("avx", "avx"), ("sse4_1", "sse4.1")):
        if flag in flags:
            return name
    return "baseline"


def onednn_cap() -> Optional[str]:
    """ONEDNN_MAX_CPU_ISA (or its old name DNNL_MAX_CPU_ISA) when set: oneDNN honours it."""
    value = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA")
    return value.strip().upper() if value and value.strip().upper() != "ALL" else None


def effective_isa() -> str:
    """The integer ISA oneDNN's kernels use: the CPU's, lowered by ONEDNN_MAX_CPU_ISA."""
    isa, cap = cpu_isa(), onednn_cap()
    if cap and cap in _CAP_CLASS and _ORDER.index(_CAP_CLASS[cap]) < _ORDER.index(isa):
        return _CAP_CLASS[cap]
    return isa


def isa_label() -> str:
    """e.g. 'avx512_vnni' or 'avx2 (oneDNN capped by ONEDNN_MAX_CPU_ISA=AVX2; CPU: avx512_vnni)'."""
    isa, eff = cpu_isa(), effective_isa()
    if eff == isa:
        return isa
    return (f"{eff} (oneDNN capped by ONEDNN_MAX_CPU_ISA={onednn_cap()}; CPU: {isa}; fbgemm and "
            f"ONNX Runtime still pick their kernels from the CPU itself)")


# -- exactness -----------------------------------------------------------------------------------

def _extremes(shape, lo: int, hi: int, dtype, gen) -> torch.Tensor:
    pick = torch.rand(shape, generator=gen) < 0.5
    return torch.where(pick, torch.tensor(lo), torch.tensor(hi)).to(dtype)


def _run_linear(kind: str, u: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """u8 codes [M, K] (zero point 0) x s8 [N, K] -> float64 sums, through candidate `kind`."""
    n = w.shape[0]
    if kind == "onednn_linear":
        packed = torch.ops.onednn.qlinear_prepack(w.contiguous(), None)
        y = torch.ops.onednn.qlinear_pointwise(u, 1.0, 0, packed, torch.ones(n),
                                               torch.zeros(n, dtype=torch.int64), None, 1.0, 0,
                                               torch.float32, "none", [], "")
        return y.double()
    if kind == "fbgemm_linear":
        from quantwise.kernels.int8_linear import fbgemm_linear, fbgemm_prepack
        return fbgemm_linear(u.float(), 0, fbgemm_prepack(w, torch.ones(n), None)).double()
    # _int_mm takes s8 x s8: (u - 128) . w, plus 128 * rowsum(w) back
    s = (u.to(torch.int16) - 128).to(torch.int8)
    acc = torch._int_mm(s, w.t())
    return acc.double() + 128.0 * w.double().sum(dim=1)


def _run_conv(u: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    n = w.shape[0]
    packed = torch.ops.onednn.qconv_prepack(w, torch.ones(n), 1.0, 0, [1, 1], [0, 0], [1, 1], 1,
                                            None)
    y = torch.ops.onednn.qconv2d_pointwise(u.contiguous(memory_format=torch.channels_last), 1.0, 0,
                                           packed, torch.ones(n), torch.zeros(n, dtype=torch.int64),
                                           None, [1, 1], [0, 0], [1, 1], 1, 1.0, 0, torch.float32,
                                           "none", [], "")
    return y.double()


def _exact_on(kind: str, ulo: int, uhi: int, wlo: int, whi: int) -> bool:
    gen = torch.Generator().manual_seed(0)
    k = 256
    try:
        if kind == "onednn_conv":
            for batch, size, n in ((1, 1, 16), (2, 5, 40)):
                u = _extremes((batch, k, size, size), ulo, uhi, torch.uint8, gen)
                w = _extremes((n, k, 1, 1), wlo, whi, torch.int8, gen)
                ref = F.conv2d(u.double(), w.double())
                if not torch.equal(_run_conv(u, w), ref):
                    return False
            return True
        for m, n in ((1, 48), (8, 64), (200, 72)):
            u = _extremes((m, k), ulo, uhi, torch.uint8, gen)
            w = _extremes((n, k), wlo, whi, torch.int8, gen)
            if not torch.equal(_run_linear(kind, u, w), u.double() @ w.double().t()):
                return False
        return True
    except RuntimeError:  # the op is missing or rejects the layout: not a candidate here
        return False


def _accumulation(kind: str) -> str:
    if _exact_on(kind, 0, 255, -128, 127):
        return EXACT
    # both sides of the int16 pair bound: full u8 with |w| <= 64, and u8 <= 127 with full s8
    if _exact_on(kind, 0, 255, -64, 64) and _exact_on(kind, 0, 127, -128, 127):
        return PAIRS
    return INEXACT


# -- timing --------------------------------------------------------------------------------------

def time_ms(fn: Callable[[], object], budget_s: float = 0.05, max_runs: int = 5) -> float:
    """Fastest of up to `max_runs` timed calls after one untimed call, stopping at `budget_s`
    (the minimum, not the median: on a shared machine other work only ever adds time)."""
    fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max_runs and (not times or time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * min(times)


def _gemm_fns(m: int, k: int, n: int) -> dict[str, Callable[[], object]]:
    gen = torch.Generator().manual_seed(1)
    u = torch.randint(0, 128, (m, k), dtype=torch.uint8, generator=gen)
    s = (u.to(torch.int16) - 64).to(torch.int8)
    w = torch.randint(-64, 65, (n, k), dtype=torch.int8, generator=gen)
    x, wf = torch.randn(m, k, generator=gen), torch.randn(n, k, generator=gen)
    fns: dict[str, Callable[[], object]] = {"fp32": lambda: F.linear(x, wf)}
    try:
        packed = torch.ops.onednn.qlinear_prepack(w, None)
        ones, zeros = torch.ones(n), torch.zeros(n, dtype=torch.int64)
        fns["onednn_linear"] = lambda: torch.ops.onednn.qlinear_pointwise(
            u, 1.0, 0, packed, ones, zeros, None, 1.0, 0, torch.float32, "none", [], "")
    except RuntimeError:
        pass
    w_t = w.t()
    fns["int_mm"] = lambda: torch._int_mm(s, w_t)
    try:
        from quantwise.kernels.int8_linear import fbgemm_linear, fbgemm_prepack
        fb, codes = fbgemm_prepack(w, torch.ones(n), None), s.float()
        fns["fbgemm_linear"] = lambda: fbgemm_linear(codes, 128, fb)
    except RuntimeError:
        pass
    return fns


def _time_candidates(fns: dict[str, Callable[[], object]]) -> dict[str, float]:
    """ms per call; a candidate whose first call takes over 50 ms and 8x the fastest so far is
    not timed further (an exact but scalar loop would otherwise take seconds). Faster first
    calls are only a warm-up: they include one-time costs (a thread pool, FBGEMM's setup)."""
    out: dict[str, float] = {}
    for name, fn in fns.items():
        try:
            t0 = time.perf_counter()
            fn()
            first = 1e3 * (time.perf_counter() - t0)
        except RuntimeError:
            continue
        best = min(out.values(), default=None)
        slow = best is not None and first > max(8 * best, 50.0)
        out[name] = first if slow else time_ms(fn)
    return out


def _conv_timings() -> dict[str, float]:
    gen = torch.Generator().manual_seed(2)
    c, size = 64, 28
    x = torch.randn(2, c, size, size, generator=gen).contiguous(memory_format=torch.channels_last)
    wf = torch.randn(c, c, 3, 3, generator=gen)
    u = torch.randint(0, 256, x.shape, dtype=torch.uint8, generator=gen).contiguous(
        memory_format=torch.channels_last)
    w = torch.randint(-64, 65, wf.shape, dtype=torch.int8, generator=gen)
    fns: dict[str, Callable[[], object]] = {"fp32": lambda: F.conv2d(x, wf, padding=1)}
    try:
        packed = torch.ops.onednn.qconv_prepack(w, torch.ones(c), 1.0, 0, [1, 1], [1, 1], [1, 1],
                                                1, list(u.shape))
        ones, zeros = torch.ones(c), torch.zeros(c, dtype=torch.int64)
        fns["onednn_conv"] = lambda: torch.ops.onednn.qconv2d_pointwise(
            u, 1.0, 0, packed, ones, zeros, None, [1, 1], [1, 1], [1, 1], 1, 1.0, 0,
            torch.float32, "none", [], "")
    except RuntimeError:
        pass
    return _time_candidates(fns)


# -- the cached probe ----------------------------------------------------------------------------

def cache_dir() -> Path:
    root = os.environ.get("QUANTWISE_CACHE_DIR")
    if root:
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "quantwise"


def _cache_key() -> str:
    model, flags = _cpuinfo()
    text = "|".join([str(_VERSION), model, " ".join(sorted(flags)), torch.__version__,
                     onednn_cap() or "", str(torch.get_num_threads())])
    return hashlib.sha1(text.encode()).hexdigest()[:16]


class Probe:
    """The measured facts about this CPU's integer kernels (one per process, cached on disk)."""

    def __init__(self, data: dict, path: Optional[Path]):
        self.data, self.path = data, path

    @property
    def accumulation(self) -> dict[str, str]:
        return self.data["accumulation"]

    def exact_for(self, kind: str, umax: int, wmax: int) -> bool:
        """Whether candidate `kind` computes u8 codes <= umax times |s8 codes| <= wmax exactly."""
        acc = self.accumulation.get(kind, INEXACT)
        return acc == EXACT or (acc == PAIRS and 2 * umax * wmax <= PAIR_LIMIT)

    def saturates(self, kind: str) -> bool:
        return self.accumulation.get(kind, INEXACT) != EXACT

    def gemm_ms(self, k: int, n: int, m: int = 128) -> dict[str, float]:
        """ms per call of each GEMM candidate and float32 at [m, k] x [k, n] (measured once)."""
        key = f"{m}x{k}x{n}"
        with _LOCK:
            table = self.data.setdefault("gemm_ms", {})
            if key not in table:
                table[key] = _time_candidates(_gemm_fns(m, k, n))
                self._save()
            return table[key]

    def timings(self, key: str, make_fns: Callable[[], dict[str, Callable[[], object]]]
                ) -> dict[str, float]:
        """ms per call of each of `make_fns()`'s candidates, measured once per `key` (cached)."""
        with _LOCK:
            table = self.data.setdefault("timings", {})
            if key not in table:
                table[key] = _time_candidates(make_fns())
                self._save()
            return table[key]

    def conv_ms(self) -> dict[str, float]:
        with _LOCK:
            if "conv_ms" not in self.data:
                self.data["conv_ms"] = _conv_timings()
                self._save()
            return self.data["conv_ms"]

    def int8_vs_fp32(self, kind: str, k: int = 384, n: int = 1536) -> Optional[float]:
        """Speed of candidate `kind` relative to float32 (> 1: faster), at a representative
        shape; None when it was not measured."""
        table = self.conv_ms() if kind == "onednn_conv" else self.gemm_ms(k, n)
        if kind not in table or "fp32" not in table:
            return None
        return table["fp32"] / max(table[kind], 1e-9)

    def _save(self) -> None:
        if self.path is None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.path, json.dumps(self.data, indent=1, sort_keys=True))
        except OSError:  # read-only home, full disk: the probe simply runs again next time
            pass

    def to_dict(self) -> dict:
        return {"cpu": self.data["cpu"], "isa": isa_label(), "torch": self.data["torch"],
                "accumulation": dict(self.accumulation), "cache": str(self.path)}


_PROBE: Optional[Probe] = None


def probe() -> Probe:
    """This process's Probe: read from the cache, or measured now (well under a second)."""
    global _PROBE
    with _LOCK:
        if _PROBE is not None:
            return _PROBE
        path = cache_dir() / f"probe-{_cache_key()}.json"
        data = None
        try:
            data = json.loads(path.read_text())
            if data.get("version") != _VERSION or set(data.get("accumulation", {})) != set(CANDIDATES):
                data = None
        except (OSError, ValueError):
            data = None
        if data is None:
            data = {"version": _VERSION, "cpu": cpu_model(), "isa": cpu_isa(),
                    "onednn_cap": onednn_cap(), "torch": torch.__version__,
                    "accumulation": {kind: _accumulation(kind) for kind in CANDIDATES}}
            _PROBE = Probe(data, path)
            _PROBE._save()
        else:
            _PROBE = Probe(data, path)
        return _PROBE


def reset() -> None:
    """Forget this process's probe (tests; after changing QUANTWISE_CACHE_DIR)."""
    global _PROBE
    with _LOCK:
        _PROBE = None
