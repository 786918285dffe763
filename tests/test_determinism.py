"""The same command twice gives byte-identical checkpoints and ONNX files (issue 17): no
timestamp, no random state, no dict order that varies between runs."""

import hashlib
from pathlib import Path

import torch

import quantwise
from quantwise.cli import main

import hf_models


def _hashes(path: Path) -> dict[str, str]:
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return {str(p.relative_to(path) if path.is_dir() else p.name): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in files}


def test_quantize_and_export_twice_give_the_same_bytes(tmp_path, capsys):
    for run in ("a", "b"):
        assert main(["quantize", "digits", "--out", str(tmp_path / run), "--quiet"]) == 0
        assert main(["export", str(tmp_path / run), "--out", str(tmp_path / f"{run}.onnx"),
                     "--no-per-layer"]) == 0
    capsys.readouterr()
    assert _hashes(tmp_path / "a") == _hashes(tmp_path / "b")
    assert _hashes(tmp_path / "a.onnx")["a.onnx"] == _hashes(tmp_path / "b.onnx")["b.onnx"]


def test_model_level_methods_are_deterministic(tmp_path):
    """GPTQ (block-wise Hessians) and SmoothQuant (searched alphas): same inputs, same bytes."""
    inputs = hf_models.example_inputs("llama")
    for config in ("w4-gptq", "w8a8-smoothquant"):
        for run in ("a", "b"):
            qmodel = quantwise.quantize(hf_models.build("llama"), config, [inputs] * 2, progress=False)
            quantwise.save(qmodel, tmp_path / f"{config}-{run}")
        assert _hashes(tmp_path / f"{config}-a") == _hashes(tmp_path / f"{config}-b"), config
    torch.manual_seed(0)
