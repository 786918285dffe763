"""Render results.json as Markdown: a header with the machine and method, one table per model."""

from __future__ import annotations

from typing import Any

# The "must reach" figures: (model, system, metric path, comparison, threshold).
# Ratios are speedups over ORT fp32 measured in the same run; sizes are bytes / fp32 safetensors.
TARGETS = [
    ("resnet18", "quantwise w8a8", "speedup_vs_ort_fp32", ">=", 3.5),
    ("resnet18", "quantwise w8a8", "quality.rel_err", "<=", 0.03),
    ("minilm", "quantwise w8a8-dynamic", "speedup_vs_ort_fp32", ">=", 2.5),
    ("minilm", "quantwise w8a8-dynamic", "quality.cos_mean", ">=", 0.995),
    ("minilm", "quantwise w8a8-dynamic", "quality.cos_min", ">=", 0.99),
    ("resnet18", "quantwise w8a8 -> ORT", "speedup_vs_ort_fp32", ">=", 2.0),  # issue 5
    ("minilm", "quantwise w8a8-smoothquant", "speedup_vs_ort_fp32", ">=", 2.5),  # issue 6
    ("minilm", "quantwise w8a8-smoothquant", "quality.cos_mean", ">=", 0.99),
    ("minilm", "quantwise w8a8-smoothquant", "quality.cos_min", ">=", 0.97),
] + [(m, f"quantwise {p}", "size_vs_fp32", "<=", 0.15 if p == "w4" else 0.26)
     for m in ("resnet18", "minilm", "digits") for p in ("w8a8", "w8a8-dynamic", "w8", "w4")]


def evaluate_targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Check each target against this run; a missing model/system/metric is 'not measured'."""
    out = []
    for model, system, path, op, threshold in TARGETS:
        if model not in results["models"]:
            continue  # model not run this time (--models)
        rows = {r["system"]: r for r in results["models"][model].get("systems", [])}
        value: Any = rows.get(system, {})
        for key in path.split("."):
            value = value.get(key) if isinstance(value, dict) else None
        ok = None if value is None else (value >= threshold if op == ">=" else value <= threshold)
        out.append({"model": model, "system": system, "metric": path, "target": f"{op} {threshold}",
                    "value": value, "pass": ok})
    return out


def targets_table(targets: list[dict[str, Any]]) -> list[str]:
    if not targets:
        return []
    lines = ["### Targets from the issue", "", "| model | system | metric | target | value | result |",
             "|---|---|---|---|---|---|"]
    for t in targets:
        result = {True: "pass", False: "**FAIL**", None: "not measured"}[t["pass"]]
        value = "" if t["value"] is None else f"{t['value']:.4g}"
        lines.append(f"| {t['model']} | {t['system']} | {t['metric']} | {t['target']} | {value} | {result} |")
    return lines + [""]


def _f(x: Any, fmt: str) -> str:
    return "" if x is None else format(x, fmt)


def _notes(row: dict[str, Any], rows_expected: int) -> str:
    """The short facts that explain a number: failures, fallbacks, unfused QDQ, cut runs."""
    if "error" in row:
        return "**failed**: " + row["error"].replace("|", "/").replace("\n", " ")[:160]
    info, notes = row.get("info", {}), []
    if "real_kernel" in info:  # quantwise summary rows, see run.layer_counts
        notes.append(f"{info['real_kernel']}/{info['layers']} layers on a real kernel")
        for cat, label in (("fallback", "fell back to float simulation"), ("float", "kept float")):
            if info.get(cat):
                why = "; ".join(info.get(f"{cat}_reasons", {}))[:110].replace("|", "/")
                notes.append(f"{info[cat]} {label} ({why})")
    if info.get("int8_graph"):
        notes.append("int8 graph: " + info["int8_graph"].split(", ")[0])
    if "int8_conv" in info:  # ORT optimized graph: how many products really run in int8
        parts = [f"{kind} {info[key]}" for kind, key in (("Conv", "int8_conv"), ("MatMul/Gemm", "int8_matmul"))
                 if not info[key].endswith("/0")]
        notes.append("int8 kernels: " + ", ".join(parts))
        if info.get("qdq_nodes_left", 0) > 1:  # one DQ at the output is normal
            notes.append(f"{info['qdq_nodes_left']} Q/DQ nodes left (float between them)")
    if "ov_int8_conv" in info:  # OpenVINO's runtime model: weight layers it runs in int8
        parts = [f"{kind} {info[key]}" for kind, key in (("Conv", "ov_int8_conv"),
                                                         ("FullyConnected", "ov_int8_fc"))
                 if not info[key].endswith("/0")]
        notes.append("OpenVINO int8: " + ", ".join(parts))
    if str(info.get("pre_process", "ok")) != "ok":
        notes.append("quant_pre_process failed")
    if "quantized_modules" in info:
        notes.append(f"{info['quantized_modules']} torch.ao quantized modules")
    if row.get("latency_min_ms") and row["latency_ms"] / row["latency_min_ms"] > 1.5:
        notes.append(f"unstable timing: median {row['latency_ms'] / row['latency_min_ms']:.1f}x "
                     "its fastest run")
    if row.get("runs") is not None and row.get("runs_requested") and row["runs"] < row["runs_requested"]:
        notes.append(f"only {row['runs']} runs (slow)")
    q = row.get("quality", {})
    if q and q.get("rows", rows_expected) < rows_expected:
        notes.append(f"quality on {q['rows']}/{rows_expected} rows (time budget)")
    if q.get("nonfinite_outputs"):
        notes.append(f"{q['nonfinite_outputs']} non-finite outputs")
    if "quality_error" in row:
        notes.append("quality failed: " + row["quality_error"][:100])
    return "; ".join(notes)


def timing_noise(rows: list[dict[str, Any]]) -> float:
    """Median / fastest run of the fp32 references: near 1 on a quiet machine. When a burst of
    outside load covers most of a run the median itself is contaminated (interleaving only shares
    bursts fairly if they are short next to one round), so a large value is a warning."""
    spreads = [r["latency_ms"] / r["latency_min_ms"] for r in rows
               if r["system"] in ("torch fp32", "ORT fp32") and r.get("latency_min_ms")]
    return max(spreads, default=1.0)


def model_table(name: str, res: dict[str, Any], ceil: dict | None = None) -> list[str]:
    if "error" in res:
        return [f"### {name}", "", f"Could not build the model: {res['error']}", ""]
    rows = res["systems"]
    expected = max((r.get("quality", {}).get("rows", 0) for r in rows), default=0)
    embedding = any("same_nn" in r.get("quality", {}) for r in rows)
    labelled = any("accuracy" in r.get("quality", {}) for r in rows)
    head = ["system", "median ms", "x ORT fp32", "x torch fp32", "size MB", "size / fp32",
            "peak MB", "rel err", "cos mean", "cos min", "same NN" if embedding else "top-1 agree"]
    head += ["accuracy"] if labelled else []
    head += ["notes"]
    lines = [f"### {name}", "", res["description"] + ".", ""]
    noise = timing_noise(rows)
    if noise > 1.25:
        lines += [f"**Noisy run**: an fp32 reference's median was {noise:.1f}x its fastest run "
                  "(most likely another process competing for the cores); treat the medians and "
                  "ratios below as unreliable and rerun on a quiet machine.", ""]
    if res.get("fp32_accuracy") is not None:
        lines += [f"fp32 top-1 accuracy: {res['fp32_accuracy']:.4f}", ""]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        q = r.get("quality", {})
        size = r.get("size_bytes")
        cells = [r["system"], _f(r.get("latency_ms"), ".1f"),
                 _f(r.get("speedup_vs_ort_fp32"), ".2f"), _f(r.get("speedup_vs_torch_fp32"), ".2f"),
                 _f(size / 1e6 if size else None, ".2f"), _f(r.get("size_vs_fp32"), ".3f"),
                 _f(r.get("peak_mem_mb"), ".0f"), _f(q.get("rel_err"), ".4f"),
                 _f(q.get("cos_mean"), ".5f"), _f(q.get("cos_min"), ".5f"),
                 _f(q.get("same_nn" if embedding else "top1_agree"), ".4f")]
        cells += [_f(q.get("accuracy"), ".4f")] if labelled else []
        cells += [_notes(r, expected)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines + [""] + ceiling_line(name, rows, ceil)


def markdown(results: dict[str, Any]) -> str:
    m, s, qw = results["machine"], results["settings"], results["quantwise"]
    v = m["versions"]
    qline = (f"quantwise {qw['version']}" if qw["importable"]
             else f"**quantwise NOT importable** ({qw['error']}): its rows are failures")
    lines = [
        "## Benchmark results", "",
        f"- Date: {m['date_utc']}; total run time {results.get('total_s', '?')} s",
        f"- Machine: {m['cpu']}, {m['cores_usable']} usable cores ({m['cores_online']} online), "
        f"{m['memory_gib']} GiB, ISA: {', '.join(m['isa'])}; load average at start "
        f"{m['loadavg_start'][0]:.2f}, at end {m.get('loadavg_end', [float('nan')])[0]:.2f}",
        f"- Software: torch {v['torch']}, onnxruntime {v['onnxruntime']}, onnx {v['onnx']}, "
        f"transformers {v['transformers']}, Python {v['python']}; {qline}",
        f"- Method: one process, same inputs, {s['threads']} threads everywhere (torch threads = "
        f"ORT intra-op, ORT inter-op 1), {s['warmup']} warm-ups, median of {s['runs']} runs "
        f"interleaved across systems in {s['rounds']} rounds. `x ORT fp32` / `x torch fp32`: "
        "speedup (reference latency / this latency; above 1 is faster). Quality: relative error "
        "||y - y_fp32|| / ||y_fp32||, cosine per row, vs fp32 torch on the same inputs.",
        f"- Memory: {s['memory']}",
        "",
    ]
    ceil = m.get("ceiling")
    if ceil:
        sums = ", ".join(f"{k} {v}" for k, v in sorted(ceil["accumulation"].items()))
        lines += [f"- Integer ISA (kernel probe): {ceil['isa']}; int8 sums: {sums}",
                  "- This machine's int8 ceiling (benchmarks/ceiling.py: best exact int8 / fp32 "
                  "throughput): " + "; ".join(f"{r['shape']} {r['ceiling']:.2f}x"
                                              for r in ceil["rows"] if r["ceiling"]), ""]
    lines += targets_table(results.get("targets", []))
    for name, res in results["models"].items():
        lines += model_table(name, res, ceil)
    return "\n".join(lines)


# the ceiling row each model's int8 speedup is compared with: its dominant shape
_CEILING_SHAPE = {"minilm": "GEMM 2048 x 384 x 1536", "resnet18": "conv 3x3, 128 ch 28x28, batch 8"}


def ceiling_line(name: str, rows: list[dict[str, Any]], ceil: dict | None) -> list[str]:
    shape = _CEILING_SHAPE.get(name)
    row = next((r for r in (ceil or {}).get("rows", []) if r["shape"] == shape), None)
    if not row or not row.get("ceiling"):
        return []
    ours = [r for r in rows if r["system"].startswith("quantwise") and "->" not in r["system"]
            and r.get("speedup_vs_torch_fp32")]  # rows run by ONNX Runtime are not ours
    if not ours:
        return []
    best = max(ours, key=lambda r: r["speedup_vs_torch_fp32"])
    return [f"Ceiling: int8 / fp32 at {shape} is {row['ceiling']:.2f}x here; the fastest quantwise "
            f"row ({best['system']}) runs {best['speedup_vs_torch_fp32']:.2f}x torch fp32 = "
            f"{best['speedup_vs_torch_fp32'] / row['ceiling']:.2f} of that ceiling.", ""]
