"""Micro-benchmark of the quantwise CPU kernels against float32 on MiniLM / ResNet shapes.

    python benchmarks/kernels_micro.py [--reps 20] [--threads 2] [--alternatives]

Linear: M=2048 (MiniLM batch 32 x seq 64), K=384 -> N=1536 and K=1536 -> N=384; and M=1.
Conv: batch 8, 64 -> 64 channels, 56x56, 3x3, padding 1 (a ResNet-18 layer1 conv), plus a
ConvTranspose2d 64 -> 64, k=4, stride 2, 28x28 -> 56x56.
Method: 2 threads, 3 warm-up calls, then `reps` rounds in which every contender of a shape runs
once (interleaved, so machine noise hits all alike); median per contender. The machine is
shared and noisy: read ratios within one run; the min column is the robust one when other
processes compete for the two cores. `--alternatives` adds the ops that were measured
and rejected (slow: _weight_int8pack_mm / _weight_int4pack_mm_for_cpu with fp32 input).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from quantwise import numerics
from quantwise.kernels import DynamicAct, StaticAct, make_conv_kernel, make_linear_kernel
from quantwise.kernels.base import dynamic_scale, quantize_symmetric_i8
from quantwise.spec import Format, PerChannel, PerGroup, PerTensor, PerToken, QuantSpec


def qweight(w, spec):
    scale, zp = numerics.qparams_from_range(*numerics.tensor_range(w, spec), spec)
    return numerics.quantize(w, scale, zp, spec), scale, zp


def static_act(x):
    spec = QuantSpec(Format.UINT8, symmetric=False, granularity=PerTensor())
    scale, zp = numerics.qparams_from_range(*numerics.tensor_range(x, spec), spec)
    return StaticAct(float(scale), int(zp), spec)


def run(contenders, reps, warmup=3):
    times = {name: [] for name, _ in contenders}
    for _, fn in contenders:
        for _ in range(warmup):
            fn()
    for _ in range(reps):
        for name, fn in contenders:
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: (statistics.median(v) * 1e3, min(v) * 1e3) for name, v in times.items()}


def table(title, contenders, kernels, reps):
    res = run(contenders, reps)
    base, base_min = res[contenders[0][0]]
    print(f"\n### {title}\n")
    print("| case | ms median | vs fp32 | ms min | vs fp32 (min) | what runs | fallback |")
    print("|---|---|---|---|---|---|---|")
    for name, _ in contenders:
        k = kernels.get(name)
        what = k.name if k is not None else ""
        fb = "" if k is None or k.fallback_reason is None else "yes"
        med, low = res[name]
        print(f"| {name} | {med:.3f} | {base / med:.2f}x | {low:.3f} | {base_min / low:.2f}x "
              f"| {what} | {fb} |")


def linear_cases(m, k, n, reps, alternatives):
    torch.manual_seed(0)
    x, w, b = torch.randn(m, k), torch.randn(n, k) / k ** 0.5, torch.randn(n)
    w8 = QuantSpec(Format.INT8, symmetric=True, narrow_range=True, granularity=PerChannel(0))
    c8, s8, z8 = qweight(w, w8)
    w4 = QuantSpec(Format.INT4, symmetric=True, granularity=PerGroup(128))
    c4, s4, z4 = qweight(w, w4)
    kernels = {
        "W8A8 static": make_linear_kernel(c8, s8, z8, w8, b, static_act(x)),
        "W8A8 dynamic per-tensor": make_linear_kernel(c8, s8, z8, w8, b, DynamicAct(QuantSpec())),
        "W8A8 dynamic per-token": make_linear_kernel(
            c8, s8, z8, w8, b, DynamicAct(QuantSpec(granularity=PerToken()))),
        "weight-only int8": make_linear_kernel(c8, s8, z8, w8, b, None),
        "weight-only int4 g128": make_linear_kernel(c4, s4, z4, w4, b, None),
        "bf16": make_linear_kernel(*qweight(w, QuantSpec(Format.BF16)), QuantSpec(Format.BF16), b, None),
        "fp16": make_linear_kernel(*qweight(w, QuantSpec(Format.FP16)), QuantSpec(Format.FP16), b, None),
    }
    contenders = [("fp32 F.linear", lambda: F.linear(x, w, b))]
    contenders += [(name, (lambda kk=kk: kk(x))) for name, kk in kernels.items()]
    wt = c8.t()

    def quant_only():
        return quantize_symmetric_i8(x, dynamic_scale(x, 127, per_row=True)[1])
    q = quant_only()
    contenders += [("  per-token act quantization alone", quant_only),
                   ("  torch._int_mm alone", lambda: torch._int_mm(q, wt))]
    table(f"Linear M={m} K={k} N={n}", contenders, kernels, reps)
    if alternatives:
        pk = torch._convert_weight_to_int4pack_for_cpu((c4.to(torch.int32) + 8), 1)
        sz = torch.stack([s4.t(), torch.zeros_like(s4.t())], -1).contiguous()
        alt = [("fp32 F.linear", lambda: F.linear(x, w, b)),
               ("_weight_int8pack_mm fp32 in", lambda: torch._weight_int8pack_mm(x, c8, s8)),
               ("_weight_int8pack_mm bf16 in", lambda: torch._weight_int8pack_mm(
                   x.to(torch.bfloat16), c8, s8.to(torch.bfloat16))),
               ("_weight_int4pack_mm_for_cpu fp32 in", lambda: torch._weight_int4pack_mm_for_cpu(x, pk, 128, sz))]
        table(f"Rejected alternatives, Linear M={m} K={k} N={n}", alt, {}, max(3, reps // 6))


def conv_cases(reps):
    torch.manual_seed(0)
    x, w, b = torch.randn(8, 64, 56, 56), torch.randn(64, 64, 3, 3) / 24, torch.randn(64)
    xcl = x.contiguous(memory_format=torch.channels_last)
    w8 = QuantSpec(Format.INT8, symmetric=True, narrow_range=True, granularity=PerChannel(0))
    c8, s8, z8 = qweight(w, w8)
    geo = dict(stride=1, padding=1, dilation=1, groups=1)
    kernels = {
        "W8A8 static (NCHW in/out)": make_conv_kernel(c8, s8, z8, w8, b, static_act(x), **geo),
        "W8A8 dynamic per-tensor (NCHW)": make_conv_kernel(c8, s8, z8, w8, b, DynamicAct(QuantSpec()), **geo),
        "bf16": make_conv_kernel(*qweight(w, QuantSpec(Format.BF16)), QuantSpec(Format.BF16), b, None, **geo),
        "fp16": make_conv_kernel(*qweight(w, QuantSpec(Format.FP16)), QuantSpec(Format.FP16), b, None, **geo),
    }
    st = kernels["W8A8 static (NCHW in/out)"]
    contenders = [("fp32 F.conv2d (NCHW)", lambda: F.conv2d(x, w, b, 1, 1)),
                  ("fp32 F.conv2d (channels_last)", lambda: F.conv2d(xcl, w, b, 1, 1)),
                  ("W8A8 static (channels_last in/out)", lambda: st(xcl))]
    contenders += [(name, (lambda kk=kk: kk(x))) for name, kk in kernels.items()]
    kernels["W8A8 static (channels_last in/out)"] = st
    table("Conv2d 8x64x56x56, 64->64, 3x3, pad 1", contenders, kernels, reps)

    xt, wt_, bt = torch.randn(8, 64, 28, 28), torch.randn(64, 64, 4, 4) / 32, torch.randn(64)
    wspec = QuantSpec(Format.INT8, symmetric=True, narrow_range=True, granularity=PerChannel(1))
    ct, st_, zt = qweight(wt_, wspec)
    kt = make_conv_kernel(ct, st_, zt, wspec, bt, static_act(xt), stride=2, padding=1, dilation=1,
                          groups=1, transposed=True, output_padding=(0, 0))
    contenders = [("fp32 F.conv_transpose2d", lambda: F.conv_transpose2d(xt, wt_, bt, 2, 1)),
                  ("W8A8 static transposed", lambda: kt(xt))]
    table("ConvTranspose2d 8x64x28x28 -> 56x56, 64->64, k4 s2 p1", contenders,
          {"W8A8 static transposed": kt}, reps)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--alternatives", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {args.reps}")
    for k, n in [(384, 1536), (1536, 384)]:
        linear_cases(2048, k, n, args.reps, args.alternatives)
    linear_cases(1, 384, 1536, args.reps, args.alternatives)  # one token: the latency floor
    conv_cases(args.reps)


if __name__ == "__main__":
    main()
