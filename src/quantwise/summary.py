"""summary(qmodel): one row per layer: format, granularity, calibrator, the kernel that runs, why."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from torch import nn

from quantwise.kernels.probe import probe
from quantwise.kernels.select import speed_note
from quantwise.state import LayerRecord, get_state


@dataclass
class Summary:
    rows: list[LayerRecord]
    graph: str = ""  # what the int8 graph path did (or why it did not apply)
    cpu: dict = field(default_factory=dict)  # this CPU, its integer ISA, what the probe found
    speed: dict[str, str] = field(default_factory=dict)  # layer -> "no int8 speedup here" notes

    @property
    def quantized(self) -> list[LayerRecord]:
        return [r for r in self.rows if r.status == "quantized"]

    @property
    def float_layers(self) -> list[LayerRecord]:
        return [r for r in self.rows if r.status == "float"]

    def to_dict(self) -> dict:
        return {"cpu": self.cpu,
                "layers": [{**r.to_dict(), "speed_note": self.speed.get(r.name)} for r in self.rows],
                "counts": {"quantized": len(self.quantized), "float": len(self.float_layers),
                           "folded": sum(r.status == "folded" for r in self.rows)},
                "int8_graph": self.graph}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def __str__(self) -> str:
        header = ("layer", "type", "format", "calibrator", "kernel", "note")
        table = [header] + [(r.name, r.module_type, r.config, r.calibrator or "-", r.kernel,
                             "; ".join(x for x in (_note(r), self.speed.get(r.name)) if x))
                            for r in self.rows]
        widths = [min(max(len(row[i]) for row in table), 72) for i in range(len(header) - 1)]
        lines = []
        for i, row in enumerate(table):
            cells = [c[:w].ljust(w) for c, w in zip(row, widths)] + [row[-1]]
            lines.append("  ".join(cells).rstrip())
            if i == 0:
                lines.append("  ".join("-" * w for w in widths) + "  ----")
        folded = len(self.rows) - len(self.quantized) - len(self.float_layers)
        lines.append(f"{len(self.quantized)} layers quantized, {len(self.float_layers)} kept float"
                     + (f", {folded} BatchNorm folded" if folded else ""))
        if self.graph:
            lines.append(self.graph)
        if self.cpu:
            sums = ", ".join(f"{k} {v}" for k, v in sorted(self.cpu["accumulation"].items()))
            lines.append(f"CPU: {self.cpu['cpu']}; integer ISA: {self.cpu['isa']}; "
                         f"int8 sums (probe): {sums}")
        return "\n".join(lines)


def _note(record: LayerRecord) -> str:
    parts = [record.reason] if record.reason else []
    if record.code_limit:
        parts.insert(0, f"int8 weight codes limited to +-{record.code_limit} (7 bits): the CPU it "
                        f"was quantized on adds u8 x s8 products in int16 pairs (no VNNI), which "
                        f"saturates for full-range codes")
    if record.nonfinite:
        parts.append(f"{record.nonfinite} of {record.seen} calibration values non-finite (excluded)")
    return "; ".join(parts)


def summary(model: nn.Module) -> Summary:
    """Per-layer table of a prepared or quantized model; `print()` it or call `.to_json()`."""
    state = get_state(model)
    lines = [r.line() for r in (state.graph, state.encoder) if r is not None]
    graph = "\n".join(line for line in lines if line)
    speed = {}
    for name, module in model.named_modules():
        note = speed_note(getattr(getattr(module, "kernel", None), "speed_vs_fp32", None))
        if note and name in state.records:
            speed[name] = note
    info = probe().to_dict()
    cpu = {k: info[k] for k in ("cpu", "isa", "accumulation")}
    return Summary(list(state.records.values()), graph, cpu, speed)
