"""`quantwise qat MODEL`: a short quantization-aware fine-tune of a built-in model, resumable.

Recipe (../shared/docs/algorithms.md, NVIDIA's QAT guide): about 10% of the original training
schedule, the learning rate starting at ~1% of the original one and decaying by a half cosine,
BatchNorm folded for training and its statistics frozen late (at `freeze_bn_at` of the steps;
qat.py), distillation from the fp32 model. Per built-in model:

| model  | data                              | loss                                        |
|--------|-----------------------------------|---------------------------------------------|
| digits | the train split (labels)          | cross-entropy + KL(fp32 logits, T = 2)      |
| minilm | the calibration sentences         | 1 - cosine with the fp32 embeddings         |

Every epoch a checkpoint (model and optimizer tensors in safetensors, the rest in JSON: no
pickle) goes to OUT/qat-checkpoint; `--resume` continues from it bit for bit. At the end the
model is converted to real kernels, saved to OUT, and PTQ and QAT are measured side by side.
Both are swapped in whole (fileio.staged_folder): a kill at any point leaves the previous
checkpoint resumable; the job holds OUT's lock, so a second job on OUT fails at once.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from quantwise.config import Config
from quantwise.errors import CheckpointError, ConfigError
from quantwise.evaluate import evaluate
from quantwise.fileio import atomic_write_text, output_lock, staged_folder, write_failure
from quantwise.io import check_output_dir, save
from quantwise.job import eval_batches
from quantwise.models.registry import load_model
from quantwise.qat import distill_loss, freeze_bn, prepare_qat
from quantwise.state import get_state
from quantwise.workflow import quantize

CHECKPOINT = "qat-checkpoint"
RECIPES = {  # original lr (scripts/train_digits.py; MiniLM's pre-training), epochs, batch size,
    # when the BatchNorm statistics freeze (fraction of the steps; 0: folded from the start)
    "digits": {"lr": 2e-3 * 0.05, "epochs": 4, "batch_size": 64, "freeze_bn_at": 0.5},
    "minilm": {"lr": 2e-5, "epochs": 2, "batch_size": 32, "freeze_bn_at": 0.5},  # has no BatchNorm
}


@dataclass
class QatReport:
    model: str
    config: str
    out: Path
    metric: str
    fp32: float
    ptq: float
    qat: float
    epochs: int
    steps: int
    losses: list[float] = field(default_factory=list)  # mean loss per epoch
    resumed_from: int = 0
    bn_frozen_at_step: int | None = None  # BatchNorm statistics frozen (0: from the start); None: no BN

    def to_dict(self) -> dict[str, Any]:
        return {**{k: v for k, v in self.__dict__.items() if k != "out"}, "out": str(self.out)}

    def __str__(self) -> str:
        return (f"{self.model} {self.config}: {self.metric} fp32 {self.fp32:.4f}, PTQ {self.ptq:.4f}, "
                f"QAT {self.qat:.4f} after {self.epochs} epochs ({self.steps} steps; loss per epoch "
                f"{', '.join(f'{x:.4f}' for x in self.losses)}{self._bn()}); saved to {self.out}")

    def _bn(self) -> str:
        if self.bn_frozen_at_step is None:
            return ""
        return f"; BatchNorm statistics frozen at step {self.bn_frozen_at_step}"


def _training_data(name: str, batch_size: int) -> tuple[list[Any], Callable]:
    """Batches and the loss(student_out, teacher_out, batch) for a built-in model."""
    if name == "digits":
        from quantwise.models.digits import digits_data

        x, y = digits_data("train")
        batches = [(x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, len(x), batch_size)]

        def loss(out, teacher, batch):
            return F.cross_entropy(out, batch[1]) + distill_loss(out, teacher, "kl", temperature=2.0)
        return batches, loss
    if name == "minilm":
        from quantwise.data import corpus_split
        from quantwise.models.minilm import load_tokenizer, tokenize

        tok, sentences = load_tokenizer(), corpus_split("calib")
        batches = [tokenize(tok, sentences[i:i + batch_size])
                   for i in range(0, len(sentences), batch_size)]
        return batches, lambda out, teacher, batch: distill_loss(out, teacher, "cosine")
    raise ConfigError(f"`quantwise qat` has a training recipe for the built-in models "
                      f"({', '.join(RECIPES)}); for your own model call quantwise.prepare_qat in "
                      "your training loop")


def _inputs(batch: Any) -> Any:
    return batch[0] if isinstance(batch, tuple) else batch


def _call(model: nn.Module, inputs: Any) -> Any:
    return model(**inputs) if isinstance(inputs, dict) else model(inputs)


def run_qat_job(model_ref: str = "digits", config: str = "w4a4", out: str | Path | None = None,
                epochs: int | None = None, lr: float | None = None, batch_size: int | None = None,
                resume: bool = False, overwrite: bool = False, seed: int = 0, progress: bool = True,
                log: Callable[[str], None] = lambda _: None,
                limit_batches: int | None = None, freeze_bn_at: float | None = None) -> QatReport:
    """See the module docstring; `limit_batches` trains on the first N batches only (smoke tests)."""
    cfg = Config.resolve(config)
    recipe = {**RECIPES.get(model_ref, {}),
              **{k: v for k, v in (("epochs", epochs), ("lr", lr), ("batch_size", batch_size)) if v},
              **({"freeze_bn_at": freeze_bn_at} if freeze_bn_at is not None else {})}
    if not 0 <= recipe.get("freeze_bn_at", 0) <= 1:
        raise ConfigError(f"freeze_bn_at is a fraction of the training steps (0 to 1), "
                          f"not {recipe['freeze_bn_at']}")
    out = Path(out) if out else Path("quantwise-out") / f"{model_ref}-{cfg.name or 'custom'}-qat"
    if not resume:
        check_output_dir(out, overwrite)  # before the lock: its clear messages come first
    with output_lock(out):
        return _run(model_ref, cfg, recipe, out, resume, seed, progress, log, limit_batches)


def _run(model_ref: str, cfg: Config, recipe: dict[str, Any], out: Path, resume: bool, seed: int,
         progress: bool, log: Callable[[str], None], limit_batches: int | None) -> QatReport:
    ckpt = out / CHECKPOINT
    if resume:
        if not (ckpt / "state.json").is_file():
            raise CheckpointError(f"--resume: no checkpoint in {ckpt}; run without --resume first")
    model, info = load_model(model_ref)
    batches, loss_fn = _training_data(model_ref, recipe["batch_size"])
    batches = batches[:limit_batches] if limit_batches else batches
    calib = [_inputs(b) for b in batches[:8]]
    evals, metric = eval_batches(info, calib)
    log(f"PTQ baseline: quantizing {model_ref} with {cfg.name}")
    ptq = quantize(model, cfg, calib, progress=False)
    reference = model if metric == "cosine" else None
    fp32_score = evaluate(model, evals, metric, reference=reference).value
    ptq_score = evaluate(ptq, evals, metric, reference=reference).value
    del ptq

    torch.manual_seed(seed)
    total = recipe["epochs"] * len(batches)
    freeze_step = round(recipe["freeze_bn_at"] * total)
    qat = prepare_qat(model, cfg, calib, progress=False, source=model_ref,
                      freeze_bn_after=0 if freeze_step == 0 else None)
    has_bn = bool(get_state(qat).folded)
    if has_bn:
        log(f"BatchNorm statistics: frozen at step {freeze_step} of {total}"
            + (" (folded from the start)" if freeze_step == 0 else ""))
    opt = torch.optim.AdamW(qat.parameters(), lr=recipe["lr"], weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.5 * (1 + math.cos(math.pi * t / total)))
    start, losses = 0, []
    if resume:
        start, losses = _load_checkpoint(ckpt, qat, opt, sched)
        log(f"resumed from epoch {start}")
    gen = torch.Generator().manual_seed(seed)
    for epoch in range(recipe["epochs"]):
        order = torch.randperm(len(batches), generator=gen)  # drawn every epoch: resume-exact
        if epoch < start:
            continue
        qat.train()
        for m in qat.modules():  # distillation targets a dropout-free teacher: no dropout noise
            if isinstance(m, nn.Dropout):
                m.eval()
        running = 0.0
        bar = tqdm(order.tolist(), desc=f"QAT epoch {epoch + 1}/{recipe['epochs']}",
                   disable=not progress, unit="batch")
        for k, i in enumerate(bar):
            if epoch * len(batches) + k == freeze_step and freeze_step > 0 and freeze_bn(qat):
                with tqdm.external_write_mode():  # a line of its own, not inside the bar
                    log(f"step {freeze_step}: BatchNorm statistics frozen")
            batch = batches[i]
            with torch.no_grad():
                teacher = _call(model, _inputs(batch))
            loss = loss_fn(_call(qat, _inputs(batch)), teacher, batch)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            running += float(loss)
            bar.set_postfix(loss=f"{float(loss):.4f}")
        losses.append(running / len(batches))
        _save_checkpoint(ckpt, qat, opt, sched, epoch + 1, losses)
    qat.eval()
    from quantwise.workflow import convert

    qmodel = convert(qat)
    qat_score = evaluate(qmodel, evals, metric, reference=reference).value
    with staged_folder(out) as staging:  # the model and its last checkpoint replace OUT in one step
        save(qmodel, staging, overwrite=True)
        shutil.copytree(ckpt, staging / CHECKPOINT)
    return QatReport(model_ref, cfg.name or "custom", out, metric, fp32_score, ptq_score, qat_score,
                     recipe["epochs"], total, losses, start, freeze_step if has_bn else None)


def _save_checkpoint(folder: Path, model: nn.Module, opt: torch.optim.Optimizer, sched: Any,
                     epoch: int, losses: list[float]) -> None:
    """model + optimizer tensors (safetensors) and the rest (JSON), staged then swapped in."""
    try:
        with staged_folder(folder) as tmp:
            _write_checkpoint(tmp, model, opt, sched, epoch, losses)
    except (OSError, safetensors.SafetensorError) as exc:  # a full disk: the last one stays
        raise write_failure(exc, folder) from exc


def _write_checkpoint(tmp: Path, model: nn.Module, opt: torch.optim.Optimizer, sched: Any,
                      epoch: int, losses: list[float]) -> None:
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    safetensors.torch.save_file(state, str(tmp / "model.safetensors"))
    opt_state = opt.state_dict()
    tensors, plain = {}, {}
    for index, entry in opt_state["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{key}"] = value.contiguous()
            else:
                plain[f"{index}.{key}"] = value
    safetensors.torch.save_file(tensors, str(tmp / "optimizer.safetensors"))
    atomic_write_text(tmp / "state.json", json.dumps({
        "epoch": epoch, "losses": losses, "optimizer_plain": plain,
        "param_groups": opt_state["param_groups"], "scheduler": sched.state_dict()}, default=str))


def _load_checkpoint(folder: Path, model: nn.Module, opt: torch.optim.Optimizer, sched: Any
                     ) -> tuple[int, list[float]]:
    try:
        meta = json.loads((folder / "state.json").read_text())
        model.load_state_dict(safetensors.torch.load_file(str(folder / "model.safetensors")))
        tensors = safetensors.torch.load_file(str(folder / "optimizer.safetensors"))
    except (OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"cannot resume from {folder}: {exc}") from None
    state: dict[int, dict[str, Any]] = {}
    for key, value in list(tensors.items()) + list(meta["optimizer_plain"].items()):
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    scheduler = meta["scheduler"]
    scheduler.pop("lr_lambdas", None)
    sched.load_state_dict({**sched.state_dict(), **scheduler})
    return int(meta["epoch"]), list(meta["losses"])
