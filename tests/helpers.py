"""What several test files share: file snapshots, the one-line-error assertion, a hang
guard, a malicious pickle, a fake CIFAR-10 on disk."""

from __future__ import annotations

import hashlib
import os
import signal
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.errors import UserError


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder` -> sha256 of its bytes (to prove nothing was changed)."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def assert_one_line(err: BaseException, *needles: str) -> str:
    """A UserError whose message is one line, no traceback text, naming each needle."""
    assert isinstance(err, UserError), f"expected a UserError, got {type(err).__name__}: {err}"
    message = str(err)
    assert message and "\n" not in message, f"not one line: {message!r}"
    assert "Traceback" not in message
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"
    return message


def raises_user_error(fn, *args, needles: tuple[str, ...] = (), **kwargs) -> str:
    """fn(*args, **kwargs) raises a one-line UserError naming each needle; its message."""
    with pytest.raises(UserError) as info:
        fn(*args, **kwargs)
    return assert_one_line(info.value, *needles)


@contextmanager
def deadline(seconds: float = 10):
    """Fail (instead of hanging the suite) if the block takes longer than `seconds` (not a
    timing assertion: a hang guard)."""

    def _timeout(signum, frame):
        raise TimeoutError(f"still busy after {seconds}s")

    previous = signal.signal(signal.SIGALRM, _timeout)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class Evil:
    """Unpickling this calls open(marker, 'w') (or os.system('touch marker')): the marker
    file proves code ran."""

    def __init__(self, marker: Path, shell: bool = False) -> None:
        self.marker, self.shell = str(marker), shell

    def __reduce__(self):
        if self.shell:
            return (os.system, (f"touch '{self.marker}'",))
        return (open, (self.marker, "w"))


def write_malicious(path: Path, marker: Path, legacy: bool = False, shell: bool = False) -> Path:
    """A checkpoint-shaped file whose model_state_dict would run code under pickle."""
    state = {"epoch": 1, "model_state_dict": {"weights": Evil(marker, shell)}, "config": {}}
    if legacy:
        import pickle

        with open(path, "wb") as out:
            pickle.dump(state, out, protocol=2)
    else:
        torch.save(state, path)
    assert not os.path.exists(marker)
    return path


def write_cifar(root: Path, n_train: int = 6, n_test: int = 4) -> None:
    """CIFAR-10 in its official pickled format under `root` (n_train images per batch file,
    5 batch files), random pixels: what torchvision's loader reads, without a download."""
    import pickle

    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(1, 6):
        batch = {
            "data": rng.integers(0, 256, (n_train, 3072), dtype=np.uint8),
            "labels": [int(v) for v in rng.integers(0, 10, n_train)],
        }
        (base / f"data_batch_{i}").write_bytes(pickle.dumps(batch))
    test = {
        "data": rng.integers(0, 256, (n_test, 3072), dtype=np.uint8),
        "labels": [int(v) for v in rng.integers(0, 10, n_test)],
    }
    (base / "test_batch").write_bytes(pickle.dumps(test))
    meta = {"label_names": [f"c{i}" for i in range(10)]}
    (base / "batches.meta").write_bytes(pickle.dumps(meta))
