"""The PyTorch workflow tutorial's linear regression: y = x @ weights + bias."""

from __future__ import annotations

import torch
from torch import nn


class LinearRegressionModel(nn.Module):
    def __init__(self, in_features: int = 1) -> None:
        super().__init__()
        # Tutorial parameter names and shapes, so its state_dicts load here unchanged.
        self.weights = nn.Parameter(torch.randn(in_features))
        self.bias = nn.Parameter(torch.randn(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weights.unsqueeze(1) + self.bias
