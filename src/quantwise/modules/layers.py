"""What quantwise knows about each float layer type: weight axes, input checks, functional forward."""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from quantwise.errors import CalibrationError
from quantwise.spec import PerChannel, PerGroup, QuantSpec

# Float layer types with a quantized counterpart; everything else stays float.
SUPPORTED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.ConvTranspose2d, nn.Embedding)


def kind_of(module: nn.Module) -> str | None:
    """'linear', 'conv', 'conv_transpose', 'embedding', or None when unsupported."""
    if isinstance(module, nn.Linear):
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
        in_dim = module.weight.shape[-1]
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
    if isinstance(module, nn.Linear) and x.shape[-1] != module.in_features:
        raise CalibrationError(f"layer {name!r} (Linear) expects input [..., {module.in_features}], "
                               f"got {tuple(x.shape)}")
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
    if not torch.isfinite(module.weight).all():
        return "weight holds NaN or Inf"
    return None
