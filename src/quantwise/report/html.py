"""One self-contained HTML page from a report document (report/document.py): inline SVG plots,
inline CSS, a few lines of script to sort tables, and the document itself embedded as JSON.

Every number shown comes from the document: a number cell carries the JSON path it shows and
the exact value (data-path, data-value), so a test can check the page against its JSON.
"""

from __future__ import annotations

import html
import json
import math
from typing import Any

from quantwise.report import plots

CSS = """
*{box-sizing:border-box}
summary,p,li,h1,h2,h3,code{overflow-wrap:anywhere}
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;color:#222;background:#fafafa}
main{max-width:1100px;margin:0 auto;padding:12px 16px 48px}
h1{font-size:22px;margin:12px 0 4px}h2{font-size:18px;margin:28px 0 8px;border-bottom:1px solid #ddd}
h3{font-size:15px;margin:18px 0 4px}
.scroll{overflow-x:auto;max-width:100%}
table{border-collapse:collapse;background:#fff;font-size:13px}
th,td{border:1px solid #e2e2e2;padding:3px 7px;text-align:left;vertical-align:top}
th{background:#f0f0f0;cursor:pointer;white-space:nowrap}td.num{text-align:right;white-space:nowrap}
td.kernel{max-width:380px;font-size:12px;color:#444}
.plots{display:grid;grid-template-columns:repeat(auto-fit,minmax(min(100%,440px),1fr));gap:8px}
svg.plot{width:100%;height:auto;min-width:0;background:#fff;border:1px solid #eee}
.note{color:#7a4b00}.muted{color:#777}details{margin:6px 0}summary{cursor:pointer;font-weight:600}
"""

SORT_JS = """
document.querySelectorAll("table.sortable th").forEach(function(th, col){
  th.addEventListener("click", function(){
    var body = th.closest("table").tBodies[0], rows = Array.prototype.slice.call(body.rows);
    var dir = th.dataset.dir === "asc" ? -1 : 1; th.dataset.dir = dir === 1 ? "asc" : "desc";
    rows.sort(function(a, b){
      var x = a.cells[col].dataset.value || a.cells[col].textContent;
      var y = b.cells[col].dataset.value || b.cells[col].textContent;
      var nx = parseFloat(x), ny = parseFloat(y);
      if (!isNaN(nx) && !isNaN(ny)) return dir * (nx - ny);
      return dir * x.localeCompare(y);
    });
    rows.forEach(function(r){ body.appendChild(r); });
  });
});
"""


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value))


def _fmt(value: float, kind: str) -> str:
    if kind == "bytes":
        return f"{value / 1e6:.3f} MB"
    if kind == "ms":
        return f"{value:.3f} ms"
    if kind == "x":
        return f"{value:.3f}x"
    if kind == "db":
        return f"{value:.2f} dB"
    if kind == "int":
        return f"{int(value):,}"
    return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.4e}"


def _num(path: str, value: Any, kind: str = "g") -> str:
    """A table cell showing a number of the document, with its JSON path ("/"-separated: layer
    names hold dots) and exact value."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return '<td class="num muted">-</td>'
    return f'<td class="num">{_span(path, value, kind)}</td>'


def _span(path: str, value: Any, kind: str = "g") -> str:
    """A number of the document in running text or a range: path, exact value, unit kind."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return (f'<span data-path="{_e(path)}" data-value="{_e(repr(value))}" data-kind="{kind}">'
            f"{_e(_fmt(value, kind))}</span>")


def _table(header: list[str], rows: list[str], sortable: bool = True) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    cls = ' class="sortable"' if sortable else ""
    return (f'<div class="scroll"><table{cls}><thead><tr>{head}</tr></thead><tbody>'
            + "".join(f"<tr>{r}</tr>" for r in rows) + "</tbody></table></div>")


def render(doc: dict[str, Any]) -> str:
    plots.reset_ids()
    result, sens, stats = doc.get("result"), doc.get("sensitivity"), doc.get("layer_stats") or {}
    title = "quantwise report"
    if result:
        title += f": {result.get('model')}, {result.get('config')}"
    elif sens:
        title += f": sensitivity under {sens.get('config')}"
    parts = [f"<h1>{_e(title)}</h1>", _job(doc.get("job") or {})]
    if result:
        parts += [_before_after(result), _layers(result, stats)]
        if result.get("plan"):
            parts.append(_plan(result["plan"], result))
    if sens:
        parts.append(_sensitivity(sens))
    if stats:
        parts.append(_layer_plots(result, stats))
    notes = (result or {}).get("notes") or []
    if notes:
        parts.append("<h2>Notes</h2><ul>" + "".join(f'<li class="note">{_e(n)}</li>' for n in notes) + "</ul>")
    data = json.dumps(doc, allow_nan=False, default=str).replace("</", "<\\/")
    return ("<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{_e(title)}</title><style>{CSS}</style></head><body><main>"
            + "\n".join(parts)
            + f'</main><script type="application/json" id="report-data">{data}</script>'
            f"<script>{SORT_JS}</script></body></html>\n")


def _job(job: dict[str, Any]) -> str:
    machine, versions = job.get("machine") or {}, job.get("versions") or {}
    rows = [f"<th>command</th><td><code>{_e(job.get('command') or '-')}</code></td>",
            f"<th>date</th><td>{_e(job.get('date') or '-')}</td>",
            f"<th>machine</th><td>{_e(machine.get('cpu', '-'))}; integer ISA {_e(machine.get('isa', '-'))}; "
            f"{_e(machine.get('arch', ''))}; {_e(machine.get('threads', '-'))} threads</td>",
            "<th>versions</th><td>" + _e(", ".join(f"{k} {v}" for k, v in versions.items()) or "-") + "</td>"]
    return "<h2>Job</h2>" + _table(["", ""], rows, sortable=False).replace("<thead><tr><th></th><th></th></tr></thead>", "")


def _before_after(r: dict[str, Any]) -> str:
    b, a = r.get("before"), r["after"]
    metric = a.get("metric", "quality")
    rows = []
    if b:
        rows.append(f"<td>fp32</td>{_num('result/before/size_bytes', b['size_bytes'], 'bytes')}"
                    f"{_num('result/before/latency_ms', b['latency_ms'], 'ms')}"
                    f"{_num('result/before/quality', b['quality'])}")
    rows.append(f"<td>{_e(a['name'])}</td>{_num('result/after/size_bytes', a['size_bytes'], 'bytes')}"
                f"{_num('result/after/latency_ms', a['latency_ms'], 'ms')}{_num('result/after/quality', a['quality'])}")
    if b:
        change = a["quality"] - b["quality"]
        rows.append(f"<td>ratio</td>{_num('result/size_ratio', r.get('size_ratio'), 'x')}"
                    f"{_num('result/speedup', r.get('speedup'), 'x')}<td class=\"num\">{change:+.4f}</td>")
    text = (f"<p>checkpoint <code>{_e(r.get('out'))}</code>, {_e(r.get('threads'))} threads; speedup = fp32 "
            "latency / quantized latency (median, measured on this machine)</p>")
    return "<h2>Before / after</h2>" + text + _table(["", "size on disk", "latency (median)", metric], rows, False)


def _range(path: str, values: Any, keys: tuple[str, str] = ("0", "1")) -> str:
    """[lo, hi] from the document: `values` a pair (keys 0, 1) or a dict (keys min, max)."""
    if not values:
        return "-"
    lo, hi = (values.get(keys[0]), values.get(keys[1])) if isinstance(values, dict) else values
    if lo is None or hi is None:
        return "-"
    return f"[{_span(f'{path}/{keys[0]}', lo)}, {_span(f'{path}/{keys[1]}', hi)}]"


def _layers(r: dict[str, Any], stats: dict[str, Any]) -> str:
    table = r["layers"]
    rows = []
    for i, layer in enumerate(table.get("layers", [])):
        name = layer["name"]
        s = stats.get(name, {})
        act, weight = s.get("activation") or {}, s.get("weight") or {}
        why = layer.get("reason") or layer.get("speed_note") or ""
        rows.append(
            f"<td>{_e(layer['name'])}</td><td>{_e(layer['module_type'])}</td><td>{_e(layer['status'])}</td>"
            f"<td>{_e(layer['config'])}</td><td>{_e(layer.get('calibrator') or '-')}</td>"
            f"<td class=\"kernel\">{_e(layer['kernel'])}</td><td>{_e(why)}</td>"
            f"<td>{_range(f'layer_stats/{name}/weight', weight, ('min', 'max'))}</td>"
            f"<td>{_range(f'layer_stats/{name}/activation', act, ('min', 'max'))}</td>"
            f"<td>{_range(f'layer_stats/{name}/activation/chosen', act.get('chosen'))}</td>"
            + _num(f"layer_stats/{layer['name']}/sqnr_db", s.get("sqnr_db"), "db"))
    cpu = table.get("cpu") or {}
    counts = table.get("counts") or {}
    head = (f"<p>{_e(counts.get('quantized', 0))} layers quantized, {_e(counts.get('float', 0))} kept float, "
            f"{_e(counts.get('folded', 0))} folded; CPU {_e(cpu.get('cpu', '-'))}, integer ISA "
            f"{_e(cpu.get('isa', '-'))}; int8 sums (probe): "
            + _e(", ".join(f"{k} {v}" for k, v in (cpu.get("accumulation") or {}).items()) or "-")
            + ". SQNR: the layer's output with its real kernel vs the float layer, on the same float "
            "calibration inputs (click a column to sort).</p>")
    if table.get("int8_graph"):
        head += f"<p class=\"muted\">{_e(table['int8_graph'])}</p>"
    return "<h2>Layers</h2>" + head + _table(
        ["layer", "type", "status", "format", "calibrator", "kernel", "why float / note", "weight range",
         "activation range", "chosen input range", "output SQNR"], rows)


def _layer_plots(r: dict[str, Any] | None, stats: dict[str, Any]) -> str:
    calib = {l["name"]: l.get("calibrator") for l in (r or {}).get("layers", {}).get("layers", [])}
    blocks = []
    for name, s in stats.items():
        figs = []
        act = s.get("activation")
        if act and act.get("edges") and act.get("counts"):
            chosen = act.get("chosen")
            label = "dynamic (per token): no fixed range" if act.get("dynamic") else f"chosen: {calib.get(name)}"
            figs.append(plots.histogram(act["edges"], act["counts"], act.get("ranges") or {}, chosen,
                                        f"{name}: calibration inputs ({act['format']}, {label})"))
        weight = s.get("weight") or {}
        if weight.get("edges") and weight.get("counts"):
            figs.append(plots.histogram(weight["edges"], weight["counts"], weight.get("ranges") or {}, None,
                                        f"{name}: float weights ({weight['format']} {weight['granularity']})"))
        if weight.get("channels"):
            c = weight["channels"]
            figs.append(plots.channels(c["index"], c["absmax"], c["clip"], f"{name}: per-channel weight range"))
        if figs:
            blocks.append(f"<details open><summary>{_e(name)}</summary><div class=\"plots\">"
                          + "".join(figs) + "</div></details>")
    return ("<h2>Ranges per layer</h2><p>Histograms of each quantized layer's calibration inputs and "
            "float weights (log counts), with the range each calibrator would pick (dashed) and the "
            "one the layer uses (black).</p>" + "".join(blocks))


def _noise(db: Any) -> float | None:
    if isinstance(db, (int, float)) and math.isfinite(db):
        return 10 ** (-db / 10)
    return None


def _sensitivity(sens: dict[str, Any]) -> str:
    rows, names, w_share, a_share = [], [], [], []
    for i, row in enumerate(sens.get("rows", [])):
        p = f"sensitivity/rows/{i}"
        rows.append(f"{_num(p + '/rank', row.get('rank'), 'int')}<td>{_e(row['name'])}</td>"
                    f"<td>{_e(row.get('module_type'))}</td>{_num(p + '/only_sqnr', row.get('only_sqnr'), 'db')}"
                    f"{_num(p + '/gain_db', row.get('gain_db'), 'db')}"
                    f"{_num(p + '/weight_only_sqnr', row.get('weight_only_sqnr'), 'db')}"
                    f"{_num(p + '/act_only_sqnr', row.get('act_only_sqnr'), 'db')}"
                    f"<td>{_e(row.get('best_calibrator') or '-')}</td>{_num(p + '/metric_gain', row.get('metric_gain'))}")
        total, nw, na = _noise(row.get("only_sqnr")), _noise(row.get("weight_only_sqnr")), _noise(row.get("act_only_sqnr"))
        if total:
            share = (nw or 0.0) / ((nw or 0.0) + (na or 0.0)) if (nw or na) else 1.0
            names.append(row["name"])
            w_share.append(total * share)
            a_share.append(total * (1 - share))
    fig = plots.sensitivity_bars(names, w_share, a_share, f"sensitivity under {sens.get('config')}") if names else ""
    return ("<h2>Sensitivity</h2><p>Per layer: model-output SQNR with only this layer quantized, what "
            "keeping it float buys with all others quantized, and the weight-only / input-only SQNRs "
            "that split its harm into a weight and an activation share.</p>" + fig
            + _table(["rank", "layer", "type", "only", "gain", "weight only", "input only", "best calibrator",
                      "metric gain"], rows))


def _plan(plan: dict[str, Any], r: dict[str, Any]) -> str:
    front = plan.get("front") or []
    chosen = {"size_bytes": plan.get("size_bytes"), "latency_ms": plan.get("latency_ms"), "metric": plan.get("metric")}
    fp32 = {"size_bytes": plan.get("fp32_bytes"), "latency_ms": plan.get("fp32_latency_ms"),
            "metric": plan.get("fp32_metric"), "target": plan.get("target")}
    figs = [plots.pareto(front, "size_bytes", chosen, fp32, "plan: quality vs checkpoint size", "bytes")]
    if any(p.get("latency_ms") is not None for p in front):
        figs.append(plots.pareto(front, "latency_ms", chosen, fp32, "plan: quality vs latency", "ms"))
    rows = [f"<td>{_e(p.get('label'))}</td>{_num(f'result/plan/front/{i}/metric', p.get('metric'))}"
            f"{_num(f'result/plan/front/{i}/size_bytes', p.get('size_bytes'), 'bytes')}"
            f"{_num(f'result/plan/front/{i}/latency_ms', p.get('latency_ms'), 'ms')}"
            f"<td>{'yes' if p.get('pareto') else ''}</td><td>{'yes' if p.get('met') else ''}</td>"
            for i, p in enumerate(front)]
    metric, fp32_metric = plan.get("metric"), plan.get("fp32_metric")
    text = (f"<p>objective {_e(plan.get('objective'))}; budget {'met' if plan.get('met') else 'NOT met'}: "
            f"metric {_span('result/plan/metric', metric)} vs fp32 {_span('result/plan/fp32_metric', fp32_metric)}; "
            f"{_e(plan.get('evaluations'))} evaluations; every evaluated point is plotted, the chosen "
            "one starred.</p>")
    return ("<h2>Plan</h2>" + text + '<div class="plots">' + "".join(figs) + "</div>"
            + _table(["point", "metric", "size", "latency", "Pareto", "meets budget"], rows))
