"""A model reachable as `benchmark_models:small_mlp` (tests put this folder on sys.path)."""

import torch


def small_mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
