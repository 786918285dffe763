"""The `quantwise` command line's parser: subcommands, options and their examples."""

from __future__ import annotations

import argparse

from quantwise.config import CALIBRATORS, PRESETS

QUANTIZE_EPILOG = """\
examples:
  quantwise quantize
      the built-in digits classifier, w8a8, calibrated on its own data; prints before/after
  quantwise quantize minilm --config w8a8-dynamic
      the real all-MiniLM-L6-v2 sentence embedder, int8 weights, per-token int8 activations
  quantwise quantize digits --method entropy --out out/digits-kl --overwrite
      entropy (KL) calibration instead of max, into a chosen folder
  quantwise quantize path/to/hf-folder --config w8 --calib sentences.txt
      a local Hugging Face folder, weight-only int8, calibrated on a text file (one sample a line)
  quantwise quantize mypkg.models:build --calib inputs/ --config my.yaml --json
      a function returning an nn.Module, a folder of .npy/.safetensors inputs, a config file
  quantwise quantize minilm --max-drop 0.01
      plan a format per layer (int4 / int8 / fp16 / fp32) so that the mean cosine vs fp32 drops by
      at most 0.01, at the smallest checkpoint; --objective latency for the fastest instead

presets: {presets}
a config file (YAML or JSON) holds defaults, ordered rules and excludes, e.g.:
  preset: w8a8
  rules:
    - pattern: "*.output.dense"
      calibrator: percentile
  exclude: ["classifier"]
"""


ANALYZE_EPILOG = """\
examples:
  quantwise analyze
      the built-in digits classifier under w8a8: which layers hurt top-1, and why
  quantwise analyze minilm --config w8a8 --json
      all-MiniLM-L6-v2: per-layer SQNR of the embeddings, weight vs activation, best calibrator
columns: only dB = model-output SQNR vs fp32 with only this layer quantized; gain dB = what
keeping this layer in float buys when all others are quantized; w-only / a-only = only its
weight / only its input quantized; best calibrator = the input range that hurts least; metric
gain = the task metric recovered by keeping it float (measured for the top --top-k layers).
"""


BENCHMARK_EPILOG = """\
examples:
  quantwise benchmark quantwise-out/digits-w8a8
      the built-in digits classifier: top-1 on its test split, fp32 vs int8
  quantwise benchmark out/my-model --model mypkg.models:build --data inputs/ --json
      a user's model: cosine of the outputs vs fp32 on the given inputs
the full side-by-side with ONNX Runtime and torch.ao is benchmarks/run.py in the repository.
"""


EXPORT_EPILOG = """\
examples:
  quantwise export quantwise-out/digits-w8a8
      writes quantwise-out/digits-w8a8.onnx, reports which ops ONNX Runtime runs as integer
      kernels, and checks the file against the PyTorch model on calibration samples
  quantwise export out/my-model --out my-model.onnx --model mypkg.models:build --data inputs/
      a user's model: --model rebuilds the float skeleton, --data gives sample inputs
exit codes: 0 parity met, 1 parity failed (the file is kept: the per-layer table names the first
layer whose error jumps), 2 bad input. Parity is met when the outputs agree within --max-rel-err
or, where the PyTorch model's own rounding spread makes that impossible, within 1.2x that spread
with quality vs fp32 (cosine, top-1) within 0.002 of the PyTorch model's (the report names the
gate used).
"""


PICKLE_HELP = ("load a Hugging Face folder's pickle weights (pytorch_model.bin) or pickled inputs "
               "(.pt): unpickling can run code, so only for files you trust (refused by default)")


def _model_args(p: argparse.ArgumentParser) -> None:
    """MODEL, --config, --calib, --method: shared by quantize and analyze."""
    p.add_argument("model", nargs="?", default="digits",
                   help="built-in name (digits, minilm), Hugging Face folder, or package.module:function "
                        "(default: digits)")
    p.add_argument("--config", default="w8a8", help="preset name or YAML/JSON file (default: w8a8)")
    p.add_argument("--calib", help="calibration data: built-in name (digits, stdlib-text), a text file, "
                                   "or a folder of .npy/.safetensors (default: the model's own)")
    p.add_argument("--method", choices=CALIBRATORS, help="activation calibrator for every layer")
    p.add_argument("--allow-pickle", action="store_true", help=PICKLE_HELP)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="quantwise", description="Quantize trained PyTorch models and measure the result.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    q = sub.add_parser(
        "quantize", help="quantize a model, save it, and print size / latency / quality before and after",
        description="Quantize MODEL, save it to --out, and print size, latency and quality before/after.",
        epilog=QUANTIZE_EPILOG.format(presets=", ".join(PRESETS)),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    _model_args(q)
    q.add_argument("--max-drop", help="plan per-layer formats instead of one config: the model's metric "
                                      "may drop by at most this (absolute, e.g. 0.01, or relative, "
                                      "e.g. 1%%)")
    q.add_argument("--objective", choices=("size", "latency"), default="size",
                   help="with --max-drop: minimise checkpoint size or measured latency (default: size)")
    q.add_argument("--formats", help="with --max-drop: comma-separated formats to choose from (default: "
                                     "int4,int8,int8-dynamic,fp16,fp32)")
    q.add_argument("--out", help="output folder (default: quantwise-out/MODEL-CONFIG)")
    q.add_argument("--stream", action="store_true",
                   help="MODEL is a Hugging Face folder: quantize it block by block from its shards, "
                        "one block in memory at a time (weight-only / dynamic configs; no "
                        "before/after measurement: run `quantwise benchmark OUT`)")
    q.add_argument("--resume", action="store_true",
                   help="with --stream: continue an interrupted run from its first unfinished block "
                        "(same model, config and calibration data; the result is that of one run)")
    q.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    q.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    q.add_argument("--report", metavar="FILE.html",
                   help="also write a self-contained HTML report (per-layer ranges and histograms, "
                        "kernels, before / after, the plan's Pareto front)")
    q.add_argument("--quiet", action="store_true", help="no progress bars or log lines")
    a = sub.add_parser(
        "analyze", help="rank the layers by how much quantizing each one hurts (sensitivity)",
        description="Calibrate MODEL once under --config, then measure per layer what quantizing "
                    "it costs and what keeping it float buys; print the ranked table.",
        epilog=ANALYZE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _model_args(a)
    a.add_argument("--batches", type=int, default=2, help="batches for the SQNR proxy (default: 2)")
    a.add_argument("--top-k", type=int, default=5,
                   help="layers whose revert is measured with the task metric (default: 5)")
    a.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    a.add_argument("--report", metavar="FILE.html", help="also write the ranking as an HTML report")
    a.add_argument("--quiet", action="store_true", help="no progress bars or log lines")
    b = sub.add_parser(
        "benchmark", help="measure a saved quantized model against its float model",
        description="Reload FOLDER (written by `quantwise quantize` or quantwise.save) and print size, "
                    "latency and quality of the float model and the quantized one, side by side.",
        epilog=BENCHMARK_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    b.add_argument("folder", help="a folder written by quantwise quantize / quantwise.save")
    b.add_argument("--model", help="the float model, when the folder records none (same forms as quantize)")
    b.add_argument("--data", help="evaluation inputs (same forms as --calib); default: the model's own "
                                  "held-out data")
    b.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    b.add_argument("--allow-pickle", action="store_true", help=PICKLE_HELP)
    g = sub.add_parser(
        "generate", help="continue a prompt with a causal LM, float or quantized (KV cache)",
        description="Load MODEL (a quantwise checkpoint folder, a built-in name such as stdlib-lm, "
                    "or a Hugging Face folder) and continue --prompt, greedy or sampled; prints "
                    "the text and the prefill / decode tokens per second.")
    g.add_argument("model", help="a quantwise checkpoint folder, a built-in name, or an HF folder")
    g.add_argument("--prompt", required=True, help="the text to continue")
    g.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate (default: 64)")
    g.add_argument("--temperature", type=float, default=0.0,
                   help="0: greedy (default); above 0: sampled at this temperature")
    g.add_argument("--top-k", type=int, help="sample from the k most likely tokens")
    g.add_argument("--top-p", type=float, help="sample from the smallest set with this probability")
    g.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    g.add_argument("--engine", choices=("auto", "quantwise", "transformers"), default="auto",
                   help="the decoding loop: quantwise's lean loop for Llama-family models "
                        "(auto: where it can run the model) or transformers' generate")
    g.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    t = sub.add_parser(
        "qat", help="quantization-aware fine-tuning of a built-in model (resumable), then convert",
        description="Fine-tune MODEL with fake quantization (LSQ scales, distillation from fp32) for "
                    "a short schedule, convert it to real kernels, save it, and print fp32 / PTQ / "
                    "QAT quality side by side. Checkpoints every epoch; --resume continues.")
    t.add_argument("model", nargs="?", default="digits", help="built-in model: digits or minilm")
    t.add_argument("--config", default="w4a4", help="preset or config file (default: w4a4)")
    t.add_argument("--epochs", type=int, help="epochs (default: the model's recipe)")
    t.add_argument("--lr", type=float, help="initial learning rate (default: the model's recipe)")
    t.add_argument("--batch-size", type=int, help="batch size (default: the model's recipe)")
    t.add_argument("--freeze-bn-at", type=float, metavar="FRACTION",
                   help="freeze the BatchNorm statistics after this fraction of the steps; 0: folded "
                        "and frozen from the start (default: the model's recipe, 0.5 for digits)")
    t.add_argument("--out", help="output folder (default: quantwise-out/MODEL-CONFIG-qat)")
    t.add_argument("--resume", action="store_true", help="continue from OUT/qat-checkpoint")
    t.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    t.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    t.add_argument("--quiet", action="store_true", help="no progress bars or log lines")
    e = sub.add_parser(
        "export", help="export a saved quantized model as ONNX (QDQ) and check it in ONNX Runtime",
        description="Reload FOLDER, write an ONNX QDQ graph, report what ONNX Runtime fuses into "
                    "integer kernels, and compare its outputs with the PyTorch model, overall and "
                    "per layer.",
        epilog=EXPORT_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    e.add_argument("folder", help="a folder written by quantwise quantize / quantwise.save")
    e.add_argument("--out", help="the .onnx file (default: FOLDER.onnx beside the folder)")
    e.add_argument("--model", help="the float model, when the folder records none (same forms as quantize)")
    e.add_argument("--data", help="sample inputs for the parity check (same forms as --calib; "
                                  "default: the model's own calibration data)")
    e.add_argument("--batches", type=int, default=4, help="sample batches for the parity check (default: 4)")
    e.add_argument("--max-rel-err", type=float, default=1e-2,
                   help="parity threshold: relative error of the outputs (default: 0.01)")
    e.add_argument("--opset", type=int, default=None, help="ONNX opset (17 or newer; default: 20)")
    e.add_argument("--weight-dtype", choices=("auto", "int8", "uint8"), default="auto",
                   help="storage of 8-bit weights: int8, or uint8 with zero point 128 (the same "
                        "values; exact in ONNX Runtime's u8 x u8 kernels on CPUs without VNNI, "
                        "whose u8 x s8 kernels saturate); auto: uint8 only where ONNX Runtime "
                        "here is measured to saturate on the model's codes (default)")
    e.add_argument("--no-per-layer", action="store_true", help="skip the per-layer comparison")
    e.add_argument("--format", choices=("onnx", "compressed-tensors", "gguf"), default="onnx",
                   help="onnx (default): a QDQ graph for ONNX Runtime; compressed-tensors: a "
                        "Hugging Face folder that transformers / vLLM load (weight-only int4 / int8 "
                        "LLMs); gguf: one file for llama.cpp (Llama architecture, byte tokenizer)")
    e.add_argument("--qtype", choices=("Q8_0", "Q4_0"), default="Q8_0",
                   help="GGUF tensor type (blocks of 32 with an fp16 scale; default: Q8_0)")
    e.add_argument("--requantize", action="store_true",
                   help="GGUF: re-quantize every weight from its dequantized values with gguf's "
                        "quantizer (default: keep quantwise's own codes where its groups tile "
                        "GGUF's blocks, only the scales rounded to fp16)")
    e.add_argument("--quantized-head", action="store_true",
                   help="compressed-tensors: keep a quantized lm_head packed (transformers loads "
                        "it; vLLM expects a float head, the default)")
    e.add_argument("--no-check", action="store_true",
                   help="compressed-tensors / gguf: skip reading the export back with transformers")
    e.add_argument("--overwrite", action="store_true", help="replace an existing .onnx file")
    e.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    r = sub.add_parser(
        "report", help="write one self-contained HTML page for a quantization job",
        description="SOURCE: a saved report (.json, or a report .html to render again), the --json "
                    "output of quantize / analyze, a checkpoint folder (measured against its float "
                    "model), or a model to quantize with --config. Writes --out, an HTML file that "
                    "opens offline: the job, before / after, per-layer formats, kernels, ranges, "
                    "histograms with each calibrator's range, SQNR, the plan's Pareto front.")
    r.add_argument("source", help="results.json / report.html, a checkpoint folder, or a model")
    r.add_argument("--config", default="w8a8", help="with a model: preset or config file (default: w8a8)")
    r.add_argument("--calib", help="with a model: calibration data (default: the model's own)")
    r.add_argument("--model", help="with a folder: the float model, when the folder records none")
    r.add_argument("--data", help="with a folder: evaluation inputs (default: the model's own)")
    r.add_argument("--out", default="report.html", help="the HTML file (default: report.html)")
    r.add_argument("--overwrite", action="store_true", help="replace an existing report (and checkpoint)")
    r.add_argument("--json", action="store_true", help="print the report document as JSON on stdout")
    r.add_argument("--allow-pickle", action="store_true", help=PICKLE_HELP)
    i = sub.add_parser(
        "inspect", help="check an ONNX file and report which ops ONNX Runtime runs as integer kernels",
        description="Check FILE (not empty or truncated, external data only beside it), let ONNX "
                    "Runtime optimize it as a CPU session would, and count the convs and matmuls "
                    "it runs as integer kernels.")
    i.add_argument("file", help="an .onnx file (written by quantwise export or any other tool)")
    i.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    return parser
