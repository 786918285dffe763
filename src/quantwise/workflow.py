"""prepare -> calibrate -> convert, and quantize() that does all three.

    qmodel = quantwise.quantize(model, "w8a8", calib_batches)   # model itself is untouched

Step by step:

    prepared = quantwise.prepare(model, config)     # deep copy, layers wrapped with observers
    quantwise.calibrate(prepared, calib_batches)     # eval mode, no grad, streams statistics
    qmodel = quantwise.convert(prepared)             # integer weights, real kernels
"""

from __future__ import annotations

import copy
import itertools
import warnings
from collections.abc import Iterable
from dataclasses import replace
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from quantwise.config import Config
from quantwise.fold import find_conv_bn_pairs, fold_conv_bn, foldable
from quantwise.encoder import apply_encoder_fastpath
from quantwise.int8graph import apply_int8_graph
from quantwise.methods import PRECOMPUTED_ATTR, apply_method
from quantwise.errors import CalibrationError, QuantwiseError, QuantwiseWarning
from quantwise.data import run_model  # noqa: F401 - re-exported: callers import it from here
from quantwise.modules import ObservedLayer, QuantizedLayer, is_supported, kind_of, unsupported_reason
from quantwise.modules import float_weight, weight_spec_for
from quantwise.modules.layers import conv_args
from quantwise.numerics import qparams_from_range, quantize as quantize_tensor, tensor_range
from quantwise.kernels import weight_code_limit
from quantwise.spec import Format, QuantSpec
from quantwise.state import LayerRecord, QuantState, get_state, set_state


def prepare(model: nn.Module, config: "Config | str", source: str | None = None,
            inplace: bool = False, keep_bn: dict | None = None) -> nn.Module:
    """A deep copy of `model` whose selected layers observe their inputs for calibration
    (`inplace`: `model` itself, for callers that already hold a private copy). `keep_bn`, a
    dict, receives conv name -> (unfolded weight, unfolded bias, BatchNorm) for each fold, so
    QAT can keep training the BatchNorm (qat.py); the model is folded as without it."""
    config = Config.resolve(config)
    prepared = model if inplace else copy.deepcopy(model)
    state = QuantState(config=config, source=source)
    state.folded = _fold_batchnorms(prepared, config, state, keep_bn)
    supported_children: set[str] = set()
    for name, module in list(prepared.named_modules()):
        if not name or any(name.startswith(p + ".") for p in supported_children):
            continue
        type_name = type(module).__name__
        if is_supported(module):
            supported_children.add(name)
            layer_config, origin = config.layer_config(name, type_name)
            reason = unsupported_reason(module)
            if layer_config.is_float or reason:
                state.records[name] = LayerRecord(name, type_name, origin=origin,
                                                  reason=reason or origin)
                continue
            prepared.set_submodule(name, ObservedLayer(module, name, layer_config, origin))
            state.records[name] = LayerRecord(name, type_name, config=layer_config.describe(),
                                              origin=origin, calibrator=_calibrator_name(layer_config, module))
        elif any(True for _ in module.parameters(recurse=False)) and name not in state.records:
            state.records[name] = LayerRecord(name, type_name, reason=unsupported_reason(module))
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}  # rows in model order
    state.records = dict(sorted(state.records.items(), key=lambda item: order.get(item[0], 0)))
    set_state(prepared, state)
    return prepared


def _fold_batchnorms(model: nn.Module, config: Config, state: QuantState,
                     keep_bn: dict | None = None) -> list[tuple[str, str]]:
    """Fold BatchNorm into each conv that will be quantized; record both sides of each fold."""
    pairs = []
    for conv_name, bn_name in find_conv_bn_pairs(model):
        conv = model.get_submodule(conv_name)
        layer_config, _ = config.layer_config(conv_name, type(conv).__name__)
        if layer_config.is_float or unsupported_reason(conv):
            continue
        bn = model.get_submodule(bn_name)
        state.records[bn_name] = LayerRecord(bn_name, type(bn).__name__, status="folded", config="-",
                                             kernel=f"folded into {conv_name}",
                                             reason=f"BatchNorm folded into {conv_name}'s weights")
        pairs.append((conv_name, bn_name))
        if keep_bn is not None and foldable(bn):  # the fold gives the conv new Parameters
            keep_bn[conv_name] = (conv.weight, conv.bias, bn)
    fold_conv_bn(model, pairs)
    return pairs


def _calibrator_name(layer_config, module: nn.Module) -> str | None:
    if layer_config.activation is None or isinstance(module, nn.Embedding):
        return None
    return "dynamic" if layer_config.dynamic else layer_config.calibrator


def observed_layers(model: nn.Module) -> list[ObservedLayer]:
    return [m for m in model.modules() if isinstance(m, ObservedLayer)]


def describe_sample(sample: Any) -> str:
    if isinstance(sample, torch.Tensor):
        return f"Tensor{tuple(sample.shape)} {sample.dtype}"
    if isinstance(sample, (tuple, list)):
        return "(" + ", ".join(describe_sample(s) for s in sample) + ")"
    if isinstance(sample, dict):
        return "{" + ", ".join(f"{k}: {describe_sample(v)}" for k, v in sample.items()) + "}"
    return type(sample).__name__


def nonempty(data: Iterable[Any] | None, what: str = "calibration data") -> Iterable[Any]:
    """`data` unchanged, or an error before anything is done if it holds no sample."""
    if data is None:
        raise CalibrationError(f"{what} is required: pass an iterable of model inputs")
    if isinstance(data, torch.Tensor):
        raise CalibrationError(f"{what} must be an iterable of model inputs (e.g. a list of "
                               "batches), not a single Tensor: wrap it as [tensor]")
    if hasattr(data, "__len__"):
        if len(data) == 0:
            raise CalibrationError(f"{what} is empty: pass at least one model input")
        return data
    iterator = iter(data)
    try:
        first = next(iterator)
    except StopIteration:
        raise CalibrationError(f"{what} is empty: pass at least one model input") from None
    return itertools.chain([first], iterator)


def calibrate(model: nn.Module, data: Iterable[Any], progress: bool = True) -> nn.Module:
    """Run `data` through a prepared model in eval mode; calibrators stream statistics.

    BatchNorm running statistics and dropout are untouched (eval mode, no grad); each
    module's training flag is restored afterwards.
    """
    state = get_state(model)
    data = nonempty(data)
    modes = {m: m.training for m in model.modules()}
    model.eval()
    total = len(data) if hasattr(data, "__len__") else None
    count = 0
    try:
        with torch.no_grad():
            for count, sample in enumerate(tqdm(data, total=total, desc="calibrating",
                                                unit="batch", disable=not progress), start=1):
                try:
                    run_model(model, sample)
                except QuantwiseError:
                    raise
                except Exception as exc:  # noqa: BLE001 - translate at the boundary
                    raise CalibrationError(f"calibration sample {count - 1} "
                                           f"({describe_sample(sample)}) failed: {exc}") from exc
    finally:
        for module, training in modes.items():
            module.train(training)
    if count == 0:
        raise CalibrationError("calibration data is empty: pass at least one model input")
    state.stage = "calibrated"
    return model


def convert(model: nn.Module, fuse: bool = True) -> nn.Module:
    """Replace observed layers with QuantizedLayers running real kernels (in place; returned).

    With `fuse` (default), fusions across layers are installed where they apply: the int8
    graph path for CNNs that torch.fx traces (int8graph: fused conv+ReLU/add, uint8 activations
    between int8 convs) and the encoder fast path for BERT-style layers (encoder).
    """
    state = get_state(model)
    tied: dict[int, QuantizedLayer] = {}  # id(float weight) -> first layer quantizing it
    layers = observed_layers(model)
    limits = _code_limits(layers)
    for obs in layers:
        if hasattr(obs, "freeze"):  # a QAT layer hands over its learned scales (qat.py)
            obs.freeze()
        record = state.records[obs.qname]
        qlayer = _convert_layer(obs, record, tied, limits)  # (a folded BatchNorm's own row says so)
        model.set_submodule(obs.qname, qlayer if qlayer is not None else obs.module)
    state.stage = "converted"
    if fuse:
        apply_int8_graph(model, state)
        apply_encoder_fastpath(model, state)
    # Static convs keep their calibrated output range (two numbers each): the int8 graph uses
    # it for residual inputs, the ONNX export for every conv's output quantization.
    return model


def _code_limits(layers: list[ObservedLayer]) -> dict[int, int]:
    """id(float weight) -> 7-bit code limit, for weights any of whose users needs it (tied
    weights share one set of codes: an embedding tied to an lm_head gets the head's limit)."""
    limits: dict[int, int] = {}
    for obs in layers:
        kind = kind_of(obs.module)
        if kind == "embedding" or obs.layer_config.weight is None:
            continue
        spec, _ = weight_spec_for(obs.module, obs.layer_config.weight)
        limit = _weight_code_limit(kind, spec, obs.layer_config.activation)
        key = id(obs.module.weight)
        if limit is not None:
            limits[key] = min(limit, limits.get(key, limit))
    return limits


def _convert_layer(obs: ObservedLayer, record: LayerRecord, tied: dict,
                   limits: dict[int, int], build: bool = True) -> QuantizedLayer | None:
    """The QuantizedLayer of an observed layer (None: it stays float, the record says why).
    build=False leaves the kernel to `record_kernel` (the caller frees the float layer first)."""
    module, cfg = obs.module, obs.layer_config
    if obs.weight_read:
        return _keep_float(record, "the model reads this layer's .weight while it runs (e.g. "
                                   "to cast its input to weight.dtype); quantized codes would "
                                   "change what it reads")
    kind = kind_of(module)
    act_spec = None if kind == "embedding" else cfg.activation
    input_qparams = None
    if obs.calibrator is not None:
        cal = obs.calibrator
        record.seen, record.nonfinite = int(cal.num_seen), int(cal.num_nonfinite)
        if obs.calls == 0 or cal.num_seen - cal.num_nonfinite == 0:
            return _keep_float(record, "no calibration sample reached this layer")
        amin, amax = cal.compute_range()
        act_spec, note = _signed_if_needed(obs.qname, act_spec, amin)
        input_qparams = qparams_from_range(amin, amax, act_spec)
        _note(record, note)
    if cfg.weight is None:
        return _keep_float(record, "activation-only quantization has no kernel; layer stays float")
    spec, note = weight_spec_for(module, cfg.weight)
    _note(record, note)
    weight = float_weight(module)  # [out, in] for Linear and transformers' Conv1D alike
    owner = tied.get(id(module.weight))
    limit = limits.get(id(module.weight)) if spec.format == Format.INT8 and spec.symmetric else None
    if owner is not None and owner.weight_spec == spec and owner.weight_shape == tuple(weight.shape):
        codes, scale, zp = owner.codes(), owner.weight_scale, owner.zero_points()
    else:
        owner = None
        w = weight.detach().float().contiguous()
        scale, zp = qparams_from_range(*tensor_range(w, spec), spec, code_limit=limit)
        record.code_limit = limit  # the summary says why (a field: the checkpoint stays small)
        pre = getattr(module, PRECOMPUTED_ATTR, None)  # left by a method (GPTQ, AWQ, ...)
        if pre is not None and tuple(pre[0].shape) == tuple(scale.shape):
            scale, zp = pre[0].to(torch.float32), pre[1].to(torch.int32)
        elif pre is not None:
            _note(record, "method's weight qparams do not fit this layer's spec: round-to-nearest")
        codes = quantize_tensor(w, scale, zp, spec)
    bias = getattr(module, "bias", None)
    layer_args = conv_args(module) if kind in ("conv", "conv_transpose") else {}
    dynamic = cfg.dynamic and act_spec is not None
    output_qparams = _output_qparams(obs)
    qlayer = QuantizedLayer(kind, spec, act_spec, dynamic, tuple(weight.shape), tuple(scale.shape),
                            None if bias is None else bias.numel(), layer_args,
                            output_qparams=output_qparams is not None)
    qlayer.set_quantized(codes, scale, zp, None if bias is None else bias.detach(), input_qparams,
                         output_qparams, build=build)
    if owner is not None:
        qlayer.tie_weight(owner)
        _note(record, f"weight tied to {owner.qname!r}: quantized once, shared")
    else:
        tied[id(module.weight)] = qlayer
    qlayer.qname = obs.qname
    record.status = "quantized"
    record.config = replace(cfg, weight=spec, activation=act_spec, dynamic=dynamic).describe()
    if build:
        record_kernel(qlayer, record)
    return qlayer


def record_kernel(qlayer: QuantizedLayer, record: LayerRecord) -> None:
    """Build the layer's kernel if it has none; the record names it and any fallback."""
    if qlayer.kernel is None:
        qlayer.build_kernel()
    record.kernel = qlayer.kernel_name
    _note(record, qlayer.fallback_reason)


def _weight_code_limit(kind: str, spec: QuantSpec, act_spec: QuantSpec | None) -> int | None:
    """+-64 for symmetric int8 weights meeting 8-bit activations where the probe found only
    int16-pair kernels (kernels.select); None elsewhere."""
    if (act_spec is None or not act_spec.format.is_integer or spec.format != Format.INT8
            or not spec.symmetric or kind not in ("linear", "conv", "conv_transpose")):
        return None
    return weight_code_limit("linear" if kind == "linear" else "conv", act_spec.format.bits)


_EDGE_SPEC = QuantSpec(Format.UINT8, symmetric=False)  # uint8 codes between int8 graph ops


def _output_qparams(obs: ObservedLayer) -> tuple[torch.Tensor, torch.Tensor] | None:
    """uint8 affine qparams of the observed output range (None if not observed or empty)."""
    cal = obs.out_calibrator
    if cal is None or cal.num_seen - cal.num_nonfinite == 0:
        return None
    return qparams_from_range(*cal.compute_range(), _EDGE_SPEC)


def _signed_if_needed(name: str, spec: QuantSpec, amin: torch.Tensor) -> tuple[QuantSpec, str | None]:
    """Unsigned symmetric cannot hold negatives: switch to int8 aloud (bad-inputs 12)."""
    if spec.format.is_signed or not spec.symmetric or float(amin) >= 0:
        return spec, None
    message = (f"layer {name!r}: input has negative values (min {float(amin):.4g}) but "
               f"{spec.format.value} symmetric cannot hold them; using int8 symmetric instead")
    warnings.warn(message, QuantwiseWarning, stacklevel=3)
    return replace(spec, format="int8"), message


def _keep_float(record: LayerRecord, reason: str) -> None:  # returns None: the float layer stays
    warnings.warn(f"layer {record.name!r} stays float: {reason}", QuantwiseWarning, stacklevel=3)
    record.status, record.config, record.reason = "float", "fp32", reason
    return None


def _note(record: LayerRecord, note: str | None) -> None:
    if note:
        record.reason = note if not record.reason else f"{record.reason}; {note}"


def quantize(model: nn.Module, config: "Config | str" = "w8a8", calib_data: Iterable[Any] | None = None,
             *, progress: bool = True, source: str | None = None,
             fuse: bool = True, inplace: bool = False) -> nn.Module:
    """Quantize a copy of `model` with `config` (a Config, preset name or file path).

    `inplace=True` quantizes `model` itself (no copy; the float model is consumed): for models
    that do not fit in memory twice. GPTQ/AWQ then hold the model plus one block's inputs and
    statistics, and every converted layer frees its float weight.

    A config with a `method` ("gptq", "awq", "smoothquant", "rtn") runs it on a copy of the
    float model first (quantwise.methods), using `calib_data`, which it then requires.

    `calib_data` is an iterable of model inputs (Tensor, tuple of Tensors, or dict of keyword
    arguments); it is required when the config has static activations. Weight-only and dynamic
    configs have nothing to calibrate: given data, they run its first sample once, which checks
    the inputs and finds layers whose `.weight` the model reads while running (kept float).
    """
    config = Config.resolve(config)
    needs_data = _needs_calibration(model, config)
    if needs_data or calib_data is not None or config.method not in (None, "rtn"):
        what = f"calibration data (method {config.method!r} needs it)" if config.method else None
        calib_data = nonempty(calib_data, what or "calibration data")
    if config.method is not None:
        # A model-level method (GPTQ, AWQ, SmoothQuant, ...) changes a copy of the float model
        # first; the usual prepare/calibrate/convert follow, and convert() takes the weight
        # qparams the method left on each layer.
        if calib_data is not None and not hasattr(calib_data, "__len__"):
            calib_data = list(calib_data)  # it is read twice: by the method, then calibration
        work = model if inplace else copy.deepcopy(model)
        apply_method(work, config, calib_data, progress=progress)
        # `work` is ours: prepared in place, so GPTQ/AWQ hold one copy of the model, not two
        prepared = prepare(work, config, source=source, inplace=True)
    else:
        prepared = prepare(model, config, source=source, inplace=inplace)
    if needs_data:
        calibrate(prepared, calib_data, progress=progress)
    elif calib_data is not None:
        calibrate(prepared, [next(iter(calib_data))], progress=False)
    return convert(prepared, fuse=fuse)


def _needs_calibration(model: nn.Module, config: Config) -> bool:
    for name, module in model.named_modules():
        if is_supported(module) and kind_of(module) != "embedding":
            layer_config, _ = config.layer_config(name, type(module).__name__)
            if layer_config.activation is not None and not layer_config.dynamic:
                return True
    return False
