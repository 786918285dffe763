"""ONNX export of quantized models (QDQ graphs), and the checks that prove the file.

onnx, onnxscript and onnxruntime are optional dependencies (`pip install quantwise[onnx]`):
they are imported only when an export or a check runs, so `import quantwise` stays lean.
"""

from __future__ import annotations

from typing import Any

from quantwise.errors import ModelLoadError


def _require() -> None:
    missing = []
    for name in ("onnx", "onnxscript", "onnxruntime"):
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ModelLoadError(f"ONNX export needs {', '.join(missing)}: pip install 'quantwise[onnx]'")


def export_onnx(model, example_inputs, path, **kwargs: Any):
    """See quantwise.export.onnx_export.export_onnx."""
    _require()
    from quantwise.export.onnx_export import export_onnx as run

    return run(model, example_inputs, path, **kwargs)


__all__ = ["export_onnx"]
