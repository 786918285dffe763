"""kernels/heap.py: glibc keeps the big buffers a forward frees (FBGEMM's outputs and
accumulators) for reuse instead of giving them back and page-faulting them in again."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from quantwise.kernels import heap

# 40 MiB of temporaries in 10 MiB buffers (as FBGEMM's outputs and accumulators at MiniLM's
# FFN), allocated, written and freed round after round; prints each round's page faults
ROUNDS = r"""
import resource, torch
from quantwise.kernels import heap
heap.keep_freed_memory()
torch.set_num_threads(1)
faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for r in range(6):
    start = faults()
    bufs = [torch.empty(10 << 18) for _ in range(4)]
    for b in bufs:
        b.fill_(1.0)
    del bufs, b
    print(faults() - start)
"""


def _faults_per_round(env_extra: dict) -> list[int]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("QUANTWISE_MALLOC", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_",
                        "GLIBC_TUNABLES")}
    run = subprocess.run([sys.executable, "-c", ROUNDS], env={**env, **env_extra},
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    return [int(v) for v in run.stdout.split()]


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_freed_buffers_come_back_without_page_faults():
    # each round touches 10,240 pages; glibc's defaults give them back and fault them in again
    # every round, with the setting they stay (one round in a few re-faults one buffer, 2,560)
    tuned, default = _faults_per_round({}), _faults_per_round({"QUANTWISE_MALLOC": "system"})
    assert 4 * sum(tuned[1:]) < sum(default[1:]), (tuned, default)


def test_once_per_process_and_the_user_choice_wins(monkeypatch):
    for name in ("QUANTWISE_MALLOC", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "GLIBC_TUNABLES"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(heap, "_state", {})
    first = heap.keep_freed_memory()
    assert heap.keep_freed_memory() is first
    if platform.libc_ver()[0] == "glibc":
        assert first and "512 MiB" in first
    monkeypatch.setattr(heap, "_state", {})
    monkeypatch.setenv("QUANTWISE_MALLOC", "system")
    assert heap.keep_freed_memory() is None
    monkeypatch.setattr(heap, "_state", {})
    monkeypatch.delenv("QUANTWISE_MALLOC")
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "1000000")
    assert heap.keep_freed_memory() is None
