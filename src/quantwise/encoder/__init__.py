"""The encoder fast path: BERT-style layers whose Linears run int8 GEMMs (per-token dynamic
or static per-tensor inputs, in any mix; static layers are described at `parts.Lin` and
`FastBertLayer._onednn_ffn`).

Eager Hugging Face BERT layers quantize the same input three times (query, key, value), copy
Q/K/V into head-major layouts, allocate every temporary afresh (on this machine the page
faults of those allocations cost as much as the attention math), and run GELU out of place.
For a layer whose six Linears are per-token dynamic int8 (`IntMMLinear`), this pass installs a
forward that does the same math with:

- one per-token quantization and one int8 GEMM for Q, K and V (weights concatenated once, the
  1/sqrt(head_dim) scaling folded into Q's weight scales and bias);
- a GEMM epilogue that writes Q/K/V straight into a head-major [3, B, heads, T, d] buffer, then
  baddbmm (mask added inside), in-place softmax and bmm;
- in-place GELU, in-place residual adds, and per-thread reusable buffers for the temporaries
  (one set shared by all layers: the size of one layer's temporaries);
- on FBGEMM (AVX2-only CPUs), C passes between the GEMMs where the library is built
  (kernels/rowquant.py): the attention per head, the FFN's rescale + bias + GELU + next
  quantization, and each rescale + residual + LayerNorm (+ next quantization); and glibc set
  to reuse the buffers FBGEMM allocates on every call (kernels/heap.py).

Quantization codes and scales are those of the per-layer path (same function, same inputs);
outputs differ only by float summation order (attention) and the folded scaling. The layer's own
forward is kept: training mode, cross-attention, caches or unexpected arguments run it
unchanged. Only `layer.forward` changes (an instance attribute); modules and state_dict do not.

Files: parts.py (what a BERT-style layer must look like, and `Lin`: what the fast path needs of
one Linear), layer.py (`FastBertLayer`: the installed forward), this file (installing it).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from quantwise.encoder.layer import FastBertLayer
from quantwise.encoder.parts import bert_parts, why_not
from quantwise.kernels.heap import keep_freed_memory
from quantwise.modules import QuantizedLayer
from quantwise.state import QuantState


@dataclass
class EncoderReport:
    layers: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # layer -> why it runs as before
    heap: str | None = None  # what kernels/heap.keep_freed_memory did, if anything

    def line(self) -> str:
        if not self.layers and not self.skipped:
            return ""
        text = (f"encoder fast path: {len(self.layers)} BERT-style layers fused (one int8 GEMM for "
                f"Q/K/V, head-major attention, reused buffers)")
        if self.skipped:
            first = next(iter(self.skipped.items()))
            text += f"; {len(self.skipped)} not ({first[0]}: {first[1]})"
        if self.heap:
            text += f"; {self.heap}"
        return text


def apply_encoder_fastpath(model: nn.Module, state: QuantState) -> EncoderReport:
    report = EncoderReport()
    for name, module in model.named_modules():
        parts = bert_parts(module)
        if parts is None or not isinstance(parts["q"], QuantizedLayer):
            continue
        why = why_not(module, parts)
        if why:
            report.skipped[name] = why
            continue
        original = type(module).forward.__get__(module)
        object.__setattr__(module, "forward", FastBertLayer(module, parts, original))
        report.layers.append(name)
    if report.layers:  # FBGEMM's per-call buffers, reused instead of page-faulted in (kernels/heap)
        report.heap = keep_freed_memory()
    state.encoder = report
    return report


def remove_encoder_fastpath(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module.__dict__.get("forward"), FastBertLayer):
            del module.__dict__["forward"]


__all__ = ["EncoderReport", "FastBertLayer", "apply_encoder_fastpath", "remove_encoder_fastpath"]
