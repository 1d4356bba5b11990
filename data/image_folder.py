"""A user's folder of class subfolders (torchvision ImageFolder), resized and normalised."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import Subset

from data.base import DataModule, seeded_split
from data.images import IMAGE_SUFFIXES, image_transform, load_images
from engine.errors import UserError


class ImageFolderData(DataModule):
    task = "classification"

    def __init__(self, root: str, val_fraction: float = 0.1, test_fraction: float = 0.1,
                 seed: int = 0, batch_size: int = 32, num_workers: int = 2,
                 pin_memory: bool | str = "auto", in_channels: int = 3, image_size: int = 32,
                 num_classes: int | None = None, mean: list[float] | None = None,
                 std: list[float] | None = None) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers,
                         pin_memory=pin_memory, seed=seed)
        self.root = Path(root)
        self.val_fraction, self.test_fraction = val_fraction, test_fraction
        self.num_classes = num_classes
        self.transform = image_transform(image_size, in_channels, mean, std)

    def setup(self) -> None:
        from torchvision.datasets import ImageFolder

        if not self.root.is_dir():
            raise UserError(f"data.root={self.root}: folder not found (expected "
                            f"{self.root}/<class_name>/<image files>)")
        empty = [d.name for d in sorted(self.root.iterdir()) if d.is_dir() and not any(
            f.suffix.lower() in IMAGE_SUFFIXES for f in d.iterdir())]
        if empty:
            raise UserError(f"data.root={self.root}: class folder(s) {empty} have no images")
        try:
            full = ImageFolder(str(self.root), transform=self.transform)
        except (FileNotFoundError, OSError) as err:
            raise UserError(f"data.root={self.root}: {err}") from None
        if self.num_classes is not None and self.num_classes != len(full.classes):
            raise UserError(f"data.num_classes={self.num_classes} but {self.root} has "
                            f"{len(full.classes)} class folders {full.classes}")
        self.num_classes = len(full.classes)
        self.classes = full.classes
        train_idx, val_idx, test_idx = seeded_split(
            len(full), [1 - self.val_fraction - self.test_fraction, self.val_fraction,
                        self.test_fraction], self.seed)
        self._splits = {name: Subset(full, idx.tolist()) for name, idx in
                        (("train", train_idx), ("val", val_idx), ("test", test_idx))}

    def predict_inputs(self, path: Path) -> tuple[list[str], torch.Tensor]:
        return load_images(path, self.transform)
