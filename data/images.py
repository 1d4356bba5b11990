"""Image transforms built from config, shared by training data and predict.py inputs."""

from __future__ import annotations

from pathlib import Path

import torch

from engine.errors import UserError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm",
                  ".pgm"}


def image_transform(image_size: int, in_channels: int, mean: list[float] | None = None,
                    std: list[float] | None = None):
    """PIL image -> normalised (C, H, W) float tensor of the model's size and channel count."""
    from torchvision import transforms

    mean = list(mean) if mean is not None else [0.5] * in_channels
    std = list(std) if std is not None else [0.5] * in_channels
    to_channels = transforms.Grayscale(1) if in_channels == 1 else transforms.Lambda(_rgb)
    return transforms.Compose([
        to_channels,
        transforms.Resize((image_size, image_size), antialias=True),
        transforms.ToTensor(),
        transforms.Normalize(mean, std),
    ])


def _rgb(image):
    return image.convert("RGB")


def list_images(path: Path) -> list[Path]:
    """One image file, or every image file directly inside a folder (sorted)."""
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise UserError(f"{path}: folder has no image files ({sorted(IMAGE_SUFFIXES)})")
        return files
    raise UserError(f"{path}: no such file or folder")


def load_images(path: Path, transform) -> tuple[list[str], torch.Tensor]:
    """All images or a clear error naming the first unreadable file: never a partial batch."""
    from PIL import Image, UnidentifiedImageError

    names, tensors = [], []
    for file in list_images(path):
        try:
            with Image.open(file) as image:
                image.load()
                tensors.append(transform(image))
        except (UnidentifiedImageError, OSError, ValueError) as err:
            raise UserError(f"{file}: not a readable image ({type(err).__name__})") from None
        names.append(str(file))
    return names, torch.stack(tensors)
