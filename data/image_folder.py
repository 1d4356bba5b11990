"""A user's folder of class subfolders (torchvision ImageFolder), resized and normalised:
root/<class_name>/<image files>, one level deep."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch
from torch.utils.data import Subset
from torchvision.datasets import ImageFolder

from data.base import DataModule, data_path, seeded_split
from data.images import IMAGE_SUFFIXES, check_decoded_size, image_transform, load_images, naming, read_image
from engine.errors import UserError


class ImageFolderData(DataModule):
    task = "classification"

    def __init__(
        self,
        root: str,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        seed: int = 0,
        batch_size: int = 32,
        num_workers: int = 2,
        pin_memory: bool | str = "auto",
        in_channels: int = 3,
        image_size: int = 32,
        num_classes: int | None = None,
        mean: list[float] | None = None,
        std: list[float] | None = None,
        augment: list | None = None,
    ) -> None:
        super().__init__(
            batch_size=batch_size, num_workers=num_workers, pin_memory=pin_memory, seed=seed, augment=augment
        )
        self.root = Path(root)
        self.val_fraction, self.test_fraction = val_fraction, test_fraction
        self.num_classes = num_classes
        self.transform = image_transform(image_size, in_channels, mean, std)

    def setup(self) -> None:
        data_path(self.root, "data.root")
        if not self.root.is_dir():
            raise UserError(
                f"data.root={self.root}: folder not found (expected {self.root}/<class_name>/<image files>)"
            )
        classes = [d for d in sorted(self.root.iterdir()) if d.is_dir()]  # as ImageFolder
        if not classes:
            raise UserError(
                f"data.root={self.root}: no class folders (expected {self.root}/<class_name>/<image files>)"
            )
        try:
            full = _ClassFolders(str(self.root), loader=partial(_load_image, self.transform))
        except OSError as err:
            raise UserError(f"data.root={self.root}: {str(err).splitlines()[0]}") from None
        found = set(full.targets)
        empty = [name for i, name in enumerate(full.classes) if i not in found]
        if empty:
            raise UserError(
                f"data.root={self.root}: class folder(s) {empty[:5]}"
                f"{' ...' if len(empty) > 5 else ''} have no images directly "
                f"inside ({', '.join(sorted(IMAGE_SUFFIXES))}; subfolders are "
                f"not read)"
            )
        # Every file's header, before training starts (a fraction of a millisecond each):
        # a text file named .png or an empty file fails here, not in the middle of epoch 3.
        for file, _ in full.samples:
            _check_header(Path(file))
        if self.num_classes is not None and self.num_classes != len(full.classes):
            raise UserError(
                f"data.num_classes={self.num_classes} but {self.root} has "
                f"{len(full.classes)} class folders {full.classes}"
            )
        self.num_classes = len(full.classes)
        self.classes = full.classes
        train_idx, val_idx, test_idx = seeded_split(
            len(full), [1 - self.val_fraction - self.test_fraction, self.val_fraction, self.test_fraction], self.seed
        )
        self._splits = {
            name: Subset(full, idx.tolist())
            for name, idx in (("train", train_idx), ("val", val_idx), ("test", test_idx))
        }

    def predict_inputs(self, path: Path, invert: bool = False) -> tuple[list[str], torch.Tensor]:
        return load_images(path, self.transform, invert=invert)

    # The class folders' names, kept in checkpoints: predict.py writes them without data.root.
    def state_dict(self) -> dict:
        return {"classes": list(getattr(self, "classes", None) or [])}

    def load_state_dict(self, state: dict) -> None:
        if state.get("classes"):
            self.classes = list(state["classes"])


class _ClassFolders(ImageFolder):
    """torchvision's ImageFolder reading only root/<class>/<image files>: its own walk
    descends into every subfolder, following symlinks, so a link back up (a/loop -> a) never
    ended and data.root=/ walked the whole file system."""

    @staticmethod
    def make_dataset(
        directory, class_to_idx, extensions=None, is_valid_file=None, allow_empty=False
    ) -> list[tuple[str, int]]:
        return [
            (str(file), index) for name, index in class_to_idx.items() for file in _image_files(Path(directory) / name)
        ]


def _image_files(folder: Path) -> list[Path]:
    """The image files directly in a class folder. One with an image suffix that is no
    regular file (a dangling or looping symlink, a folder, a pipe, a device) is refused:
    opening a pipe blocks forever, and skipping a file silently hides a mistake."""
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    for file in files:
        if not file.is_file():
            raise UserError(
                f"{file}: not a regular image file (a broken or looping symlink, a folder, a pipe or device); remove it"
            )
    return files


def _check_header(file: Path) -> None:
    from PIL import Image

    try:
        with Image.open(file) as image:
            check_decoded_size(image, file)
    except UserError:
        raise
    except Exception as err:  # UnidentifiedImageError, OSError, ...: a user's file
        raise UserError(f"{file}: not a readable image ({type(err).__name__}); remove it or replace it") from None


def _load_image(transform, path: str) -> torch.Tensor:
    """ImageFolder's loader and transform, failing with the file's name (a truncated body is
    only seen here, when the pixels are decoded; a pixel range the transform refuses too)."""
    image = read_image(Path(path))
    with naming(path):
        return transform(image)
