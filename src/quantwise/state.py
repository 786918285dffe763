"""What quantwise remembers about a quantized model: per-layer records, config, source."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

from quantwise.config import Config
from quantwise.errors import QuantwiseError

STATE_ATTR = "_quantwise"


@dataclass
class LayerRecord:
    """One row of the summary: what a layer became and why."""

    name: str
    module_type: str
    status: str = "float"          # "quantized", "float" or "folded" (into the layer before)
    config: str = "fp32"           # LayerConfig.describe() of what runs
    origin: str = "default"        # which part of the Config chose it
    calibrator: str | None = None
    kernel: str = "float32 (PyTorch)"
    reason: str | None = None      # why it stayed float, fell back, or changed spec
    seen: int = 0                  # activation values seen in calibration
    nonfinite: int = 0             # of which NaN/Inf (excluded from the range)
    code_limit: int | None = None  # int8 weight codes limited to +-this (int16-pair CPUs)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class QuantState:
    config: Config
    records: dict[str, LayerRecord] = field(default_factory=dict)
    source: str | None = None       # how to rebuild the float model: built-in name, folder, module:fn
    stage: str = "prepared"         # "prepared", "calibrated", "converted"
    folded: list[tuple[str, str]] = field(default_factory=list)  # (conv, batchnorm) pairs
    graph: Any = None               # int8graph.GraphReport once convert()/load() ran the pass
    encoder: Any = None             # encoder.EncoderReport, likewise


def get_state(model: nn.Module) -> QuantState:
    state = getattr(model, STATE_ATTR, None)
    if not isinstance(state, QuantState):
        raise QuantwiseError("this model was not prepared by quantwise: call quantwise.prepare() "
                             "or quantwise.quantize() first")
    return state


def set_state(model: nn.Module, state: QuantState) -> None:
    # A plain attribute (not a submodule or buffer): invisible to state_dict, kept by deepcopy.
    object.__setattr__(model, STATE_ATTR, state)
