"""The `quantwise` command line: runs the job a subcommand names (parser.py) and prints its
result (output.py).

Exit codes: 0 success, 1 an export that misses its parity gate, 2 bad input (usage, model, data,
config, output path), 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings

from quantwise.cli.output import print_result
from quantwise.cli.parser import build_parser
from quantwise.errors import QuantwiseError, QuantwiseWarning
from quantwise.fileio import outputs_mark, outputs_since


def _check_report_path(path: str, overwrite: bool) -> None:
    """Before the long work: an existing report is replaced only with --overwrite, and its folder
    must be writable."""
    from pathlib import Path

    from quantwise.errors import OutputPathError
    from quantwise.io import check_output_dir

    target = Path(path)
    if target.is_dir():
        raise OutputPathError(f"report path {target} is a folder: pass a file name such as report.html")
    if target.exists() and not overwrite:
        raise OutputPathError(f"report {target} already exists: pass --overwrite or choose another name")
    check_output_dir(target.parent if str(target.parent) else Path("."), overwrite=True)


def _report_document(args: argparse.Namespace, log, argv: list[str] | None):
    """The document `quantwise report SOURCE` renders: read, measured, or quantized for it."""
    from pathlib import Path

    from quantwise.job import run_benchmark_job, run_quantize_job
    from quantwise.report import document, read_document

    source = Path(args.source)
    if source.is_file() and source.suffix.lower() in (".json", ".html", ".htm"):
        return read_document(source)
    if source.is_dir() and (source / "quantwise.json").is_file():
        result = run_benchmark_job(source, args.data, args.model, log=log, collect_stats=True,
                                   allow_pickle=args.allow_pickle)
    else:
        result = run_quantize_job(args.source, args.config, args.calib, overwrite=args.overwrite,
                                  progress=not args.json, log=log, collect_stats=True,
                                  allow_pickle=args.allow_pickle)
    return document(result=result.to_dict(), stats=result.stats, command=argv)


def _max_drop(text: str | None) -> float | str | None:
    """'0.01' -> 0.01; '1%' stays a string (plan() reads it as relative); None stays None."""
    if text is None or text.strip().endswith("%"):
        return text
    try:
        return float(text)
    except ValueError:
        return text  # plan() rejects it with a message that says what to pass


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    if args.command == "quantize" and args.resume and not args.stream:
        print("quantwise: error: --resume continues a --stream run: add --stream", file=sys.stderr)
        return 2
    quiet = getattr(args, "quiet", False) or args.json
    log = (lambda _: None) if quiet else (lambda m: print(m, file=sys.stderr))
    if (args.command == "quantize" and not args.stream and args.method is None
            and args.max_drop is None):
        from quantwise.stream.job import stream_by_default

        why = stream_by_default(args.model)
        if why:
            log(why)
            args.stream = True
    mark = outputs_mark()
    try:
        from quantwise.job import (run_analyze_job, run_benchmark_job, run_export_job,  # heavy imports
                                   run_quantize_job)

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", QuantwiseWarning)
            if getattr(args, "report", None):
                _check_report_path(args.report, getattr(args, "overwrite", False))
            if args.command == "analyze":
                report = run_analyze_job(args.model, args.config, args.calib, args.method,
                                         args.batches, args.top_k,
                                         progress=not (args.quiet or args.json), log=log,
                                         allow_pickle=args.allow_pickle)
            elif args.command == "qat":
                from quantwise.qatjob import run_qat_job

                report = run_qat_job(args.model, args.config, args.out, args.epochs, args.lr,
                                     args.batch_size, args.resume, args.overwrite,
                                     progress=not (args.quiet or args.json), log=log,
                                     freeze_bn_at=args.freeze_bn_at)
            elif args.command == "export" and args.format != "onnx":
                from quantwise.export.llm import run_llm_export

                report = run_llm_export(args.folder, args.format, args.out, args.qtype,
                                        not args.requantize, args.quantized_head, args.overwrite,
                                        not args.no_check, log=log)
            elif args.command == "export":
                report = run_export_job(args.folder, args.out, args.model, args.data, args.max_rel_err,
                                        args.batches, not args.no_per_layer, args.overwrite, args.opset,
                                        log=log, weight_dtype=args.weight_dtype)
            elif args.command == "generate":
                from quantwise.runtime.generate import generate, load_generator

                model, tokenizer = load_generator(args.model)
                report = generate(model, tokenizer, args.prompt, args.max_new_tokens,
                                  args.temperature, args.top_k, args.top_p, args.seed,
                                  engine=args.engine)
            elif args.command == "benchmark":
                report = run_benchmark_job(args.folder, args.data, args.model, log=log,
                                           allow_pickle=args.allow_pickle)
            elif args.command == "report":
                _check_report_path(args.out, args.overwrite)
                report = _report_document(args, log, argv)
            elif args.command == "inspect":
                from quantwise.export.check import fusion_report
                from quantwise.export.onnx_file import open_onnx

                open_onnx(args.file)  # refused before ONNX Runtime reads a byte of it
                report = fusion_report(args.file)
            elif args.stream:
                from quantwise.stream.job import run_stream_job

                report = run_stream_job(args.model, args.config, args.calib, args.out,
                                        args.overwrite, progress=not quiet, log=log,
                                        resume=args.resume)
            else:
                report = run_quantize_job(
                    args.model, args.config, args.calib, args.method, args.out, args.overwrite,
                    progress=not (args.quiet or args.json), log=log,
                    max_drop=_max_drop(args.max_drop), objective=args.objective,
                    formats=tuple(f.strip() for f in args.formats.split(",")) if args.formats else None,
                    allow_pickle=args.allow_pickle, collect_stats=bool(args.report))
            notes = sorted({str(w.message) for w in caught if issubclass(w.category, QuantwiseWarning)})
            if getattr(args, "report", None) or args.command == "report":
                from quantwise.report import document, write_report

                if args.command == "report":
                    doc = report
                elif args.command == "analyze":
                    doc = document(sensitivity=json.loads(report.to_json()), command=argv)
                else:
                    report.notes = report.notes + notes
                    doc = document(result=report.to_dict(), stats=report.stats, command=argv)
                path = write_report(doc, args.out if args.command == "report" else args.report)
                log(f"report written to {path}")
    except QuantwiseError as exc:
        print(f"quantwise: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if getattr(args, "stream", False):
            print("quantwise: interrupted; the finished blocks are kept: run the same command "
                  "with --resume to continue", file=sys.stderr)
        else:  # outputs are written whole (fileio): one that was finished stays
            done = ", ".join(str(p) for p in outputs_since(mark))
            print("quantwise: interrupted; " + (f"finished before it: {done}; nothing else was "
                  "written" if done else "nothing was written"), file=sys.stderr)
        return 130
    return print_result(args, report, notes)


__all__ = ["main", "build_parser"]
