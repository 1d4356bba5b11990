"""Image transforms built from config, shared by training data and predict.py inputs.

Every image is converted to the model's channel count (grayscale is repeated into RGB, alpha
is dropped, RGB becomes grayscale by luminance) and resized to `image_size`; so an image of
another size or channel count is used, not refused. A file that is not a readable image is
refused with its name: never silently skipped.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from engine.errors import UserError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
# A small compressed file can decode to gigabytes (a 630 KB float TIFF took 3 GB): the models
# take inputs of a few hundred pixels at most, so 128 MiB of decoded pixels (a 44-megapixel
# RGB photo) is plenty; checked from the header, before decoding.
MAX_DECODED_BYTES = 128 << 20
MAX_IMAGE_SIZE = 4096  # data.image_size: one 4096x4096 RGB input is 200 MB as float32


def image_transform(image_size: int, in_channels: int, mean: list[float] | None = None, std: list[float] | None = None):
    """PIL image -> normalised (C, H, W) float tensor of the model's size and channel count."""
    from torchvision import transforms

    if in_channels not in (1, 3):
        raise UserError(f"data.in_channels={in_channels!r}: image files give 1 (grayscale) or 3 (RGB) channels")
    if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < 1:
        raise UserError(f"data.image_size={image_size!r}: expected an integer >= 1")
    if image_size > MAX_IMAGE_SIZE:
        raise UserError(f"data.image_size={image_size}: expected at most {MAX_IMAGE_SIZE}")
    mean = list(mean) if mean is not None else [0.5] * in_channels
    std = list(std) if std is not None else [0.5] * in_channels
    for key, values in (("data.mean", mean), ("data.std", std)):
        if len(values) != in_channels:
            raise UserError(
                f"{key}={values}: expected {in_channels} value(s), one per channel (data.in_channels={in_channels})"
            )
    if any(not s > 0 for s in std):
        raise UserError(f"data.std={std}: expected values > 0")
    to_channels = transforms.Lambda(_gray) if in_channels == 1 else transforms.Lambda(_rgb)
    return transforms.Compose(
        [
            to_channels,
            transforms.Resize((image_size, image_size), antialias=True),
            transforms.ToTensor(),
            transforms.Lambda(_three_channels if in_channels == 3 else _same),
            transforms.Normalize(mean, std),
        ]
    )


# Modes with more than 8 bits per sample: PIL's convert("L"/"RGB") clips them to 0..255
# (a 16-bit PNG keeps 3 values of 398, a float TIFF in [0, 1] becomes all zeros), so they
# are scaled by their real range into a float image in [0, 1] instead.
HIGH_BIT_MODES = ("I", "F", "I;16", "I;16L", "I;16B", "I;16N")


def _same(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def _three_channels(tensor: torch.Tensor) -> torch.Tensor:
    """A high-bit grayscale image (one float channel) repeated into RGB."""
    return tensor.expand(3, -1, -1) if tensor.shape[0] == 1 else tensor


def _unit_float(image):
    """A 16-bit, 32-bit integer or float grayscale image as a PIL "F" image in [0, 1]:
    integers by 16-bit range, floats as [0, 1], [0, 255] or [0, 65535] data, whichever
    holds every pixel. Anything else (negative, beyond 16 bits, NaN) is refused."""
    import numpy as np
    from PIL import Image

    pixels = np.array(image, dtype=np.float32)  # exact for what is accepted (<= 65535)
    if not np.isfinite(pixels).all():
        raise UserError(f"image mode {image.mode}: has NaN or infinite pixel values")
    low, high = float(pixels.min(initial=0.0)), float(pixels.max(initial=0.0))
    if image.mode == "F":
        scale = next((s for s in (1.0, 255.0, 65535.0) if high <= s), None)
    else:
        scale = 65535.0 if high <= 65535 else None
    if low < 0 or scale is None:
        raise UserError(
            f"image mode {image.mode}: pixel values from {low:g} to {high:g} are "
            f"not supported (expected 0..65535, or 0..1 for float images)"
        )
    pixels /= np.float32(scale)  # in place: float32 division rounds as float64's would
    return Image.fromarray(pixels)  # mode F


def _rgb(image):
    if image.mode in HIGH_BIT_MODES:
        return _unit_float(image)  # one channel; _three_channels repeats it after ToTensor
    return image if image.mode == "RGB" else image.convert("RGB")


def _gray(image):
    if image.mode == "L":
        return image
    if image.mode in HIGH_BIT_MODES:
        return _unit_float(image)
    try:
        return image.convert("L")
    except ValueError:  # e.g. LAB: PIL converts it to RGB only
        return image.convert("RGB").convert("L")


def list_images(path: Path) -> list[Path]:
    """One image file, or every image file directly inside a folder (sorted). Other files in
    the folder (a README, a CSV) are not inputs: they are listed on stderr, not read."""
    if path.is_file():
        return [path]
    if path.is_dir():
        entries = sorted(path.iterdir())
        files = [p for p in entries if p.suffix.lower() in IMAGE_SUFFIXES and not p.is_dir()]
        if not files:
            raise UserError(f"{path}: folder has no image files ({sorted(IMAGE_SUFFIXES)})")
        others = [p.name for p in entries if p not in files and not p.name.startswith(".")]
        if others:
            import sys

            print(
                f"note: {path}: ignored {len(others)} entr{'y' if len(others) == 1 else 'ies'}"
                f" without an image suffix: {', '.join(others[:5])}"
                f"{' ...' if len(others) > 5 else ''}",
                file=sys.stderr,
            )
        return files
    raise UserError(f"{path}: no such file or folder")


def read_image(file: Path):
    """A fully decoded PIL image, or a one-line UserError naming the file.

    The file comes from a user: any decoder failure (PIL raises OSError, SyntaxError,
    ValueError, struct.error, ... on corrupt data) is bad input, not a bug."""
    from PIL import Image, UnidentifiedImageError

    if not file.is_file():  # a FIFO would block Image.open forever; a dangling link fails
        raise UserError(f"{file}: not a readable image file (missing or not a regular file)")
    try:
        with Image.open(file) as image:
            check_decoded_size(image, file)
            image.load()
            return image.copy()
    except UserError:
        raise
    except UnidentifiedImageError:
        raise UserError(f"{file}: not an image (unknown format)") from None
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise UserError(
            f"{file}: corrupt or unreadable image ({type(err).__name__}{': ' + first[:150] if first else ''})"
        ) from None


@contextmanager
def naming(file: Path | str) -> Iterator[None]:
    """A conversion of `file`'s image that fails (a pixel range or mode it cannot take) is
    one line naming the file: in training (data/image_folder.py) as in predict."""
    try:
        yield
    except UserError as err:
        raise UserError(f"{file}: {err}") from None
    except Exception as err:  # a mode the conversion cannot handle
        raise UserError(f"{file}: cannot convert this image ({type(err).__name__}: {str(err).strip()[:150]})") from None


def check_decoded_size(image, file: Path) -> None:
    """An opened (not yet decoded) image whose pixels would take more than MAX_DECODED_BYTES
    is refused, naming the file."""
    from PIL import ImageMode

    mode = ImageMode.getmode(image.mode)
    size = image.width * image.height * len(mode.bands) * int(mode.typestr[-1])
    if size > MAX_DECODED_BYTES:
        raise UserError(
            f"{file}: a {image.width}x{image.height} {image.mode} image decodes to "
            f"{size / 2**20:.0f} MiB; at most {MAX_DECODED_BYTES >> 20} MiB is read "
            f"(make it smaller)"
        )


def load_images(
    path: Path, transform, invert: bool = False, dark_background: bool = False
) -> tuple[list[str], torch.Tensor]:
    """All images or a clear error naming the first unreadable file: never a partial batch.

    invert: 255 - value before the transform (dark-on-light drawings for a model trained on
    light-on-dark images). dark_background: the model was trained on dark backgrounds, so a
    folder of mostly light-background images without invert gets a note on stderr. A note,
    not an automatic inversion: the border guess fails on photos or digits touching the edge,
    and silently changed inputs are worse than a hint."""
    names, tensors, light = [], [], 0
    for file in list_images(path):
        image = read_image(file)
        with naming(file):
            light += dark_background and _light_border(_gray(image))
            if invert:
                from PIL import ImageOps

                image = ImageOps.invert(_rgb(image) if image.mode != "L" else image)
            tensors.append(transform(image))
        names.append(str(file))
    if dark_background and not invert and light > len(names) / 2:
        import sys

        print(
            f"note: {light} of {len(names)} images have a light background, but the model was "
            f"trained on light strokes on a dark background (white digits on black): pass "
            f"invert=true if yours are dark on light",
            file=sys.stderr,
        )
    return names, torch.stack(tensors)


def _light_border(gray) -> bool:
    """The mean of the outermost pixels is above mid-grey: a light background."""
    import numpy as np

    pixels = np.asarray(gray, dtype=np.float32)
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    return bool(border.mean() > 127.5)
