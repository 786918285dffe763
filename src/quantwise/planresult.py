"""What quantwise.plan returns: the chosen Plan and every evaluated Candidate."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from quantwise.config import Config


@dataclass
class Candidate:
    """One evaluated model: a real quantize() with `config`, scored by eval_fn."""

    label: str
    layers: dict[str, str]
    config: Config
    metric: float
    size_bytes: int
    latency_ms: float | None = None
    met: bool = False
    pareto: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, "metric": self.metric, "size_bytes": self.size_bytes,
                "latency_ms": self.latency_ms, "met": self.met, "pareto": self.pareto,
                "layers": dict(self.layers), "config": self.config.to_dict()}


@dataclass
class Plan:
    config: Config
    layers: dict[str, str]             # layer -> format
    metric: float
    fp32_metric: float
    max_drop: float                    # absolute
    objective: str
    size_bytes: int
    fp32_bytes: int
    latency_ms: float | None
    met: bool
    front: list[Candidate]
    evaluations: int
    seconds: float
    message: str = ""
    fp32_latency_ms: float | None = None
    format_latency_ms: dict[str, float] = field(default_factory=dict)  # uniform configs (latency)

    @property
    def size_ratio(self) -> float:
        return self.size_bytes / self.fp32_bytes

    @property
    def target(self) -> float:
        return self.fp32_metric - self.max_drop

    def to_dict(self) -> dict[str, Any]:
        return {"objective": self.objective, "met": self.met, "message": self.message,
                "metric": self.metric, "fp32_metric": self.fp32_metric, "max_drop": self.max_drop,
                "target": self.target, "size_bytes": self.size_bytes, "fp32_bytes": self.fp32_bytes,
                "size_ratio": self.size_ratio, "latency_ms": self.latency_ms,
                "fp32_latency_ms": self.fp32_latency_ms, "format_latency_ms": self.format_latency_ms,
                "evaluations": self.evaluations, "seconds": self.seconds, "layers": self.layers,
                "config": self.config.to_dict(), "front": [c.to_dict() for c in self.front]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def __str__(self) -> str:
        def lat(v):
            return "-" if v is None else f"{v:.1f} ms"
        lines = [(f"plan ({self.objective}): {'budget met' if self.met else 'BUDGET NOT MET'}; "
                  f"metric {self.metric:.6g} vs fp32 {self.fp32_metric:.6g} (target >= "
                  f"{self.target:.6g}, max drop {self.max_drop:.4g})"),
                 (f"size {self.size_bytes:,} B = {self.size_ratio:.3f}x fp32; latency "
                  f"{lat(self.latency_ms)} (fp32 {lat(self.fp32_latency_ms)}); "
                  f"{self.evaluations} evaluations, {self.seconds:.1f} s")]
        if self.message:
            lines.append(self.message)
        by_format: dict[str, list[str]] = {}
        for name, fmt in self.layers.items():
            by_format.setdefault(fmt, []).append(name)
        lines.append("format         layers")
        for fmt, names in by_format.items():
            shown = ", ".join(names[:4]) + (f", ... (+{len(names) - 4})" if len(names) > 4 else "")
            lines.append(f"{fmt:<14} {len(names):>3}: {shown}")
        lines.append("Pareto front (metric, size, latency, candidate):")
        for c in self.front:
            if c.pareto:
                lines.append(f"  {c.metric:.6g}  {c.size_bytes / self.fp32_bytes:.3f}x  "
                             f"{lat(c.latency_ms)}  {c.label}{'' if c.met else ' (over budget)'}")
        return "\n".join(lines)


def mark_pareto(front: list[Candidate]) -> None:
    """Non-dominated on (metric up, size down, latency down where both were measured)."""
    def dominates(a: Candidate, b: Candidate) -> bool:
        pairs = [(a.metric, b.metric), (-a.size_bytes, -b.size_bytes)]
        if a.latency_ms is not None and b.latency_ms is not None:
            pairs.append((-a.latency_ms, -b.latency_ms))
        return all(x >= y for x, y in pairs) and any(x > y for x, y in pairs)
    for c in front:
        c.pareto = not any(dominates(o, c) for o in front if o is not c)
