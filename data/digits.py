"""scikit-learn's bundled 8x8 handwritten digits: 1797 real images, 10 classes, offline."""

from __future__ import annotations

from pathlib import Path

import torch

from data.base import DataModule
from data.images import image_transform, load_images
from engine.batches import TensorSplit
from engine.errors import UserError


class DigitsData(DataModule):
    task = "classification"
    num_classes = 10

    def __init__(
        self,
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        seed: int = 0,
        batch_size: int = 32,
        in_channels: int = 1,
        image_size: int = 8,
        num_classes: int = 10,
        **loader: object,
    ) -> None:
        super().__init__(batch_size=batch_size, seed=seed, **loader)
        if (in_channels, image_size, num_classes) != (1, 8, 10):
            raise UserError(
                "data=digits is 1x8x8 images of 10 classes: keep data.in_channels=1,"
                " data.image_size=8, data.num_classes=10"
            )
        self.val_fraction, self.test_fraction = val_fraction, test_fraction

    def setup(self) -> None:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        digits = load_digits()
        # Pixels are 0..16; map to [-1, 1] like the 0.5/0.5 normalisation of image files.
        x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 8.0 - 1.0
        y = torch.tensor(digits.target, dtype=torch.long)
        index = list(range(len(y)))
        holdout = self.val_fraction + self.test_fraction
        train_idx, rest = train_test_split(index, test_size=holdout, stratify=digits.target, random_state=self.seed)
        val_idx, test_idx = train_test_split(
            rest, test_size=self.test_fraction / holdout, stratify=digits.target[rest], random_state=self.seed
        )
        self._splits = {
            name: TensorSplit(x[idx], y[idx])
            for name, idx in (("train", train_idx), ("val", val_idx), ("test", test_idx))
        }

    def predict_inputs(self, path: Path, invert: bool = False) -> tuple[list[str], torch.Tensor]:
        # The sklearn digits are light strokes on a dark background: black-on-white drawings
        # need invert=true (a note says so when most inputs look light); resized to 8x8 gray.
        return load_images(path, image_transform(8, 1), invert=invert, dark_background=True)
