"""Synthetic straight line y = weight * x + bias, as in the PyTorch workflow tutorial."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from data.base import DataModule, seeded_split
from data.tabular import read_feature_csv
from engine.batches import TensorSplit
from engine.errors import UserError


class LinearData(DataModule):
    task = "regression"

    def __init__(
        self,
        weight: float = 0.7,
        bias: float = 0.3,
        start: float = 0.0,
        end: float = 1.0,
        step: float = 0.02,
        train_fraction: float = 0.8,
        val_fraction: float = 0.2,
        noise_std: float = 0.0,
        seed: int = 0,
        batch_size: int = 8,
        num_features: int = 1,
        **loader: object,
    ) -> None:
        super().__init__(batch_size=batch_size, seed=seed, **loader)
        if num_features != 1:
            raise UserError(
                f"data.num_features={num_features!r}: data=linear has one feature (x); keep data.num_features=1"
            )
        _check_range(start, end, step, weight, bias, noise_std)
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
        train_idx, val_idx = seeded_split(cut, [1 - self.val_fraction, self.val_fraction], self.seed)
        self._splits = {
            "train": TensorSplit(x[train_idx], y[train_idx]),
            "val": TensorSplit(x[val_idx], y[val_idx]),
            "test": TensorSplit(x[cut:], y[cut:]),
        }

    def predict_inputs(self, path: Path) -> tuple[dict[str, list[str]], torch.Tensor]:
        return read_feature_csv(path, ["x"])


MAX_SAMPLES = 10_000_000  # x and y as float32: 80 MB; data.step=1e-9 would ask for 1e9


def _check_range(start: float, end: float, step: float, weight: float, bias: float, noise_std: float) -> None:
    """arange(start, end, step) must be a finite, increasing range of at most MAX_SAMPLES
    points: checked before any tensor is made."""
    values = {"start": start, "end": end, "step": step, "weight": weight, "bias": bias, "noise_std": noise_std}
    for key, value in values.items():
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not math.isfinite(value)
            or abs(value) > 1e30
        ):
            raise UserError(f"data.{key}={value!r}: expected a finite number")
    if not step > 0:
        raise UserError(f"data.step={step!r}: expected a number > 0")
    if not end > start:
        raise UserError(f"data.start={start!r}, data.end={end!r}: expected start < end")
    if noise_std < 0:
        raise UserError(f"data.noise_std={noise_std!r}: expected a number >= 0")
    samples = math.ceil((end - start) / step)
    if samples > MAX_SAMPLES:
        raise UserError(
            f"data.start={start}, data.end={end}, data.step={step}: {samples:.3g} "
            f"samples; a synthetic data set may have at most {MAX_SAMPLES:,}"
        )
