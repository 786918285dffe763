"""Shared fixtures: small real models and their data, built once per session."""

import os
import tempfile

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# the kernel probe's cache (kernels/probe.py): fresh per test session, never the user's
os.environ.setdefault("QUANTWISE_CACHE_DIR", tempfile.mkdtemp(prefix="quantwise-test-cache-"))
torch.manual_seed(0)


@pytest.fixture(scope="session")
def digits():
    """(float model, calibration batches, test images, test labels) of the built-in classifier."""
    from quantwise.models.digits import (
        digits_calib_batches,
        digits_data,
        load_digits_model,
    )

    images, labels = digits_data("test")
    return load_digits_model(), list(digits_calib_batches(32)), images, labels


class TinyNet(torch.nn.Module):
    """Linear, Conv, BatchNorm, LayerNorm: every kind of layer the workflow must handle."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(8)
        self.fc1 = torch.nn.Linear(8 * 4 * 4, 32)
        self.norm = torch.nn.LayerNorm(32)
        self.fc2 = torch.nn.Linear(32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.conv(x)))
        x = torch.nn.functional.adaptive_avg_pool2d(x, 4).flatten(1)
        return self.fc2(self.norm(torch.relu(self.fc1(x))))


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    model = TinyNet().eval()
    data = [torch.randn(4, 3, 8, 8) for _ in range(6)]
    return model, data


@pytest.fixture(scope="module")
def one_thread():
    # These tensors are too small to gain from intra-op threads, and on a shared 2-core machine
    # OpenMP threads waiting for a busy core made this file 5x slower; restored afterwards.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

