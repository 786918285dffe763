"""Built-in models (digits CNN, all-MiniLM-L6-v2) and model reference resolution."""

from quantwise.models.registry import BUILTIN_MODELS, DEFAULT_MODEL, ModelInfo, builtin_info, load_model

__all__ = ["BUILTIN_MODELS", "DEFAULT_MODEL", "ModelInfo", "builtin_info", "load_model"]
