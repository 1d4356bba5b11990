"""How checkpoint files sit in a run folder: their names, the last.pt/best.pt links, which
files retention may delete, and finding the newest good one for `resume=auto`.

    checkpoints/NAME/
        epoch_NNNN.pt, step_NNNNNNNN.pt   periodic checkpoints (the newest checkpoint.keep_last)
        last.pt, best.pt                  hard links to periodic files (or copies)
        .NAME.PID.tmp                     a write in progress; a stale one is removed on resume
        NAME.corrupt[.N]                  a file resume=auto found damaged, set aside
        metrics.csv, config.yaml, loss_curve.png, test_metrics.json, export/

Writing them is engine.saver; what is inside them is engine.checkpoint.
"""

from __future__ import annotations

import os
import re
import sys
import warnings
from pathlib import Path
from typing import Any

import torch

from engine.checkpoint import load_checkpoint, verify
from engine.errors import UserError

PERIODIC = re.compile(r"^(epoch_\d+|step_\d+)\.pt$")
TMP_SUFFIX = ".tmp"
LINKS = ("last.pt", "best.pt")


def tmp_path(path: Path) -> Path:
    """The temporary name a write of `path` goes to first (same folder: rename is atomic)."""
    return path.with_name(f".{path.name}.{os.getpid()}{TMP_SUFFIX}")


def prune(run_dir: Path, saved: list[str], keep_last: int) -> list[str]:
    """Delete the oldest periodic checkpoints this run wrote beyond `keep_last` (called only
    after the newest one is durable). Files this run did not write are never touched, and
    only a bare periodic name (epoch_NNNN.pt, step_NNNNNNNN.pt) of a regular file inside
    `run_dir` is ever deleted, whatever a (crafted) checkpoint's saved_files says."""
    keep, drop = saved[-keep_last:], saved[:-keep_last]
    for name in drop:
        if name not in keep and is_retained_name(run_dir, name):
            (run_dir / name).unlink(missing_ok=True)
    return keep


def is_retained_name(run_dir: Path, name: Any) -> bool:
    """Can retention manage `name`: a periodic file name of this folder's own, no path parts,
    not a link (a link would point elsewhere)."""
    if not isinstance(name, str) or not PERIODIC.match(name) or Path(name).name != name:
        return False
    path = run_dir / name
    return not path.is_symlink() and path.resolve().parent == run_dir.resolve()


def retained_names(run_dir: Path, saved: Any) -> list[str]:
    """The entries of a checkpoint's saved_files that retention may delete; anything else
    (absolute paths, '../', other names, links) is dropped with one warning line."""
    names = list(saved) if isinstance(saved, (list, tuple)) else []
    kept = [n for n in names if is_retained_name(run_dir, n)]
    ignored = [n for n in names if n not in kept]
    if ignored:
        print(f"warning: {run_dir}: the checkpoint's saved_files lists {len(ignored)} "
              f"name(s) that are not this run's periodic checkpoints, e.g. {ignored[0]!r}; "
              f"retention ignores them and never deletes them", file=sys.stderr)
    return kept


def progress_key(state: dict) -> tuple[int, int]:
    return int(state.get("global_step", 0)), int(state.get("epoch", 0))


def find_latest(run_dir: Path, map_location: str | torch.device = "cpu"
                ) -> tuple[Path, dict] | None:
    """Newest checkpoint of `run_dir` that loads and verifies; warns about (and sets aside,
    never deletes) any newer file that does not.

    Only the names train.py writes are candidates (epoch_N.pt, step_N.pt, last.pt, best.pt):
    other files in the folder are never touched. Temporaries (.NAME.PID.tmp) never match."""
    if not run_dir.is_dir():
        return None
    # last.pt / best.pt are hard links to periodic files: try each file once, under its
    # periodic name, which is what the warning and the "resuming from" line then show.
    groups: dict[int, list[Path]] = {}
    for path in sorted(run_dir.glob("*.pt"), key=lambda p: (not PERIODIC.match(p.name), p.name)):
        if not path.is_file():  # a folder named *.pt is not a checkpoint: leave it alone
            continue
        if PERIODIC.match(path.name) or path.name in LINKS:
            groups.setdefault(path.stat().st_ino, []).append(path)
    candidates = []
    for paths in groups.values():
        try:  # cheap (mmap) read of the progress counters; full verification below
            head = torch.load(paths[0], map_location="cpu", weights_only=True, mmap=True)
            key = progress_key(head)
        except Exception as err:  # any unreadable file is skipped, not fatal
            _set_aside(paths, _why_unreadable(paths[0], err))
            continue
        candidates.append((key, paths))
    for _, paths in sorted(candidates, key=lambda c: c[0], reverse=True):
        try:
            return paths[0], load_checkpoint(paths[0], map_location)
        except UserError as err:
            _set_aside(paths, str(err).removeprefix(f"{paths[0]}: "))
    return None


def _why_unreadable(path: Path, err: Exception) -> str:
    try:  # the zip check names the problem better (truncated, checksum) than torch.load
        verify(path)
    except UserError as bad:
        return str(bad).removeprefix(f"{path}: ")
    first = (str(err).strip().splitlines() or [""])[0][:160]
    return f"unreadable ({type(err).__name__}: {first})"


def _set_aside(paths: list[Path], why: str) -> None:
    """Rename a bad file (and its hard links) to NAME.corrupt, NAME.corrupt.1, ...: kept for
    inspection, never overwritten, and no longer a resume candidate."""
    moved = []
    for path in paths:
        aside, n = path.with_name(path.name + ".corrupt"), 0
        while aside.exists():
            n += 1
            aside = path.with_name(f"{path.name}.corrupt.{n}")
        try:
            os.replace(path, aside)
        except OSError as err:  # a read-only folder: say what was wrong with the file too
            raise UserError(f"{path}: {why}; cannot set it aside as {aside.name} "
                            f"({err.strerror or err})") from None
        moved.append(aside.name)
    links = f" (and its links {', '.join(moved[1:])})" if len(moved) > 1 else ""
    warnings.warn(f"skipped {paths[0]}: {why}; kept it as {moved[0]}{links}", stacklevel=3)


def remove_stale_tmp(run_dir: Path) -> None:
    """Half-written temporaries of a process that died mid-save: never a checkpoint."""
    for tmp in run_dir.glob(f".*{TMP_SUFFIX}"):
        tmp.unlink(missing_ok=True)
