"""Calibration and evaluation data: built-in data sets, text files and folders of tensors.

Built-in names: "digits" (scikit-learn digits, calib split), "stdlib-text" (English sentences
from the docstrings of Python's standard library) and "stdlib-code" (byte-token windows of the
standard library's source files, calib split; see quantwise.models.stdlib_lm), so no download is
ever needed.
A model input is a Tensor, a tuple of Tensors, or a dict of keyword tensors.
"""

from __future__ import annotations

import importlib
import inspect
import math
import random
import re
import tokenize  # numpy parses a .npy header with it: TokenError on a damaged one
import warnings
from functools import lru_cache
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch
from torch import Tensor

from quantwise.errors import CalibrationError, DataLoadError

ModelInput = Union[Tensor, tuple, dict]


def run_model(model: torch.nn.Module, sample: Any) -> Any:
    """Call the model on one input: a Tensor, a tuple/list of tensors, or a dict of kwargs."""
    if isinstance(sample, torch.Tensor):
        return model(sample)
    if isinstance(sample, (tuple, list)):
        return model(*sample)
    if isinstance(sample, dict):
        return model(**sample)
    raise CalibrationError(f"a model input must be a Tensor, a tuple of Tensors or a dict of "
                           f"keyword arguments, got {type(sample).__name__}")
BUILTIN_DATA = ("digits", "stdlib-text", "stdlib-code")
STDLIB_CODE_CALIB_WINDOWS = 128  # windows of 256 byte tokens from the calib files
TENSOR_SUFFIXES = (".npy", ".safetensors")
PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle", ".ckpt")  # loaded only with allow_pickle
PICKLE_HINT = ("refused by default because unpickling can run arbitrary code: save the tensors as "
               ".npy or .safetensors, or pass --allow-pickle (Python: allow_pickle=True) if you "
               "trust the file")

# Fixed, sorted list: the corpus must not depend on what happens to be imported already.
CORPUS_MODULES = sorted([
    "abc", "argparse", "array", "ast", "asyncio", "base64", "bisect", "calendar", "collections",
    "concurrent.futures", "configparser", "contextlib", "copy", "csv", "dataclasses", "datetime",
    "decimal", "difflib", "email", "email.message", "enum", "fractions", "ftplib", "functools",
    "getopt", "gettext", "glob", "gzip", "hashlib", "heapq", "hmac", "html", "http",
    "http.client", "http.cookiejar", "http.server", "imaplib", "inspect", "io", "ipaddress",
    "itertools", "json", "logging", "logging.handlers", "lzma", "mailbox", "math", "mimetypes",
    "multiprocessing", "numbers", "operator", "optparse", "os", "pathlib", "pickle", "pprint",
    "queue", "random", "re", "sched", "secrets", "selectors", "shlex", "shutil", "smtplib",
    "socket", "socketserver", "sqlite3", "statistics", "string", "struct", "subprocess",
    "tarfile", "tempfile", "textwrap", "threading", "timeit", "tokenize", "trace", "traceback",
    "types", "typing", "unittest", "unittest.mock", "urllib.parse", "urllib.request", "uuid",
    "warnings", "weakref", "xml.dom.minidom", "xml.etree.ElementTree", "zipfile", "zoneinfo",
])
CALIB_SENTENCES = 512
HELDOUT_SENTENCES = 944
CORPUS_SEED = 0
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_PLAIN_WORDS = re.compile(r"^[A-Z][A-Za-z0-9 ,;:'()\-]*[.!?]$")


def _docstrings(module_name: str) -> list[str]:
    """Docstrings of a module, its public classes/functions and their public methods."""
    module = importlib.import_module(module_name)
    docs = [inspect.getdoc(module)]
    for name, obj in sorted(vars(module).items()):
        if name.startswith("_") or inspect.ismodule(obj) or getattr(obj, "__module__", None) != module.__name__:
            continue  # skip re-exports so each docstring is seen once, under its own module
        if inspect.isclass(obj) or inspect.isfunction(obj):
            docs.append(inspect.getdoc(obj))
        if inspect.isclass(obj):
            docs += [inspect.getdoc(m) for n, m in sorted(vars(obj).items())
                     if not n.startswith("_") and inspect.isfunction(m)]
    return [d for d in docs if d]


def _sentences(doc: str) -> list[str]:
    """Prose sentences of a docstring; code examples and indented blocks are dropped."""
    out = []
    for para in re.split(r"\n\s*\n", doc):
        lines = para.splitlines()
        if any(line.startswith((" ", "\t", ">>>", "...")) for line in lines):
            continue  # indented text is code, tables or argument lists, not prose
        text = " ".join(line.strip() for line in lines)
        for sent in _SENTENCE_END.split(text):
            sent = sent.strip()
            if 6 <= len(sent.split()) <= 60 and _PLAIN_WORDS.match(sent):
                out.append(sent)
    return out


@lru_cache(maxsize=1)
def _corpus() -> tuple[str, ...]:
    seen: dict[str, None] = {}  # insertion-ordered set: deduplicate, keep first occurrence
    for module_name in CORPUS_MODULES:
        try:
            with warnings.catch_warnings():  # reading deprecated aliases (typing.io) warns
                warnings.simplefilter("ignore", DeprecationWarning)
                docs = _docstrings(module_name)
        except ImportError:  # e.g. a Python build without sqlite3 or lzma
            continue
        for doc in docs:
            for sent in _sentences(doc):
                seen.setdefault(sent, None)
    return tuple(seen)


def stdlib_corpus() -> list[str]:
    """English sentences (6..60 words, deduplicated, fixed order) from stdlib docstrings.

    Deterministic for a given Python version (docstrings change between versions).
    """
    return list(_corpus())


def corpus_split(name: str) -> list[str]:
    """Disjoint, seeded splits of the corpus: "calib" (512 sentences), "heldout" (up to 944)."""
    if name not in ("calib", "heldout"):
        raise DataLoadError(f"unknown corpus split {name!r}; use 'calib' or 'heldout'")
    order = list(_corpus())
    random.Random(CORPUS_SEED).shuffle(order)
    if name == "calib":
        return order[:CALIB_SENTENCES]
    return order[CALIB_SENTENCES:CALIB_SENTENCES + HELDOUT_SENTENCES]


def _tokenizer_for(model_info: Any, tokenizer: Any, what: str) -> Any:
    if tokenizer is not None:
        return tokenizer
    source = getattr(model_info, "source", None)
    if getattr(model_info, "kind", None) == "embedder" or source is not None:
        from quantwise.models.minilm import load_tokenizer

        return load_tokenizer(source)
    name = getattr(model_info, "name", "this model")
    raise DataLoadError(f"{what} is text, but {name} has no tokenizer; pass tokenizer=... or use "
                        "tensor data (a folder of .npy / .safetensors files)")


def _batched_text(sentences: list[str], tokenizer: Any, batch_size: int) -> list[dict[str, Tensor]]:
    from quantwise.models.minilm import tokenize

    return [tokenize(tokenizer, sentences[i:i + batch_size]) for i in range(0, len(sentences), batch_size)]


def _read_text(path: Path) -> list[str]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise DataLoadError(f"{path} is not UTF-8 text; calibration text files hold one sample a "
                            "line, tensors go in .npy or .safetensors files") from exc
    except OSError as exc:
        raise DataLoadError(f"cannot read {path}: {exc}") from exc
    samples = [line.strip() for line in lines if line.strip()]  # blank lines are not samples
    if not samples:
        raise DataLoadError(f"empty calibration data: {path} has no non-blank lines; put one sample a line")
    return samples


def _load_pickle(path: Path) -> ModelInput:
    """A .pt file the user allowed: torch's weights_only loader (tensors and containers only)."""
    try:
        value = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - UnpicklingError, EOFError, RuntimeError: one answer
        first = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise DataLoadError(f"cannot read {path} with torch's weights_only loader ({first}); save "
                            "the tensors as .npy or .safetensors") from None
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, Tensor) for v in value):
        value = tuple(value)
    elif isinstance(value, dict) and value and all(isinstance(k, str) and isinstance(v, Tensor)
                                                   for k, v in value.items()):
        value = {k: value[k] for k in sorted(value)}
    elif not isinstance(value, Tensor):
        raise DataLoadError(f"{path} holds a {type(value).__name__}, not a tensor, a tuple of "
                            "tensors or a dict of named tensors")
    return value


def _is_pickle(path: Path) -> bool:
    """By content: a pickle (protocol 2-5 opcode) or torch.save's zip archive (e.g. data.bin)."""
    try:
        with path.open("rb") as handle:
            head = handle.read(4)
    except OSError:
        return False
    return head == b"PK\x03\x04" or (len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5)


def _load_tensor_file(path: Path) -> ModelInput:
    """One file -> one model input: a Tensor, or a dict of tensors (several per safetensors file)."""
    if path.suffix in PICKLE_SUFFIXES or (path.suffix not in TENSOR_SUFFIXES and _is_pickle(path)):
        return _load_pickle(path)
    if path.suffix == ".npy":
        _check_npy_size(path)
        try:
            array = np.load(path, allow_pickle=False)
        except ValueError as exc:
            if "allow_pickle" in str(exc) or "Object arrays" in str(exc):
                raise DataLoadError(f"{path} holds a pickled object array; pickle loading is refused "
                                    "for safety. Save a numeric array (np.save of a numeric dtype)") from exc
            raise DataLoadError(f"cannot read {path} as a .npy array: {exc}") from exc
        except (OSError, EOFError) as exc:  # EOFError: empty or cut inside the header
            raise DataLoadError(f"cannot read {path} as a .npy array: {exc or 'truncated'}") from exc
        if array.dtype.kind not in "biuf":  # strings, bytes, complex: no tensor to feed a model
            raise DataLoadError(f"{path} holds a {array.dtype} array; save numeric (int/float/bool) arrays")
        if array.dtype.kind == "f" and array.dtype.itemsize > 8:  # long double: torch has none
            array = array.astype(np.float64)
        # big-endian arrays (saved on another machine, '>f4'): torch reads native order only
        array = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("="))
        tensor = torch.from_numpy(array)
        # numpy defaults to float64; models run in float32.
        return tensor.float() if tensor.dtype == torch.float64 else tensor
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except Exception as exc:  # safetensors raises its own SafetensorError on corrupt files
        raise DataLoadError(f"cannot read {path} as safetensors: {exc}") from exc
    if not tensors:
        raise DataLoadError(f"{path} holds no tensors; remove it or save at least one tensor")
    if len(tensors) == 1:
        return next(iter(tensors.values()))
    return {key: tensors[key] for key in sorted(tensors)}


def _check_npy_size(path: Path) -> None:
    """Refuse a .npy whose header claims more bytes than the file holds, before numpy allocates
    them (a header of shape (2**40,) would otherwise ask for terabytes)."""
    fmt = np.lib.format
    try:
        with path.open("rb") as handle:
            version = fmt.read_magic(handle)
            if version == (1, 0):
                shape, _, dtype = fmt.read_array_header_1_0(handle)
            elif version == (2, 0):
                shape, _, dtype = fmt.read_array_header_2_0(handle)
            else:  # 3.0 (UTF-8 field names): no public reader
                read = getattr(fmt, "_read_array_header", None)
                if read is None:
                    from numpy.lib._format_impl import _read_array_header as read
                shape, _, dtype = read(handle, version)
            start = handle.tell()
    except (ValueError, OSError, EOFError, SyntaxError, TypeError, MemoryError, tokenize.TokenError) as exc:
        raise DataLoadError(f"cannot read {path} as a .npy array: its header is damaged "
                            f"({str(exc)[:200] or type(exc).__name__}); save it again with np.save") from None
    if dtype.hasobject:
        return  # pickled: np.load refuses it below, with its own message
    claimed = math.prod(shape) * dtype.itemsize
    available = path.stat().st_size - start
    if claimed > available:
        raise DataLoadError(f"{path}: its .npy header claims a {dtype} array of shape {shape} "
                            f"({claimed} bytes) but the file holds {available}: truncated or damaged")


def _add_batch_dim(item: ModelInput, model_info: Any, path: Path) -> ModelInput:
    """Give single samples a leading batch dimension of 1 where the model's sample shape is known."""
    shape = getattr(model_info, "input_shape", None)
    if isinstance(item, Tensor) and shape is not None:
        if tuple(item.shape) == tuple(shape):
            return item.unsqueeze(0)
        if tuple(item.shape[1:]) != tuple(shape):
            raise DataLoadError(f"{path} has shape {tuple(item.shape)}; expected one sample {tuple(shape)} "
                                f"or a batch (N, {', '.join(map(str, shape))})")
    if isinstance(item, dict) and getattr(item.get("input_ids"), "ndim", 0) == 1:
        return {k: v.unsqueeze(0) for k, v in item.items()}  # one tokenized sentence
    return item


def _num_samples(item: ModelInput) -> int | None:
    tensors = list(item.values()) if isinstance(item, dict) else list(item) if isinstance(item, tuple) else [item]
    sizes = {t.shape[0] if t.ndim else None for t in tensors}
    return sizes.pop() if len(sizes) == 1 else None


def _truncate(item: ModelInput, n: int) -> ModelInput:
    if isinstance(item, dict):
        return {k: v[:n] for k, v in item.items()}
    return tuple(t[:n] for t in item) if isinstance(item, tuple) else item[:n]


def _tensor_inputs(paths: list[Path], model_info: Any, limit: int | None) -> list[ModelInput]:
    inputs, total = [], 0
    for path in paths:
        item = _add_batch_dim(_load_tensor_file(path), model_info, path)
        n = _num_samples(item)
        if limit is not None and n is not None and total + n > limit:
            item, n = _truncate(item, limit - total), limit - total
        if n != 0:
            inputs.append(item)
        total += 1 if n is None else n
        if limit is not None and total >= limit:
            break
    return inputs


def _signature(item: ModelInput) -> tuple | None:
    """What must match for two inputs to be concatenated along dim 0 (None: never merge)."""
    if _num_samples(item) is None:
        return None
    if isinstance(item, dict):
        return ("dict",) + tuple((k, tuple(v.shape[1:]), v.dtype) for k, v in item.items())
    if isinstance(item, tuple):
        return ("tuple",) + tuple((tuple(t.shape[1:]), t.dtype) for t in item)
    return ("tensor", tuple(item.shape[1:]), item.dtype)


def _concat(items: list[ModelInput]) -> ModelInput:
    first = items[0]
    if len(items) == 1:
        return first
    if isinstance(first, dict):
        return {k: torch.cat([it[k] for it in items]) for k in first}
    if isinstance(first, tuple):
        return tuple(torch.cat(parts) for parts in zip(*items))
    return torch.cat(items)


def _collate(inputs: list[ModelInput], batch_size: int) -> list[ModelInput]:
    """Merge consecutive compatible inputs (e.g. one-sample files) into batches <= batch_size."""
    out: list[ModelInput] = []
    group: list[ModelInput] = []
    size, sig = 0, None
    for item in inputs:
        n, item_sig = _num_samples(item), _signature(item)
        if group and (item_sig is None or item_sig != sig or size + n > batch_size):
            out.append(_concat(group))
            group, size = [], 0
        group.append(item)
        size, sig = size + (n or 0), item_sig
    if group:
        out.append(_concat(group))
    return out


def load_calibration_data(spec: str, model_info: Any = None, tokenizer: Any = None,
                          batch_size: int = 32, limit: int | None = None,
                          allow_pickle: bool = False) -> list[ModelInput]:
    """Turn a data spec into a list of model inputs (batches).

    spec: "digits", "stdlib-text", "stdlib-code" (dicts {"input_ids": [B, 256]} of byte tokens,
    STDLIB_CODE_CALIB_WINDOWS windows unless limit says otherwise), a text file (one sample a line, tokenized into dict batches),
    or a .npy / .safetensors file or a folder of them (sorted; each file is a sample or a batch;
    consecutive same-shaped files are merged into batches of up to batch_size).
    limit caps the number of samples. Errors raise DataLoadError. Pickle files (.pt, ...) are
    refused unless `allow_pickle` (then read with torch's weights_only loader).
    """
    if batch_size < 1 or (limit is not None and limit < 1):
        raise DataLoadError(f"batch_size and limit must be >= 1 (got {batch_size}, {limit})")
    if spec == "digits":
        from quantwise.models.digits import digits_data

        if getattr(model_info, "kind", None) == "embedder":
            raise DataLoadError("'digits' images cannot feed a text embedder; use 'stdlib-text' or a text file")
        images = digits_data("calib")[0][:limit]
        return [images[i:i + batch_size] for i in range(0, len(images), batch_size)]
    if spec == "stdlib-code":
        from quantwise.models.stdlib_lm import lm_batches

        kind = getattr(model_info, "kind", None)
        if kind not in (None, "causal-lm", "custom"):
            raise DataLoadError(f"'stdlib-code' is byte-token windows for a byte-level causal LM "
                                f"(stdlib-lm); it cannot feed a {kind}")
        return lm_batches("calib", limit or STDLIB_CODE_CALIB_WINDOWS, batch_size)
    if spec == "stdlib-text":
        tok = _tokenizer_for(model_info, tokenizer, "'stdlib-text'")
        return _batched_text(corpus_split("calib")[:limit], tok, batch_size)
    path = Path(spec).expanduser()
    if not path.exists():
        raise DataLoadError(f"calibration data {spec!r} not found; pass a built-in data set "
                            f"({', '.join(BUILTIN_DATA)}), a text file, or a folder of .npy / .safetensors files")
    if path.is_dir():
        suffixes = TENSOR_SUFFIXES + (PICKLE_SUFFIXES if allow_pickle else ())
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in suffixes)
        pickles = [p.name for p in path.iterdir() if p.is_file() and p.suffix in PICKLE_SUFFIXES]
        if not files and pickles:
            raise DataLoadError(f"calibration folder {path} holds only pickle files ({pickles[0]}, "
                                f"...): {PICKLE_HINT}")
        if not files:
            raise DataLoadError(f"empty calibration data: folder {path} has no .npy or .safetensors files")
        inputs = _tensor_inputs(files, model_info, limit)
    elif (path.suffix in PICKLE_SUFFIXES or _is_pickle(path)) and not allow_pickle:
        raise DataLoadError(f"{path} is a pickle file: {PICKLE_HINT}")
    elif path.suffix in TENSOR_SUFFIXES + PICKLE_SUFFIXES or _is_pickle(path):
        inputs = _tensor_inputs([path], model_info, limit)
    else:
        tok = _tokenizer_for(model_info, tokenizer, str(path))
        return _batched_text(_read_text(path)[:limit], tok, batch_size)
    if not inputs:
        raise DataLoadError(f"empty calibration data: {path} holds only zero-sample tensors")
    return _collate(inputs, batch_size)
