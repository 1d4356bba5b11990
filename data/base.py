"""What every data module provides: named splits, the task type, and prediction inputs."""

from __future__ import annotations

import os
import stat
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import torch
from omegaconf import open_dict
from torch.utils.data import ConcatDataset, Subset

from engine.batches import Split, TensorSplit
from engine.errors import UserError
from engine.runtime import max_workers


class DataModule(ABC):
    """Base class: subclasses fill `self._splits` in `setup()` with 'train', 'val', 'test'."""

    task = "regression"  # or "classification"
    num_classes: int | None = None
    fold: tuple[int, int] | None = None  # cross-validation: (fold, folds), set by use_fold
    _folded: dict | None = None  # the splits with the fold applied (a new setup() applies it again)

    def __init__(
        self,
        batch_size: int,
        num_workers: int = 0,
        pin_memory: bool | str = False,
        seed: int = 0,
        augment: list | None = None,
    ) -> None:
        if not isinstance(batch_size, int) or batch_size < 1:
            raise UserError(f"data.batch_size must be an integer >= 1, got {batch_size!r}")
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
            raise UserError(f"data.num_workers={num_workers!r}: expected an integer >= 0")
        if num_workers > max_workers():  # train.py refused this already (engine.config);
            import sys  # a config saved on a bigger machine is capped here, with a note

            print(
                f"note: data.num_workers={num_workers} capped to {max_workers()} (4 per CPU core of this machine)",
                file=sys.stderr,
            )
            num_workers = max_workers()
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.seed = seed
        self.augment = augment  # train-split transforms, applied by data/augment.py
        self._splits: dict[str, Split] | None = None

    @abstractmethod
    def setup(self) -> None:
        raise NotImplementedError

    def split(self, name: str) -> Split:
        if self._splits is None:
            self.setup()
        assert self._splits is not None
        if self.fold is not None and self._splits is not self._folded:
            stratify = self.task == "classification"
            self._splits = self._folded = fold_splits(self._splits, *self.fold, self.seed, stratify)
        if name not in self._splits:
            raise UserError(f"split {name!r} not available; have {sorted(self._splits)}")
        split = self._splits[name]
        if len(split) == 0:
            raise UserError(f"data: the {name!r} split is empty; use more data or change the data.*_fraction settings")
        return split

    def use_fold(self, fold: int | None, folds: int | None) -> None:
        """k-fold cross-validation (train.py's cv.fold of cv.folds): the splits train and val
        become fold_splits'; None, None: the module's own splits."""
        if folds is not None and fold is None:
            raise UserError(
                f"cv.folds={folds} without cv.fold: cross-validation trains one run per fold; run it as a "
                f"sweep with -m, e.g. python train.py -m cv={folds}fold ..."
            )
        self.fold = None if folds is None else (int(fold), int(folds))

    def predict_inputs(self, path: Path, invert: bool = False) -> tuple[list[str] | dict[str, list], torch.Tensor]:
        """Read a user's input file/folder for predict.py: (file names, or the input's columns to
        keep in the output, and the model inputs). Image modules take `invert` (predict.py's
        invert=true); others are never given it."""
        raise UserError(f"{type(self).__name__} does not support predict.py inputs")

    # What training learned about the data (e.g. data=csv's scaling), saved in checkpoints.
    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:  # noqa: B027 - most modules learn nothing
        pass

    def decode(self, outputs: torch.Tensor) -> torch.Tensor:
        """Model outputs in the target's units (data=csv inverts its target scaling)."""
        return outputs

    @property
    def class_names(self) -> list[str] | None:
        """Names predict.py writes for class indices (None: the index): e.g. the class folders."""
        return getattr(self, "classes", None)

    def fill_sizes(self, section: Any) -> None:
        """Null size keys of the data section (num_features, num_outputs) get what setup found,
        so a model YAML's ${data.num_features} resolves and the saved config holds the number."""
        missing = [k for k in ("num_features", "num_outputs") if k in section and section[k] is None]
        if missing:
            self.split("train")
            with open_dict(section):
                for key in missing:
                    section[key] = getattr(self, key)


def seeded_split(n: int, fractions: list[float], seed: int) -> list[torch.Tensor]:
    """Random disjoint index sets of the given fractions (the rest goes to the first one)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    sizes = [round(n * f) for f in fractions[1:]]
    first = n - sum(sizes)
    out, start = [perm[:first]], first
    for size in sizes:
        out.append(perm[start : start + size])
        start += size
    return out


def fold_assignment(n: int, folds: int, seed: int, labels: torch.Tensor | None = None) -> torch.Tensor:
    """Each of n samples' fold, 0 to folds-1, fixed by the seed: a seeded permutation dealt out
    in turn, grouped by class when `labels` are given (stratified: each class's count per fold
    is the floor or ceiling of its count / folds; fold sizes differ by at most one)."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    if labels is not None:
        order = order[torch.argsort(labels[order], stable=True)]
    assignment = torch.empty(n, dtype=torch.long)
    assignment[order] = torch.arange(n) % folds
    return assignment


def fold_splits(splits: dict[str, Split], fold: int, folds: int, seed: int, stratify: bool) -> dict[str, Split]:
    """The train and val splits pooled and cut into `folds` folds: fold `fold` is val, the rest
    train; the other splits (test) as they were."""
    pooled = _pooled(splits["train"], splits["val"])
    if folds > len(pooled):
        raise UserError(f"cv.folds={folds}: more folds than the {len(pooled)} samples of the train and val splits")
    assignment = fold_assignment(len(pooled), folds, seed, split_labels(pooled) if stratify else None)
    train, val = (assignment != fold).nonzero().flatten(), (assignment == fold).nonzero().flatten()
    return {**splits, "train": _take(pooled, train), "val": _take(pooled, val)}


def split_labels(split: Split) -> torch.Tensor:
    """A classification split's class indices, without loading images where the data set
    lists its targets (torchvision's ImageFolder, MNIST, CIFAR)."""
    if isinstance(split, TensorSplit):
        return split.y.reshape(len(split))
    targets = getattr(split.dataset, "targets", None) if isinstance(split, Subset) else None
    if targets is not None:
        return torch.as_tensor(targets)[torch.as_tensor(split.indices, dtype=torch.long)]
    return torch.as_tensor([int(split[i][1]) for i in range(len(split))])


def _pooled(a: Split, b: Split) -> Split:
    if isinstance(a, TensorSplit) and isinstance(b, TensorSplit):
        return TensorSplit(torch.cat([a.x, b.x]), torch.cat([a.y, b.y]))
    if isinstance(a, Subset) and isinstance(b, Subset) and a.dataset is b.dataset:
        return Subset(a.dataset, [*a.indices, *b.indices])  # one data set: its digest stays exact
    return ConcatDataset([a, b])


def _take(split: Split, index: torch.Tensor) -> Split:
    if isinstance(split, TensorSplit):
        return TensorSplit(split.x[index], split.y[index])
    if isinstance(split, Subset):
        return Subset(split.dataset, [split.indices[i] for i in index.tolist()])
    return Subset(split, index.tolist())


SYSTEM_ROOTS = (Path("/proc"), Path("/sys"), Path("/dev"))


def data_path(path: str | Path, key: str) -> Path:
    """`path` (given on the command line or stored in a checkpoint's config) checked as data:
    a regular file or a folder, not under /proc, /sys or /dev, after following symlinks. Read
    as a CSV, /proc/self/environ is the environment; a FIFO or /dev/zero never ends. A missing
    path passes: the caller says what belongs there."""
    path = Path(str(path))
    real = Path(os.path.realpath(path))
    if any(real.is_relative_to(root) for root in SYSTEM_ROOTS):
        raise UserError(f"{key}={path}: a system path ({real}), not data")
    try:
        mode = os.stat(real).st_mode
    except FileNotFoundError:
        return path
    except OSError as err:  # a symlink loop, no permission
        raise UserError(f"{key}={path}: cannot be read ({err.strerror})") from None
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        raise UserError(f"{key}={path}: not a regular file or folder (a pipe, device or socket)")
    return path
