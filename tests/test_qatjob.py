"""`quantwise qat`: a short QAT fine-tune of the digits model that saves a normal checkpoint,
and resumes bit for bit after an interruption."""

import json

import pytest
import torch

import quantwise
from quantwise import qatjob
from quantwise.cli import main
from quantwise.models.digits import digits_data


def test_cli_qat_reports_and_saves_a_loadable_model(tmp_path, capsys):
    out = tmp_path / "d"
    assert main(["qat", "digits", "--epochs", "1", "--out", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["metric"] == "top1" and report["steps"] > 0 and len(report["losses"]) == 1
    assert report["qat"] >= report["fp32"] - 0.02
    assert report["bn_frozen_at_step"] == round(report["steps"] * qatjob.RECIPES["digits"]["freeze_bn_at"])
    qmodel = quantwise.load(out)
    x, y = digits_data("test")
    with torch.no_grad():
        assert float((qmodel(x).argmax(1) == y).float().mean()) == pytest.approx(report["qat"])
    assert (out / qatjob.CHECKPOINT / "optimizer.safetensors").is_file()
    assert main(["qat", "digits", "--epochs", "1", "--out", str(out)]) == 2  # exists: refused


def test_resume_continues_exactly(tmp_path, monkeypatch):
    # 12 steps; BatchNorm statistics frozen at step 3, inside the epoch before the interruption
    run = dict(epochs=2, progress=False, limit_batches=6, freeze_bn_at=0.25)
    full = qatjob.run_qat_job("digits", "w4a4", tmp_path / "full", **run)

    real_save = qatjob._save_checkpoint

    def save_then_stop(folder, model, opt, sched, epoch, losses):
        real_save(folder, model, opt, sched, epoch, losses)
        if epoch == 1:
            raise KeyboardInterrupt  # the user pressed Ctrl-C after the first epoch

    monkeypatch.setattr(qatjob, "_save_checkpoint", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        qatjob.run_qat_job("digits", "w4a4", tmp_path / "cut", **run)
    monkeypatch.setattr(qatjob, "_save_checkpoint", real_save)
    resumed = qatjob.run_qat_job("digits", "w4a4", tmp_path / "cut", resume=True, **run)
    assert resumed.resumed_from == 1
    assert full.bn_frozen_at_step == resumed.bn_frozen_at_step == 3
    assert resumed.losses == full.losses and resumed.qat == full.qat
    x, _ = digits_data("test")
    a, b = quantwise.load(full.out), quantwise.load(resumed.out)
    with torch.no_grad():
        assert torch.equal(a(x), b(x))
