"""Fuzz targets: a strategy of folder contents and the quantwise entry point fed with them.

The property of every target: the entry point returns or raises a QuantwiseError (the CLI
returns 0, 1 or 2), within TIMEOUT_S seconds, with no allocation far past the files' size (the
address space is capped at MEMORY_HEADROOM above its size at the start: a header claiming 2**60
bytes that is believed becomes a MemoryError / RuntimeError, i.e. a finding). A case is
{relative name: bytes | ("symlink", target)}, written into a fresh folder `case/` inside a root
that also holds `outside.bin` (what an escaping path would reach). Used by tests/test_fuzz.py
(short, fixed seeds) and scripts/fuzz.py (long, random seeds, reproducers saved).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import resource
import signal
import tempfile
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

from hypothesis import strategies as st

import fuzz_seeds as seeds
import fuzz_strategies as fs

TIMEOUT_S = 20.0
MEMORY_HEADROOM = 3 * 2 ** 30
OUTSIDE = b"SECRET outside the case folder"
ACCEPTED: tuple[type[BaseException], ...] = ()  # set at import below (quantwise.errors)


class Hang(BaseException):
    """A target ran past TIMEOUT_S (BaseException: no `except Exception` in quantwise hides it)."""


@dataclass(frozen=True)
class Target:
    name: str
    strategy: Callable[[], st.SearchStrategy]  # built lazily: seeds load torch / transformers
    check: Callable[[Path], None]             # raises on a finding
    examples: int                             # in the short run (tests/test_fuzz.py)


def write_case(files: dict[str, Any], folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder.parent / "outside.bin").write_bytes(OUTSIDE)
    for name, data in files.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(data, tuple):
            os.symlink(data[1], path)
        else:
            path.write_bytes(data)
    return folder


@contextlib.contextmanager
def guarded(timeout: float = TIMEOUT_S):
    """Hang after `timeout` s; address space capped MEMORY_HEADROOM above the current size."""
    def alarm(*_):
        raise Hang(f"no answer in {timeout:.0f} s")

    old_handler = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, timeout)
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    vm = next(int(line.split()[1]) * 1024 for line in Path("/proc/self/status").read_text().splitlines()
              if line.startswith("VmSize:"))
    cap = vm + MEMORY_HEADROOM if hard == resource.RLIM_INFINITY else min(hard, vm + MEMORY_HEADROOM)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old_handler)
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def run_case(target: Target, files: dict[str, Any]) -> None:
    """Write `files`, run the target under guard; a QuantwiseError is the expected answer."""
    with tempfile.TemporaryDirectory(prefix=f"fuzz-{target.name}-") as root:
        folder = write_case(files, Path(root) / "case")
        with guarded(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                target.check(folder)
            except ACCEPTED:
                pass


# -- entry points -----------------------------------------------------------------------------
def check_safetensors(folder: Path) -> None:
    from quantwise.formats.shards import ShardedCheckpoint

    checkpoint = ShardedCheckpoint.open(folder, allow_non_float=(folder / "allow").exists())
    for name in checkpoint.tensors:
        checkpoint.read(name, dtype=None)
    config = folder / "config.json"
    if config.is_file():
        try:
            data = json.loads(config.read_bytes())
        except (ValueError, RecursionError):  # not the loader under test
            return
        if isinstance(data, dict):
            checkpoint.check_config(data, config)


def check_metadata(folder: Path) -> None:
    from quantwise.formats.metadata import read_quantwise_json
    from quantwise.io import read_metadata

    read_quantwise_json(folder)
    read_metadata(folder)


@lru_cache(maxsize=1)
def _float_model():
    return seeds.tiny_model()


def check_io_load(folder: Path) -> None:
    """load (with the float model, or from the recorded source) and one forward pass: a
    checkpoint that loads must also run."""
    import quantwise

    model = quantwise.load(folder, model=None if (folder / "no-model").exists() else _float_model())
    model(seeds.tiny_input())


def check_hf_load(folder: Path) -> None:
    from quantwise.models.registry import load_model

    load_model(str(folder))


def check_config(folder: Path) -> None:
    """A config that loads must also describe, match layers and survive a save / load round trip."""
    from quantwise.config import Config

    path = next(folder.glob("config.*"))
    cfg = Config.load(path)
    for name, kind in (("fc1", "Linear"), ("conv", "Conv2d"), ("bn", "BatchNorm2d")):
        cfg.layer_config(name, kind)[0].describe()
    for suffix in (".json", ".yaml"):
        cfg.save(folder / f"again{suffix}")
        again = Config.load(folder / f"again{suffix}").to_dict()
        if json.dumps(again, sort_keys=True, default=str) != json.dumps(cfg.to_dict(), sort_keys=True, default=str):
            raise AssertionError(f"{suffix} round trip changed the config: {cfg.to_dict()} -> {again}")


def check_config_quantize(folder: Path) -> None:
    """A config that loads must quantize TinyNet or say why (a ConfigError, a CalibrationError)."""
    import quantwise

    cfg = quantwise.Config.load(next(folder.glob("config.*")))
    qmodel = quantwise.quantize(_float_model(), cfg, [seeds.tiny_input(4)], progress=False)
    qmodel(seeds.tiny_input())


def check_calibration(folder: Path) -> None:
    from quantwise.data import load_calibration_data
    from quantwise.models.registry import ModelInfo, builtin_info

    opts = json.loads((folder / "opts.json").read_text())
    info = [None, builtin_info("digits"), ModelInfo("tiny", "custom", None, None, "cosine",
                                                    input_shape=seeds.IN_SHAPE)][opts["info"]]
    spec = folder / "data" / opts["file"] if opts["file"] else folder / "data"
    load_calibration_data(str(spec), info, batch_size=opts["batch"], limit=opts["limit"],
                          allow_pickle=opts["pickle"])


def check_onnx(folder: Path) -> None:
    """open_onnx refuses damaged files and any external data outside the folder; a file it
    accepts reads nothing outside (checked after the fact)."""
    import onnx
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    from quantwise.export.onnx_file import open_onnx

    proto = open_onnx(folder / "model.onnx")
    for tensor in _get_all_tensors(proto):
        if uses_external_data(tensor):
            where = {e.key: e.value for e in tensor.external_data}.get("location", "")
            resolved = (folder / where).resolve()
            if not resolved.is_relative_to(folder.resolve()):
                raise AssertionError(f"open_onnx accepted external data {where!r} -> {resolved}")
    assert isinstance(proto, onnx.ModelProto)


def check_onnx_runtime(folder: Path) -> None:
    from quantwise.export.check import fusion_report
    from quantwise.export.onnx_file import open_onnx

    open_onnx(folder / "model.onnx")
    fusion_report(folder / "model.onnx").line()


def run_cli(argv: list[str]) -> None:
    from quantwise.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    if code not in (0, 1, 2) or (code == 2 and "quantwise: error:" not in err.getvalue()):
        raise AssertionError(f"quantwise {' '.join(argv)} -> exit {code}; stderr {err.getvalue()[-500:]}")


def check_cli_inspect(folder: Path) -> None:
    run_cli(["inspect", str(folder / "model.onnx"), "--json"])


def check_cli_benchmark(folder: Path) -> None:
    run_cli(["benchmark", str(folder / "ckpt"), "--model", "fuzz_seeds:tiny_model",
             "--data", str(folder / "data"), "--json"])


def check_cli_quantize(folder: Path) -> None:
    run_cli(["quantize", "fuzz_seeds:tiny_model", "--config", str(next(folder.glob("config.*"))),
             "--calib", str(folder / "data"), "--out", str(folder / "out"), "--json"])


def check_cli_quantize_hf(folder: Path) -> None:
    stream = ["--stream"] if (folder / "stream").exists() else []
    run_cli(["quantize", str(folder / "model"), "--config", "w8a8-dynamic", "--calib", "stdlib-code",
             "--out", str(folder / "out"), "--json", *stream])


# -- strategies of whole cases -------------------------------------------------------------------
def _checkpoint_case():
    @st.composite
    def case(draw):
        files = dict(draw(st.sampled_from(list(seeds.checkpoints().values()))))
        what = draw(st.sampled_from(["json", "json", "json", "weights", "both", "files"]))
        if what in ("json", "both"):
            files["quantwise.json"] = draw(fs.json_bytes(json.loads(files["quantwise.json"])))
        if what in ("weights", "both"):
            files["model.safetensors"] = draw(fs.safetensors_bytes(files["model.safetensors"]))
        if what == "files":
            drop = draw(st.sampled_from(["quantwise.json", "model.safetensors", None]))
            files.pop(drop, None)
            if draw(st.booleans()):
                files["model.safetensors.index.json"] = draw(_index_bytes(["model.safetensors"]))
        if draw(st.integers(0, 4)) == 0:
            files["no-model"] = b""
        return files
    return case()


def _index_bytes(shards: list[str]):
    tree = {"metadata": {"total_size": 1}, "weight_map": {"w": shards[0]}}
    names = shards + ["../outside.bin", "/etc/passwd", "pytorch_model.bin", "missing.safetensors",
                      "link.safetensors", "", ".safetensors", "sub/x.safetensors", "model.safetensors"]
    return fs.json_bytes(tree, fs.JSON_ODD | st.sampled_from(names))


def _hf_case(with_options: bool = False):
    @st.composite
    def case(draw):
        base = draw(st.sampled_from(list(seeds.hf_folders().values())))
        files = dict(base)  # each edit starts from the valid seed file
        shards = sorted(n for n in files if n.endswith(".safetensors"))
        for _ in range(draw(st.integers(1, 2))):
            what = draw(st.sampled_from(["config", "config", "weights", "weights", "index", "drop", "link"]))
            if what == "config":
                files["config.json"] = draw(fs.json_bytes(json.loads(base["config.json"])))
            elif what == "weights":
                shard = draw(st.sampled_from(shards))
                files[shard] = draw(fs.safetensors_bytes(base[shard]))
            elif what == "index":
                if "model.safetensors.index.json" in base:
                    names = fs.JSON_ODD | st.sampled_from(shards + ["../x.safetensors", "pytorch_model.bin"])
                    files["model.safetensors.index.json"] = draw(fs.json_bytes(
                        json.loads(base["model.safetensors.index.json"]), names))
                else:
                    files["model.safetensors.index.json"] = draw(_index_bytes(shards))
            elif what == "drop":
                files.pop(draw(st.sampled_from(sorted(files))))
            else:
                files[draw(st.sampled_from(shards + ["link.safetensors"]))] = (
                    "symlink", draw(st.sampled_from(["../outside.bin", "/etc/passwd", "/dev/zero", "."])))
        if with_options and draw(st.booleans()):
            files["allow"] = b""
        return files
    return case()


def _config_case(prefix: str = ""):
    @st.composite
    def case(draw):
        suffix, data = draw(fs.config_file(seeds.config_dicts()))
        return {f"{prefix}config{suffix}": data}
    return case()


@st.composite
def _calibration_case(draw):
    data = draw(fs.calibration_folder())
    files = {f"data/{name}": body for name, body in data.items()}
    files["data/.keep"] = b""
    opts = {"info": draw(st.integers(0, 2)), "batch": draw(st.integers(1, 4)),
            "limit": draw(st.none() | st.integers(1, 6)), "pickle": draw(st.booleans()),
            "file": draw(st.none() | st.sampled_from(sorted(data) or [None]))}
    files["opts.json"] = json.dumps(opts).encode()
    return files


def _onnx_case():
    return fs.onnx_case(seeds.onnx_models(), seeds.ONNX_WEIGHTS())


def _valid_data() -> dict[str, bytes]:
    import numpy as np

    buf = io.BytesIO()
    np.save(buf, seeds.tiny_input(4).numpy())
    return {"data/x.npy": buf.getvalue()}


def _benchmark_case():
    @st.composite
    def case(draw):
        files = {f"ckpt/{k}": v for k, v in draw(_checkpoint_case()).items()}
        files.update(_valid_data() if draw(st.booleans()) else
                     {k: v for k, v in draw(_calibration_case()).items() if k.startswith("data/")})
        return files
    return case()


def _quantize_case():
    @st.composite
    def case(draw):
        files = draw(_config_case())
        files.update(_valid_data() if draw(st.integers(0, 2)) else
                     {k: v for k, v in draw(_calibration_case()).items() if k.startswith("data/")})
        return files
    return case()


def _quantize_hf_case():
    @st.composite
    def case(draw):
        files = {f"model/{k}": (("symlink", "../" + v[1]) if isinstance(v, tuple) and v[1].startswith("..")
                                else v) for k, v in draw(_hf_case()).items()}
        if draw(st.booleans()):
            files["stream"] = b""
        return files
    return case()


TARGETS: dict[str, Target] = {t.name: t for t in [
    Target("safetensors", lambda: _hf_case(with_options=True), check_safetensors, 450),
    Target("metadata", _checkpoint_case, check_metadata, 250),
    Target("io_load", _checkpoint_case, check_io_load, 350),
    Target("config", _config_case, check_config, 300),
    Target("config_quantize", _config_case, check_config_quantize, 40),
    Target("calibration", lambda: _calibration_case(), check_calibration, 300),
    Target("onnx", _onnx_case, check_onnx, 300),
    Target("onnx_runtime", _onnx_case, check_onnx_runtime, 30),
    Target("hf_load", _hf_case, check_hf_load, 40),
    Target("cli_inspect", _onnx_case, check_cli_inspect, 20),
    Target("cli_benchmark", _benchmark_case, check_cli_benchmark, 20),
    Target("cli_quantize", _quantize_case, check_cli_quantize, 20),
    Target("cli_quantize_hf", _quantize_hf_case, check_cli_quantize_hf, 10),
]}


def _accepted() -> tuple[type[BaseException], ...]:
    from quantwise.errors import QuantwiseError

    return (QuantwiseError,)


ACCEPTED = _accepted()
