"""What the `quantwise` command prints once its job is done (text or --json), and its exit code."""

from __future__ import annotations

import argparse
import json


def print_result(args: argparse.Namespace, report, notes: list[str]) -> int:
    """Print `report` of the job `args.command` ran, with the warnings it gave as notes; the exit
    code (an ONNX export whose parity gate failed: 1)."""
    if args.command == "qat":
        print(json.dumps(report.to_dict(), indent=2) if args.json else report)
        return 0
    if args.command == "generate":
        rate = report.decode_tokens_per_s
        print(json.dumps(report.to_dict(), indent=2) if args.json else
              f"{report.prompt}{report.text}\n\n{report.new_tokens} new tokens; prefill "
              f"{report.prompt_tokens} tokens in {report.prefill_s * 1e3:.1f} ms, decode "
              + (f"{rate:.1f} tokens/s" if rate else "-") + f" (decoding loop: {report.engine})")
        return 0
    if args.command == "inspect":
        print(json.dumps(report.to_dict(), indent=2) if args.json else report.line())
        return 0
    if args.command == "report":
        if args.json:
            print(json.dumps(report, indent=2, allow_nan=False, default=str))
        return 0
    if args.command == "analyze":
        print(report.to_json() if args.json else report)
        if not args.json:
            for note in notes:
                print(f"note: {note}")
        return 0
    if args.command == "export":
        if args.format != "onnx":
            from quantwise.export.llm import format_report

            print(json.dumps({**report, "notes": notes}, indent=2) if args.json
                  else format_report(report) + "".join(f"\nnote: {n}" for n in notes))
            return 0
        return _print_export(report, notes, args.json)
    if getattr(args, "stream", False):
        report["notes"] = notes
        print(json.dumps(report, indent=2) if args.json else "\n".join(
            f"{k}: {v}" for k, v in report.items() if k != "notes")
            + "".join(f"\nnote: {n}" for n in notes))
        return 0
    report.notes = report.notes + notes
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(_format_report(report))
        if report.plan is not None:
            print(f"\n{report.plan}")
        for note in report.notes:
            print(f"note: {note}")
    return 0


def _print_export(result, notes: list[str], as_json: bool) -> int:
    if as_json:
        print(json.dumps({**result.to_dict(), "warnings": notes}, indent=2))
    else:
        print(result.line())
        for layer, note in result.notes.items():
            print(f"  float: {layer}: {note}")
        print(result.fusion.line())
        if result.openvino is not None:
            print(result.openvino.line())
        elif result.openvino_note:
            print(f"note: {result.openvino_note}")
        print(result.parity.table())
        if result.runtime_note:  # uint8 weights chosen here: a note; still saturating: a warning
            print(f"{'note' if result.weight_dtype == 'uint8' else 'warning'}: {result.runtime_note}")
        for note in notes:
            print(f"note: {note}")
    return 0 if result.parity.ok else 1


def _format_report(report) -> str:
    b, a = report.before, report.after
    if b is None:  # the quantized model alone (its float model does not fit: see the notes)
        return (f"\n{report.layers}\n\nmodel {report.model}, config {report.config}, "
                f"{report.threads} threads, checkpoint {report.out}\n"
                f"{a.name}: {a.size_bytes / 1e6:.3f} MB on disk, {a.latency_ms:.2f} ms (median), "
                f"{a.quality.metric} {_quality(a.quality)}; fp32: not measured")
    higher_better = b.quality.metric != "perplexity"
    rows = [("", "size on disk", "latency (median)", b.quality.metric),
            ("fp32", f"{b.size_bytes / 1e6:.3f} MB", f"{b.latency_ms:.2f} ms", _quality(b.quality)),
            (a.name, f"{a.size_bytes / 1e6:.3f} MB", f"{a.latency_ms:.2f} ms", _quality(a.quality)),
            ("ratio", f"{a.size_bytes / b.size_bytes:.3f}x", _speed(b.latency_ms / a.latency_ms),
             f"{a.quality.value - b.quality.value:+.4f}" if higher_better else "")]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return (f"\n{report.layers}\n\nmodel {report.model}, config {report.config}, "
            f"{report.threads} threads, checkpoint {report.out}\n" + "\n".join(lines))


def _speed(speedup: float) -> str:
    return f"{speedup:.2f}x faster" if speedup >= 1 else f"{1 / speedup:.2f}x slower"


def _quality(result) -> str:
    extra = "".join(f" ({k} {v:.4f})" for k, v in result.details.items())
    return f"{result.value:.4f}{extra}"
