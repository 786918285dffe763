"""glibc's malloc set, once per process, to reuse the big buffers int8 inference frees.

FBGEMM's int8 GEMM allocates its float32 output and an int32 accumulator of the same size on
every call (torch has no CPU caching allocator). With glibc's dynamic thresholds, once two such
buffers free more than twice the largest one at the top of the heap, glibc gives the memory back
to the kernel, and the next call page-faults it in again, zeroed: all-MiniLM-L6-v2 w8a8-dynamic
(32 x 64 tokens) took 15-19 thousand page faults a forward, ~1 us each, ~2.5% of its time on 2
Zen 1 cores (benchmarks/minilm_passes.py --heap measures it). ONNX Runtime avoids the same cost
with its own arena.

`keep_freed_memory` raises glibc's thresholds from the start: the mmap threshold to 32 MiB (the
most glibc's own dynamic adjustment reaches) and the trim threshold to 512 MiB (glibc's dynamic
ceiling, 64 MiB, still gave memory back and re-faulted it in a synthetic BERT layer whose
temporaries are ~56 MiB). Freed memory then stays with the process for reuse, as in ONNX
Runtime's arena: its resident size stays near the peak of the forward's temporaries, never more
than 512 MiB above what it holds. Where the user chose already (MALLOC_TRIM_THRESHOLD_ /
MALLOC_MMAP_THRESHOLD_ / GLIBC_TUNABLES in the environment), QUANTWISE_MALLOC=system is set, or
the C library is not glibc, nothing changes. Called when the encoder fast path is installed.
"""

from __future__ import annotations

import ctypes
import os
import platform
from typing import Optional

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
MMAP_BYTES, TRIM_BYTES = 32 << 20, 512 << 20
_USER_SET = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "GLIBC_TUNABLES")
_state: dict[str, Optional[str]] = {}


def _glibc() -> Optional[ctypes.CDLL]:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def keep_freed_memory() -> Optional[str]:
    """Apply the setting above (once per process); returns what was done, for reports, or None
    where nothing changed."""
    if "note" in _state:
        return _state["note"]
    note = None
    wanted = os.environ.get("QUANTWISE_MALLOC", "").strip().lower() != "system"
    if wanted and not any(k in os.environ for k in _USER_SET):
        libc = _glibc()
        if libc is not None and libc.mallopt(M_MMAP_THRESHOLD, MMAP_BYTES) == 1 \
                and libc.mallopt(M_TRIM_THRESHOLD, TRIM_BYTES) == 1:
            note = (f"glibc keeps up to {TRIM_BYTES >> 20} MiB of freed memory for reuse "
                    f"(QUANTWISE_MALLOC=system: its defaults)")
    _state["note"] = note
    return note


__all__ = ["keep_freed_memory"]
