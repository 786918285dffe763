import json
import subprocess
import sys

import pytest

from quantwise.cli import main


def test_default_job_quantizes_digits_and_reports(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["quantize", "--out", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["model"] == "digits" and report["config"] == "w8a8"
    assert report["before"]["metric"] == "top1"
    assert report["after"]["quality"] >= report["before"]["quality"] - 0.005
    assert report["size_ratio"] <= 0.27
    assert report["before"]["latency_ms"] > 0 and report["after"]["latency_ms"] > 0
    assert report["layers"]["counts"]["quantized"] == 4
    assert (out / "model.safetensors").is_file()


def test_table_output_and_method(tmp_path, capsys):
    out = tmp_path / "kl"
    assert main(["quantize", "digits", "--method", "entropy", "--out", str(out), "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "entropy" in text and "size on disk" in text
    assert "x faster" in text or "x slower" in text


def test_missing_model_path_exit_2_writes_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["quantize", str(tmp_path / "no" / "such-model"), "--out", str(out)])
    assert code == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "built-in" in err
    assert not out.exists()


def test_empty_dir_and_bad_config_exit_2(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["quantize", str(empty), "--out", str(tmp_path / "o")]) == 2
    assert "empty directory" in capsys.readouterr().err
    cfg = tmp_path / "c.yaml"
    cfg.write_text("preset: w8a8\ndefault:\n  weight: {format: int3}\n")
    assert main(["quantize", "--config", str(cfg), "--out", str(tmp_path / "o")]) == 2
    assert "valid formats" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_existing_output_refused_before_work(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    assert main(["quantize", "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "precious"


def test_help_teaches_by_example():
    result = subprocess.run([sys.executable, "-m", "quantwise.cli", "quantize", "--help"],
                            capture_output=True, text=True, check=True)
    assert "examples:" in result.stdout and "quantwise quantize minilm" in result.stdout
    bad = subprocess.run([sys.executable, "-m", "quantwise.cli", "quantize", "--method", "kl"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "invalid choice" in bad.stderr


@pytest.mark.parametrize("calib", ["missing.txt"])
def test_missing_calibration_data_exit_2(tmp_path, capsys, calib):
    assert main(["quantize", "--calib", str(tmp_path / calib), "--out", str(tmp_path / "o")]) == 2
    assert "not found" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_ctrl_c_during_calibration_exits_130_and_writes_nothing(tmp_path, capsys, monkeypatch):
    import quantwise.workflow

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(quantwise.workflow, "run_model", interrupted)
    out = tmp_path / "out"
    assert main(["quantize", "--out", str(out), "--quiet"]) == 130
    assert "interrupted" in capsys.readouterr().err
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_ctrl_c_after_the_save_names_what_was_finished(tmp_path, capsys, monkeypatch):
    """Interrupted while the HTML report is written: the checkpoint is already whole on disk, so
    the message must not say that nothing was written."""
    import quantwise.report

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(quantwise.report, "write_report", interrupted)
    out, page = tmp_path / "out", tmp_path / "r.html"
    assert main(["quantize", "--out", str(out), "--report", str(page), "--quiet"]) == 130
    err = capsys.readouterr().err
    assert f"finished before it: {out}" in err and "nothing else was written" in err, err
    assert (out / "quantwise.json").exists() and not page.exists()


def test_benchmark_a_saved_folder(tmp_path, capsys):
    out = tmp_path / "q"
    assert main(["quantize", "--out", str(out), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["benchmark", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["before"]["metric"] == "top1" and report["after"]["quality"] >= 0.99
    assert report["size_ratio"] <= 0.27 and report["layers"]["counts"]["quantized"] == 4


def test_benchmark_custom_model_needs_data_and_reports_cosine(tmp_path, capsys):
    import numpy as np

    out = tmp_path / "q"
    data = tmp_path / "inputs"
    data.mkdir()
    for i in range(3):
        np.save(data / f"{i}.npy", np.random.rand(4, 16).astype("float32"))
    ref = "benchmark_models:small_mlp"
    assert main(["quantize", ref, "--calib", str(data), "--out", str(out), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["benchmark", str(out)]) == 2  # the recorded source is code: never run unasked
    assert "does not run code a checkpoint names" in capsys.readouterr().err
    assert main(["benchmark", str(out), "--model", ref]) == 2
    assert "--data" in capsys.readouterr().err
    assert main(["benchmark", str(out), "--model", ref, "--data", str(data), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["before"]["metric"] == "cosine" and report["after"]["quality"] > 0.99


def test_benchmark_missing_folder_exit_2(tmp_path, capsys):
    assert main(["benchmark", str(tmp_path / "nothing")]) == 2
    assert "not a folder" in capsys.readouterr().err


def test_analyze_ranks_digits_layers_as_json(capsys):
    assert main(["analyze", "--json", "--top-k", "2"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [r["rank"] for r in report["rows"]] == [1, 2, 3, 4]
    assert {r["name"] for r in report["rows"]} == {"features.0", "features.3", "classifier.1",
                                                   "classifier.3"}
    assert report["evaluations"] == 4 and report["fp32_metric"] > 0.99  # fp32, all, 2 reverts
    assert all(r["best_calibrator"] in ("max", "percentile", "entropy", "mse") for r in report["rows"])


def test_analyze_table_and_bad_config(capsys):
    assert main(["analyze", "digits", "--quiet", "--top-k", "0"]) == 0
    text = capsys.readouterr().out
    assert "gain dB" in text and "kept float, not analysed" in text
    assert main(["analyze", "--config", "no-such-preset"]) == 2
    assert "no-such-preset" in capsys.readouterr().err


def test_quantize_with_an_accuracy_budget_plans_the_formats(tmp_path, capsys):
    out = tmp_path / "plan"
    assert main(["quantize", "digits", "--max-drop", "0.005", "--out", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    plan = report["plan"]
    assert plan["met"] and plan["objective"] == "size"
    assert report["after"]["quality"] >= report["before"]["quality"] - 0.005
    assert report["size_ratio"] <= 0.15  # 4-bit weights where the budget allows
    assert set(plan["layers"]) == {"features.0", "features.3", "classifier.1", "classifier.3"}
    assert (out / "model.safetensors").is_file()


def test_bad_max_drop_exit_2(tmp_path, capsys):
    assert main(["quantize", "digits", "--max-drop", "lots", "--out", str(tmp_path / "x")]) == 2
    assert "max_drop" in capsys.readouterr().err


def test_export_writes_checks_and_reports(tmp_path, capsys):
    out = tmp_path / "digits-w8a8"
    assert main(["quantize", "--out", str(out), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["export", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    onnx_path = tmp_path / "digits-w8a8.onnx"
    assert report["path"] == str(onnx_path) and onnx_path.exists()
    assert report["fusion"]["conv_int8"] == report["fusion"]["conv_total"] == 2
    assert report["parity"]["ok"] and report["parity"]["top1_agreement"] >= 0.995
    # a second export refuses to replace the file; a strict threshold fails with exit code 1
    assert main(["export", str(out)]) == 2
    assert main(["export", str(out), "--overwrite", "--max-rel-err", "1e-9", "--no-per-layer"]) == 1
    assert "FAIL" in capsys.readouterr().out
    # uint8 weights (exact where ONNX Runtime's u8 x s8 kernels saturate): same fusion and parity
    assert main(["export", str(out), "--overwrite", "--weight-dtype", "uint8", "--json"]) == 0
    unsigned = json.loads(capsys.readouterr().out)
    assert unsigned["weight_dtype"] == "uint8" and "uint8" in unsigned["runtime_note"]
    assert unsigned["fusion"]["conv_int8"] == 2 and unsigned["parity"]["ok"]
