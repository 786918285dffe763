"""Fuzzing, the short bounded run (issue 17): every loader of a user-supplied file gets structure-
aware mutations of valid seed files (tests/fuzz_strategies.py, tests/fuzz_targets.py) and must
answer with a QuantwiseError, never another exception, a hang or a large allocation.

About 2,100 examples in all, derandomized (the same cases on every run, no example database),
so a failure here reproduces on any machine. scripts/fuzz.py runs the same targets for minutes
with random seeds.
"""

import resource

import pytest
from hypothesis import HealthCheck, given, settings

from fuzz_targets import TARGETS, run_case

RSS_GROWTH_MIB = 400  # far below any 2**30-byte allocation a header could ask for


def _short(target):
    @settings(max_examples=target.examples, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck), print_blob=False)
    @given(target.strategy())
    def run(files):
        run_case(target, files)
    return run


@pytest.mark.parametrize("name", list(TARGETS))
def test_fuzz(name):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    _short(TARGETS[name])()
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown < RSS_GROWTH_MIB, f"{name}: peak RSS grew {grown:.0f} MiB over small files"


def test_enough_examples():
    assert sum(t.examples for t in TARGETS.values()) >= 2000


# -- the findings of the fuzzers, one fixed example each (fast, named) ----------------------------
def _npy(tmp_path, array, header_edit=None):
    import io

    import numpy as np

    buf = io.BytesIO()
    np.save(buf, array)
    data = buf.getvalue()
    if header_edit:
        data = data.replace(*header_edit)
    (tmp_path / "d").mkdir(exist_ok=True)
    (tmp_path / "d" / "x.npy").write_bytes(data)
    return str(tmp_path / "d")


def test_npy_header_claiming_terabytes_is_refused_before_allocating(tmp_path):
    import numpy as np

    from quantwise.data import load_calibration_data
    from quantwise.errors import DataLoadError

    spec = _npy(tmp_path, np.zeros(3, "<f4"), (b"'shape': (3,), }", b"'shape': (2**40,)}"))
    with pytest.raises(DataLoadError):
        load_calibration_data(spec)
    big = _npy(tmp_path, np.zeros(3, "<f4"), (b"(3,)", b"(9999999999,)"))
    with pytest.raises(DataLoadError, match="claims"):
        load_calibration_data(big)


def test_npy_big_endian_and_long_double_load(tmp_path):
    import numpy as np

    from quantwise.data import load_calibration_data

    for dtype in (">f4", np.longdouble):
        batch = load_calibration_data(_npy(tmp_path, np.arange(6, dtype=dtype).reshape(2, 3)))[0]
        assert batch.tolist() == [[0, 1, 2], [3, 4, 5]]


def test_safetensors_header_errors_are_checkpoint_errors(tmp_path):
    import json
    import struct

    from quantwise.errors import CheckpointError
    from quantwise.formats.shards import ShardedCheckpoint

    header = json.dumps({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
    good = struct.pack("<Q", len(header)) + header + b"\0" * 4
    for data, match in [(struct.pack("<Q", 2 ** 60) + header, "claims"),
                        (good + b"junk", "trailing"),
                        (struct.pack("<Q", 200_000) + b"[" * 200_000, "JSON"),
                        (good.replace(b'"F32"', b'"F99"'), "malformed")]:
        (tmp_path / "model.safetensors").write_bytes(data)
        with pytest.raises(CheckpointError, match=match):
            ShardedCheckpoint.open(tmp_path)


def test_config_file_errors_are_config_errors(tmp_path):
    from quantwise.config import Config
    from quantwise.errors import ConfigError

    for text in ["1: 2\nname: x\n", "rules: 3\n", "exclude: [[a]]\n", "[" * 5000,
                 "default: {weight: {granularity: {type: per_group, size: a}}}\n",
                 "default: {weight: {granularity: {type: [x]}}}\n", "rules: [{pattern: [a]}]\n",
                 "default: {dynamic: maybe}\n", "preset: [w8a8]\n"]:
        (tmp_path / "c.yaml").write_text(text)
        with pytest.raises(ConfigError):
            Config.load(tmp_path / "c.yaml")


def test_onnx_external_offset_that_is_no_integer(tmp_path):
    import fuzz_seeds
    import onnx

    from quantwise.errors import CheckpointError
    from quantwise.export.onnx_file import open_onnx

    model = onnx.load_from_string(fuzz_seeds.onnx_models()["external"])
    for entry in model.graph.initializer[0].external_data:
        if entry.key == "offset":
            entry.value = "1e3"
    (tmp_path / "weights.bin").write_bytes(fuzz_seeds.ONNX_WEIGHTS())
    (tmp_path / "m.onnx").write_bytes(model.SerializeToString())
    with pytest.raises(CheckpointError, match="malformed external data"):
        open_onnx(tmp_path / "m.onnx")
