"""What every data module provides: named splits, the task type, and prediction inputs."""

from __future__ import annotations

import os
import stat
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import torch
from omegaconf import open_dict

from engine.batches import Split
from engine.errors import UserError
from engine.runtime import max_workers


class DataModule(ABC):
    """Base class: subclasses fill `self._splits` in `setup()` with 'train', 'val', 'test'."""

    task = "regression"  # or "classification"
    num_classes: int | None = None

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
        if name not in self._splits:
            raise UserError(f"split {name!r} not available; have {sorted(self._splits)}")
        split = self._splits[name]
        if len(split) == 0:
            raise UserError(f"data: the {name!r} split is empty; use more data or change the data.*_fraction settings")
        return split

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
