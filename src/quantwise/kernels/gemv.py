"""Weight-only Linears at 1-8 rows (LLM decoding): a compiled GEMV that reads the int8 / int4
codes once, dequantizes each row into an L1-resident float32 buffer (the values
numerics.dequantize gives) and dots it with every activation row (csrc/gemv.c), so it moves
1 or 0.5 byte per weight.

Why: at batch 1-8 a Linear is bound by the bytes of its weight, and no torch CPU op multiplies
float32 activations by int8/int4 weights at float32 accuracy at that speed on every CPU:
FBGEMM's fp16-weight GEMM reads 2 bytes per weight, and torch's int4 GEMM rounds activations to
bf16 and is slower than float32 on CPUs without AVX-512 BF16 (0.66x at 4096 x 4096 on an
AVX2-only EPYC). The C file has no torch headers: `cc -O3 -shared` builds it in well under a
second at first use, into the probe's cache folder; the AVX2 + FMA functions run only where the
CPU's flags have both, and only where the probe measured them faster than the layer's other
kernel at one row (QUANTWISE_GEMV=on skips that timing, =off never uses the GEMV). No compiler
or another CPU: the layer keeps its other kernel. Rows are split over torch.get_num_threads() threads (ctypes releases the GIL).
Accumulation is float32 like F.linear's, in another order (scale applied per row or group).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

import torch

from quantwise.kernels.base import tensor_bytes
from quantwise.kernels.probe import _cpuinfo, cache_dir

_SRC = Path(__file__).parent / "csrc" / "gemv.c"
MAX_ROWS = 8
_F, _I = ctypes.c_void_p, ctypes.c_int


@functools.cache
def library() -> tuple[Optional[ctypes.CDLL], str]:
    """(the compiled library or None, why not)."""
    flags = _cpuinfo()[1]
    if platform.machine().lower() not in ("x86_64", "amd64") or not {"avx2", "fma"} <= flags:
        return None, "the compiled GEMV needs an x86-64 CPU with AVX2 and FMA"
    source = _SRC.read_bytes()
    cc = os.environ.get("CC", "cc")
    out = cache_dir() / f"gemv-{hashlib.sha1(source + cc.encode()).hexdigest()[:12]}.so"
    if not out.exists():
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
            os.close(fd)
            subprocess.run([cc, "-O3", "-shared", "-fPIC", "-o", tmp, str(_SRC)], check=True,
                           capture_output=True, timeout=120)
            os.replace(tmp, out)  # atomic: a concurrent build never loads half a file
        except (OSError, subprocess.SubprocessError) as exc:
            return None, f"could not build the GEMV ({type(exc).__name__}: {str(exc)[:120]})"
    try:
        lib = ctypes.CDLL(str(out))
    except OSError as exc:
        return None, f"could not load the GEMV ({exc})"
    lib.qw_gemv_i8.argtypes = [_F, _I, _I, _F, _F, _F, _F, _I, _I, _I, _F]
    lib.qw_gemv_i4.argtypes = [_F, _I, _I, _F, _F, _I, _F, _F, _I, _I, _I, _F]
    lib.qw_gemv_i8.restype = lib.qw_gemv_i4.restype = None
    return lib, ""


@functools.cache
def _pool(threads: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=threads, thread_name_prefix="quantwise-gemv")


def _ptr(t: Optional[torch.Tensor]):
    return None if t is None else ctypes.c_void_p(t.data_ptr())


def blocked_int4(codes: torch.Tensor) -> torch.Tensor:
    """int4 codes [N, K] (K % 32 == 0) -> uint8 [N, K/2]: per block of 32, byte b holds
    code b + 8 in its low nibble and code b + 16 + 8 in its high nibble (csrc/gemv.c)."""
    n, k = codes.shape
    u = (codes.to(torch.int16) + 8).reshape(n, k // 32, 2, 16)
    return (u[:, :, 0] | (u[:, :, 1] << 4)).to(torch.uint8).reshape(n, k // 2).contiguous()


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
        self.bias = None if bias is None else bias.detach().to(torch.float32).contiguous()

    @staticmethod
    def supports(bits: int, k: int, group: int) -> bool:
        if library()[0] is None:
            return False
        return k % 8 == 0 if bits == 8 else (k % group == 0 and group % 32 == 0)

    def __call__(self, x2: torch.Tensor) -> torch.Tensor:
        """x2: contiguous float32 [M, K] with M <= 8."""
        m, n, k = x2.shape[0], self.out_features, self.in_features
        y = torch.empty(m, n)
        # small layers: one thread (handing work to the pool costs more than it saves)
        threads = 1 if n * k * max(m, 2) < (1 << 21) else min(torch.get_num_threads(), n // 64)
        threads = max(threads, 1)
        bounds = [n * i // threads for i in range(threads + 1)]
        scratch = self._scratch(threads)
        if self.bits == 8:
            def run(t, lo, hi):
                self.lib.qw_gemv_i8(_ptr(x2), m, k, _ptr(self.codes), _ptr(self.scale),
                                    _ptr(self.bias), _ptr(y), n, lo, hi, _ptr(scratch[t]))
        else:
            def run(t, lo, hi):
                self.lib.qw_gemv_i4(_ptr(x2), m, k, _ptr(self.codes), _ptr(self.scale),
                                    self.group, _ptr(self.bias), _ptr(y), n, lo, hi,
                                    _ptr(scratch[t]))
        if threads == 1:
            run(0, 0, n)
        else:
            futures = [_pool(threads).submit(run, i, bounds[i], bounds[i + 1])
                       for i in range(1, threads)]
            run(0, bounds[0], bounds[1])
            for f in futures:
                f.result()
        return y

    def _scratch(self, threads: int) -> list[torch.Tensor]:
        """One K-float row buffer per thread (torch's CPU allocations are 64-byte aligned)."""
        bufs = self.__dict__.setdefault("_bufs", [])
        while len(bufs) < threads:
            bufs.append(torch.empty(self.in_features))
        return bufs

    def __getstate__(self) -> dict:  # deepcopy: the library handle and buffers are per process
        state = {k: v for k, v in self.__dict__.items() if k not in ("lib", "_bufs")}
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.lib = library()[0]

    def nbytes(self) -> int:
        return tensor_bytes(self.codes, self.scale, self.bias)


class FewRowsLinear:
    """A weight-only kernel whose calls of 1-8 float32 rows go to the compiled GEMV (chosen
    when the probe measured it faster at one row for this shape); more rows go to `base`."""

    def __init__(self, base, gemv: WeightOnlyGemv):
        self.base, self.gemv = base, gemv
        self.in_features, self.out_features = gemv.in_features, gemv.out_features
        self.name = (f"{base.name}; 1-{MAX_ROWS} rows: compiled AVX2 GEMV reading the "
                     f"int{gemv.bits} codes (float32 activations and accumulation)")
        self.fallback_reason = base.fallback_reason
        self.speed_vs_fp32 = getattr(base, "speed_vs_fp32", None)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if 0 < x2.shape[0] <= MAX_ROWS and x.dtype == torch.float32:
            return self.gemv(x2.contiguous()).reshape(*lead, self.out_features)
        return self.base(x)

    def nbytes(self) -> int:
        return self.base.nbytes() + self.gemv.nbytes()


def with_gemv(base, codes: torch.Tensor, scale: torch.Tensor, bits: int, group: int,
              bias: Optional[torch.Tensor]):
    """`base`, or base + the GEMV for few rows where the probe measured the GEMV faster."""
    from quantwise.kernels.probe import probe
    import torch.nn.functional as F

    n, k = codes.shape
    mode = os.environ.get("QUANTWISE_GEMV", "").strip().lower()  # "off", "on" (no timing)
    if mode == "off" or not WeightOnlyGemv.supports(bits, k, group):
        return base
    gemv = WeightOnlyGemv(codes, scale, bits, group, bias)
    if mode == "on":
        return FewRowsLinear(base, gemv)

    def fns():
        x = torch.randn(1, k)
        w = torch.randn(n, k)
        return {"fp32": lambda: F.linear(x, w), "base": lambda: base(x), "gemv": lambda: gemv(x)}

    times = probe().timings(f"gemv-{type(base).__name__}-int{bits}-g{group}-{n}x{k}", fns)
    if "gemv" in times and times["gemv"] < times.get("base", float("inf")):
        return FewRowsLinear(base, gemv)
    return base
