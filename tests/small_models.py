"""Small models shared by several test files (imported like calib_common)."""

import itertools

import torch


class MLP(torch.nn.Module):
    """Linear layers with ReLU between them: the small model the sensitivity and plan tests
    break one layer of on purpose."""

    def __init__(self, widths=(16, 64, 64, 64, 10)) -> None:
        super().__init__()
        self.fcs = torch.nn.ModuleList(torch.nn.Linear(a, b) for a, b in itertools.pairwise(widths))

    def forward(self, x):
        for fc in self.fcs[:-1]:
            x = torch.relu(fc(x))
        return self.fcs[-1](x)
