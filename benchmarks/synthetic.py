"""Random in-memory images for the benchmark: VGG16 at 32x32 without a CIFAR-10 download."""

from __future__ import annotations

import torch

from data.base import DataModule
from engine.batches import TensorSplit


class RandomImages(DataModule):
    """`train_size` + `val_size` seeded random images with random labels (only speed matters)."""

    task = "classification"

    def __init__(
        self,
        train_size: int = 128,
        val_size: int = 32,
        image_size: int = 32,
        in_channels: int = 3,
        num_classes: int = 10,
        seed: int = 0,
        batch_size: int = 32,
        **loader: object,
    ) -> None:
        super().__init__(batch_size=batch_size, seed=seed, **loader)
        self.train_size, self.val_size = train_size, val_size
        self.image_size, self.in_channels, self.num_classes = image_size, in_channels, num_classes

    def setup(self) -> None:
        gen = torch.Generator().manual_seed(self.seed)
        n = self.train_size + self.val_size
        x = torch.randn(n, self.in_channels, self.image_size, self.image_size, generator=gen)
        y = torch.randint(0, self.num_classes, (n,), generator=gen)
        cut = self.train_size
        val = TensorSplit(x[cut:], y[cut:])
        self._splits = {"train": TensorSplit(x[:cut], y[:cut]), "val": val, "test": val}
