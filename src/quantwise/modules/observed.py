"""ObservedLayer: wraps a float layer between prepare() and convert().

mode "observe": feed the layer's input to its calibrator, then run the float layer (a static
conv also feeds its output to a second calibrator: the int8 graph path needs the range of
outputs that no quantized layer consumes directly, e.g. a downsample conv before a residual add).
mode "float": run the float layer untouched.
mode "fake": simulate quantization in float (input and weight fake-quantized with the
current calibration): for analysis and tests, never reported as a deployment result.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call

from quantwise.calibrators import Calibrator, make_calibrator
from quantwise.config import LayerConfig
from quantwise.modules.layers import check_input, weight_spec_for
from quantwise.numerics import fake_quantize, qparams_from_range, tensor_range


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

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.mode == "observe":
            check_input(self.qname, self.module, x)
            self.calls += 1
            if self.calibrator is not None:
                self.calibrator.update(x.detach())
            if self.out_calibrator is not None:
                y = self.module(x, *args, **kwargs)
                self.out_calibrator.update(y.detach())
                return y
        elif self.mode == "fake":
            return self._fake_forward(x, *args, **kwargs)
        return self.module(x, *args, **kwargs)

    def input_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, zero_point) of the static input quantizer from the calibrator's range."""
        amin, amax = self.calibrator.compute_range()
        return qparams_from_range(amin, amax, self.layer_config.activation)

    def _fake_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        cfg = self.layer_config
        params = {}
        if cfg.weight is not None:
            spec, _ = weight_spec_for(self.module, cfg.weight)
            w = self.module.weight.detach()
            scale, zp = qparams_from_range(*tensor_range(w, spec), spec)
            params["weight"] = fake_quantize(w, scale, zp, spec)
        if cfg.activation is not None and x.dtype.is_floating_point:
            if cfg.dynamic:
                scale, zp = qparams_from_range(*tensor_range(x, cfg.activation), cfg.activation)
                x = fake_quantize(x, scale, zp, cfg.activation)
            elif self.calibrator is not None:
                scale, zp = self.input_qparams()
                x = fake_quantize(x, scale, zp, cfg.activation)
        return functional_call(self.module, params, (x, *args), kwargs) if params else self.module(x, *args, **kwargs)
