"""Linear(2, 1) on features [x^2, x], as in the PyTorch checkpoint tutorial."""

from __future__ import annotations

import torch
from torch import nn


class QuadraticModel(nn.Module):
    def __init__(self, in_features: int = 2) -> None:
        super().__init__()
        # The tutorial's name (`layer`), so its checkpoint-N.pt and model_state_dict.pt load.
        self.layer = nn.Linear(in_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)
