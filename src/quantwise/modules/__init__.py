"""Layer wrappers: ObservedLayer (during calibration) and QuantizedLayer (after convert)."""

from quantwise.modules.layers import (SUPPORTED, float_weight, is_supported, kind_of, unsupported_reason,
                                     weight_spec_for)
from quantwise.modules.observed import ObservedLayer
from quantwise.modules.quantized import QuantizedLayer

__all__ = ["SUPPORTED", "ObservedLayer", "QuantizedLayer", "float_weight", "is_supported", "kind_of",
           "unsupported_reason", "weight_spec_for"]
