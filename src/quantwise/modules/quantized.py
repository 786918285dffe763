"""QuantizedLayer: a layer whose weight is stored quantized and which runs a real kernel.

The buffers (integer codes, int4 packed two per byte, scales, zero points, bias, the static
input scale) are the canonical form that is saved; the kernel is rebuilt from them at convert
and at load time, so a reloaded model computes bit-identical outputs.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from quantwise.kernels import DynamicAct, Kernel, StaticAct, make_conv_kernel, make_linear_kernel
from quantwise.numerics import pack_int4, unpack_int4
from quantwise.spec import Format, PerGroup, QuantSpec

_PACKED = (Format.INT4, Format.UINT4)


class QuantizedLayer(nn.Module):
    def __init__(self, kind: str, weight_spec: QuantSpec, act_spec: QuantSpec | None, dynamic: bool,
                 weight_shape: tuple[int, ...], scale_shape: tuple[int, ...], bias_size: int | None,
                 layer_args: dict[str, Any], output_qparams: bool = False) -> None:
        super().__init__()
        self.kind = kind
        self.weight_spec = weight_spec
        self.act_spec = act_spec
        self.dynamic = dynamic
        self.weight_shape = tuple(weight_shape)
        self.layer_args = dict(layer_args)
        fmt = weight_spec.format
        if fmt in _PACKED:
            # Packed along all dims but the first: a 3x3 conv row of 9 codes takes 5 bytes, not 6.
            stored = (weight_shape[0], (math.prod(weight_shape[1:]) + 1) // 2)
            self.register_buffer("weight", torch.zeros(stored, dtype=torch.uint8))
        else:
            self.register_buffer("weight", torch.zeros(weight_shape, dtype=fmt.storage_dtype))
        self.register_buffer("weight_scale", torch.ones(scale_shape, dtype=torch.float32))
        # Symmetric weights have zero points of 0: not stored (they would cost as much as the scales).
        self.register_buffer("weight_zero_point", None if weight_spec.symmetric
                             else torch.zeros(scale_shape, dtype=torch.int32))
        self.register_buffer("bias", None if bias_size is None else torch.zeros(bias_size))
        if act_spec is not None and not dynamic:
            self.register_buffer("input_scale", torch.ones((), dtype=torch.float32))
            self.register_buffer("input_zero_point", torch.zeros((), dtype=torch.int32))
        if output_qparams:  # calibrated uint8 range of the output, for the int8 graph path
            self.register_buffer("output_scale", torch.ones((), dtype=torch.float32))
            self.register_buffer("output_zero_point", torch.zeros((), dtype=torch.int32))
        self.kernel: Kernel | None = None
        self.qname = ""
        self.tied_to: str | None = None  # name of the layer whose quantized weight this one shares

    # -- construction --------------------------------------------------------------------------
    def set_quantized(self, codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                      bias: torch.Tensor | None, input_qparams: tuple | None,
                      output_qparams: tuple | None = None, build: bool = True) -> None:
        """Fill the buffers from unpacked codes and qparams, then build the kernel (unless
        build=False: build_kernel() later)."""
        self.weight = (pack_int4(codes.reshape(codes.shape[0], -1)) if self.weight_spec.format in _PACKED
                       else codes.contiguous())
        self.weight_scale = scale.to(torch.float32).contiguous()
        if self.weight_zero_point is not None:
            self.weight_zero_point = zero_point.to(torch.int32).contiguous()
        if bias is not None:
            self.bias = bias.detach().to(torch.float32).clone()
        if input_qparams is not None:
            self.input_scale = input_qparams[0].to(torch.float32).reshape(())
            self.input_zero_point = input_qparams[1].to(torch.int32).reshape(())
        if output_qparams is not None:
            self.output_scale = output_qparams[0].to(torch.float32).reshape(())
            self.output_zero_point = output_qparams[1].to(torch.int32).reshape(())
        if build:
            self.build_kernel()

    def tie_weight(self, owner: "QuantizedLayer") -> None:
        """Share `owner`'s quantized weight storage (tied embedding / lm_head): stored once."""
        self.weight, self.weight_scale, self.weight_zero_point = (
            owner.weight, owner.weight_scale, owner.weight_zero_point)
        self.tied_to = owner.qname

    def zero_points(self) -> torch.Tensor:
        """Weight zero points (zeros when symmetric, as those are not stored)."""
        if self.weight_zero_point is None:
            return torch.zeros(self.weight_scale.shape, dtype=torch.int32)
        return self.weight_zero_point

    def codes(self) -> torch.Tensor:
        """Unpacked integer codes (or half/fp8 values) of the weight."""
        if self.weight_spec.format in _PACKED:
            flat = unpack_int4(self.weight, math.prod(self.weight_shape[1:]), self.weight_spec.format.is_signed)
            return flat.reshape(self.weight_shape)
        return self.weight

    def build_kernel(self, lean: bool = False) -> None:
        """The layer's kernel (kernels.make_linear_kernel / make_conv_kernel); `lean`: no
        copy of 8-bit codes in another layout (a load that must fit in memory)."""
        if self.kind == "embedding":
            self.kernel = None
            return
        if self.act_spec is None:
            act = None
        elif self.dynamic:
            act = DynamicAct(self.act_spec)
        else:
            act = StaticAct(float(self.input_scale), int(self.input_zero_point), self.act_spec)
        args = (self.codes(), self.weight_scale, self.zero_points(), self.weight_spec, self.bias, act)
        if self.kind == "linear":
            self.kernel = make_linear_kernel(*args, lean=lean)
        else:
            self.kernel = make_conv_kernel(*args, **self.layer_args)

    def __getstate__(self) -> dict:
        # oneDNN's prepacked weights are opaque (no storage to copy): copies rebuild the kernel
        # from the canonical buffers, so deepcopy(model) works and stays bit-identical.
        state = self.__dict__.copy()
        state["kernel"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        if self.kind != "embedding":
            self.build_kernel()

    # -- run -----------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        if dtype is torch.float32 and self.kind == "linear" and not torch.is_grad_enabled():
            return self.kernel(x)  # the common inference call, without the checks below
        if self.kind == "embedding":
            return self._embed(x)
        if not dtype.is_floating_point:
            raise TypeError(
                f"quantized {self.kind} layer {self.qname!r} got a {dtype} input: a float input was "
                f"probably cast to this layer's .weight.dtype (its {self.weight.dtype} codes), as "
                "ViTModel does with its patch conv; keep the layer float (config exclude), or pass "
                "calib_data to quantize() so that it does so itself")
        if self.kind == "conv" and x.dim() == 4:
            # oneDNN's int8 conv works in NHWC: once the first conv's input is channels_last,
            # outputs stay channels_last through relu/add/pool (as torch's convs do for
            # channels_last weights), and no layer pays a layout copy again.
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.no_grad():  # integer kernels are inference-only; QAT trains the float model
            out = self.kernel(x.float() if dtype != torch.float32 else x)
        return out if out.dtype == dtype else out.to(dtype)

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        if (self.weight_zero_point is None and self.weight_spec.format in (Format.INT8, Format.UINT8)
                and self.weight_scale.dim() == 1 and self.weight_scale.numel() == self.weight_shape[0]):
            # symmetric per-row 8-bit: one gather and one int8 x float32 multiply (the usual case)
            flat = ids.reshape(-1)
            rows = torch.index_select(self.weight, 0, flat)
            scale = torch.index_select(self.weight_scale, 0, flat).unsqueeze(-1)
            return torch.mul(rows, scale).view(*ids.shape, self.weight_shape[-1])
        rows = self.weight[ids]
        if self.weight_spec.format in _PACKED:
            rows = unpack_int4(rows, self.weight_shape[-1], self.weight_spec.format.is_signed)
        if not self.weight_spec.format.is_integer and self.weight_spec.format.value in ("fp16", "bf16"):
            return rows.float()
        scale, zp = self.weight_scale, self.zero_points()
        if scale.dim():  # one scale per row or per group of a row; a per-tensor scale is 0-d
            scale, zp = scale[ids], zp[ids]
        values = rows.to(torch.int32) if self.weight_spec.format.is_integer else rows.float()
        if isinstance(self.weight_spec.granularity, PerGroup):
            g = self.weight_spec.granularity.size
            values = values.reshape(*values.shape[:-1], -1, g)
            return ((values - zp.unsqueeze(-1)).float() * scale.unsqueeze(-1)).flatten(-2)
        if scale.dim() == ids.dim():  # per-row scales
            return (values - zp.unsqueeze(-1)).float() * scale.unsqueeze(-1)
        return (values - zp).float() * scale  # per-tensor

    # -- description ---------------------------------------------------------------------------
    @property
    def kernel_name(self) -> str:
        if self.kind == "embedding":
            fmt = self.weight_spec.format.value
            return f"{fmt} row gather + dequantize (weight-only)"
        return "(no kernel built)" if self.kernel is None else self.kernel.name

    @property
    def output_qparams(self) -> tuple[float, int] | None:
        """Calibrated (scale, zero point) of the uint8 output codes, if they were observed."""
        if not hasattr(self, "output_scale"):
            return None
        return float(self.output_scale), int(self.output_zero_point)

    @property
    def fallback_reason(self) -> str | None:
        return None if self.kernel is None else self.kernel.fallback_reason

    def meta(self) -> dict[str, Any]:
        """JSON-able description that rebuilds this layer's skeleton (see from_meta)."""
        return {"kind": self.kind, "weight_spec": self.weight_spec.to_dict(),
                "act_spec": self.act_spec.to_dict() if self.act_spec else None,
                "dynamic": self.dynamic, "weight_shape": list(self.weight_shape),
                "scale_shape": list(self.weight_scale.shape), "bias_size": None if self.bias is None else self.bias.numel(),
                **({"tied_to": self.tied_to} if self.tied_to else {}),
                "layer_args": {k: list(v) if isinstance(v, tuple) else v for k, v in self.layer_args.items()},
                **({"output_qparams": True} if hasattr(self, "output_scale") else {})}

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> "QuantizedLayer":
        args = {k: tuple(v) if isinstance(v, list) else v for k, v in meta["layer_args"].items()}
        act = QuantSpec.from_dict(meta["act_spec"]) if meta["act_spec"] else None
        layer = cls(meta["kind"], QuantSpec.from_dict(meta["weight_spec"]), act, meta["dynamic"],
                    tuple(meta["weight_shape"]), tuple(meta["scale_shape"]), meta["bias_size"], args,
                    output_qparams=bool(meta.get("output_qparams", False)))
        layer.tied_to = meta.get("tied_to")  # load() re-ties it once every layer exists
        return layer

    def extra_repr(self) -> str:
        return f"{self.kind}, weight={tuple(self.weight_shape)}, kernel={self.kernel_name!r}"

