"""LLM prefill and decode speed, batch 1: quantwise's quantized models against float32.

    python benchmarks/llm_decode.py [--models stdlib-lm,tiny22] [--configs fp32,bf16,w8,w4,w4-gptq]
                                    [--prompt 128] [--new 128] [--repeats 2] [--workdir DIR]

Each row: greedy generation (quantwise.runtime.time_decode) of exactly `new` tokens after a
`prompt`-token prompt, batch 1, 2 threads; prefill tokens / s = prompt / time to the first new
token, decode tokens / s = (new - 1) / the time after it; the best of `repeats` runs after a
warm-up. "transformers fp32" / "transformers bf16": the float model (cast to bfloat16 by
transformers) in transformers' own generate; "quantwise fp32": the same float model in
quantwise's lean decoding loop (runtime/decoder.py), the baseline of "x quantwise fp32"; the
quantwise rows run in that loop too. stdlib-lm: the
committed, trained model, prompted with held-out standard-library text. tiny22: the
TinyLlama-1.1B shape with random bf16 weights (formats/synthetic.py, the folder
benchmarks/scale.py writes), prompted with random tokens; its quantized models come from the
streaming quantizer (GPTQ: 64 x 256 random-token calibration, ~26 min on 2 cores, so an
existing `out-tiny22-w4-gptq` of scale.py in the workdir is reused when present).
"llama.cpp Q4_0 / Q8_0": quantwise's w4 / w8 checkpoint exported with `quantwise export --format
gguf` (codes kept where they tile GGUF's blocks) and run by llama-cpp-python (2 threads, greedy,
the same prompt tokens; its generator timed the same way). llama-cpp-python is not in the
project's extras (it compiles llama.cpp: ~6 min here): `pip install llama-cpp-python`; without
it those rows say so. The random tiny22 folder has no tokenizer: its GGUF gets the byte
tokenizer description (the token ids are arbitrary anyway).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))


def _stdlib(config: str, workdir: Path):
    import quantwise
    from quantwise.data import load_calibration_data
    from quantwise.models.stdlib_lm import load_stdlib_lm

    model = load_stdlib_lm()
    if config in ("fp32", "fp32-lean"):
        return model
    if config == "bf16-cast":
        return model.to(torch.bfloat16)
    return quantwise.quantize(model, config, load_calibration_data("stdlib-code"), progress=False)


def _tiny(config: str, workdir: Path):
    import quantwise
    from quantwise.models.minilm import load_hf_folder
    from scale import folder_for

    src = folder_for("tiny22", workdir)
    if config in ("fp32", "fp32-lean", "bf16-cast"):
        model = load_hf_folder(src)
        return model if config != "bf16-cast" else model.to(torch.bfloat16)
    out = workdir / f"out-tiny22-{config}"
    if not (out / "quantwise.json").is_file():
        from quantwise.stream import quantize_folder

        g = torch.Generator().manual_seed(0)
        calib = ([{"input_ids": torch.randint(0, 32000, (1, 256), generator=g)} for _ in range(64)]
                 if config.endswith(("gptq", "awq")) else None)
        quantize_folder(src, config, calib, out, overwrite=True, progress=True)
    return quantwise.load(out)


def _gguf(model_name: str, qtype: str, workdir: Path) -> Path:
    """quantwise's w4 (Q4_0) or w8 (Q8_0) checkpoint as GGUF, written once per workdir."""
    import quantwise
    from quantwise.formats.gguf_export import export_gguf

    config = {"Q4_0": "w4", "Q8_0": "w8"}[qtype]
    out = workdir / f"{model_name}-{config}-{qtype}.gguf"
    if out.is_file():
        return out
    if model_name == "stdlib-lm":
        from quantwise.data import load_calibration_data
        from quantwise.models.stdlib_lm import WEIGHTS_DIR, load_stdlib_lm

        folder = quantwise.save(quantwise.quantize(
            load_stdlib_lm(), config, load_calibration_data("stdlib-code"), progress=False,
            source=str(WEIGHTS_DIR)), workdir / f"stdlib-lm-{config}", overwrite=True)
    else:
        _tiny(config, workdir)  # the streamed checkpoint
        folder = workdir / f"out-tiny22-{config}"
        if not (folder / "tokenizer.json").is_file():
            from quantwise.models.stdlib_lm import ByteTokenizer

            (folder / "tokenizer.json").write_text(json.dumps(ByteTokenizer().to_dict()))
    export_gguf(folder, out, qtype, overwrite=True, keep_codes=True)
    return out


def _llama_cpp(path: Path, ids: torch.Tensor, new: int) -> tuple[float, float]:
    """(prefill tokens / s, decode tokens / s) of llama.cpp greedy generation, timed as
    time_decode times quantwise: to the first new token, then the rest."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_threads=2, n_threads_batch=2, n_ctx=ids.shape[1] + new + 8,
                n_batch=ids.shape[1], verbose=False)
    tokens = ids[0].tolist()
    out = []
    start = time.perf_counter()
    for tok in llm.generate(tokens, top_k=1, temp=0.0, min_p=0.0, top_p=1.0, repeat_penalty=1.0):
        out.append(time.perf_counter())
        if len(out) == new:
            break
    llm.close()
    return len(tokens) / (out[0] - start), (new - 1) / (out[-1] - out[0])


def _prompt(model_name: str, n: int) -> torch.Tensor:
    if model_name == "stdlib-lm":
        from quantwise.models.stdlib_lm import split_tokens

        return split_tokens("heldout")[:n].unsqueeze(0).long()
    return torch.randint(3, 32000, (1, n), generator=torch.Generator().manual_seed(1))


def _name(config: str) -> str:
    if config.startswith("llama.cpp"):
        return config.replace("-", " ")
    return {"fp32": "transformers fp32", "bf16-cast": "transformers bf16",
            "fp32-lean": "quantwise fp32"}.get(config, f"quantwise {config}")


def _engine(config: str) -> str:
    """transformers' generate for the transformers rows, quantwise's loop for the others."""
    return "transformers" if config in ("fp32", "bf16-cast") else "quantwise"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="stdlib-lm,tiny22")
    ap.add_argument("--configs", default="fp32,fp32-lean,bf16-cast,bf16,w8,w4,w4-gptq,"
                                         "llama.cpp-Q8_0,llama.cpp-Q4_0")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "quantwise-scale"))
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(2)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    from quantwise.kernels.probe import cpu_model, isa_label
    from quantwise.runtime.generate import time_decode

    print(f"CPU: {cpu_model()} ({isa_label()}); 2 threads; batch 1, prompt {args.prompt}, "
          f"{args.new} new tokens, best of {args.repeats}\n")
    print("| model | system | prefill tok/s | decode tok/s | x transformers fp32 | x quantwise fp32 |")
    print("|---|---|---|---|---|---|")
    rows = []
    for model_name in args.models.split(","):
        build = _stdlib if model_name == "stdlib-lm" else _tiny
        ids = _prompt(model_name, args.prompt)
        base = lean = None
        for config in args.configs.split(","):
            t = time.perf_counter()
            if config.startswith("llama.cpp"):
                try:
                    import llama_cpp  # noqa: F401
                except ImportError:
                    print(f"| {model_name} | {config} | not run: llama-cpp-python is not installed | | |")
                    continue
                path = _gguf(model_name, config.split("-")[1], workdir)
                built = time.perf_counter() - t
                _llama_cpp(path, ids[:, :16], 4)
                runs = [_llama_cpp(path, ids, args.new) for _ in range(args.repeats)]
                model = None
            else:
                model = build(config, workdir)
                built = time.perf_counter() - t
                engine = _engine(config)
                time_decode(model, ids[:, :16], 4, engine)  # warm-up: kernels, caches
                runs = [time_decode(model, ids, args.new, engine) for _ in range(args.repeats)]
            prefill, decode = max(r[0] for r in runs), max(r[1] for r in runs)
            base = decode if config == "fp32" else base
            lean = decode if config == "fp32-lean" else lean
            row = {"model": model_name, "system": _name(config), "prefill_tok_s": round(prefill, 1),
                   "decode_tok_s": round(decode, 2), "build_s": round(built, 1),
                   "decode_x_fp32": round(decode / base, 2) if base else None,
                   "decode_x_quantwise_fp32": round(decode / lean, 2) if lean else None}
            rows.append(row)
            print(f"| {model_name} | {row['system']} | {row['prefill_tok_s']} | {row['decode_tok_s']} "
                  f"| {row['decode_x_fp32'] or '-'} | {row['decode_x_quantwise_fp32'] or '-'} |",
                  flush=True)
            del model
            gc.collect()
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
