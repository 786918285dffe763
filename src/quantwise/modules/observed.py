"""ObservedLayer: wraps a float layer between prepare() and convert().

mode "observe": feed the layer's input to its calibrator, then run the float layer (a static
conv also feeds its output to a second calibrator: the int8 graph path needs the range of
outputs that no quantized layer consumes directly, e.g. a downsample conv before a residual add).
mode "float": run the float layer untouched.
mode "fake": simulate quantization in float (input and weight fake-quantized with the
current calibration): for analysis and tests, never reported as a deployment result.
mode "fake_weight" / "fake_act": only the weight / only the input is fake-quantized, so an
error can be attributed to one side (sensitivity analysis).

For sensitivity analysis, `extra_calibrators` are fed the same input in "observe" mode, and
`input_range` (when set) replaces the calibrator's range in the fake modes, so other ranges can
be tried without calibrating again.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn
from torch.func import functional_call

from quantwise.calibrators import Calibrator, make_calibrator
from quantwise.config import LayerConfig
from quantwise.modules.layers import check_input, float_weight, is_hf_conv1d, weight_spec_for
from quantwise.numerics import fake_quantize, qparams_from_range, tensor_range
from quantwise.spec import QuantSpec

MODES = ("observe", "float", "fake", "fake_weight", "fake_act")


class ObservedLayer(nn.Module):
    def __init__(self, module: nn.Module, name: str, layer_config: LayerConfig, origin: str) -> None:
        super().__init__()
        self.module = module
        self.qname = name
        self.layer_config = layer_config
        self.origin = origin  # "default", "rule 0: *.fc" ...: why this config applies
        self.mode = "observe"
        self.calls = 0
        self.calibrator: Calibrator | None = None
        act = layer_config.activation
        if act is not None and not layer_config.dynamic and not isinstance(module, nn.Embedding):
            args = dict(layer_config.calibrator_args)
            if layer_config.calibrator in ("entropy", "mse") and act.format.value == "uint8":
                args.setdefault("num_quant_levels", 256)  # unsigned int8 has 256 levels
            self.calibrator = make_calibrator(layer_config.calibrator, **args)
        self.out_calibrator: Calibrator | None = None
        if self.calibrator is not None and type(module) in (nn.Conv1d, nn.Conv2d):
            self.out_calibrator = make_calibrator(layer_config.calibrator, **args)
        self.extra_calibrators: dict[str, Calibrator] = {}
        self.input_range: tuple[torch.Tensor, torch.Tensor] | None = None
        # (weight data_ptr, weight version) -> fake weight: a sweep runs many forwards with the
        # same weight (MiniLM's word-embedding table takes as long to fake-quantize as a forward).
        self._fake_weight: tuple[tuple[int, int], torch.Tensor] | None = None
        # Set when code outside quantwise read `.weight` through this wrapper (see __getattr__).
        self.weight_read = False

    def __getattr__(self, name: str):
        """Attributes the wrapper lacks come from the float layer, so a model that reads its
        layers (`projection.weight.dtype`, `dense.out_features`) runs while observed. A read of
        `.weight` is recorded: after convert that attribute holds integer codes (ViTModel casts
        its pixels to the patch conv's weight.dtype), so convert keeps such a layer float."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            module = self.__dict__.get("_modules", {}).get("module")
            if module is None or name.startswith("__"):
                raise
        if name == "weight":
            self.__dict__["weight_read"] = True
        return getattr(module, name)

    @property
    def quantizes_input(self) -> bool:
        """True when the fake modes quantize this layer's input (static or dynamic)."""
        cfg = self.layer_config
        return (cfg.activation is not None and not isinstance(self.module, nn.Embedding)
                and (cfg.dynamic or self.calibrator is not None))

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.mode == "observe":
            check_input(self.qname, self.module, x)
            self.calls += 1
            if self.calibrator is not None:
                self.calibrator.update(x.detach())
            for cal in self.extra_calibrators.values():
                cal.update(x.detach())
            if self.out_calibrator is not None:
                y = self.module(x, *args, **kwargs)
                self.out_calibrator.update(y.detach())
                return y
        elif self.mode in ("fake", "fake_weight", "fake_act"):
            return self._fake_forward(x, self.mode != "fake_act", self.mode != "fake_weight",
                                      *args, **kwargs)
        elif self.mode != "float":
            raise ValueError(f"ObservedLayer mode must be one of {MODES}, got {self.mode!r}")
        return self.module(x, *args, **kwargs)

    def input_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, zero_point) of the static input quantizer from the calibrator's range."""
        rng = self.input_range
        amin, amax = rng if rng is not None else self.calibrator.compute_range()
        return qparams_from_range(amin, amax, self._input_spec(amin))

    def _input_spec(self, amin: torch.Tensor) -> QuantSpec:
        # As convert() does: unsigned symmetric cannot hold negatives, so int8 symmetric instead.
        spec = self.layer_config.activation
        if spec.format.is_signed or not spec.symmetric or float(amin) >= 0:
            return spec
        return replace(spec, format="int8")

    def fake_weight(self) -> torch.Tensor:
        """The weight fake-quantized with the layer's weight spec (cached while unchanged), in
        the module's own layout (Conv1D's [in, out] is quantized as [out, in], then transposed
        back)."""
        w = self.module.weight.detach()
        key = (w.data_ptr(), w._version)
        if self._fake_weight is None or self._fake_weight[0] != key:
            spec, _ = weight_spec_for(self.module, self.layer_config.weight)
            rows = float_weight(self.module).detach()
            scale, zp = qparams_from_range(*tensor_range(rows, spec), spec)
            fake = fake_quantize(rows, scale, zp, spec)
            self._fake_weight = (key, fake.t() if is_hf_conv1d(self.module) else fake)
        return self._fake_weight[1]

    def clear_cache(self) -> None:
        self._fake_weight = None

    def _fake_forward(self, x: torch.Tensor, weight: bool, act: bool, *args,
                      **kwargs) -> torch.Tensor:
        cfg = self.layer_config
        params = {}
        if weight and cfg.weight is not None:
            params["weight"] = self.fake_weight()
        if act and cfg.activation is not None and x.dtype.is_floating_point:
            if cfg.dynamic:
                scale, zp = qparams_from_range(*tensor_range(x, cfg.activation), cfg.activation)
                x = fake_quantize(x, scale, zp, cfg.activation)
            elif self.calibrator is not None:
                scale, zp = self.input_qparams()
                x = fake_quantize(x, scale, zp, cfg.activation)
        return functional_call(self.module, params, (x, *args), kwargs) if params else self.module(x, *args, **kwargs)
