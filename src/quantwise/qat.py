"""Quantization-aware training: fake quantization in the loop, learnable scales (LSQ), and the
same real-kernel model as post-training quantization at the end.

    qat = quantwise.prepare_qat(model, "w4a8", calib_batches)   # a deep copy, in train mode
    for x, y in loader:                                          # the user's own loop
        loss = loss_fn(qat(x), y) + quantwise.distill_loss(qat(x), teacher(x))
        ...
    qmodel = quantwise.convert(qat)                              # real int kernels, saveable

prepare_qat = [the config's method, e.g. GPTQ, on a copy] + prepare (deep copy, Conv+BatchNorm
folded with the running statistics) + calibrate (initial ranges) + every ObservedLayer replaced
by a QATLayer (a folded conv's QATLayer takes its BatchNorm back: see below):

- weights: fake-quantized with a learnable scale per channel / group (LSQ, Esser et al. 2020),
  initialised from the round-to-nearest max range, or from the method's scales ("w4-gptq":
  QAT then starts where GPTQ ended);
- static activations: fake-quantized with a learnable scale (zero point fixed at its
  calibrated value), initialised from the calibrated range; dynamic ones are recomputed per
  batch as at run time;
- rounding passes the gradient straight through (STE); clipping blocks it outside the range;
  the scale gradient is LSQ's, scaled by 1 / sqrt(numel * qmax) so scales learn at the pace of
  the weights.

convert() then quantizes each weight with its learned scale and each static input with its
learned range, so the converted model computes what the QAT forward simulated (within one
quantization step: float summation order differs).

BatchNorm (Krishnamoorthi 2018, section 3.2: folded for training, statistics frozen late). In
the model tree each folded BatchNorm is nn.Identity, as after a PTQ fold; its conv's QATLayer
holds it (`.bn`) and the unfolded conv. The weight is folded with the running statistics,
W * gamma / sqrt(running_var + eps), and fake-quantized (its LSQ scale starts from the folded
weight's range). By default (`freeze_bn_after=None`) the BatchNorm is live: in training the
conv output is divided back by gamma / sqrt(running_var + eps), gets the conv bias, and goes
through the BatchNorm with batch statistics, which updates the running ones. `freeze_bn(model)`,
or `freeze_bn_after=N` training calls of each layer, switches to the running statistics (no more
updates; gamma and beta still train); in eval mode, frozen, or with the BatchNorm module itself
in eval mode, the layer computes the folded conv that convert() runs. `freeze_bn_after=0` folds
at prepare as PTQ does (frozen from the start: no BatchNorm parameters left). convert() folds
each BatchNorm for real.

Freezing late is better on digits w4a4 (`quantwise qat digits`, fp32 top-1 0.9972): frozen
half-way (`--freeze-bn-at 0.5`, the recipe's default), mean top-1 over 10 seeds 0.9947, 9 seeds
of 10 within 0.5 points of fp32; frozen from the start (`--freeze-bn-at 0`), 0.9928 and 4 of 10.
Seed 0, the command's default, gives 0.9944 for both.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from quantwise.config import Config
from quantwise.errors import ConfigError
from quantwise.fold import bn_factor, fold_into_conv, folded_conv_bn
from quantwise.modules import ObservedLayer
from quantwise.modules.layers import float_weight, is_hf_conv1d, weight_spec_for
from quantwise.numerics import TINY, qparams_from_range, tensor_range
from quantwise.spec import PerChannel, PerGroup, PerToken, QuantSpec
from quantwise.state import get_state
from quantwise.methods import apply_method
from quantwise.workflow import PRECOMPUTED_ATTR, calibrate, observed_layers, prepare


def _grad_scale(t: torch.Tensor, g: float) -> torch.Tensor:
    """t in the forward pass, gradient multiplied by g in the backward pass."""
    return (t - t * g).detach() + t * g


def _round_ste(t: torch.Tensor) -> torch.Tensor:
    return (torch.round(t) - t).detach() + t


def lsq_fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                      qmin: int, qmax: int, grad_scale: float = 1.0) -> torch.Tensor:
    """(clamp(round(x / s) + zp, qmin, qmax) - zp) * s with LSQ gradients for x and s.

    The forward equals numerics.fake_quantize for the same (s, zp): float32 division, round
    half to even, saturate."""
    s = _grad_scale(scale, grad_scale)
    q = torch.clamp(_round_ste(x / s) + zero_point, qmin, qmax)
    return (q - zero_point) * s


class _LearnedRange:
    """What convert() reads from a QATLayer's calibrator: the learned range, as a fixed one."""

    name = "qat"

    def __init__(self, amin: float, amax: float) -> None:
        self.num_seen, self.num_nonfinite = 1, 0
        self._range = (torch.tensor(amin, dtype=torch.float64), torch.tensor(amax, dtype=torch.float64))

    def compute_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self._range


class QATLayer(ObservedLayer):
    """A layer trained with fake-quantized weight and input (see the module docstring)."""

    def __init__(self, obs: ObservedLayer, act_range: tuple[torch.Tensor, torch.Tensor] | None,
                 live_bn: tuple | None = None, freeze_bn_after: int | None = None) -> None:
        super().__init__(obs.module, obs.qname, obs.layer_config, obs.origin)
        self.mode = "qat"
        self.calls = max(obs.calls, 1)
        self.out_calibrator = obs.out_calibrator  # a conv's output range (int8 graph, export)
        cfg = obs.layer_config
        self.weight_spec, _ = weight_spec_for(obs.module, cfg.weight)
        w = float_weight(obs.module).detach().float()
        scale, zp = qparams_from_range(*tensor_range(w, self.weight_spec), self.weight_spec)
        pre = getattr(obs.module, PRECOMPUTED_ATTR, None)  # a method's (GPTQ, AWQ) scales
        if pre is not None and tuple(pre[0].shape) == tuple(scale.shape):
            scale, zp = pre[0].float(), pre[1]
        self.weight_scale = nn.Parameter(scale.clone())
        self.register_buffer("weight_zero_point", zp.float())
        self.act_spec: QuantSpec | None = None
        if cfg.activation is not None and not cfg.dynamic and act_range is not None:
            self.act_spec = self._input_spec(act_range[0])
            a_scale, a_zp = qparams_from_range(*act_range, self.act_spec)
            self.act_scale = nn.Parameter(a_scale.clone().reshape(()))
            self.register_buffer("act_zero_point", a_zp.float().reshape(()))
        self.bn: nn.Module | None = None
        if live_bn is not None:  # (unfolded weight, bias, BatchNorm) from prepare(keep_bn=...)
            self.module.weight, self.module.bias, self.bn = live_bn
            self.freeze_bn_after = freeze_bn_after
            self.register_buffer("bn_calls", torch.zeros((), dtype=torch.long))  # live training calls
            self.register_buffer("bn_frozen", torch.tensor(False))

    # -- forward -------------------------------------------------------------------------------
    def _qat_weight(self, w: torch.Tensor | None = None) -> torch.Tensor:
        spec, w = self.weight_spec, float_weight(self.module) if w is None else w
        qmin, qmax = spec.qmin, spec.qmax
        g = 1.0 / math.sqrt(w.numel() * max(qmax, 1))
        scale, zp = self.weight_scale.clamp(min=TINY), self.weight_zero_point
        gran = spec.granularity
        if isinstance(gran, PerGroup):
            n, k = w.shape
            wg = w.reshape(n, k // gran.size, gran.size)
            out = lsq_fake_quantize(wg, scale.reshape(n, -1, 1), zp.reshape(n, -1, 1), qmin, qmax, g)
            out = out.reshape(n, k)
        elif isinstance(gran, PerChannel):
            shape = [1] * w.dim()
            shape[gran.axis % w.dim()] = -1
            out = lsq_fake_quantize(w, scale.reshape(shape), zp.reshape(shape), qmin, qmax, g)
        else:
            out = lsq_fake_quantize(w, scale, zp, qmin, qmax, g)
        return out.t() if is_hf_conv1d(self.module) else out  # back to the module's layout

    def _qat_input(self, x: torch.Tensor) -> torch.Tensor:
        cfg = self.layer_config
        if self.act_spec is not None:
            g = 1.0 / math.sqrt(x[0].numel() * max(self.act_spec.qmax, 1))
            return lsq_fake_quantize(x, self.act_scale.clamp(min=TINY), self.act_zero_point,
                                     self.act_spec.qmin, self.act_spec.qmax, g)
        if cfg.dynamic and cfg.activation is not None:  # as at run time: scale from this batch
            spec = cfg.activation
            dims = -1 if isinstance(spec.granularity, PerToken) else tuple(range(x.dim()))
            amax = x.detach().abs().amax(dim=dims, keepdim=True)
            s = (amax / spec.qmax).clamp(min=TINY)
            return lsq_fake_quantize(x, s, torch.zeros((), device=x.device), spec.qmin, spec.qmax)
        return x

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.mode != "qat":
            return super().forward(x, *args, **kwargs)
        if x.is_floating_point():
            x = self._qat_input(x)
        if self.bn is not None:
            return self._conv_bn_forward(x)
        return functional_call(self.module, {"weight": self._qat_weight()}, (x, *args), kwargs)

    def _conv_bn_forward(self, x: torch.Tensor) -> torch.Tensor:
        conv, bn = self.module, self.bn
        live = self.training and bn.training and not bool(self.bn_frozen)
        if live and self.freeze_bn_after is not None and int(self.bn_calls) >= self.freeze_bn_after:
            self.freeze_bn()
            live = False
        weight, bias = folded_conv_bn(conv.weight, conv.bias, bn)  # running statistics
        weight = self._qat_weight(weight)
        if not live:  # the folded conv, as convert() will run it
            return conv._conv_forward(x, weight, bias)
        self.bn_calls += 1
        y = conv._conv_forward(x, weight, None)
        shape = (1, -1) + (1,) * (y.dim() - 2)
        y = y / bn_factor(bn).to(y.dtype).reshape(shape)  # unfold: conv(x, fq(W)) approximately
        if conv.bias is not None:
            y = y + conv.bias.reshape(shape)
        return bn(y)  # batch statistics; updates the running ones

    def freeze_bn(self) -> None:
        """From now on the BatchNorm uses (and keeps) its running statistics."""
        if self.bn is not None:
            self.bn_frozen.fill_(True)

    # -- convert -------------------------------------------------------------------------------
    def freeze(self) -> None:
        """Hand the learned scales to convert(): the weight's as precomputed qparams, the
        input's as a fixed calibrated range. A live BatchNorm is folded in for real."""
        if self.bn is not None:
            fold_into_conv(self.module, self.bn)
            self.bn = None
        with torch.no_grad():
            setattr(self.module, PRECOMPUTED_ATTR, (self.weight_scale.detach().clamp(min=TINY).clone(),
                                                    self.weight_zero_point.round().to(torch.int32)))
            if self.act_spec is not None:
                spec = self.act_spec
                s, zp = float(self.act_scale.clamp(min=TINY)), float(self.act_zero_point)
                # the range that qparams_from_range maps back to exactly (s, zp)
                lo, hi = ((-spec.qmax * s, spec.qmax * s) if spec.symmetric
                          else ((spec.qmin - zp) * s, (spec.qmax - zp) * s))
                self.calibrator = _LearnedRange(lo, hi)


def prepare_qat(model: nn.Module, config: "Config | str" = "w4a8", calib_data: Iterable[Any] | None = None,
                *, progress: bool = True, source: str | None = None,
                freeze_bn_after: int | None = None) -> nn.Module:
    """A deep copy of `model` ready for quantization-aware training (train mode; see module
    docstring). `calib_data` initialises the activation ranges; without it, static
    activations are calibrated on the first batch the model sees. Folded BatchNorms stay live
    (batch statistics in training) until `freeze_bn(model)` or, given `freeze_bn_after=N`,
    after N training-mode calls of each conv; `freeze_bn_after=0`: frozen from the start."""
    config = Config.resolve(config)
    if freeze_bn_after is not None and freeze_bn_after < 0:
        raise ConfigError(f"freeze_bn_after counts training calls: 0 or more, not {freeze_bn_after}")
    keep_bn: dict | None = None if freeze_bn_after == 0 else {}
    if config.method is not None:  # e.g. "w4-gptq": QAT starts from GPTQ's weights and scales
        if calib_data is None:
            raise ConfigError(f"method {config.method!r} needs calib_data")
        calib_data = list(calib_data)
        model = copy.deepcopy(model)
        apply_method(model, config, calib_data, progress=progress)
        prepared = prepare(model, config, source=source, inplace=True, keep_bn=keep_bn)
    else:
        prepared = prepare(model, config, source=source, keep_bn=keep_bn)
    state = get_state(prepared)
    needs_ranges = any(o.calibrator is not None for o in observed_layers(prepared))
    if calib_data is not None:
        calibrate(prepared, calib_data, progress=progress)
    elif needs_ranges:
        raise ConfigError("static activations need calib_data to initialise their ranges "
                          "(a few batches of model inputs), or use a preset with dynamic activations")
    for obs in observed_layers(prepared):
        act_range = obs.calibrator.compute_range() if obs.calibrator is not None and obs.calls else None
        live_bn = keep_bn.get(obs.qname) if keep_bn else None
        prepared.set_submodule(obs.qname, QATLayer(obs, act_range, live_bn, freeze_bn_after))
    state.stage = "qat"
    return prepared.train()


def qat_layers(model: nn.Module) -> list[QATLayer]:
    return [m for m in model.modules() if isinstance(m, QATLayer)]


def freeze_bn(model: nn.Module) -> int:
    """Freeze the BatchNorm statistics of a prepare_qat model (see module docstring): each live
    BatchNorm uses its running statistics from now on. Returns how many there are."""
    layers = [m for m in qat_layers(model) if m.bn is not None]
    for layer in layers:
        layer.freeze_bn()
    return len(layers)


def distill_loss(student: Any, teacher: Any, kind: str = "kl", temperature: float = 1.0) -> torch.Tensor:
    """Distillation from the fp32 model, for the user's loop: "kl" on logits (softened by
    `temperature`, scaled by T^2 as in Hinton et al.), "mse" on outputs or hidden states,
    "cosine" (1 - cosine similarity per row, for embeddings). Tensors or HF outputs
    (logits / last_hidden_state taken); the teacher side carries no gradient."""
    s, t = _tensor(student), _tensor(teacher).detach()
    if s.shape != t.shape:
        raise ConfigError(f"student output {tuple(s.shape)} and teacher output {tuple(t.shape)} differ")
    if kind == "kl":
        T = float(temperature)
        log_p = F.log_softmax(s.float() / T, dim=-1)
        q = F.softmax(t.float() / T, dim=-1)
        return F.kl_div(log_p.reshape(-1, s.shape[-1]), q.reshape(-1, s.shape[-1]),
                        reduction="batchmean") * T * T
    if kind == "mse":
        return F.mse_loss(s.float(), t.float())
    if kind == "cosine":
        return (1 - F.cosine_similarity(s.float().flatten(1), t.float().flatten(1), dim=-1)).mean()
    raise ConfigError(f"unknown distillation kind {kind!r}: use 'kl', 'mse' or 'cosine'")


def _tensor(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    for key in ("logits", "last_hidden_state"):
        value = getattr(out, key, None)
        if isinstance(value, torch.Tensor):
            return value
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise ConfigError(f"cannot find an output tensor in {type(out).__name__}")


__all__ = ["prepare_qat", "QATLayer", "distill_loss", "freeze_bn", "lsq_fake_quantize", "qat_layers"]
