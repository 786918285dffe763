"""Batch-1 greedy decoding with stdlib-lm (the byte-level Llama trained here): ms per token of
the float32 model and of its w8 / w4 quantizations, with and without the compiled GEMV.

    python benchmarks/decode_stdlib_lm.py [--tokens 64] [--rounds 7] [--threads 2]

Each system generates `tokens` new tokens (Hugging Face generate, KV cache, greedy) from the same
prompt; rounds interleave the systems; median per system. "same tokens" compares the generated
ids with the float32 model's. The model is small (hidden 256, 4 layers): much of each step is
Python and attention, so this shows what the Linear kernels are worth end to end.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

import quantwise
from quantwise.kernels.probe import cpu_model, isa_label
from quantwise.models.stdlib_lm import load_stdlib_lm

PROMPT = b"import os\n\n\ndef main(argv):\n    "


def build(model: torch.nn.Module, preset: str, gemv: str | None) -> torch.nn.Module:
    old = os.environ.get("QUANTWISE_GEMV")
    if gemv is not None:
        os.environ["QUANTWISE_GEMV"] = gemv  # read when the kernels are built
    try:
        return quantwise.quantize(model, preset, progress=False)
    finally:
        if old is None:
            os.environ.pop("QUANTWISE_GEMV", None)
        else:
            os.environ["QUANTWISE_GEMV"] = old


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = load_stdlib_lm().eval()
    ids = torch.tensor([[256] + list(PROMPT)])
    systems = {"fp32": model}
    for preset in ("w8", "w4"):
        systems[preset] = build(model, preset, None)
        systems[f"{preset}, GEMV off"] = build(model, preset, "off")

    def gen(m):
        return m.generate(ids, max_new_tokens=args.tokens, min_new_tokens=args.tokens,
                          do_sample=False, pad_token_id=258)

    with torch.no_grad():
        ref = gen(model)
        same = {k: bool(torch.equal(gen(m), ref)) for k, m in systems.items()}
        times: dict[str, list[float]] = {k: [] for k in systems}
        for _ in range(args.rounds):
            for name, m in systems.items():
                t0 = time.perf_counter()
                gen(m)
                times[name].append(time.perf_counter() - t0)
    fp = statistics.median(times["fp32"])
    print(f"CPU: {cpu_model()} ({isa_label()}); torch {torch.__version__}, {args.threads} threads; "
          f"{args.tokens} tokens, median of {args.rounds} rounds\n")
    print("| system | ms / token | x fp32 | same tokens as fp32 |")
    print("|---|---|---|---|")
    for name, t in times.items():
        med = statistics.median(t)
        print(f"| {name} | {med / args.tokens * 1e3:.2f} | {fp / med:.2f}x | {same[name]} |")


if __name__ == "__main__":
    main()
