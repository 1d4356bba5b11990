"""Where the scripts may write, and writing there safely.

evaluate.py, predict.py and `python -m engine.export` write where `output=` says. An existing
file there is replaced only when it is that script's own kind of output (recognised by its
content, so a renamed or hard-linked checkpoint is still a checkpoint); a checkpoint, an
export, metrics.csv or config.yaml is never overwritten. Every file is written to a
temporary name and renamed, so a failed write (read-only folder, full disk) leaves the old
file, no temporary, and one line naming the path and the OS error.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import IO

from engine.errors import UserError

RUN_FILES = re.compile(r"^(epoch_\d+|step_\d+|last|best)\.pt$|^metrics\.csv$")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def is_eval_json(path: Path) -> bool:
    """evaluate.py's metrics JSON: an object with its `samples` and `source` keys."""
    if path.stat().st_size > 1 << 20:
        return False
    try:
        data = json.loads(path.read_bytes())
    except (ValueError, UnicodeDecodeError):
        return False
    return isinstance(data, dict) and {"samples", "source"} <= data.keys()


def is_predictions_csv(path: Path) -> bool:
    """predict.py's CSV: its header's first column is `input`."""
    with open(path, "rb") as handle:
        first = handle.readline(4096)
    return first.split(b",")[0].strip() == b"input"


def is_png(path: Path) -> bool:
    """A plot evaluate.py may redraw."""
    with open(path, "rb") as handle:
        return handle.read(len(PNG_MAGIC)) == PNG_MAGIC


def check_output(path: Path, own_kind: Callable[[Path], bool], what: str,
                 reads: tuple[Path | None, ...] = (), name: str | None = None) -> None:
    """Refuse, in one line, an output file that is one of the files being read (a hard link
    included), or an existing file that is not `what` (e.g. a checkpoint, metrics.csv)."""
    name = name or f"output={path}"
    for source in reads:
        if source is not None and path.exists() and source.exists() \
                and os.path.samefile(path, source):
            raise UserError(f"{name}: is the same file as {source}, which is being read; choose "
                            f"another output=")
    if path.is_dir():
        raise UserError(f"{name}: is a folder; expected a file name")
    if path.exists() and not own_kind(path):
        raise UserError(f"{name}: exists and is not {what}; refusing to overwrite it (a "
                        f"checkpoint, export, metrics.csv or config.yaml is never "
                        f"overwritten); choose another output=")


def check_export_dir(out_dir: Path) -> None:
    """An export folder is new, empty or an earlier export: never a run folder (its
    config.yaml and checkpoints are the run's) nor a folder with another config.yaml."""
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"{out_dir}: exists and is not a folder; expected an export folder")
    if not out_dir.is_dir():
        return
    run_files = sorted(p.name for p in out_dir.iterdir() if RUN_FILES.match(p.name))
    if run_files:
        raise UserError(f"{out_dir}: is a run folder ({', '.join(run_files[:3])}); export "
                        f"into a folder of its own, e.g. {out_dir / 'export'}")
    if (out_dir / "config.yaml").exists() and not (out_dir / "model.safetensors").is_file():
        raise UserError(f"{out_dir}: has a config.yaml that is not an export's; refusing to "
                        f"overwrite it; choose another folder")


def write_atomic(path: Path, write: Callable[[IO], object], binary: bool = False) -> Path:
    """Write through `write(handle)` into a temporary file, then rename it over `path`. An
    OSError becomes a one-line UserError naming `path`; the temporary is removed."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") if binary else open(tmp, "w", newline="") as handle:
            write(handle)
        os.replace(tmp, path)
    except OSError as err:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise UserError(f"{path}: cannot write ({err.strerror or err})") from None
    return path
