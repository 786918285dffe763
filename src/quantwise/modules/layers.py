"""What quantwise knows about each float layer type: weight axes, input checks, functional forward."""

from __future__ import annotations

import sys
from dataclasses import replace

import torch
from torch import nn

from quantwise.errors import CalibrationError
from quantwise.spec import PerChannel, PerGroup, QuantSpec

# Float layer types with a quantized counterpart; everything else stays float. Also supported:
# transformers' Conv1D (GPT-2), a Linear whose weight is stored [in, out]: see is_supported.
SUPPORTED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.ConvTranspose2d, nn.Embedding)


def is_hf_conv1d(module: nn.Module) -> bool:
    """True for transformers.pytorch_utils.Conv1D (y = x @ W + b, W [in, out]).

    transformers stays optional: if it was never imported, no module can be one of its Conv1D.
    """
    cls = getattr(sys.modules.get("transformers.pytorch_utils"), "Conv1D", None)
    return cls is not None and isinstance(module, cls)


def is_supported(module: nn.Module) -> bool:
    """A layer type with a quantized counterpart (SUPPORTED or transformers' Conv1D)."""
    return isinstance(module, SUPPORTED) or is_hf_conv1d(module)


def float_weight(module: nn.Module) -> torch.Tensor:
    """The float weight in the layout the kernels use: [out, in] for Linear and Conv1D (a
    transposed view of Conv1D's [in, out]), the module's own layout otherwise."""
    return module.weight.t() if is_hf_conv1d(module) else module.weight


def kind_of(module: nn.Module) -> str | None:
    """'linear', 'conv', 'conv_transpose', 'embedding', or None when unsupported."""
    if isinstance(module, nn.Linear) or is_hf_conv1d(module):
        return "linear"
    if isinstance(module, nn.ConvTranspose2d):
        return "conv_transpose"
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        return "conv"
    if isinstance(module, nn.Embedding):
        return "embedding"
    return None


def weight_spec_for(module: nn.Module, spec: QuantSpec) -> tuple[QuantSpec, str | None]:
    """Adapt a configured weight spec to the layer's weight layout; say why when it changes.

    Per-channel means per *output* channel: axis 1 for ConvTranspose weights [Cin, Cout/g, ...].
    Per-group runs along the input dimension of Linear/Embedding weights only.
    """
    kind = kind_of(module)
    g = spec.granularity
    if isinstance(g, PerChannel) and kind == "conv_transpose" and g.axis == 0:
        return replace(spec, granularity=PerChannel(1)), None
    if isinstance(g, PerGroup):
        if kind in ("conv", "conv_transpose"):
            axis = 1 if kind == "conv_transpose" else 0
            return (replace(spec, granularity=PerChannel(axis)),
                    "per-group needs a Linear/Embedding weight; conv uses per-channel")
        in_dim = float_weight(module).shape[-1]
        if in_dim % g.size:
            return (replace(spec, granularity=PerChannel(0)),
                    f"input dim {in_dim} not a multiple of group {g.size}; per-channel instead")
    return spec, None


def check_input(name: str, module: nn.Module, x: object) -> None:
    """Fail early, naming expected vs got, when a calibration input cannot feed this layer."""
    if not isinstance(x, torch.Tensor):
        raise CalibrationError(f"layer {name!r} expects a tensor input, got {type(x).__name__}")
    if isinstance(module, nn.Embedding):
        if x.dtype.is_floating_point:
            raise CalibrationError(f"layer {name!r} (Embedding) expects integer token ids, got {x.dtype}")
        return
    if not x.dtype.is_floating_point:
        raise CalibrationError(f"layer {name!r} expects a floating-point input, got {x.dtype} "
                               f"of shape {tuple(x.shape)}")
    if kind_of(module) == "linear" and x.shape[-1] != float_weight(module).shape[1]:
        raise CalibrationError(f"layer {name!r} ({type(module).__name__}) expects input "
                               f"[..., {float_weight(module).shape[1]}], got {tuple(x.shape)}")
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.ConvTranspose2d)):
        spatial = 1 if isinstance(module, nn.Conv1d) else 2
        if x.dim() not in (spatial + 1, spatial + 2) or x.shape[-spatial - 1] != module.in_channels:
            raise CalibrationError(
                f"layer {name!r} ({type(module).__name__}) expects input [N, {module.in_channels}, "
                f"{', '.join('...' for _ in range(spatial))}], got {tuple(x.shape)}")


def conv_args(module: nn.Module) -> dict:
    """Keyword arguments of the conv kernels for a Conv1d/Conv2d/ConvTranspose2d."""
    args = {"stride": tuple(module.stride), "padding": tuple(module.padding),  # str padding: see unsupported_reason
            "dilation": tuple(module.dilation), "groups": module.groups,
            "transposed": isinstance(module, nn.ConvTranspose2d)}
    if args["transposed"]:
        args["output_padding"] = tuple(module.output_padding)
    return args


def all_finite(t: torch.Tensor) -> bool:
    """No NaN / Inf in t, from its max and min (both propagate NaN): no temporaries, where
    torch.isfinite(t).all() made |t| and three boolean copies (0.46 GB for a 262 MB head)."""
    if t.numel() == 0 or not t.is_floating_point():
        return True
    return bool(torch.isfinite(t.amax())) and bool(torch.isfinite(t.amin()))


def unsupported_reason(module: nn.Module) -> str | None:
    """Why a layer of a supported type still cannot be quantized, or None."""
    if kind_of(module) is None:
        return f"no quantized kernel for {type(module).__name__}"
    if kind_of(module) in ("conv", "conv_transpose"):
        if isinstance(module.padding, str):
            return f"padding={module.padding!r} is not supported by the int8 conv kernels"
        if module.padding_mode != "zeros":
            return f"padding_mode={module.padding_mode!r} is not supported by the int8 conv kernels"
    if isinstance(module, nn.Embedding) and module.max_norm is not None:
        return "Embedding with max_norm renormalizes its weight in place"
    # a meta-device weight (streaming's skeleton, quantwise.stream) is checked once it is read
    if not module.weight.is_meta and not all_finite(module.weight):
        return "weight holds NaN or Inf"
    return None
