"""`quantwise export --format compressed-tensors | gguf`: the export read back by transformers
agrees with quantwise's own model (perplexity, logits); non-LM checkpoints are refused."""

from __future__ import annotations

import json

import pytest

import quantwise
from quantwise.cli import main
from quantwise.data import load_calibration_data
from quantwise.models.stdlib_lm import WEIGHTS_DIR, load_stdlib_lm

pytest.importorskip("gguf")
pytest.importorskip("compressed_tensors")
pytest.importorskip("accelerate")  # transformers' GGUF loader


@pytest.fixture(scope="module")
def w4(tmp_path_factory):
    calib = load_calibration_data("stdlib-code")[:2]
    model = quantwise.quantize(load_stdlib_lm(), "w4", calib, progress=False, source=str(WEIGHTS_DIR))
    return quantwise.save(model, tmp_path_factory.mktemp("w4") / "w4")


@pytest.mark.parametrize("args", [["--format", "gguf", "--qtype", "Q4_0"],
                                  ["--format", "compressed-tensors"]])
def test_export_is_read_back_by_transformers_within_the_gate(w4, tmp_path, capsys, args):
    out = tmp_path / ("m.gguf" if "gguf" in args else "ct")
    assert main(["export", str(w4), *args, "--out", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert out.exists() and report["out"] == str(out)
    # the same int4 codes on both sides: logits within 1e-2, perplexity within 0.5%
    assert report["logits_rel_err"] <= 1e-2
    assert abs(report["perplexity_change"]) <= 5e-3
    if "gguf" in args:
        assert report["rounded"] and not report["requantized"]  # codes kept, scales fp16


def test_requantized_gguf_says_so_and_what_it_costs(w4, tmp_path, capsys):
    out = tmp_path / "r.gguf"
    assert main(["export", str(w4), "--format", "gguf", "--qtype", "Q4_0", "--requantize",
                 "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "re-quantized to Q4_0" in text and "held-out perplexity" in text


def test_a_model_that_is_not_an_llm_is_refused(tmp_path, capsys):
    from quantwise.models.registry import load_model

    model, _ = load_model("digits")
    calib = load_calibration_data("digits")[:1]
    folder = quantwise.save(quantwise.quantize(model, "w8", calib, progress=False), tmp_path / "d")
    for fmt in ("gguf", "compressed-tensors"):
        assert main(["export", str(folder), "--format", fmt, "--out", str(tmp_path / fmt)]) == 2
        err = capsys.readouterr().err
        assert "quantwise: error" in err and not (tmp_path / fmt).exists()
