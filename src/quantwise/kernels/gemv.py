"""Weight-only Linears at 1-8 rows (LLM decoding): a compiled GEMV that reads the int8 / int4
codes once (1 or 0.5 byte per weight) and multiplies them in integer arithmetic by the
activations rounded per row to 16-bit codes, applying the scales per output row (int8) or per
group (int4) in float32 (csrc/gemv.c).

Numerics: each activation row is rounded to codes of step max|x| / 32767, so every element is
off by at most max|x| / 65534 (a relative error of ~3e-5 at the output for Gaussian rows, ~200x
below int8 weight rounding; torch's int4 GEMM rounds activations to bf16, ~100x coarser); the
integer sums are exact. Rows with a NaN or Inf (or a maximum too small to scale) send the call
to the same kernel with float32 activations and accumulation, which gives F.linear's non-finite
outputs; `exact=True` asks for that path. Why integers: on AVX2 the float path was bound by
converting every weight to float32 (a widening shuffle and a conversion per 8 weights before
the FMA); vpmaddwd / vpmaddubsw multiply 16-32 codes per instruction with no conversion:
1.3x (int8) and 1.7-2x (int4) faster at MiniLM's shapes on one thread. On AVX-512 VNNI CPUs
csrc/gemv_vnni.c does the same sums with vpdpbusd / vpdpwssd (half the instructions); int4
rows are stored in tiles of 4 read as one stream (csrc/gemv.h): together 10-14 -> 25-29 GB/s
at the 1.1B decode shapes on 2 Zen 4 cores, where memory gives ~27.

Why a compiled kernel: at batch 1-8 a Linear is bound by the bytes of its weight, and no torch
CPU op multiplies float32 activations by int8/int4 weights at that speed on every CPU:
FBGEMM's fp16-weight GEMM reads 2 bytes per weight, and torch's int4 GEMM rounds activations to
bf16 and is slower than float32 on CPUs without AVX-512 BF16 (0.66x at 4096 x 4096 on an
AVX2-only EPYC). The C file has no torch headers: `cc -O3 -shared` builds it in well under a
second at first use, into the probe's cache folder; the AVX2 + FMA functions run only where the
CPU's flags have both, and only where the probe measured them faster than the layer's other
kernel at one row (QUANTWISE_GEMV=on skips that timing, =off never uses the GEMV). No compiler
or another CPU: the layer keeps its other kernel. Output columns are split over
torch.get_num_threads() OpenMP threads for layers of 128K+ multiply-adds; built with -fopenmp the
library uses the libgomp torch has loaded, i.e. torch's own threads (a Python thread pool was
tried: its hand-off cost ~45 us and its threads fought torch's spinning OpenMP threads for the
cores, 2-4x slower at 4096 x 4096 right after a torch op).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import subprocess
import tempfile
from pathlib import Path
from typing import Optional

import torch

from quantwise.kernels.base import tensor_bytes
from quantwise.kernels.probe import _cpuinfo, cache_dir

_CSRC = Path(__file__).parent / "csrc"
# gemv.h: included by both GEMV files; decode.c: the float glue of runtime/decoder.py's loop;
# rowquant.c: the encoder fast path's row passes and attention (kernels/rowquant.py)
_SOURCES = (_CSRC / "gemv.c", _CSRC / "gemv_vnni.c", _CSRC / "decode.c", _CSRC / "rowquant.c")
MAX_ROWS = 8
_F, _I = ctypes.c_void_p, ctypes.c_int


class _Layer(ctypes.Structure):  # csrc/gemv.c qw_layer
    _fields_ = [("w", _F), ("scale", _F), ("urow", _F), ("bias", _F), ("n", _I), ("k", _I),
                ("bits", _I), ("group", _I), ("vnni", _I)]


def library_tag() -> str:
    """The C sources' and compiler's hash: names the built library and the probe's timings."""
    text = b"".join(p.read_bytes() for p in (*_SOURCES, _CSRC / "gemv.h", _CSRC / "vec.h"))
    return hashlib.sha1(text + os.environ.get("CC", "cc").encode()).hexdigest()[:12]


def uses_vnni() -> bool:
    """Whether layers take csrc/gemv_vnni.c's AVX-512 VNNI paths: the CPU has them and neither
    ONEDNN_MAX_CPU_ISA (which the test suite uses to run the AVX2 paths on a VNNI CPU) nor
    QUANTWISE_GEMV_ISA=avx2 caps the ISA below them."""
    from quantwise.kernels.probe import effective_isa

    if os.environ.get("QUANTWISE_GEMV_ISA", "").strip().lower() == "avx2":
        return False
    return effective_isa() in ("avx512_vnni", "amx") and {"avx512bw", "avx512_vnni"} <= _cpuinfo()[1]


@functools.cache
def library() -> tuple[Optional[ctypes.CDLL], str]:
    """(the compiled library or None, why not)."""
    flags = _cpuinfo()[1]
    if platform.machine().lower() not in ("x86_64", "amd64") or not {"avx2", "fma"} <= flags:
        return None, "the compiled GEMV needs an x86-64 CPU with AVX2 and FMA"
    cc = os.environ.get("CC", "cc")
    out = cache_dir() / f"gemv-{library_tag()}.so"
    if not out.exists():
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
            os.close(fd)
            base = [cc, "-O3", "-shared", "-fPIC", "-Wno-unknown-pragmas", "-o", tmp,
                    *map(str, _SOURCES)]
            try:  # OpenMP: the GEMV then runs on torch's own (already loaded) OpenMP threads
                subprocess.run(base + ["-fopenmp", "-lm"], check=True, capture_output=True, timeout=120)
            except subprocess.CalledProcessError:  # no libgomp to link: one thread per call
                subprocess.run(base + ["-lm"], check=True, capture_output=True, timeout=120)
            os.replace(tmp, out)  # atomic: a concurrent build never loads half a file
        except (OSError, subprocess.SubprocessError) as exc:
            return None, f"could not build the GEMV ({type(exc).__name__}: {str(exc)[:120]})"
    try:
        lib = ctypes.CDLL(str(out))
    except OSError as exc:
        return None, f"could not load the GEMV ({exc})"
    lib.qw_gemv.argtypes = [_F, _F, _F, _I, _I, _I]
    lib.qw_gemv.restype = None
    lib.openmp = bool(lib.qw_openmp())  # built with OpenMP: calls may use several threads
    return lib, ""


TILE = 4  # csrc/gemv.h QW_TILE


def blocked_int4(codes: torch.Tensor) -> torch.Tensor:
    """int4 codes [N, K] (K % 64 == 0) -> uint8 [N, K/2] (csrc/gemv.h): per block of 64 codes,
    byte b holds code b + 8 in its low nibble and code b + 32 + 8 in its high nibble; rows in
    tiles of TILE, each tile holding block 0 of its rows side by side, then block 1, ...; the
    last N % TILE rows row after row."""
    n, k = codes.shape
    # uint8 throughout (stored nibbles 0..15, 15 << 4 fits): temporaries of one byte per code
    u = (codes.to(torch.int8) + 8).view(torch.uint8).reshape(n, k // 64, 2, 32)
    b = (u[:, :, 0] | (u[:, :, 1] << 4))  # [N, K/64, 32]
    full = n - n % TILE
    tiles = b[:full].reshape(full // TILE, TILE, k // 64, 32).transpose(1, 2)
    return torch.cat([tiles.reshape(full, k // 2), b[full:].reshape(n - full, k // 2)])


class WeightOnlyGemv:
    """y = x @ dequantize(W)^T + bias for x of 1-8 rows, on the compiled GEMV."""

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, bits: int, group: int,
                 bias: Optional[torch.Tensor]):
        self.lib = library()[0]
        n, k = codes.shape
        self.out_features, self.in_features, self.bits, self.group = n, k, bits, group
        if bits == 8:
            self.codes = codes.to(torch.int8).contiguous()
            self.scale = scale.to(torch.float32).reshape(n).contiguous()
        else:
            self.codes = blocked_int4(codes)
            self.scale = scale.to(torch.float32).reshape(n, k // group).contiguous()
            # the integer path's offset term per row (csrc/gemv.c i4q_block): 128 x the sum over
            # groups of scale x the group's sum of stored nibbles (code + 8)
            # integer group sums (exact), in row chunks: no float64 copy of a 32K-row head
            u = torch.empty(n, k // group, dtype=torch.float64)
            for r in range(0, n, 4096):
                c = codes[r:r + 4096].reshape(-1, k // group, group)
                u[r:r + 4096] = c.sum(-1, dtype=torch.int32) + 8 * group
            self.urow = (128 * (u * self.scale.double()).sum(-1)).to(torch.float32).contiguous()
        self.bias = None if bias is None else bias.detach().to(torch.float32).contiguous()

    @staticmethod
    def supports(bits: int, k: int, group: int) -> bool:
        if library()[0] is None:
            return False
        return k % 8 == 0 if bits == 8 else (k % 64 == 0 and k % group == 0 and group % 32 == 0)

    def __call__(self, x2: torch.Tensor, exact: bool = False) -> torch.Tensor:
        """x2: contiguous float32 [M, K] with M <= 8. exact: float32 activations (not int16;
        int4 at 3+ rows always)."""
        m, n = x2.shape[0], self.out_features
        y = torch.empty(m, n)
        # small layers: one thread (waking a second costs ~1-2 us: 256 x 256 ran 4.2 us on one
        # thread, 5.0 on two; 384 x 384 7.0 and 4.8)
        threads = 1 if n * self.in_features * m < (1 << 17) or not self.lib.openmp else max(
            1, min(torch.get_num_threads(), n // 64))
        self.lib.qw_gemv(self._layer_ptr(), x2.data_ptr(), y.data_ptr(), m, threads, exact)
        return y

    def _layer_ptr(self) -> int:
        """The address of the layer's C struct of weight pointers (built once: a ctypes call
        costs ~0.15 us per argument, and a small layer's call is a few microseconds)."""
        ptr = self.__dict__.get("_ptr")
        if ptr is None:
            urow = getattr(self, "urow", None)
            self._struct = _Layer(self.codes.data_ptr(), self.scale.data_ptr(),
                                  None if urow is None else urow.data_ptr(),
                                  None if self.bias is None else self.bias.data_ptr(),
                                  self.out_features, self.in_features, self.bits, self.group,
                                  int(uses_vnni()))
            ptr = self._ptr = ctypes.addressof(self._struct)
        return ptr

    def __getstate__(self) -> dict:  # deepcopy: the library handle and pointers are per process
        state = {k: v for k, v in self.__dict__.items() if k not in ("lib", "_struct", "_ptr")}
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.lib = library()[0]

    def nbytes(self) -> int:
        return tensor_bytes(self.codes, self.scale, getattr(self, "urow", None), self.bias)


def fuse_rows(parts: list[WeightOnlyGemv]) -> Optional[WeightOnlyGemv]:
    """One GEMV over the output rows of `parts` (Linears of one input: q / k / v, gate / up),
    whose buffers the parts then view, so a decoding step makes one call where it made
    len(parts) and no weight is stored twice. None unless the parts share bits, group and
    input width (and, int4, all but the last fill whole tiles of rows)."""
    first = parts[0]
    if len(parts) < 2 or any((p.bits, p.group, p.in_features) != (first.bits, first.group,
                                                                   first.in_features) for p in parts):
        return None
    if first.bits == 4 and any(p.out_features % TILE for p in parts[:-1]):
        return None
    fused = WeightOnlyGemv.__new__(WeightOnlyGemv)
    fused.lib, fused.bits, fused.group = first.lib, first.bits, first.group
    fused.in_features = first.in_features
    fused.out_features = sum(p.out_features for p in parts)
    names = ["codes", "scale"] + (["urow"] if first.bits == 4 else [])
    for name in names:
        setattr(fused, name, torch.cat([getattr(p, name) for p in parts]))
    has_bias = any(p.bias is not None for p in parts)
    fused.bias = torch.cat([p.bias if p.bias is not None else torch.zeros(p.out_features)
                            for p in parts]) if has_bias else None
    start = 0
    for p in parts:  # the parts view the fused buffers (a zero bias adds exactly nothing)
        rows = slice(start, start + p.out_features)
        for name in names + (["bias"] if has_bias else []):
            setattr(p, name, getattr(fused, name)[rows])
        p.__dict__.pop("_ptr", None)
        p.__dict__.pop("_struct", None)
        start += p.out_features
    return fused


class FewRowsLinear:
    """A weight-only kernel whose calls of 1-8 float32 rows go to the compiled GEMV (chosen
    when the probe measured it faster at one row for this shape); more rows go to `base`."""

    def __init__(self, base, gemv: WeightOnlyGemv):
        self.base, self.gemv = base, gemv
        self.in_features, self.out_features = gemv.in_features, gemv.out_features
        rows = "" if gemv.bits == 8 else " at 1-2 rows (3-8: float32 activations and FMAs)"
        self.name = (f"{base.name}; 1-{MAX_ROWS} rows: compiled AVX2 GEMV reading the "
                     f"int{gemv.bits} codes x activations rounded per row to int16 (error <= "
                     f"max|x|/65534 per element), integer sums, float32 scaling{rows}")
        self.fallback_reason = base.fallback_reason
        self.speed_vs_fp32 = getattr(base, "speed_vs_fp32", None)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float32:
            return self.base(x)
        if x.dim() == 2:  # the decoding case: no reshapes (a call here is a few microseconds)
            if 0 < x.shape[0] <= MAX_ROWS:
                return self.gemv(x if x.is_contiguous() else x.contiguous())
            return self.base(x)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if 0 < x2.shape[0] <= MAX_ROWS:
            return self.gemv(x2.contiguous()).reshape(*lead, self.out_features)
        return self.base(x)

    def nbytes(self) -> int:
        return self.base.nbytes() + self.gemv.nbytes()


def with_gemv(base, codes: torch.Tensor, scale: torch.Tensor, bits: int, group: int,
              bias: Optional[torch.Tensor]):
    """`base`, or base + the GEMV for few rows where the probe measured the GEMV faster."""
    from quantwise.kernels.probe import probe

    n, k = codes.shape
    mode = os.environ.get("QUANTWISE_GEMV", "").strip().lower()  # "off", "on" (no timing)
    if mode == "off" or not WeightOnlyGemv.supports(bits, k, group):
        return base
    gemv = WeightOnlyGemv(codes, scale, bits, group, bias)
    if mode == "on":
        return FewRowsLinear(base, gemv)

    def fns():  # no float32 reference: it would allocate a float copy of the weight
        x = torch.randn(1, k)
        return {"base": lambda: base(x), "gemv": lambda: gemv(x)}

    isa = "vnni" if uses_vnni() else "avx2"
    key = f"gemv-{library_tag()}-{isa}-{type(base).__name__}-int{bits}-g{group}-{n}x{k}"
    times = probe().timings(key, fns)  # keyed by the C source too: a new kernel is re-timed
    if "gemv" in times and times["gemv"] < times.get("base", float("inf")):
        return FewRowsLinear(base, gemv)
    return base
