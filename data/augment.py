"""Train-split augmentation from config (`data.augment`: torchvision.transforms.v2 entries).

Each sample's random draw is a pure function of (seed, epoch, sample index): the transform
runs under a forked CPU RNG seeded from a hash of the three. So the augmented batches do not
depend on the global RNG (dropout keeps its stream), on DataLoader workers, or on where in
the epoch a resumed run starts: a run killed mid-epoch and resumed sees the same batches.
Transforms see the split's own output: a normalised (C, H, W) float tensor.
Val, test and predict splits never pass through here.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch.utils.data import Dataset

from engine.batches import Split, TensorSplit
from engine.config import is_transform_class, locate
from engine.errors import UserError

KEY = "data.augment"
TRANSFORMS = "torchvision.transforms.v2."


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed for one sample of one epoch (blake2b: no collisions between nearby
    (seed, epoch, index) triples, unlike seed * a + epoch * b + index)."""
    digest = hashlib.blake2b(f"{seed}/{epoch}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def check_augment(data_cfg: Any) -> None:
    """One line per mistake in `data.augment`, before Hydra instantiates the data section
    (whose error for a misspelt transform is a multi-line traceback)."""
    entries = data_cfg.get("augment") if isinstance(data_cfg, DictConfig) else None
    if entries is None:
        return
    if not isinstance(entries, ListConfig):
        raise UserError(
            f"{KEY}={_plain(entries)!r}: expected a list of transforms (entries "
            f"with _target_: {TRANSFORMS}NAME), or null"
        )
    for i, entry in enumerate(entries):
        key = f"{KEY}[{i}]"
        target = entry.get("_target_") if isinstance(entry, DictConfig) else None
        if not isinstance(target, str):
            raise UserError(
                f"{key}={_plain(entry)!r}: expected a transform entry with _target_: {TRANSFORMS}NAME and its arguments"
            )
        try:
            obj = locate(target)
        except Exception as err:  # ImportError, AttributeError
            first = str(err).strip().splitlines()[0] if str(err).strip() else repr(err)
            raise UserError(
                f"{key}._target_={target!r}: cannot be imported ({first}); expected {TRANSFORMS}NAME"
            ) from None
        if not is_transform_class(obj):
            raise UserError(
                f"{key}._target_={target!r}: expected a {TRANSFORMS}* transform "
                f"class, e.g. {TRANSFORMS}RandomHorizontalFlip"
            )
        try:
            build_transform(entry)
        except Exception as err:  # unknown or bad arguments (numbers.Number hints: no
            # type check from the signature, the constructor's own error is clearer)
            while err.__cause__ is not None:  # Hydra's wrapper: the constructor's own error
                err = err.__cause__
            first = str(err).strip().splitlines()[0] if str(err).strip() else repr(err)
            raise UserError(f"{key}: could not build {target} ({first})") from None


def _plain(value: Any) -> Any:
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    return value


def build_transform(entry: Any) -> Callable:
    """One entry: an already built transform (Hydra instantiates nested _target_s) or a
    config mapping."""
    if callable(entry):
        return entry
    return instantiate(entry)


def compose(entries: Sequence[Any]) -> Callable:
    from torchvision.transforms import v2  # lazy: only runs with data.augment set

    return v2.Compose([build_transform(e) for e in entries])


class AugmentedSplit(Dataset):
    """A train split whose samples pass through `transform` with per-sample seeds.

    Batches calls `set_epoch` before each epoch; being a Dataset, it takes the DataLoader
    path there (an in-memory TensorSplit is indexed per sample)."""

    def __init__(self, split: Split, transform: Callable, seed: int) -> None:
        self.split, self.transform, self.seed = split, transform, int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, Any]:
        if isinstance(self.split, TensorSplit):
            x, y = self.split.x[index], self.split.y[index]
        else:
            x, y = self.split[index]
        # devices=[]: only the CPU generator (where v2 draws) is saved and restored; seeding
        # the generator itself, not torch.manual_seed, leaves the CUDA generators alone.
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(sample_seed(self.seed, self.epoch, index))
            x = self.transform(x)
        return x, y


def augmented_train_split(data: Any, seed: int) -> Split:
    """The train split, wrapped when the data module was given `augment` entries."""
    split = data.split("train")
    entries = getattr(data, "augment", None)
    if not entries:
        return split
    sample = split.x[0] if isinstance(split, TensorSplit) else split[0][0]
    shape = list(getattr(sample, "shape", []))
    if len(shape) != 3:
        raise UserError(
            f"{KEY}: {type(data).__name__}'s train samples have shape {shape}, not "
            f"images (channels, height, width); augmentation is for image data"
        )
    augmented = AugmentedSplit(split, compose(entries), seed)
    try:  # one sample now: a transform that cannot take these images fails before the run
        augmented[0]
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else repr(err)
        raise UserError(
            f"{KEY}: the transforms fail on a train sample of shape {shape} ({type(err).__name__}: {first[:200]})"
        ) from None
    return augmented
