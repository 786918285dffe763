"""Train stdlib-lm (byte-level LlamaForCausalLM) from scratch on the Python standard library's source.

Writes src/quantwise/models/weights/stdlib-lm/ atomically (a temporary folder, then a rename):
config.json, model.safetensors (fp32), tokenizer.json (the byte tokenizer) and training.json
(hyper-parameters, steps, tokens, time, held-out perplexity).

Data, split and perplexity are defined in quantwise/models/stdlib_lm.py. Training batches are
windows of CONTEXT tokens at uniformly random offsets into the "train" stream (seeded generator).
Optimiser: AdamW (betas 0.9/0.95, weight decay 0.1 on matrices only), linear warm-up then cosine
decay to 10 % of the peak, gradient clipping 1.0; forward/backward under CPU bf16 autocast
(1.75x faster on a CPU with AVX512-BF16), master weights and the saved model in fp32.

The schedule's progress is max(step / steps, elapsed / time_budget): with a generous budget the
run is exactly `steps` steps and reproducible; on a slow machine it finishes the cosine early
instead of being cut off at a high learning rate (training.json records what happened).

Usage: python scripts/train_stdlib_lm.py [--steps 2600] [--batch 16] [--minutes 38] [--threads 1]
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from quantwise.models.stdlib_lm import (CONTEXT, WEIGHTS_DIR, ByteTokenizer, build_config, lm_windows,
                                        load_stdlib_lm, perplexity, split_files, split_tokens)

HELDOUT_WINDOWS = 200


def lr_at(progress: float, peak: float, warmup: float) -> float:
    if progress < warmup:
        return peak * progress / warmup
    p = min(1.0, (progress - warmup) / (1.0 - warmup))
    return peak * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * p)))


def save_folder(model: torch.nn.Module, out: Path, info: dict) -> None:
    """Write the HF folder next to `out`, then swap it in with renames (never half-written)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.config.architectures = ["LlamaForCausalLM"]
        config = model.config.to_dict()
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        state = {k: v.detach().float().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "tokenizer.json").write_text(json.dumps(ByteTokenizer().to_dict(), indent=2) + "\n")
        (tmp / "training.json").write_text(json.dumps(info, indent=2) + "\n")
        for f in tmp.iterdir():
            os.chmod(f, 0o644)
        os.chmod(tmp, 0o755)
        old = out.with_name(f".{out.name}.old")
        if old.exists():
            shutil.rmtree(old)
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=2600)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=float, default=0.04, help="fraction of the run")
    ap.add_argument("--minutes", type=float, default=38.0, help="time budget (see the docstring)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-bf16", action="store_true", help="train in plain fp32")
    ap.add_argument("--out", type=Path, default=WEIGHTS_DIR)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    train = split_tokens("train")
    monitor = torch.stack(lm_windows("calib", 32))
    print(f"files: train {len(split_files('train'))}, calib {len(split_files('calib'))}, heldout "
          f"{len(split_files('heldout'))}; train tokens {train.numel():,}", flush=True)

    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(build_config())
    n_params = sum(p.numel() for p in model.parameters())
    print(f"LlamaForCausalLM, {n_params:,} parameters", flush=True)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), eps=1e-8)
    budget = args.minutes * 60.0
    start = time.perf_counter()
    step, tokens, ema, log = 0, 0, None, []
    bar = tqdm(total=args.steps, desc="train", unit="step", dynamic_ncols=True)
    model.train()
    while True:
        elapsed = time.perf_counter() - start
        progress = max(step / args.steps, elapsed / budget)
        if progress >= 1.0:
            break
        lr = lr_at(progress, args.lr, args.warmup)
        for group in opt.param_groups:
            group["lr"] = lr
        offsets = torch.randint(0, train.numel() - CONTEXT, (args.batch,), generator=gen)
        ids = torch.stack([train[o:o + CONTEXT] for o in offsets.tolist()])
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=not args.no_bf16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        tokens += ids.numel()
        value = loss.item()
        ema = value if ema is None else 0.98 * ema + 0.02 * value
        bar.update(1)
        bar.set_postfix(loss=f"{ema:.3f}", lr=f"{lr:.2e}")
        if step % 250 == 0:
            ppl = perplexity(model, monitor)
            model.train()
            log.append({"step": step, "train_loss_ema": round(ema, 4), "calib_ppl_32": round(ppl, 4),
                        "minutes": round((time.perf_counter() - start) / 60, 2)})
            tqdm.write(f"step {step}: train loss {ema:.3f}, calib perplexity (32 windows) {ppl:.3f}")
    bar.close()
    train_s = time.perf_counter() - start
    model.eval()
    heldout = lm_windows("heldout", HELDOUT_WINDOWS)
    ppl = perplexity(model, heldout)
    print(f"trained {step} steps, {tokens:,} tokens in {train_s / 60:.1f} min; held-out perplexity "
          f"({HELDOUT_WINDOWS} windows x {CONTEXT} tokens) {ppl:.4f}", flush=True)
    info = {"steps": step, "planned_steps": args.steps, "batch": args.batch, "context": CONTEXT,
            "tokens": tokens, "train_tokens_available": int(train.numel()), "lr": args.lr,
            "warmup": args.warmup, "seed": args.seed, "bf16_autocast": not args.no_bf16,
            "threads": args.threads, "time_budget_min": args.minutes,
            "stopped_by": "steps" if step >= args.steps else "time budget",
            "train_minutes": round(train_s / 60, 2), "parameters": n_params,
            "heldout_windows": HELDOUT_WINDOWS, "heldout_perplexity": round(ppl, 4),
            "python": platform.python_version(), "torch": torch.__version__,
            "date": datetime.date.today().isoformat(), "log": log}
    save_folder(model, args.out, info)
    reloaded = load_stdlib_lm(args.out)
    check = perplexity(reloaded, heldout[:16])
    size = (args.out / "model.safetensors").stat().st_size
    print(f"saved {args.out} (model.safetensors {size / 1e6:.2f} MB); reload check: perplexity on 16 "
          f"held-out windows {check:.4f}", flush=True)
    if size > 20_000_000:
        sys.exit(f"model.safetensors is {size} bytes, over the 20 MB limit")


if __name__ == "__main__":
    main()
