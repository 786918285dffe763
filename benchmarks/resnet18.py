"""ResNet-18 in plain torch.nn (torchvision is not usable here): the standard BasicBlock network.

Random weights are enough for a speed benchmark. Two initialisations are offered because the
quantization *error* depends strongly on which one is used:
- "default" (what the benchmark uses unless told otherwise): PyTorch's own layer defaults with
  seed 0 and BatchNorm left at mean 0 / var 1. This is the setup behind the anchor figures in
  docs/anchors.md (torch.ao FX static reproduces its relative error 0.019 exactly).
- "calibrated-bn": torchvision's Kaiming-normal init plus BatchNorm statistics estimated from
  random images, so activations are shaped more like a trained network's. It is harder: torch.ao
  FX static measures relative error ~0.056 and top-1 agreement ~0.84 on it.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class BasicBlock(nn.Module):
    """Two 3x3 convs with a residual connection; a 1x1 conv downsample when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                            nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet18(nn.Module):
    """conv7x7/2 - maxpool - 4 stages of 2 BasicBlocks (64, 128, 256, 512) - avgpool - fc."""

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        stages, cin = [], 64
        for i, cout in enumerate((64, 128, 256, 512)):
            stride = 1 if i == 0 else 2
            stages.append(nn.Sequential(BasicBlock(cin, cout, stride), BasicBlock(cout, cout)))
            cin = cout
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def random_images(n: int, seed: int) -> Tensor:
    """Seeded N(0, 1) images [n, 3, 224, 224]: what ImageNet-normalised pixels roughly look like."""
    return torch.randn(n, 3, 224, 224, generator=torch.Generator().manual_seed(seed))


INITS = ("default", "calibrated-bn")


@torch.no_grad()
def build_resnet18(seed: int = 0, init: str = "default", bn_batches: int = 2,
                   bn_batch_size: int = 8) -> ResNet18:
    """Seeded ResNet-18 in eval mode; `init` is one of INITS (see the module docstring)."""
    if init not in INITS:
        raise ValueError(f"unknown init {init!r}; choose from {', '.join(INITS)}")
    torch.manual_seed(seed)
    model = ResNet18()
    if init == "default":
        return model.eval()
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            m.momentum = None  # cumulative average over the estimation batches
            m.reset_running_stats()
    model.train()
    for i in range(bn_batches):  # seeds 1000+ never overlap the benchmark's input seeds
        model(random_images(bn_batch_size, seed=1000 + i))
    return model.eval()
