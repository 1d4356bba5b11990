"""Linear(2, 1) on features [x^2, x], as in the PyTorch checkpoint tutorial."""

from __future__ import annotations

import torch
from torch import nn


class QuadraticModel(nn.Module):
    def __init__(self, in_features: int = 2) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)
