"""The report's plots: matplotlib figures rendered as inline SVG.

matplotlib rather than plotly: plotly's JavaScript alone is ~4.5 MB, so a self-contained page
for 40 layers would miss the 5 MB budget before any data; matplotlib's SVG needs no script,
renders as the page loads, and text kept as text (svg.fonttype "none") keeps a histogram at
~15 KB. Figures are built on Figure objects (no pyplot global state) and saved without a date,
with a fixed id salt, so the same data gives the same bytes.
"""

from __future__ import annotations

import io
import re
from typing import Any, Sequence

CALIBRATOR_COLORS = {"max": "#d62728", "percentile": "#1f77b4", "entropy": "#2ca02c", "mse": "#9467bd"}


def _figure(width: float = 6.4, height: float = 2.6):
    import matplotlib

    matplotlib.rcParams.update({"svg.fonttype": "none", "svg.hashsalt": "quantwise",
                                "font.size": 8, "axes.titlesize": 9})
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    fig.subplots_adjust(left=0.1, right=0.98, bottom=0.17, top=0.88)  # fixed: constrained layout doubled the time
    return fig, fig.add_subplot()


_ids = [0]


def reset_ids() -> None:
    """Start the per-figure id prefixes again (html.render does, so a page is reproducible)."""
    _ids[0] = 0


def _svg(fig) -> str:
    """Inline SVG, about half of matplotlib's bytes: no metadata, no indentation, coordinates to
    0.01 pt, one short font stack, ids prefixed per figure (many figures share one page)."""
    buf = io.StringIO()
    fig.savefig(buf, format="svg", metadata={"Date": None, "Creator": None})
    text = buf.getvalue()
    text = text[text.index("<svg"):]  # drop the XML declaration and DOCTYPE: inline in HTML
    text = re.sub(r"<metadata>.*?</metadata>", "", text, flags=re.S)
    text = re.sub(r"font-family: [^;\"]+", "font-family: sans-serif", text)
    text = re.sub(r"(\d+\.\d\d)\d+", r"\1", text)
    text = re.sub(r"\s*\n\s*", " ", text).replace("> <", "><")
    _ids[0] += 1
    prefix = f"f{_ids[0]}-"
    text = re.sub(r'id="([^"]+)"', lambda m: f'id="{prefix}{m.group(1)}"', text)
    text = re.sub(r"(#|url\(#)([A-Za-z_][\w.-]*)", lambda m: f"{m.group(1)}{prefix}{m.group(2)}"
                  if not re.fullmatch(r"[0-9a-fA-F]{3}|[0-9a-fA-F]{6}", m.group(2)) else m.group(0), text)
    # scale with the page: keep the viewBox, drop the fixed size in points
    return re.sub(r'<svg([^>]*?) width="[^"]+" height="[^"]+"', r'<svg\1 class="plot"', text, count=1)


def histogram(edges: Sequence[float], counts: Sequence[int], ranges: dict[str, Any],
              chosen: Sequence[float] | None, title: str) -> str:
    """Log-count histogram with each calibrator's range (thin) and the chosen one (thick, black)."""
    fig, ax = _figure()
    lo, hi = edges
    n = len(counts)
    step = (hi - lo) / n if n else 1.0
    xs = [lo + i * step for i in range(n + 1)]
    ax.stairs([c if c > 0 else 0.5 for c in counts], xs, fill=True, color="#bbbbbb",
              baseline=0.5, label="values")
    ax.set_yscale("log")
    ax.set_ylim(bottom=0.5)
    for name, bounds in ranges.items():
        if bounds is not None:
            color = CALIBRATOR_COLORS.get(name, "#555555")
            for i, x in enumerate(bounds):
                ax.axvline(x, color=color, lw=1.0, ls=(0, (3, 2)), label=name if i == 0 else None)
    if chosen is not None:
        for i, x in enumerate(chosen):
            ax.axvline(x, color="black", lw=2.0, label="chosen" if i == 0 else None)
    ax.set_title(title)
    ax.set_xlabel("value")
    ax.set_ylabel("count (log)")
    ax.legend(fontsize=7, ncols=3, loc="upper right", frameon=False)
    return _svg(fig)


def channels(index: Sequence[int], absmax: Sequence[float], clip: Sequence[float], title: str) -> str:
    """Per output channel: the float weights' |w| max and the clip the stored scale gives."""
    fig, ax = _figure()
    ax.plot(index, absmax, color="#1f77b4", lw=1.0, label="|w| max (float)")
    ax.plot(index, clip, color="black", lw=1.0, ls=(0, (3, 2)), label="clip (scale x qmax)")
    ax.set_title(title)
    ax.set_xlabel("output channel")
    ax.set_ylabel("|w|")
    ax.legend(fontsize=7, frameon=False)
    return _svg(fig)


def sensitivity_bars(names: Sequence[str], weight_share: Sequence[float], act_share: Sequence[float],
                     title: str) -> str:
    """Each layer's harm (noise power relative to the signal, when only it is quantized), split
    into the part its weight and its input cause (from the weight-only / input-only SQNRs)."""
    height = 1.0 + 0.22 * len(names)
    fig, ax = _figure(6.4, min(height, 12.0))
    ys = list(range(len(names)))[::-1]
    ax.barh(ys, weight_share, color="#1f77b4", label="weight")
    ax.barh(ys, act_share, left=weight_share, color="#ff7f0e", label="activation")
    ax.set_yticks(ys, names)
    ax.set_xscale("log")
    ax.set_xlabel("noise / signal with only this layer quantized (log)")
    ax.set_title(title)
    ax.legend(fontsize=7, frameon=False)
    return _svg(fig)


def pareto(points: Sequence[dict[str, Any]], x_key: str, chosen: dict[str, Any] | None,
           fp32: dict[str, float] | None, title: str, x_label: str) -> str:
    """Every evaluated plan point (quality vs size or latency), the front joined, the chosen marked."""
    fig, ax = _figure(6.4, 3.2)
    pts = [p for p in points if p.get(x_key) is not None]
    ax.scatter([p[x_key] for p in pts], [p["metric"] for p in pts], s=14, color="#999999",
               label="evaluated")
    front = sorted((p for p in pts if p.get("pareto")), key=lambda p: p[x_key])
    if front:
        ax.plot([p[x_key] for p in front], [p["metric"] for p in front], color="#1f77b4", lw=1.0,
                marker="o", ms=3, label="Pareto front")
    if chosen is not None and chosen.get(x_key) is not None:
        ax.scatter([chosen[x_key]], [chosen["metric"]], s=80, marker="*", color="#d62728",
                   zorder=3, label="chosen")
    if fp32 and fp32.get(x_key) is not None:
        ax.scatter([fp32[x_key]], [fp32["metric"]], s=30, marker="s", color="black", label="fp32")
    if fp32 and fp32.get("target") is not None:
        ax.axhline(fp32["target"], color="#d62728", lw=0.8, ls=(0, (3, 2)), label="budget")
    ax.set_xlabel(x_label)
    ax.set_ylabel("metric")
    ax.set_title(title)
    ax.legend(fontsize=7, frameon=False)
    return _svg(fig)
