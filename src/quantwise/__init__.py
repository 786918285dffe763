"""quantwise: quantize trained PyTorch models and prove the result.

    import quantwise
    qmodel = quantwise.quantize(model, "w8a8", calib_batches)
    print(quantwise.summary(qmodel))
    quantwise.save(qmodel, "out/model-w8a8")
"""

from quantwise._version import __version__  # noqa: E402
from quantwise.config import Config, LayerConfig, Rule  # noqa: E402
from quantwise.errors import (  # noqa: E402
    CalibrationError, CheckpointError, ConfigError, DataLoadError, EvaluationError, ModelLoadError,
    OutputPathError, QuantwiseError, QuantwiseWarning)
from quantwise.evaluate import EvalResult, evaluate  # noqa: E402
from quantwise.io import load, save  # noqa: E402
from quantwise.plan import Plan, plan  # noqa: E402
from quantwise.qat import distill_loss, freeze_bn, prepare_qat  # noqa: E402
from quantwise.runtime import generate  # noqa: E402
from quantwise.sensitivity import LayerSensitivity, SensitivityReport, sensitivity  # noqa: E402
from quantwise.spec import Format, PerChannel, PerGroup, PerTensor, PerToken, QuantSpec  # noqa: E402
from quantwise.summary import summary  # noqa: E402
from quantwise.workflow import calibrate, convert, prepare, quantize  # noqa: E402

__all__ = [
    "__version__", "Config", "LayerConfig", "Rule", "QuantSpec", "Format", "PerTensor", "PerChannel",
    "PerToken", "PerGroup", "quantize", "prepare", "calibrate", "convert", "summary", "save", "load",
    "evaluate", "EvalResult", "generate", "plan", "Plan", "prepare_qat", "freeze_bn", "distill_loss", "sensitivity", "SensitivityReport", "LayerSensitivity",
    "EvaluationError", "QuantwiseError", "ConfigError", "CalibrationError", "CheckpointError",
    "ModelLoadError", "DataLoadError", "OutputPathError", "QuantwiseWarning",
]
