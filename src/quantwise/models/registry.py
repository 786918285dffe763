"""Resolve a model reference (built-in name, local Hugging Face folder, `package.module:function`).

A file path is never executed: Python code is only reached through an importable module name.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from quantwise.errors import ModelLoadError

DEFAULT_MODEL = "digits"
_MODULE_REF = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*$")


@dataclass(frozen=True)
class ModelInfo:
    """What quantwise knows about a loaded model, to pick defaults for data and metrics.

    calib_data / eval_data are built-in data set names (see quantwise.data) or None when the
    user must supply data; input_shape is one sample's tensor shape when it is fixed; source is
    the Hugging Face folder a tokenizer can be loaded from.
    """

    name: str
    kind: str  # "classifier" | "embedder" | "causal-lm" | "custom"
    calib_data: str | None
    eval_data: str | None
    metric: str  # "top1" | "cosine" | "perplexity"
    input_shape: tuple[int, ...] | None = None
    source: str | None = None


def _load_digits() -> nn.Module:
    from quantwise.models.digits import load_digits_model

    return load_digits_model()


def _load_minilm() -> nn.Module:
    from quantwise.models.minilm import load_minilm

    return load_minilm()


def _minilm_source() -> str:
    from quantwise.models.minilm import default_minilm_path

    return str(default_minilm_path())


def _load_stdlib_lm() -> nn.Module:
    from quantwise.models.stdlib_lm import load_stdlib_lm

    return load_stdlib_lm()


BUILTIN_MODELS: dict[str, Callable[[], nn.Module]] = {"digits": _load_digits, "minilm": _load_minilm,
                                                      "stdlib-lm": _load_stdlib_lm}


def builtin_info(name: str) -> ModelInfo:
    """ModelInfo of a built-in model (without loading its weights)."""
    if name == "digits":
        return ModelInfo("digits", "classifier", "digits", "digits", "top1", input_shape=(1, 8, 8))
    if name == "minilm":
        return ModelInfo("minilm", "embedder", "stdlib-text", "stdlib-text", "cosine", source=_minilm_source())
    if name == "stdlib-lm":
        return ModelInfo("stdlib-lm", "causal-lm", "stdlib-code", "stdlib-code", "perplexity")
    raise ModelLoadError(f"unknown built-in model {name!r}; built-in models: {_builtin_names()}")


def _builtin_names() -> str:
    return ", ".join(sorted(BUILTIN_MODELS))


def _what_to_pass() -> str:
    return (f"pass a built-in model name ({_builtin_names()}), a local Hugging Face folder with "
            "config.json and *.safetensors, or `package.module:function` returning an nn.Module")


def load_model(ref: str, allow_pickle: bool = False) -> tuple[nn.Module, ModelInfo]:
    """Load a model in eval mode from a built-in name, an HF folder path or `package.module:function`.
    `allow_pickle`: an HF folder's pickle weights (pytorch_model.bin) are loaded (it can run code)."""
    ref = str(ref).strip()
    if ref in BUILTIN_MODELS:
        return BUILTIN_MODELS[ref]().eval(), builtin_info(ref)
    path = Path(ref).expanduser()
    if path.exists():
        return _load_path(path, allow_pickle)
    if _MODULE_REF.match(ref):
        return _load_function(ref)
    if "/" in ref or "\\" in ref or path.suffix:
        raise ModelLoadError(f"model path {ref!r} does not exist; {_what_to_pass()}")
    raise ModelLoadError(f"unknown model {ref!r}; {_what_to_pass()}")


def _load_path(path: Path, allow_pickle: bool = False) -> tuple[nn.Module, ModelInfo]:
    if path.is_file():
        # Never import or exec a .py file, nor unpickle a checkpoint given by path.
        hint = (" (a pickle: quantwise never unpickles a bare file; a Hugging Face folder's "
                "pytorch_model.bin loads with --allow-pickle)"
                if path.suffix in (".pt", ".pth", ".bin", ".pkl", ".ckpt") else "")
        raise ModelLoadError(f"{path} is a file{hint}; quantwise does not run files as code or load "
                             f"bare checkpoints; {_what_to_pass()}")
    if not any(path.iterdir()):
        raise ModelLoadError(f"{path} is an empty directory; {_what_to_pass()}")
    if (path / "quantwise.json").is_file():
        raise ModelLoadError(f"{path} is a quantized quantwise checkpoint, not a float model: load it "
                             "with quantwise.load(), or pass it to `quantwise benchmark` / `quantwise "
                             "export`; to quantize again, start from the float model")
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{path} has no config.json, so no model was found in it; {_what_to_pass()}")
    from quantwise.models.minilm import SentenceEmbedder, load_hf_folder

    model = load_hf_folder(path, allow_pickle).eval()
    if isinstance(model, SentenceEmbedder):
        info = ModelInfo(path.name, "embedder", "stdlib-text", "stdlib-text", "cosine", source=str(path))
    else:
        info = ModelInfo(path.name, "custom", None, None, "cosine", source=str(path))
    return model, info


def _load_function(ref: str) -> tuple[nn.Module, ModelInfo]:
    module_name, func_name = ref.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ModelLoadError(f"cannot import module {module_name!r} from {ref!r} ({exc}); make sure "
                             f"it is installed or on PYTHONPATH, or {_what_to_pass()}") from exc
    func = getattr(module, func_name, None)
    if not callable(func):
        raise ModelLoadError(f"module {module_name!r} has no function {func_name!r}; {_what_to_pass()}")
    try:
        model = func()
    except Exception as exc:  # user code: report any failure as a load error, keep the cause
        raise ModelLoadError(f"calling {ref}() raised {type(exc).__name__}: {exc}") from exc
    if not isinstance(model, nn.Module):
        raise ModelLoadError(f"{ref}() returned {type(model).__name__}, not a torch.nn.Module; "
                             "the function must take no arguments and return the model")
    return model.eval(), ModelInfo(ref, "custom", None, None, "cosine")
