"""Every exception and warning quantwise raises. Catch `QuantwiseError` to catch them all."""


class QuantwiseError(Exception):
    """Base class of every error quantwise raises on purpose."""


class ConfigError(QuantwiseError, ValueError):
    """A Config, preset or spec is malformed: unknown key, bad format name, bad value."""


class CalibrationError(QuantwiseError, ValueError):
    """Calibration data is empty, of the wrong shape or dtype, or reaches no quantized layer."""


class CheckpointError(QuantwiseError, ValueError):
    """A saved quantized model is missing, truncated, mismatched or not a quantwise folder."""


class ModelLoadError(QuantwiseError, ValueError):
    """A model name, path or `module:function` reference cannot be turned into an nn.Module."""


class DataLoadError(QuantwiseError, ValueError):
    """A calibration or evaluation data source cannot be read."""


class OutputPathError(QuantwiseError, ValueError):
    """The output path would overwrite the input, already exists, or is not writable."""


class EvaluationError(QuantwiseError, ValueError):
    """An eval_fn is not callable, or returned something that is not a finite number."""


class ExportError(QuantwiseError, ValueError):
    """A checkpoint that a target format (compressed-tensors, GGUF) cannot express."""


class QuantwiseWarning(UserWarning):
    """Something worked but deserves the user's attention (outliers, non-finite values, fallbacks)."""
