"""Train the built-in DigitsCNN and write its committed weights (safetensors) and metadata (json).

Deterministic: fixed seeds, single-threaded-safe ops, fixed data split. Runs in well under two
minutes on a laptop CPU. Usage: python scripts/train_digits.py [--epochs 40] [--seed 0]
"""

from __future__ import annotations

import argparse
import datetime
import json
import time

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from quantwise.models.digits import WEIGHTS_DIR, WEIGHTS_FILE, DigitsCNN, digits_data


def shift_augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Shift each image by -1..1 pixels in x and y (zero fill): digits are not always centred."""
    padded = F.pad(x, (1, 1, 1, 1))
    out = torch.empty_like(x)
    offsets = torch.randint(0, 3, (x.shape[0], 2), generator=gen)
    for i, (dy, dx) in enumerate(offsets.tolist()):
        out[i] = padded[i, :, dy : dy + 8, dx : dx + 8]
    return out


@torch.no_grad()
def accuracy(model: DigitsCNN, x: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 accuracy of the model in eval mode."""
    model.eval()
    return (model(x).argmax(dim=1) == y).float().mean().item()


def train(epochs: int, seed: int, batch_size: int = 64, lr: float = 2e-3) -> tuple[DigitsCNN, float]:
    """Train from scratch on the train split; return the model (eval mode) and test accuracy."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x_train, y_train = digits_data("train")
    x_test, y_test = digits_data("test")
    model = DigitsCNN()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(x_train), generator=gen)
        total = 0.0
        for start in range(0, len(perm), batch_size):
            idx = perm[start : start + batch_size]
            xb = shift_augment(x_train[idx], gen)
            loss = F.cross_entropy(model(xb), y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        sched.step()
        if (epoch + 1) % 10 == 0 or epoch == epochs - 1:
            print(f"epoch {epoch + 1:3d}  loss {total / len(x_train):.4f}  "
                  f"test acc {accuracy(model, x_test, y_test):.4f}")
    model.eval()
    return model, accuracy(model, x_test, y_test)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    t0 = time.perf_counter()
    model, test_acc = train(args.epochs, args.seed)
    print(f"test top-1: {test_acc:.4f}  ({time.perf_counter() - t0:.1f} s)")

    WEIGHTS_DIR.mkdir(parents=True, exist_ok=True)
    # safetensors needs contiguous tensors; clone so no storage is shared between entries.
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(state, str(WEIGHTS_FILE))
    meta = {
        "architecture": "DigitsCNN",
        "test_top1": round(test_acc, 6),
        "test_samples": len(digits_data("test")[1]),
        "epochs": args.epochs,
        "seed": args.seed,
        "torch_version": torch.__version__,
        "date": datetime.date.today().isoformat(),
    }
    (WEIGHTS_DIR / "digits_cnn.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"wrote {WEIGHTS_FILE} and digits_cnn.json")


if __name__ == "__main__":
    main()
