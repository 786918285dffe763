"""`quantwise export FOLDER --format compressed-tensors | gguf`: a quantized causal LM written for
the LLM runtimes (formats/compressed_tensors.py, formats/gguf_export.py), then read back by the
other tool (transformers: its compressed-tensors integration, its GGUF loader) and compared with
quantwise's own model, so the export states what it costs instead of assuming it.

Comparison: held-out perplexity of stdlib-code windows for byte-level models (stdlib-lm's
tokenizer), and the logits' relative error on the first 64 tokens of one window (random tokens
for other vocabularies).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from quantwise.errors import ExportError
from quantwise.evaluate import evaluate
from quantwise.io import load

FORMATS = ("onnx", "compressed-tensors", "gguf")
EVAL_WINDOWS = 16


def _byte_level(folder: Path) -> bool:
    try:
        return json.loads((folder / "tokenizer.json").read_text()).get("type") == "bytes"
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        return False


def _compare(ours: torch.nn.Module, theirs: torch.nn.Module, folder: Path) -> dict[str, Any]:
    if _byte_level(folder):
        from quantwise.models.stdlib_lm import lm_batches

        batches = lm_batches("heldout", EVAL_WINDOWS, batch_size=8)
        ids = batches[0]["input_ids"][:1, :64]
    else:
        vocab = ours.config.vocab_size
        batches = None
        ids = torch.randint(0, vocab, (1, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = theirs(input_ids=ids).logits.float()
        b = ours(input_ids=ids).logits.float()
    result = {"logits_rel_err": float((a - b).norm() / b.norm())}
    if batches is not None:
        p_ours = evaluate(ours, batches, "perplexity").value
        p_theirs = evaluate(theirs, batches, "perplexity").value
        result.update(perplexity_quantwise=p_ours, perplexity_export=p_theirs,
                      perplexity_change=p_theirs / p_ours - 1)
    return result


def _reload_compressed_tensors(path: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def _reload_gguf(path: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                dtype=torch.float32).eval()


def run_llm_export(folder: str | Path, fmt: str, out: str | Path | None = None,
                   qtype: str = "Q8_0", keep_codes: bool = False, quantized_head: bool = False,
                   overwrite: bool = False, check: bool = True,
                   log: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """Export FOLDER as `fmt` and (check) compare the other tool's reload with quantwise's."""
    folder = Path(folder)
    if fmt == "compressed-tensors":
        from quantwise.formats.compressed_tensors import export_compressed_tensors

        out = Path(out) if out else folder.with_name(folder.name + "-compressed-tensors")
        log(f"writing {out} (compressed-tensors)")
        report: dict[str, Any] = {"format": fmt, "out": str(
            export_compressed_tensors(folder, out, overwrite, quantized_head=quantized_head))}
        reload = _reload_compressed_tensors
    elif fmt == "gguf":
        from quantwise.formats.gguf_export import export_gguf

        out = Path(out) if out else folder.with_name(f"{folder.name}-{qtype}.gguf")
        log(f"writing {out} (GGUF {qtype})")
        written = export_gguf(folder, out, qtype, overwrite, keep_codes=keep_codes)
        report = {"format": fmt, "out": str(out), "qtype": qtype, "bytes": written["bytes"],
                  **{k: written[k] for k in ("exact", "rounded", "requantized", "float")}}
        reload = _reload_gguf
    else:
        raise ExportError(f"format {fmt!r}: supported are {', '.join(FORMATS)}")
    if check:
        log("reading it back with transformers and comparing with quantwise's model")
        ours = load(folder)
        report.update(_compare(ours, reload(Path(report["out"])), folder))
    return report


def format_report(report: dict[str, Any]) -> str:
    lines = [f"wrote {report['out']} ({report['format']}"
             + (f" {report['qtype']}, {report['bytes'] / 1e6:.2f} MB)" if "qtype" in report else ")")]
    if "requantized" in report:
        lines.append(f"tensors: {len(report['exact'])} with quantwise's own codes, "
                     f"{len(report['rounded'])} with scales rounded to fp16, "
                     f"{len(report['requantized'])} re-quantized to {report['qtype']} from the "
                     f"dequantized weights, {len(report['float'])} float")
        if report["requantized"]:
            lines.append("re-quantized: " + ", ".join(report["requantized"][:6])
                         + (" ..." if len(report["requantized"]) > 6 else ""))
    if "logits_rel_err" in report:
        lines.append(f"read back by transformers: logits relative error "
                     f"{report['logits_rel_err']:.2e} vs quantwise's model (first 64 tokens)")
    if "perplexity_export" in report:
        lines.append(f"held-out perplexity: quantwise {report['perplexity_quantwise']:.4f}, "
                     f"export {report['perplexity_export']:.4f} "
                     f"({100 * report['perplexity_change']:+.2f}%)")
    return "\n".join(lines)
