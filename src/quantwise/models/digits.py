"""DigitsCNN: a small conv + batch-norm + linear classifier for scikit-learn's bundled digits.

The digits dataset (1797 grayscale 8x8 images, 10 classes) ships inside scikit-learn, so the
model, its data and its committed weights all work without any download.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from quantwise.errors import DataLoadError, ModelLoadError

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
WEIGHTS_FILE = WEIGHTS_DIR / "digits_cnn.safetensors"

SPLIT_SEED = 0
TEST_SIZE = 360
CALIB_SIZE = 256
SPLITS = ("train", "calib", "test")


class DigitsCNN(nn.Module):
    """Conv-BN-ReLU x2, max-pool, two linear layers; input float32 [B, 1, 8, 8] in [0, 1]."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.BatchNorm2d(64),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 8x8 -> 4x4
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(64 * 4 * 4, 128),
            nn.ReLU(),
            nn.Linear(128, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        """Return class logits [B, num_classes]."""
        return self.classifier(self.features(x))


def load_digits_model(weights: str | Path | None = None) -> DigitsCNN:
    """Build a DigitsCNN in eval mode with the committed (or given) safetensors weights."""
    from safetensors.torch import load_file

    path = Path(weights) if weights is not None else WEIGHTS_FILE
    if not path.is_file():
        raise ModelLoadError(
            f"digits weights not found at {path}; run `python scripts/train_digits.py` to create them"
        )
    model = DigitsCNN()
    # strict=True: a renamed layer or stale file must fail loudly, not leave random weights.
    model.load_state_dict(load_file(str(path)), strict=True)
    return model.eval()


@lru_cache(maxsize=1)
def _split_indices() -> dict[str, np.ndarray]:
    """Fixed, seeded, stratified indices: test is held out; calib is a subset of train."""
    from sklearn.model_selection import train_test_split

    labels = _raw_digits()[1]
    idx = np.arange(len(labels))
    train, test = train_test_split(idx, test_size=TEST_SIZE, random_state=SPLIT_SEED, stratify=labels)
    # Calibration data comes from the training distribution, never from the test set.
    _, calib = train_test_split(
        train, test_size=CALIB_SIZE, random_state=SPLIT_SEED, stratify=labels[train]
    )
    return {"train": np.sort(train), "calib": np.sort(calib), "test": np.sort(test)}


@lru_cache(maxsize=1)
def _raw_digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return bunch.images.astype(np.float32), bunch.target.astype(np.int64)


def digits_data(split: str) -> tuple[Tensor, Tensor]:
    """Return (images float32 [N,1,8,8] scaled to [0,1], labels int64 [N]) for train/calib/test.

    Sizes: test 360, train 1437, calib 256 (a stratified subset of train).
    """
    if split not in SPLITS:
        raise DataLoadError(f"unknown digits split {split!r}; use one of {', '.join(SPLITS)}")
    images, labels = _raw_digits()
    sel = _split_indices()[split]
    x = torch.from_numpy(images[sel] / 16.0).unsqueeze(1).float()  # pixels are 0..16
    y = torch.from_numpy(labels[sel])
    return x, y


def digits_calib_batches(batch_size: int = 32) -> Iterator[Tensor]:
    """Yield image batches [<=batch_size, 1, 8, 8] from the calib split, in a fixed order."""
    if batch_size < 1:
        raise DataLoadError(f"batch_size must be >= 1, got {batch_size}")
    x, _ = digits_data("calib")
    for start in range(0, len(x), batch_size):
        yield x[start : start + batch_size]
