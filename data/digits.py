"""scikit-learn's bundled 8x8 handwritten digits: 1797 real images, 10 classes, offline.

`image_size` and `in_channels` give the images the shape a model wants: resized once at setup
(antialiased bilinear), the grey channel repeated into 3; e.g. data.image_size=28 for a
model written for 1x28x28 MNIST. The default 1x8x8 is the images as they are."""

from __future__ import annotations

from pathlib import Path

import torch

from data.base import DataModule
from data.images import image_transform, load_images
from engine.batches import TensorSplit
from engine.errors import UserError

SIZES = (8, 256)  # data.image_size: the original 8 px up to 256 (1797 x 3 x 256 x 256 floats: 1.4 GB)


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
        low, high = SIZES
        if not _is_int(image_size) or not low <= image_size <= high:
            raise UserError(
                f"data.image_size={image_size!r}: expected an integer from {low} to {high} for data=digits"
                f" (data.image_size={low}: the original {low}x{low} images)"
            )
        if not _is_int(in_channels) or in_channels not in (1, 3):
            raise UserError(
                f"data.in_channels={in_channels!r}: expected 1 (grey) or 3 (the grey channel repeated) for data=digits"
            )
        if not _is_int(num_classes) or num_classes != 10:
            raise UserError(f"data.num_classes={num_classes!r}: data=digits has 10 classes; expected 10")
        self.val_fraction, self.test_fraction = val_fraction, test_fraction
        self.image_size, self.in_channels = image_size, in_channels

    def setup(self) -> None:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        digits = load_digits()
        # Pixels are 0..16; map to [-1, 1] like the 0.5/0.5 normalisation of image files.
        x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 8.0 - 1.0
        if self.image_size != x.shape[-1]:  # once here, not per batch; 8 keeps the pixels as they are
            from torchvision.transforms.v2.functional import resize

            x = resize(x, [self.image_size, self.image_size], antialias=True)
        if self.in_channels == 3:
            x = x.repeat(1, 3, 1, 1)
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
        # need invert=true (a note says so when most inputs look light); resized to the
        # training images' size and channels.
        transform = image_transform(self.image_size, self.in_channels)
        return load_images(path, transform, invert=invert, dark_background=True)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
