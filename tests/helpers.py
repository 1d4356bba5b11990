"""Checks and hostile files shared by the bad-input, safety, fuzz and write-path tests: file
snapshots, the one-line-error assertion, a hang guard, a malicious pickle."""

from __future__ import annotations

import hashlib
import os
import signal
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from engine.errors import UserError


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder` -> sha256 of its bytes (to prove nothing was changed)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


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
def deadline(seconds: float):
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


def write_malicious(path: Path, marker: Path, legacy: bool = False,
                    shell: bool = False) -> Path:
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
