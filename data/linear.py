"""Synthetic straight line y = weight * x + bias, as in the PyTorch workflow tutorial."""

from __future__ import annotations

from pathlib import Path

import torch

from data.base import DataModule, TensorSplit, seeded_split
from data.tabular import read_feature_csv
from engine.errors import UserError


class LinearData(DataModule):
    task = "regression"

    def __init__(self, weight: float = 0.7, bias: float = 0.3, start: float = 0.0,
                 end: float = 1.0, step: float = 0.02, train_fraction: float = 0.8,
                 val_fraction: float = 0.2, noise_std: float = 0.0, seed: int = 0,
                 batch_size: int = 8, num_features: int = 1, **loader: object) -> None:
        super().__init__(batch_size=batch_size, seed=seed, **loader)
        if num_features != 1:
            raise UserError(f"data.num_features={num_features!r}: data=linear has one feature "
                            f"(x); keep data.num_features=1")
        self.weight, self.bias, self.noise_std = weight, bias, noise_std
        self.start, self.end, self.step = start, end, step
        self.train_fraction, self.val_fraction = train_fraction, val_fraction
        self.num_features = num_features

    def setup(self) -> None:
        x = torch.arange(self.start, self.end, self.step).unsqueeze(1)
        y = self.weight * x + self.bias
        if self.noise_std:
            gen = torch.Generator().manual_seed(self.seed)
            y = y + self.noise_std * torch.randn(y.shape, generator=gen)
        cut = int(self.train_fraction * len(x))  # the tutorial's ordered 80/20 split
        # Validation (which picks best.pt) is carved out of the training part, at random, so
        # the test part stays unseen by every choice the run makes.
        train_idx, val_idx = seeded_split(cut, [1 - self.val_fraction, self.val_fraction],
                                          self.seed)
        self._splits = {"train": TensorSplit(x[train_idx], y[train_idx]),
                        "val": TensorSplit(x[val_idx], y[val_idx]),
                        "test": TensorSplit(x[cut:], y[cut:])}

    def predict_inputs(self, path: Path) -> tuple[list[str], torch.Tensor]:
        return read_feature_csv(path, ["x"])
