"""The anchors: what a user would pick instead of quantwise, built from the same fp32 torch model.

ONNX Runtime fp32 (the demanding speed reference), ORT `quantize_static` (QDQ, per-channel,
MinMax, after `quant_pre_process` where it works), ORT `quantize_dynamic`, and torch.ao's FX
static (x86 backend) and eager `quantize_dynamic`. Each builder returns a `System` or raises; the
runner records the exception text as that system's result, so one anchor failing (the ORT
calibrators on MiniLM's attention mask, FX tracing a Hugging Face model) never stops the run.

Every file goes into the run's temporary folder, never the current directory.
"""

from __future__ import annotations

import copy
import logging
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from harness import System, call_torch, saved_bytes, torch_system

INTRA_THREADS = 2


def session_options(optimized_path: str | None = None) -> Any:
    """Same threads as torch (2 intra-op, 1 inter-op, sequential), full graph optimization."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = INTRA_THREADS
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3  # errors only: the optimizer's warnings would flood the table
    if optimized_path:
        so.optimized_model_filepath = optimized_path
    return so


def _feeds(x: Any, names: list[str]) -> dict[str, Any]:
    """Torch-form input (tensor or dict of tensors) -> ORT feed dict of numpy arrays."""
    if isinstance(x, dict):
        return {n: x[n].numpy() for n in names}
    xs = x if isinstance(x, tuple) else (x,)
    return {n: t.numpy() for n, t in zip(names, xs)}


def ort_system(name: str, path: Path, tmp: Path, **info: Any) -> System:
    """An ORT CPU session on `path`, with the op counts of its optimized graph in `info`.

    The session is created in `load`, which the runner calls after the conversion's garbage has
    been freed, so the memory figure is that of loading the file and running it."""
    import onnx
    import onnxruntime as ort

    graph = onnx.load(str(path), load_external_data=False).graph
    inits = {t.name for t in graph.initializer}
    names = [i.name for i in graph.input if i.name not in inits]
    info.update(optimized_graph_ops(path))
    holder: dict[str, Any] = {}

    def load() -> None:
        holder["sess"] = ort.InferenceSession(str(path), session_options(),
                                              providers=["CPUExecutionProvider"])

    return System(name, run=lambda feeds: holder["sess"].run(None, feeds),
                  prepare=lambda x: _feeds(x, names), load=load,
                  size_bytes=path.stat().st_size, size_note=".onnx file", info=info)


def _input_names(path: Path) -> list[str]:
    """Graph inputs of an ONNX file (not its initializers) or of an OpenVINO IR (.xml)."""
    if path.suffix == ".xml":
        import openvino as ov

        return [i.get_any_name() for i in ov.Core().read_model(str(path)).inputs]
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    inits = {t.name for t in graph.initializer}
    return [i.name for i in graph.input if i.name not in inits]


def ov_system(name: str, path: Path, **info: Any) -> System:
    """OpenVINO's CPU plugin on the ONNX file `path`, INTRA_THREADS threads, latency hint. It
    bundles oneDNN and honours ONEDNN_MAX_CPU_ISA (measured: its int8 ResNet-18 takes 2x longer
    under =AVX2), but then fails to compile float32 graphs on an AVX-512 CPU ("Check
    '!getSupportedPrimitiveDescriptors().empty()' failed"): those rows then read "failed".
    Precision hint f32: by default OpenVINO runs float parts in bf16 on CPUs with AVX-512 BF16
    or AMX (not an fp32 row then, and measured slower for the int8 ResNet-18 under the AVX2
    cap: 70.2 vs 66.7 ms, as it reorders to bf16), so the anchor gets its faster, exact setting."""
    import openvino as ov

    from quantwise.export.openvino import report_from_compiled

    names = _input_names(path)
    holder: dict[str, Any] = {}

    def load() -> None:
        core = ov.Core()
        core.set_property("CPU", {"INFERENCE_NUM_THREADS": INTRA_THREADS,
                                  "PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"})
        holder["model"] = core.compile_model(str(path), "CPU")
        ran = report_from_compiled(holder["model"])  # which weight layers OpenVINO runs in int8
        info.update(ov_int8_conv=f"{ran.conv_int8}/{ran.conv_total}",
                    ov_int8_fc=f"{ran.fc_int8}/{ran.fc_total}")

    def run(feeds: dict[str, Any]) -> list:
        return list(holder["model"](feeds).values())

    info["openvino"] = ov.__version__
    info["openvino_precision"] = "f32"
    return System(name, run=run, prepare=lambda x: _feeds(x, names), load=load,
                  size_bytes=path.stat().st_size, size_note=".onnx file", info=info)


def ov_fp32(case: Any, ctx: dict[str, Any]) -> System:
    return ov_system("OpenVINO fp32", _need_fp32_onnx(ctx))


def nncf_openvino(case: Any, ctx: dict[str, Any]) -> System:
    """NNCF's own post-training int8 (`nncf.quantize`, defaults; the transformer model type for
    MiniLM, as NNCF's docs ask) on the fp32 ONNX file read by OpenVINO, calibrated on the same
    batches as quantwise, saved as OpenVINO IR and run by its CPU plugin."""
    import nncf
    import openvino as ov

    src = _need_fp32_onnx(ctx)
    model = ov.Core().read_model(str(src))
    names = [i.get_any_name() for i in model.inputs]
    calib = [_feeds(x, names) for x in case.calib]
    kwargs = {"model_type": nncf.ModelType.TRANSFORMER} if case.kind == "embedding" else {}
    qmodel = nncf.quantize(model, nncf.Dataset(calib), subset_size=max(1, sum(
        _batch_size(x) for x in case.calib)), **kwargs)
    out = ctx["tmp"] / "nncf" / "model.xml"
    out.parent.mkdir(parents=True, exist_ok=True)
    ov.save_model(qmodel, str(out))
    system = ov_system("NNCF + OpenVINO int8", out, nncf=nncf.__version__)
    system.size_bytes = out.stat().st_size + out.with_suffix(".bin").stat().st_size
    system.size_note = "OpenVINO IR (.xml + .bin)"
    return system


def optimized_graph_ops(path: Path) -> dict[str, Any]:
    """Which Conv / MatMul kernels the session really runs (quantwise.export.check reads the graph
    ORT optimizes). This is how one sees that QDQ nodes were *not* fused and the layer still runs
    in float between Q and DQ. The splits count every product, attention's activation x
    activation matmuls included, as this table always has."""
    from quantwise.export.check import INTEGER_OPS, fusion_report

    try:
        rep = fusion_report(path, threads=INTRA_THREADS)
    except Exception as exc:  # noqa: BLE001 - counting is a nicety, never a failure
        return {"optimized_graph": f"not readable: {exc}"[:200]}
    acts = rep.act_matmul
    act_int8 = sum(v for k, v in acts.items() if k in INTEGER_OPS)
    products = {k: v for k, v in rep.op_counts.items()
                if any(w in k for w in ("Conv", "MatMul", "Gemm", "Attention"))}
    return {"product_ops": dict(sorted(products.items())),
            "int8_conv": f"{rep.conv_int8}/{rep.conv_total}",
            "int8_matmul": f"{rep.matmul_int8 + act_int8}/{rep.matmul_total + sum(acts.values())}",
            "qdq_nodes_left": rep.qdq_left, "input_quant": rep.input_quant}


def _batch_size(x: Any) -> int:
    first = next(iter(x.values())) if isinstance(x, dict) else (x[0] if isinstance(x, tuple) else x)
    return int(first.shape[0])


def export_onnx(model: nn.Module, example: Any, folder: Path, name: str = "model_fp32",
                dynamic_batch: bool = False) -> Path:
    """torch.onnx.export (the torch.export-based exporter, one self-contained file).

    The legacy TorchScript exporter (dynamo=False) gave a MiniLM graph whose output disagreed with
    torch (relative error 1.0, with TracerWarnings in transformers' masking code), so the default
    exporter is used; it needs the `onnxscript` package. `_check_matches` guards against a repeat.
    """
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.onnx"
    if isinstance(example, dict):
        args, kwargs, names = (), dict(example), list(example)
    else:
        args = example if isinstance(example, tuple) else (example,)
        kwargs, names = None, [f"input_{i}" for i in range(len(args))] if len(args) > 1 else ["input"]
    dynamic = None
    if dynamic_batch:
        batch = {0: torch.export.Dim.DYNAMIC}
        dynamic = {k: batch for k in kwargs} if kwargs else tuple(batch for _ in args)
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, args, str(path), kwargs=kwargs, input_names=names,
                          output_names=["output"], dynamo=True, external_data=False,
                          dynamic_shapes=dynamic,
                          artifacts_dir=str(folder), verbose=False)
    return path


def _check_matches(path: Path, model: nn.Module, x: Any, tol: float = 1e-3) -> float:
    """An export that computes something else must fail loudly, not benchmark a wrong graph.
    Uses its own short-lived session so the benchmarked one is loaded later, on a clean heap."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), session_options(), providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    out = torch.from_numpy(sess.run(None, _feeds(x, names))[0]).float()
    del sess
    with torch.no_grad():
        ref = call_torch(model, x).float()
    err = float((out - ref).norm() / ref.norm())
    if not err <= tol:
        raise RuntimeError(f"exported ONNX graph disagrees with torch: relative error {err:.3g}")
    return err


# ---------------------------------------------------------------- builders: (case, ctx) -> System

def ort_fp32(case: Any, ctx: dict[str, Any]) -> System:
    dynamic = any(_batch_size(c) != _batch_size(case.latency_input) for c in case.calib)
    path = export_onnx(case.model, case.latency_input, ctx["tmp"] / "ort", dynamic_batch=dynamic)
    ctx["onnx_fp32"] = path  # the quantizers below start from this same file
    err = _check_matches(path, case.model, case.latency_input)
    return ort_system("ORT fp32", path, ctx["tmp"], dynamic_batch=dynamic, export_rel_err=err)


def _need_fp32_onnx(ctx: dict[str, Any]) -> Path:
    if "onnx_fp32" not in ctx:
        raise RuntimeError("needs the fp32 ONNX export, which failed (see the ORT fp32 row)")
    return ctx["onnx_fp32"]


def ort_static(case: Any, ctx: dict[str, Any]) -> System:
    """ORT's documented static recipe: quant_pre_process, then QDQ, per-channel weights, MinMax
    calibration, int8 activations and weights (ORT's defaults otherwise)."""
    import onnxruntime as ort
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat,
                                          QuantType, quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    src, tmp, info = _need_fp32_onnx(ctx), ctx["tmp"] / "ort", {}
    pre = tmp / "model_pre.onnx"
    try:
        quant_pre_process(str(src), str(pre))
        src, info["pre_process"] = pre, "ok"
    except Exception as exc:  # noqa: BLE001 - documented as optional; fall back to the raw export
        info["pre_process"] = f"failed, quantized the raw export: {exc}"[:300]
    names = [i.name for i in ort.InferenceSession(str(src), providers=["CPUExecutionProvider"])
             .get_inputs()]  # quant_pre_process may rename nothing, but ask the file, not the export

    class Reader(CalibrationDataReader):
        """Feeds the same calibration batches quantwise and torch.ao get."""

        def __init__(self) -> None:
            self.batches = iter([_feeds(x, names) for x in case.calib])

        def get_next(self) -> dict[str, Any] | None:
            return next(self.batches, None)

    out = tmp / "model_static_qdq.onnx"
    quantize_static(str(src), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax)
    # No CalibMaxIntermediateOutputs: in ORT 1.32 MinMaxCalibrater.collect_data clears the
    # collected batches when that count is reached *without* merging their ranges first, so the
    # ranges come from the last few batches only ("No data is collected" when it divides evenly).
    # MinMax keeps only ReduceMin/ReduceMax outputs per batch, so memory is small anyway.
    return ort_system("ORT static QDQ", out, ctx["tmp"], **info)


def ort_dynamic(case: Any, ctx: dict[str, Any]) -> System:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    out = ctx["tmp"] / "ort" / "model_dynamic.onnx"
    quantize_dynamic(str(_need_fp32_onnx(ctx)), str(out), weight_type=QuantType.QInt8)
    return ort_system("ORT dynamic", out, ctx["tmp"])


def _torchao_size(model: nn.Module) -> tuple[int, str]:
    # safetensors cannot hold quantized tensors or packed params: torch.save is torch.ao's format
    return saved_bytes(lambda buf: torch.save(model.state_dict(), buf)), "torch.save state_dict"


def _count_quantized_modules(model: nn.Module) -> int:
    return sum(1 for m in model.modules() if type(m).__module__.startswith("torch.ao.nn.quantized"))


class _TextModelPositional(nn.Module):
    """FX needs positional example inputs; Hugging Face text models take keyword tensors. An
    explicit signature (not *args, which FX cannot trace) lets prepare_fx at least try."""

    ARGS = ("input_ids", "attention_mask", "token_type_ids")

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: Any, attention_mask: Any, token_type_ids: Any) -> Any:
        return self.model(input_ids=input_ids, attention_mask=attention_mask,
                          token_type_ids=token_type_ids)


def _positional(x: Any) -> tuple:
    if isinstance(x, dict):
        return tuple(x[k] for k in _TextModelPositional.ARGS)
    return x if isinstance(x, tuple) else (x,)


def torchao_static(case: Any, ctx: dict[str, Any]) -> System:
    """torch.ao FX graph mode, x86 backend, default qconfig mapping, same calibration batches."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.ao announces its removal
        from torch.ao.quantization import get_default_qconfig_mapping
        from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

        torch.backends.quantized.engine = "x86"
        model = copy.deepcopy(case.model).eval()
        keyword = isinstance(case.latency_input, dict)
        if keyword:
            if set(case.latency_input) - set(_TextModelPositional.ARGS):
                raise RuntimeError(f"no positional wrapper for inputs {sorted(case.latency_input)}")
            model = _TextModelPositional(model)
        try:
            prepared = prepare_fx(model, get_default_qconfig_mapping("x86"),
                                  example_inputs=_positional(case.latency_input))
        except Exception as exc:  # noqa: BLE001 - re-raised with where it failed
            raise RuntimeError(f"prepare_fx (FX symbolic trace) failed: {type(exc).__name__}: "
                               f"{exc}") from exc
        with torch.no_grad():
            for x in case.calib:
                prepared(*_positional(x))
        qmodel = convert_fx(prepared)
    size, note = _torchao_size(qmodel)
    system = torch_system("torch.ao static", qmodel, size_bytes=size, size_note=note,
                          info={"quantized_modules": _count_quantized_modules(qmodel)})
    system.prepare = _positional  # the converted GraphModule is called positionally

    def run(x: tuple) -> Any:
        with torch.no_grad():
            return qmodel(*x)

    system.run = run
    return system


def torchao_dynamic(case: Any, ctx: dict[str, Any]) -> System:
    """torch.ao eager dynamic int8 on every nn.Linear (the only layers it supports)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.backends.quantized.engine = "x86"
        qmodel = torch.ao.quantization.quantize_dynamic(copy.deepcopy(case.model).eval(),
                                                        {nn.Linear}, dtype=torch.qint8)
    size, note = _torchao_size(qmodel)
    linears = sum(1 for m in case.model.modules() if isinstance(m, nn.Linear))
    return torch_system("torch.ao dynamic", qmodel, size_bytes=size, size_note=note,
                        info={"quantized_modules": _count_quantized_modules(qmodel),
                              "linear_layers": linears})


# (row name, builder) in the order the table shows them
BUILDERS = [("ORT fp32", ort_fp32), ("ORT static QDQ", ort_static), ("ORT dynamic", ort_dynamic),
            ("torch.ao static", torchao_static), ("torch.ao dynamic", torchao_dynamic)]
