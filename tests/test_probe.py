"""The kernel probe: every kernel the selector can choose is exact on saturating codes, full-range
codes never reach a saturating kernel, the probe is cached, and the quality checks hold here and
with oneDNN forced onto the AVX2 code paths of CPUs without VNNI (ONEDNN_MAX_CPU_ISA=AVX2)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from quantwise.kernels import ConvGeom, DynamicAct, StaticAct, make_conv_kernel, make_linear_kernel
from quantwise.kernels import probe as probe_mod
from quantwise.kernels.int8_conv import OneDnnConv
from quantwise.kernels.int8_linear import IntMMLinear, OneDnnLinear
from quantwise.kernels.probe import EXACT, PAIRS, probe
from quantwise.kernels.select import LINEAR, _too_slow
from quantwise.spec import Format, PerChannel, PerTensor, PerToken, QuantSpec

W8 = QuantSpec(Format.INT8, granularity=PerChannel(0))
U8_UNIT = StaticAct(1.0, 0, QuantSpec(Format.UINT8, symmetric=False, granularity=PerTensor()))
PER_TOKEN = DynamicAct(QuantSpec(Format.INT8, symmetric=True, granularity=PerToken()))
HERE = Path(__file__).parent


def _extremes(shape, lo, hi, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.where(torch.rand(shape, generator=g) < 0.5, float(lo), float(hi))


def _wmax(kind: str) -> int:
    """The largest |weight code| the probe says `kind` sums exactly with u8 codes up to 255."""
    return 127 if probe().accumulation[kind] == EXACT else 64


def test_every_candidate_is_classified_exact_or_int16_pairs():
    acc = probe().accumulation
    assert set(acc) == set(probe_mod.CANDIDATES)
    assert all(v in (EXACT, PAIRS) for v in acc.values()), acc


@pytest.mark.parametrize("m", [1, 7, 300])
@pytest.mark.parametrize("which", ["onednn_static", "int_mm_static", "int_mm_token", "onednn_token"])
def test_selectable_linear_kernels_are_exact_on_saturating_codes(which, m):
    k, n = 256, 40
    gemm = "int_mm" if which.startswith("int_mm") else "onednn_linear"
    wm = _wmax(gemm)
    codes = _extremes((n, k), -wm, wm).to(torch.int8)
    ones = torch.ones(n)
    if which.endswith("static"):
        x = _extremes((m, k), 0, 255, seed=1)  # scale 1, zero point 0: the codes themselves
        act = U8_UNIT
        kernel = (OneDnnLinear(codes, ones, None, act) if gemm == "onednn_linear" else
                  IntMMLinear(codes, ones, torch.zeros(n, dtype=torch.int32), None, act))
    else:
        x = _extremes((m, k), -127, 127, seed=1)  # row max 127: scale 1, codes = x (u8 1..255)
        x[:, 0] = 127.0
        kernel = IntMMLinear(codes, ones, torch.zeros(n, dtype=torch.int32), None, PER_TOKEN,
                             gemm="onednn" if gemm == "onednn_linear" else "int_mm")
    exact = x.double() @ codes.double().t()
    assert torch.equal(kernel(x).double(), exact)


@pytest.mark.parametrize("size", [1, 6])
def test_selectable_conv_kernel_is_exact_on_saturating_codes(size):
    wm = _wmax("onednn_conv")
    codes = _extremes((24, 128, 3, 3), -wm, wm).to(torch.int8)
    x = _extremes((2, 128, size, size), 0, 255, seed=1)
    geom = ConvGeom.make(2, 1, 1, 1, 1)
    kernel = OneDnnConv(codes, torch.ones(24), None, U8_UNIT, geom, (1, 1))
    exact = F.conv2d(x.double(), codes.double(), padding=1)
    assert torch.equal(kernel(x).double(), exact)


def test_full_range_codes_never_run_on_a_saturating_kernel():
    """8-bit codes (a checkpoint made on a VNNI CPU) where every fast kernel sums int16 pairs:
    the exact float simulation, which says why; elsewhere a real kernel, exact."""
    k, n = 256, 32
    codes = _extremes((n, k), -127, 127).to(torch.int8)
    x = _extremes((16, k), 0, 255, seed=1)
    exact = x.double() @ codes.double().t()
    kernel = make_linear_kernel(codes, torch.ones(n), torch.zeros(n), W8, None, U8_UNIT)
    saturating = all(probe().saturates(c) for c in LINEAR)
    usable = [c for c in LINEAR if not probe().saturates(c) and not _too_slow(c)]
    assert (kernel.fallback_reason is None) == bool(usable), kernel.fallback_reason
    if saturating:
        assert "int16 pairs" in kernel.fallback_reason and "7-bit" in kernel.fallback_reason
    assert torch.allclose(kernel(x).double(), exact, rtol=1e-6, atol=0)

    wc = _extremes((16, 64, 3, 3), -127, 127).to(torch.int8)
    conv = make_conv_kernel(wc, torch.ones(16), torch.zeros(16), W8, None, U8_UNIT, stride=1,
                            padding=1, dilation=1, groups=1)
    assert (conv.fallback_reason is not None) == probe().saturates("onednn_conv")
    xc = _extremes((1, 64, 5, 5), 0, 255, seed=2)
    assert torch.allclose(conv(xc).double(), F.conv2d(xc.double(), wc.double(), padding=1),
                          rtol=1e-6, atol=0)


def test_probe_is_cached_per_cpu_and_torch_version(tmp_path, monkeypatch):
    monkeypatch.setenv("QUANTWISE_CACHE_DIR", str(tmp_path))
    probe_mod.reset()
    try:
        first = probe()
        files = list(tmp_path.glob("probe-*.json"))
        assert len(files) == 1 and first.path == files[0]
        saved = json.loads(files[0].read_text())
        assert saved["torch"] == torch.__version__ and saved["accumulation"] == first.accumulation
        probe_mod.reset()
        monkeypatch.setattr(probe_mod, "_accumulation", lambda kind: pytest.fail("re-measured"))
        assert probe().accumulation == first.accumulation
    finally:
        probe_mod.reset()


def test_unwritable_cache_only_costs_a_new_measurement(tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    monkeypatch.setenv("QUANTWISE_CACHE_DIR", str(blocker))
    probe_mod.reset()
    try:
        assert set(probe().accumulation) == set(probe_mod.CANDIDATES)
    finally:
        probe_mod.reset()


def _check_quality(result: dict, minilm: bool) -> None:
    assert result["mlp_sqnr_db"] >= 25.0, result
    assert result["extreme_linear_rel_err"] <= 1e-5, result
    assert result["cnn_rel_err"] <= 0.03, result
    if minilm:
        dyn, sq = result["minilm"]["w8a8-dynamic"], result["minilm"]["w8a8-smoothquant"]
        assert dyn["mean"] >= 0.995 and dyn["fallbacks"] == 0, dyn
        assert sq["mean"] >= 0.99 and sq["fallbacks"] == 0, sq


def test_quality_on_this_cpu():
    sys.path.insert(0, str(HERE))
    try:
        import cpu_checks
    finally:
        sys.path.remove(str(HERE))
    _check_quality(cpu_checks.main([]), minilm=False)


def test_quality_on_the_avx2_code_paths():
    """oneDNN reads ONEDNN_MAX_CPU_ISA once, at start-up: hence a fresh process."""
    env = dict(os.environ, ONEDNN_MAX_CPU_ISA="AVX2")
    out = subprocess.run([sys.executable, str(HERE / "cpu_checks.py"), "--minilm"], env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["isa"].startswith("avx2"), result["isa"]
    assert all(v == PAIRS for v in result["accumulation"].values()) or "avx2" == probe_mod.cpu_isa()
    _check_quality(result, minilm=True)


def test_a_slow_first_call_is_a_warm_up_not_the_timing():
    """One-time costs (a thread pool, FBGEMM's setup) must not decide a kernel choice; only a
    candidate whose first call is over 50 ms and 8x the fastest is left untimed."""
    import time

    calls = {"warm": 0}

    def fast():
        return None

    def warm():  # 20 ms once, then as fast as `fast`
        calls["warm"] += 1
        if calls["warm"] == 1:
            time.sleep(0.02)

    def scalar():  # always slow: timed once only
        time.sleep(0.06)

    out = probe_mod._time_candidates({"fast": fast, "warm": warm, "scalar": scalar})
    assert out["warm"] < 5.0 and calls["warm"] > 2
    assert out["scalar"] >= 60.0


@pytest.mark.parametrize("onednn", [EXACT, PAIRS])
def test_per_token_order_prefers_fbgemm_where_onednn_sums_int16_pairs(onednn, monkeypatch):
    """Without VNNI a lucky oneDNN timing must not decide the per-token kernel (bimodal at the
    probe's 128 rows); on AMX oneDNN leads, elsewhere _int_mm."""
    from quantwise.kernels import select

    monkeypatch.delenv("QUANTWISE_INT8_GEMM", raising=False)
    p = probe()
    monkeypatch.setitem(p.data, "accumulation", {**p.accumulation, "onednn_linear": onednn})
    order = select.default_per_token_order()
    assert sorted(order) == sorted(LINEAR)
    if probe_mod.cpu_isa() == "amx":
        assert order[0] == "onednn_linear"
    else:
        assert order[0] == ("fbgemm_linear" if onednn == PAIRS else "int_mm")
