"""The main job: load a model, quantize it, save it, and measure before/after side by side.

Used by `quantwise quantize`; returns a JobReport that the command line prints as a table or JSON.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from quantwise.config import Config
from quantwise.errors import (CalibrationError, CheckpointError, EvaluationError, ModelLoadError,
                              OutputPathError)
from quantwise.data import corpus_split, load_calibration_data
from quantwise.evaluate import (EvalResult, evaluate, float_checkpoint_bytes, folder_bytes,
                                median_latency_ms)
from quantwise.io import check_output_dir, load, read_metadata, refuse_code_source, save
from quantwise.plan import Plan, plan
from quantwise.report.collect import layer_stats
from quantwise.sensitivity import SensitivityReport, sensitivity
from quantwise.models.registry import DEFAULT_MODEL, ModelInfo, load_model
from quantwise.models.hf import is_hf_folder
from quantwise.state import get_state
from quantwise.summary import Summary, summary
from quantwise.workflow import quantize


@dataclass
class Measured:
    name: str
    size_bytes: int
    latency_ms: float
    quality: EvalResult

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "size_bytes": self.size_bytes, "latency_ms": self.latency_ms,
                "metric": self.quality.metric, "quality": self.quality.value,
                **{f"quality_{k}": v for k, v in self.quality.details.items()}}


@dataclass
class JobReport:
    model: str
    config: str
    out: Path
    threads: int
    before: Measured | None  # None: the float model was not loaded (see notes)
    after: Measured
    layers: Summary
    notes: list[str] = field(default_factory=list)
    plan: Plan | None = None  # when the config was planned against an accuracy budget
    stats: dict[str, Any] | None = None  # per-layer ranges for the HTML report (report/collect.py)

    def to_dict(self) -> dict[str, Any]:
        b = self.before
        return {"model": self.model, "config": self.config, "out": str(self.out),
                "threads": self.threads, "after": self.after.to_dict(),
                "before": None if b is None else b.to_dict(),
                "size_ratio": None if b is None else self.after.size_bytes / b.size_bytes,
                "speedup": None if b is None else b.latency_ms / self.after.latency_ms,
                "layers": self.layers.to_dict(), "notes": self.notes,
                "plan": None if self.plan is None else self.plan.to_dict()}


def default_out(model_ref: str, config_name: str) -> Path:
    stem = Path(model_ref).name if model_ref not in ("", None) else DEFAULT_MODEL
    stem = stem.replace(":", "-").replace(".", "-")
    return Path("quantwise-out") / f"{stem}-{config_name}"


EVAL_LM_WINDOWS = 64  # held-out windows (256 byte tokens each) for stdlib-lm in the job


def eval_batches(info: ModelInfo, calib: list[Any]) -> tuple[list[Any], str]:
    """Held-out evaluation data and the metric for a model; custom models use their calib data.

    stdlib-code: lm_windows("heldout", EVAL_LM_WINDOWS) in batches of 8 (latency is timed on one
    batch), metric perplexity.
    """
    if info.eval_data == "digits":
        from quantwise.models.digits import digits_data

        images, labels = digits_data("test")
        return [(images[i:i + 64], labels[i:i + 64]) for i in range(0, len(images), 64)], "top1"
    if info.eval_data == "stdlib-code":
        from quantwise.models.stdlib_lm import lm_batches

        return lm_batches("heldout", EVAL_LM_WINDOWS, batch_size=8), "perplexity"
    if info.eval_data == "stdlib-text":
        from quantwise.models.minilm import load_tokenizer, tokenize

        tokenizer = load_tokenizer(info.source)
        sentences = corpus_split("heldout")
        return [tokenize(tokenizer, sentences[i:i + 32]) for i in range(0, len(sentences), 32)], "cosine"
    return calib, "cosine"


def _model_and_calib(model_ref: str, calib: str | None, log: Callable[[str], None],
                     allow_pickle: bool = False) -> tuple[nn.Module, ModelInfo, str, list[Any]]:
    log(f"loading model {model_ref!r}")
    model, info = load_model(model_ref, allow_pickle=allow_pickle)
    calib_spec = calib or info.calib_data
    if calib_spec is None:
        raise CalibrationError(f"model {info.name!r} has no built-in calibration data: pass --calib "
                               "(a text file, or a folder of .npy / .safetensors inputs)")
    return model, info, calib_spec, load_calibration_data(calib_spec, info, allow_pickle=allow_pickle)


def run_quantize_job(model_ref: str = DEFAULT_MODEL, config: str = "w8a8", calib: str | None = None,
                     method: str | None = None, out: str | Path | None = None,
                     overwrite: bool = False, progress: bool = True,
                     log: Callable[[str], None] = lambda _: None, max_drop: float | str | None = None,
                     objective: str = "size", formats: tuple[str, ...] | None = None,
                     allow_pickle: bool = False, collect_stats: bool = False) -> JobReport:
    """Quantize with `config`, or, with `max_drop`, with the plan that meets that accuracy budget
    on the model's own metric at the lowest size or latency (`objective`). `collect_stats`: also
    the per-layer ranges and SQNRs the HTML report plots."""
    cfg = Config.resolve(config)
    if method:
        cfg = cfg.with_calibrator(method)
    name = cfg.name if max_drop is None else f"plan-{objective}"
    out = Path(out) if out else default_out(model_ref, name)
    inputs = (model_ref, calib) if Path(model_ref).exists() else ((calib,) if calib else ())
    check_output_dir(out, overwrite, inputs=tuple(p for p in inputs if p and Path(p).exists()))
    model, info, calib_spec, calib_data = _model_and_calib(model_ref, calib, log, allow_pickle)
    evals = eval_batches(info, calib_data)
    chosen = None
    if max_drop is not None:
        change = "rise" if evals[1] == "perplexity" else "drop"  # lower-is-better metric
        log(f"planning per-layer formats: metric {evals[1]} may {change} by at most {max_drop}, "
            f"objective {objective}")
        kwargs = {} if formats is None else {"formats": formats}
        chosen = plan(model, calib_data, _metric_fn(model, evals), max_drop, objective=objective,
                      progress=progress, **kwargs)
        cfg = chosen.config
        cfg.name = name
    log(f"quantizing with {cfg.name} ({len(calib_data)} calibration batches from {calib_spec!r})")
    qmodel = quantize(model, cfg, calib_data, progress=progress, source=_source(model_ref))
    _check_something_quantized(qmodel, calib_spec)
    save(qmodel, out, overwrite=overwrite)
    log(f"saved to {out}; measuring before/after")
    report = _measure(model, qmodel, info, cfg.name, out, evals)
    report.plan = chosen
    if collect_stats:
        log("collecting per-layer ranges for the report")
        report.stats = layer_stats(model, qmodel, calib_data)
    return report


def _check_something_quantized(qmodel: nn.Module, calib_spec: str) -> None:
    """A job that quantized no layer failed (all-NaN calibration data, a config excluding
    everything): say why in one line, exit non-zero, write nothing, so scripts notice."""
    records = [r for r in get_state(qmodel).records.values() if r.status != "folded"]
    if any(r.status == "quantized" for r in records):
        return
    first = next((r for r in records if r.reason), None)
    why = f" (first: {first.name}: {first.reason})" if first else ""
    seen, bad = sum(r.seen for r in records), sum(r.nonfinite for r in records)
    if bad:
        why += f"; {bad} of {seen} calibration values were NaN or infinite"
    raise CalibrationError(f"nothing was quantized: all {len(records)} layers stayed float{why}; "
                           f"check the calibration data {calib_spec!r} and the config; no output "
                           "was written")


def _metric_fn(model: nn.Module, evals: tuple[list[Any], str], limit: int = 8
               ) -> Callable[[nn.Module], float]:
    """The model's own metric on its first `limit` evaluation batches (cosine: vs `model`), as
    plan() and sensitivity() want it: higher is better. Perplexity (lower is better) enters as
    -perplexity, so max_drop 0.05 lets it rise by 0.05 and "1%" by 1% of the fp32 perplexity."""
    batches, metric = evals[0][:limit], evals[1]
    reference = model if metric == "cosine" else None
    sign = -1.0 if metric == "perplexity" else 1.0
    return lambda candidate: sign * evaluate(candidate, batches, metric, reference=reference).value


def run_analyze_job(model_ref: str = DEFAULT_MODEL, config: str = "w8a8", calib: str | None = None,
                    method: str | None = None, proxy_batches: int = 2, top_k: int = 5,
                    eval_batches_limit: int = 4, progress: bool = True,
                    log: Callable[[str], None] = lambda _: None,
                    allow_pickle: bool = False) -> SensitivityReport:
    """Per-layer sensitivity of MODEL under CONFIG; the task metric is the model's own (top-1 on
    its test split, or cosine vs fp32 on held-out inputs), on the first `eval_batches_limit`
    evaluation batches."""
    cfg = Config.resolve(config)
    if method:
        cfg = cfg.with_calibrator(method)
    model, info, _, calib_data = _model_and_calib(model_ref, calib, log, allow_pickle)
    batches, metric = eval_batches(info, calib_data)
    batches = batches[:max(1, eval_batches_limit)]
    proxy = [b[0] for b in batches] if metric == "top1" else batches
    eval_fn = _metric_fn(model, (batches, metric))

    log(f"analysing {info.name} under {cfg.name}: calibrate once on {len(calib_data)} batches, "
        f"proxy SQNR on {min(proxy_batches, len(proxy))}, {metric} on {len(batches)} batches"
        + (" (eval_fn = -perplexity: higher is better)" if metric == "perplexity" else ""))
    return sensitivity(model, cfg, calib_data, proxy, eval_fn, proxy_batches=proxy_batches,
                       top_k=top_k, progress=progress)


def run_benchmark_job(folder: str | Path, data: str | None = None, model_ref: str | None = None,
                      log: Callable[[str], None] = lambda _: None, collect_stats: bool = False,
                      allow_pickle: bool = False) -> JobReport:
    """Reload a saved quantized model and measure it against its float model, side by side
    (the quantized model alone, by perplexity, when the float one would not fit in memory).
    `allow_pickle`: the float model's or `data`'s pickle files are loaded (as for quantize)."""
    folder = Path(folder)
    too_big = _float_does_not_fit(folder, model_ref)
    if too_big:
        log(too_big)
        return _measure_alone(folder, data, too_big, allow_pickle)
    meta, model, info, qmodel = _reload(folder, model_ref, log, allow_pickle)
    if data is not None:
        evals = (load_calibration_data(data, info, allow_pickle=allow_pickle), "cosine")
    elif info.eval_data is not None:
        evals = eval_batches(info, [])
    else:
        raise CalibrationError(f"model {info.name!r} has no built-in evaluation data: pass --data "
                               "(a text file, or a folder of .npy / .safetensors inputs)")
    report = _measure(model, qmodel, info, meta["config"].get("name", "quantized"), folder, evals)
    if collect_stats:  # on the data it was calibrated on (the model's own), else the given data
        calib = load_calibration_data(info.calib_data, info) if info.calib_data else evals[0]
        report.stats = layer_stats(model, qmodel, [b[0] if evals[1] == "top1" and calib is evals[0]
                                                   else b for b in calib])
    return report


def _float_does_not_fit(folder: Path, model_ref: str | None) -> str | None:
    """Why the float model is not loaded beside the quantized one: its source is a Hugging Face
    folder whose float32 weights plus the quantized model (kernels: up to ~3x its size on disk)
    exceed the memory available. None: it fits, or nothing says otherwise."""
    from quantwise.formats.shards import float32_bytes
    from quantwise.io import available_memory

    ref = model_ref or read_metadata(folder).get("source")
    path = Path(ref) if ref else None
    if path is None or not (path / "config.json").is_file() or not is_hf_folder(folder):
        return None
    float32, available = float32_bytes(path), available_memory()
    if float32 is None or available is None or float32 + 3 * folder_bytes(folder) <= available:
        return None
    return (f"the float model {path} is {float32 / 1e9:.1f} GB in float32 with "
            f"{available / 1e9:.1f} GB of memory available: measuring the quantized model alone")


def _measure_alone(folder: Path, data: str | None, why: str, allow_pickle: bool = False) -> JobReport:
    """Size, latency and perplexity of a quantized causal LM without its float model."""
    from quantwise.models.hf import folder_tokenizer

    meta = read_metadata(folder)
    qmodel = load(folder)
    if not type(qmodel).__name__.endswith("ForCausalLM"):
        raise CheckpointError(f"{why}, but {type(qmodel).__name__} is not a causal LM, whose "
                              "perplexity needs no float reference: run `quantwise benchmark` "
                              "where the float model fits")
    if data is None:
        raise CalibrationError(f"{folder} is a causal LM without its float model here: pass --data "
                               "(a text file, or .npy / .safetensors token ids) to score its perplexity")
    info = ModelInfo(folder.name, "causal-lm", None, None, "perplexity", source=str(folder))
    batches = load_calibration_data(data, info, tokenizer=folder_tokenizer(folder), batch_size=8,
                                    allow_pickle=allow_pickle)
    after = Measured(meta["config"].get("name", "quantized"), folder_bytes(folder),
                     median_latency_ms(qmodel, batches[0]), evaluate(qmodel, batches, "perplexity"))
    return JobReport(info.name, after.name, folder, torch.get_num_threads(), None, after,
                     summary(qmodel), notes=[why])


def _reload(folder: Path, model_ref: str | None, log: Callable[[str], None], allow_pickle: bool = False
            ) -> tuple[dict[str, Any], nn.Module, ModelInfo, nn.Module]:
    """(metadata, float model, its info, the reloaded quantized model) of a saved folder."""
    meta = read_metadata(folder)
    ref = model_ref or meta.get("source")
    if not ref:
        raise CheckpointError(f"{folder} records no source model: pass --model (a built-in name, a "
                              "Hugging Face folder, or package.module:function)")
    if model_ref is None:
        refuse_code_source(ref)
    log(f"loading float model {ref!r} and {folder}")
    model, info = load_model(ref, allow_pickle=allow_pickle)
    # a self-contained folder rebuilds without a copy of the float model (io.load): the float
    # model once, not twice, beside the quantized one
    return meta, model, info, load(folder) if model_ref is None and is_hf_folder(folder) \
        else load(folder, model=model)


def _measure(model: nn.Module, qmodel: nn.Module, info: ModelInfo, name: str, folder: Path,
             evals: tuple[list[Any], str]) -> JobReport:
    """Size on disk, median latency (same threads, same batch) and quality, fp32 vs quantized."""
    batches, metric = evals
    reference = model if metric == "cosine" else None
    sample = batches[0][0] if metric == "top1" else batches[0]
    try:
        before = Measured("fp32", float_checkpoint_bytes(model), median_latency_ms(model, sample),
                          evaluate(model, batches, metric, reference=reference))
        after = Measured(name, folder_bytes(folder), median_latency_ms(qmodel, sample),
                         evaluate(qmodel, batches, metric, reference=reference))
    except (RuntimeError, TypeError, ValueError, IndexError) as exc:  # the model refused the data
        first = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
        raise EvaluationError(f"running the model on its evaluation data failed ({first}): pass "
                              "--data whose tensors fit the model's inputs") from None
    return JobReport(info.name, name, folder, torch.get_num_threads(), before, after, summary(qmodel))


def _source(model_ref: str) -> str:
    """What load() can rebuild the float model from: a built-in name, folder, or module:function."""
    path = Path(model_ref)
    return str(path.resolve()) if path.exists() else model_ref



def run_export_job(folder: str | Path, out: str | Path | None = None, model_ref: str | None = None,
                   data: str | None = None, max_rel_err: float = 1e-2, batches: int = 4,
                   per_layer: bool = True, overwrite: bool = False, opset: int | None = None,
                   log: Callable[[str], None] = lambda _: None, weight_dtype: str = "auto"):
    """Reload FOLDER, export it as ONNX QDQ, then prove the file: what ONNX Runtime fuses into
    integer kernels, and parity with the PyTorch quantized model on calibration samples."""
    from quantwise.export import export_onnx
    from quantwise.export import openvino
    from quantwise.export.onnx_export import DEFAULT_OPSET
    from quantwise.export.check import fusion_report, parity

    folder = Path(folder)
    out = Path(out) if out else folder.with_name(folder.name + ".onnx")
    if out.resolve() == folder.resolve() or folder.resolve() in out.resolve().parents:
        raise OutputPathError(f"{out}: write the ONNX file outside the checkpoint folder {folder}")
    _, model, info, qmodel = _reload(folder, model_ref, log)
    spec = data or info.calib_data
    if spec is None:
        raise CalibrationError(f"model {info.name!r} has no built-in sample data: pass --data "
                               "(a text file, or a folder of .npy / .safetensors inputs)")
    samples = load_calibration_data(spec, info)[:max(1, batches)]
    opset = opset or DEFAULT_OPSET
    log(f"exporting to {out} (opset {opset})")
    result = export_onnx(qmodel, samples[0], out, opset=opset, overwrite=overwrite,
                         weight_dtype=weight_dtype)
    log("reading what ONNX Runtime runs, then checking parity on "
        f"{len(samples)} batches from {spec!r}")
    result.fusion = fusion_report(out)
    if openvino.available():  # the second runtime: which layers its CPU plugin runs in int8
        log("reading what OpenVINO runs")
        try:
            result.openvino = openvino.openvino_report(out)
        except ModelLoadError as exc:  # a second runtime's failure is a note, not the export's
            result.openvino_note = str(exc)
    # the float model too: where rounding makes elementwise agreement impossible, the gate is
    # the model's own rounding spread plus quality vs fp32 (check.parity)
    result.parity = parity(qmodel, out, samples, per_layer=per_layer, max_rel_err=max_rel_err,
                           reference=model, metric=info.metric)
    return result
