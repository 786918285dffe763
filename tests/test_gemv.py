"""The compiled weight-only GEMV (kernels/gemv.py, csrc/gemv.c) against the float simulation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from quantwise import numerics
from quantwise.kernels import make_linear_kernel
from quantwise.kernels.gemv import FewRowsLinear, WeightOnlyGemv, blocked_int4, library
from quantwise.spec import Format, PerChannel, PerGroup, QuantSpec

U = 2.0 ** -24
needs_gemv = pytest.mark.skipif(library()[0] is None, reason="no compiled GEMV on this machine")


def _quantized(n, k, spec, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    scale, zp = numerics.qparams_from_range(*numerics.tensor_range(w, spec), spec)
    codes = numerics.quantize(w, scale, zp, spec)
    return codes, scale, zp, numerics.dequantize(codes, scale, zp, spec)


def _assert_close(out, x, w_hat, bias, int16=True):
    """float32 sums in another order: within 2 (K + 4) u of sum |x| |w| (test_kernels' bound);
    with int16 activations (the default path) also the rounding of each row to codes of step
    max|x| / 32767: at most half a step per element, times sum |w| over the row."""
    ref = F.linear(x.double(), w_hat.double(), None if bias is None else bias.double())
    mag = F.linear(x.abs().double(), w_hat.abs().double(),
                   None if bias is None else bias.abs().double())
    bound = 2 * (x.shape[-1] + 4) * U * mag + 1e-30
    if int16:
        half_step = x.abs().amax(dim=-1, keepdim=True).double() / 65534
        bound = bound + half_step * w_hat.abs().double().sum(dim=-1) * (1 + 1e-6)
    assert (out.double() - ref).abs().le(bound).all()


@pytest.mark.parametrize("n", [3, 4, 9])
def test_blocked_int4_layout(n):
    """Blocks of 64 codes as 32 bytes (low nibbles: codes 0-31); rows in tiles of 4 whose
    blocks lie side by side; the last n % 4 rows row after row."""
    codes = torch.randint(-8, 8, (n, 128), dtype=torch.int8)
    b = blocked_int4(codes).to(torch.int16)
    assert b.shape == (n, 64)
    flat, full = b.reshape(-1), n - n % 4
    for row in range(n):
        for block in range(2):
            at = (row // 4 * 4 * 64 + block * 128 + row % 4 * 32 if row < full
                  else row * 64 + block * 32)
            got = flat[at:at + 32]
            lo, hi = (got & 15) - 8, (got >> 4) - 8
            want = codes[row, block * 64:(block + 1) * 64].to(torch.int16)
            assert torch.equal(torch.cat([lo, hi]), want)


@needs_gemv
@pytest.mark.parametrize("m", [1, 3, 8])
@pytest.mark.parametrize("n,k", [(37, 64), (300, 512), (1, 16), (7, 24)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_int8_gemv_matches_the_simulation(m, n, k, with_bias):
    spec = QuantSpec(Format.INT8, granularity=PerChannel(0))
    codes, scale, _, w_hat = _quantized(n, k, spec)
    bias = torch.randn(n) if with_bias else None
    x = torch.randn(m, k) * 3
    gemv = WeightOnlyGemv(codes, scale, 8, k, bias)
    _assert_close(gemv(x), x, w_hat, bias)
    _assert_close(gemv(x, exact=True), x, w_hat, bias, int16=False)


@needs_gemv
@pytest.mark.parametrize("m", [1, 5, 8])
@pytest.mark.parametrize("n,k,group", [(37, 128, 32), (260, 512, 128), (9, 256, 256),
                                       (13, 192, 64), (5, 1024, 1024)])
def test_int4_gemv_matches_the_simulation(m, n, k, group):
    spec = QuantSpec(Format.INT4, granularity=PerGroup(group))
    codes, scale, _, w_hat = _quantized(n, k, spec)
    bias = torch.randn(n)
    x = torch.randn(m, k)
    gemv = WeightOnlyGemv(codes, scale, 4, group, bias)
    _assert_close(gemv(x), x, w_hat, bias)
    _assert_close(gemv(x, exact=True), x, w_hat, bias, int16=False)


@needs_gemv
@pytest.mark.parametrize("bits,k,group", [(8, 8192, 8192), (8, 4112, 4112), (4, 2048, 2048),
                                          (4, 4096, 4096), (4, 8192, 8192), (4, 512, 32),
                                          (4, 512, 256)])
def test_integer_sums_do_not_overflow_on_extreme_codes(bits, k, group):
    """Every product at its largest: activations at +-max (codes +-32767) against the extreme
    weight codes (-128 / -8), which overflow int32 (int8) or int16 (int4) sums if the runs
    between conversions were too long."""
    low = -128 if bits == 8 else -8
    codes = torch.full((16, k), low, dtype=torch.int32)
    codes[1::2] = 127 if bits == 8 else 7
    scale = torch.ones(16) if bits == 8 else torch.ones(16, k // group)
    x = torch.ones(2, k)
    x[1, ::2] = -1.0
    w_hat = codes.float()
    out = WeightOnlyGemv(codes, scale, bits, group, None)(x)
    _assert_close(out, x, w_hat, None)


@needs_gemv
@pytest.mark.parametrize("bits", [8, 4])
def test_rows_the_int16_path_cannot_hold_take_the_float_path(bits):
    """NaN / Inf in a row: F.linear's non-finite outputs; an all-zero row: the bias; a row of
    subnormals (32767 / max overflows): float32 results, not zeros."""
    k, n = 256, 40
    spec = QuantSpec(Format.INT8 if bits == 8 else Format.INT4,
                     granularity=PerChannel(0) if bits == 8 else PerGroup(64))
    codes, scale, _, w_hat = _quantized(n, k, spec)
    bias = torch.randn(n)
    gemv = WeightOnlyGemv(codes, scale, bits, k if bits == 8 else 64, bias)
    x = torch.randn(4, k)
    x[1, 7] = float("nan")
    x[2, 3] = float("inf")
    out, ref = gemv(x), F.linear(x, w_hat, bias)
    assert torch.equal(out.isnan(), ref.isnan()) and torch.equal(out.isinf(), ref.isinf())
    _assert_close(out[[0, 3]], x[[0, 3]], w_hat, bias, int16=False)  # the whole call: float
    zero = torch.zeros(1, k)
    assert torch.equal(gemv(zero), bias.reshape(1, n))
    tiny = torch.full((1, k), 1e-42)
    plain = WeightOnlyGemv(codes, scale, bits, k if bits == 8 else 64, None)
    _assert_close(plain(tiny), tiny, w_hat, None, int16=False)
    assert bool(plain(tiny).ne(0).any())


@needs_gemv
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("m", [1, 2])
def test_thread_split_gives_identical_rows(threads, m):
    """513 x 256 x m >= 128K multiply-adds: split over the threads; every block shape (8 or 4
    weight rows per pass, single rows at a thread's edge) computes a row the same way."""
    spec = QuantSpec(Format.INT8, granularity=PerChannel(0))
    codes, scale, _, _ = _quantized(513, 256, spec)
    x = torch.randn(m, 256)
    gemv = WeightOnlyGemv(codes, scale, 8, 256, None)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        ref = gemv(x)
        torch.set_num_threads(threads)
        assert torch.equal(gemv(x), ref)
    finally:
        torch.set_num_threads(old)


@needs_gemv
def test_few_rows_go_to_the_gemv_and_many_to_the_base_kernel(monkeypatch):
    monkeypatch.setenv("QUANTWISE_GEMV", "on")  # whatever the probe would measure here
    spec = QuantSpec(Format.INT8, granularity=PerChannel(0))
    codes, scale, zp, w_hat = _quantized(2048, 2048, spec)
    kernel = make_linear_kernel(codes, scale, zp, spec, None, None)
    assert isinstance(kernel, FewRowsLinear)
    assert "compiled AVX2 GEMV" in kernel.name and kernel.fallback_reason is None
    x = torch.randn(2, 3, 2048)  # 6 rows: the GEMV
    _assert_close(kernel(x).reshape(6, -1), x.reshape(6, -1), w_hat, None)
    many = torch.randn(20, 2048)  # the fp16-weight GEMM, as before
    torch.testing.assert_close(kernel(many), kernel.base(many), rtol=0, atol=0)


@needs_gemv
def test_gemv_layers_copy_save_and_reload(tmp_path, monkeypatch):
    """A model whose weight-only Linears run the GEMV deep-copies and reloads bit-identically."""
    import copy

    import quantwise

    monkeypatch.setenv("QUANTWISE_GEMV", "on")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.ReLU(), torch.nn.Linear(512, 128))
    for preset in ("w8", "w4"):
        q = quantwise.quantize(model, preset, progress=False)
        assert any("compiled AVX2 GEMV" in r.kernel for r in quantwise.summary(q).quantized)
        x = torch.randn(3, 256)
        with torch.no_grad():
            y = q(x)
            assert torch.equal(copy.deepcopy(q)(x), y)
            quantwise.save(q, tmp_path / preset)
            assert torch.equal(quantwise.load(tmp_path / preset, model=model)(x), y)


@needs_gemv
def test_gemv_shares_torchs_openmp_runtime():
    """Built with OpenMP, the library must be bound to the libgomp torch loaded (one runtime, one
    pool of threads): a second copy would compete with torch's spinning threads for the cores."""
    import ctypes

    lib = library()[0]
    if not lib.openmp:
        pytest.skip("GEMV built without OpenMP here (no libgomp to link)")
    torch_gomp = Path(torch.__file__).parent / "lib" / "libgomp.so.1"
    if not torch_gomp.exists():
        pytest.skip("this torch build does not ship libgomp")
    lib.qw_omp_symbol.restype = ctypes.c_void_p
    ours = lib.qw_omp_symbol()
    theirs = ctypes.cast(ctypes.CDLL(str(torch_gomp)).omp_get_num_threads, ctypes.c_void_p).value
    assert ours == theirs
