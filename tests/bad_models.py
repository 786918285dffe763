"""Small models for tests/test_bad_inputs.py, reachable from the command line as
`bad_models:NAME` (tests put this folder on sys.path). Each one carries one awkward property."""

import time

import torch
from torch import nn


def _seeded() -> None:
    torch.manual_seed(0)


def mlp() -> nn.Module:
    """Inputs [B, 16]."""
    _seeded()
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))


def zero_mlp() -> nn.Module:
    """All-zero weights and biases (case 11)."""
    model = mlp()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    return model


def denormal_mlp() -> nn.Module:
    """First layer's weights 1e-40, subnormal in float32 (case 14)."""
    model = mlp()
    with torch.no_grad():
        model[0].weight.fill_(1e-40)
    return model


class Unreached(nn.Module):
    """`spare` is a Linear no input ever reaches (case 15)."""

    def __init__(self) -> None:
        super().__init__()
        _seeded()
        self.fc = nn.Linear(16, 4)
        self.spare = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) if x.shape[-1] == 16 else self.spare(x)


def unreached() -> nn.Module:
    return Unreached()


class TiedLM(nn.Module):
    """Embedding and head sharing one weight (case 16); inputs: token ids [B, T] below 64."""

    def __init__(self) -> None:
        super().__init__()
        _seeded()
        self.embed = nn.Embedding(64, 32)
        self.mix = nn.Linear(32, 32)
        self.head = nn.Linear(32, 64, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.mix(self.embed(ids))))


def tied_lm() -> nn.Module:
    return TiedLM()


class TrainModeCNN(nn.Module):
    """Conv + BatchNorm + Dropout, handed over in train mode (case 17); inputs [B, 3, 8, 8]."""

    def __init__(self) -> None:
        super().__init__()
        _seeded()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop(torch.relu(self.bn(self.conv(x))))
        return self.fc(x.mean(dim=(2, 3)))


def train_mode_cnn() -> nn.Module:
    model = TrainModeCNN().train()
    with torch.no_grad():  # non-trivial running statistics, to see that they do not move
        model.bn.running_mean.uniform_(-1, 1)
        model.bn.running_var.uniform_(0.5, 2)
    return model


class GroupedConvs(nn.Module):
    """Grouped, depthwise and transposed convolutions (case 18); inputs [B, 4, 8, 8]."""

    def __init__(self) -> None:
        super().__init__()
        _seeded()
        self.grouped = nn.Conv2d(4, 8, 3, padding=1, groups=2)
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.up = nn.ConvTranspose2d(8, 6, 2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(torch.relu(self.depthwise(torch.relu(self.grouped(x)))))


def grouped_convs() -> nn.Module:
    return GroupedConvs()


class WithLSTM(nn.Module):
    """An LSTM, which quantwise does not quantize, before a Linear (case 24); inputs [B, T, 16]."""

    def __init__(self) -> None:
        super().__init__()
        _seeded()
        self.rnn = nn.LSTM(16, 16, batch_first=True)
        self.fc = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.rnn(x)[0])


def with_lstm() -> nn.Module:
    return WithLSTM()


class SlowCNN(TrainModeCNN):
    """TrainModeCNN taking 50 ms a batch: calibration lasts long enough to be interrupted (case 22)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(0.05)
        return super().forward(x)


def slow_cnn() -> nn.Module:
    return SlowCNN().eval()
