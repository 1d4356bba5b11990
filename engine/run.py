"""Opening a run: the run folder for this config (locked, one process at a time), the
checkpoint to resume from (resume=auto / PATH / none), and accepting the run once that
checkpoint is restored. Under torchrun rank 0 decides and every rank follows."""

from __future__ import annotations

import re
import weakref
from pathlib import Path
from typing import Any

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from engine.checkpoint import load_checkpoint, load_file
from engine.config import run_dir_for
from engine.distributed import is_distributed, is_main, on_main, rank
from engine.errors import UserError
from engine.metrics import read_history
from engine.outputs import write_atomic
from engine.run_folder import find_latest, remove_stale_tmp
from engine.runlock import lock_run_dir, unlock_run_dir
from engine.saver import Saver, atomic_link


def run_name_for(cfg: DictConfig, hydra_cfg: Any = None) -> str:
    """`run_name` (default: `name`), plus the job's overrides in a multirun so each job of a
    sweep gets its own folder. `hydra_cfg`: a finished job's (a sweeper reading its results);
    default: the running job's."""
    base = str(cfg.run_name or cfg.name)
    try:
        hydra_cfg = HydraConfig.get() if hydra_cfg is None else hydra_cfg
        if hydra_cfg.mode == RunMode.MULTIRUN:
            job = re.sub(r"[^\w.,=+-]", "_", hydra_cfg.job.override_dirname) or str(
                hydra_cfg.job.num)
            return f"{base}/{job}"
    except ValueError:  # not running under @hydra.main (tests compose configs directly)
        pass
    return base


def open_run(cfg: DictConfig, device: torch.device) -> tuple[Path, Saver, dict | None]:
    """Find (or refuse) the run directory and the checkpoint to resume from.

    Under torchrun rank 0 alone checks and writes the directory; every rank gets its
    result or its error, then reads the checkpoint rank 0 chose. Every rank gets a Saver
    (its `saved` list follows the checkpoint's); only rank 0's may write, so train.py calls
    it through `distributed.on_main`."""
    if not is_distributed():
        run_dir, saver, resumed, _ = _open_locked(cfg, device)
        return run_dir, saver, _own_best(cfg, run_dir, resumed)
    opened: dict[str, Any] = {}

    def on_rank0() -> tuple[Path, str | None]:
        run_dir, opened["saver"], opened["resumed"], source = _open_locked(cfg, device)
        return run_dir, source

    run_dir, source = on_main(on_rank0)
    if is_main():
        return run_dir, opened["saver"], _own_best(cfg, run_dir, opened["resumed"])
    resumed = _own_best(cfg, run_dir, with_history(load_on_rank(source, device), source)
                        if source else None)
    saver = Saver(run_dir, cfg.checkpoint.keep_last,
                  resumed.get("saved_files") if resumed else None)
    return run_dir, saver, resumed


def load_on_rank(path: str, device: torch.device) -> dict:
    """The checkpoint rank 0 chose, read by another rank (same file system needed)."""
    try:
        return load_checkpoint(path, device)
    except UserError as err:
        raise UserError(f"rank {rank()}: {err} (with several nodes, checkpoint.root must be "
                        f"on a file system every node shares)") from None


def _own_best(cfg: DictConfig, run_dir: Path, resumed: dict | None) -> dict | None:
    """resume=PATH from another run's folder keeps the best value as an uninterrupted run would
    (exact resume; Lightning's ModelCheckpoint restores best_model_score the same way). The
    file of that best epoch is brought along once the run is accepted (accept_run)."""
    if resumed and str(cfg.resume) != "auto" and \
            Path(str(cfg.resume)).resolve().parent != run_dir.resolve():
        resumed["best_from"] = str(cfg.resume)
    return resumed


def _bring_best_along(run_dir: Path, resumed: dict | None) -> None:
    """The inherited best epoch's checkpoint becomes this folder's best.pt when it is at hand
    (the resumed file itself, or epoch_N.pt beside it), so `evaluate.py ckpt=NEW/best.pt`
    works even when no later epoch beats it; otherwise best.pt comes with the first better
    epoch, and the end of the run uses last.pt in its place (engine/metrics.py)."""
    source = (resumed or {}).get("best_from")
    best_epoch = ((resumed or {}).get("best") or {}).get("epoch")
    if source is None or not isinstance(best_epoch, int) or (run_dir / "best.pt").exists():
        return
    source = Path(source)
    for candidate in (source, source.parent / f"epoch_{best_epoch:04d}.pt"):
        try:
            head = load_file(candidate, check=False)  # memory-mapped: only counters are read
        except UserError:
            continue
        if isinstance(head, dict) and head.get("epoch") == best_epoch and \
                not head.get("step_in_epoch"):
            atomic_link(candidate, run_dir / "best.pt")
            print(f"best.pt: {candidate} (the best epoch so far, {best_epoch})")
            return


def _open_locked(cfg: DictConfig, device: torch.device
                 ) -> tuple[Path, Saver, dict | None, str | None]:
    """_open_run_dir, releasing the run folder's lock again when the run is refused (an
    in-process caller may go on; a later `python train.py` must not find it held)."""
    try:
        return _open_run_dir(cfg, device)
    except BaseException:
        unlock_run_dir(run_dir_for(cfg.checkpoint.root, run_name_for(cfg)))
        raise


def _open_run_dir(cfg: DictConfig, device: torch.device
                  ) -> tuple[Path, Saver, dict | None, str | None]:
    run_dir = run_dir_for(cfg.checkpoint.root, run_name_for(cfg))
    if run_dir.is_dir():  # before reading or cleaning anything in it: one process at a time
        lock_run_dir(run_dir)
    existing = sorted(p.name for p in run_dir.glob("*.pt")) if run_dir.is_dir() else []
    resumed = source = None
    weights_mode = _weights_mode(cfg, run_dir, existing)
    if cfg.resume is None:
        if existing:
            raise UserError(f"{run_dir} already has checkpoints ({', '.join(existing[:4])}"
                            f"{' ...' if len(existing) > 4 else ''}); continue it with "
                            f"resume=auto or start another with run_name=NEW_NAME")
    elif str(cfg.resume) == "auto":
        if run_dir.is_dir():
            remove_stale_tmp(run_dir)
        found = find_latest(run_dir, device)
        if found is None:
            print(f"resume=auto: no checkpoint in {run_dir}, starting a new run")
        else:
            print(f"resuming from {found[0]}")
            source, resumed = str(found[0]), found[1]
    else:
        path = Path(str(cfg.resume))
        source, resumed = str(path), load_checkpoint(path, device)
        inside = path.resolve().parent == run_dir.resolve()
        if existing and not inside:
            raise UserError(f"resume={path}: {run_dir} already has checkpoints of another "
                            f"run; set run_name=NEW_NAME to continue {path} there")
    if resumed is not None:
        resumed = with_history(resumed, source)
    run_dir.mkdir(parents=True, exist_ok=True)
    lock_run_dir(run_dir)  # a new directory is locked once it exists (no-op if held)
    # config.yaml: accept_run, once the checkpoint is restored
    saver = _LockedSaver(run_dir, cfg.checkpoint.keep_last,
                         resumed.get("saved_files") if resumed and not weights_mode else None,
                         background=bool(cfg.checkpoint.get("async", False)))
    weakref.finalize(saver, unlock_run_dir, run_dir)  # also when train() ends another way
    return run_dir, saver, resumed, source


class _LockedSaver(Saver):
    """The run's Saver; closing it at the end of training also frees the run folder, so a
    train() called in-process (a notebook, a test) does not block a later `python train.py`."""

    def close(self) -> None:
        try:
            super().close()
        finally:
            unlock_run_dir(self.run_dir)


def _weights_mode(cfg: DictConfig, run_dir: Path, existing: list[str]) -> bool:
    """resume_mode=weights starts a new schedule from a checkpoint's weights and optimizer:
    a new run, so it gets its own folder (its epoch_N.pt must not replace the old run's)."""
    mode = str(cfg.get("resume_mode", "exact"))
    if mode not in ("exact", "weights"):
        raise UserError(f"resume_mode={mode!r}: expected exact or weights")
    if mode == "exact":
        return False
    if cfg.resume is None or str(cfg.resume) == "auto":
        raise UserError("resume_mode=weights: name the checkpoint to start from with "
                        "resume=PATH (and a new run_name=)")
    if existing:
        raise UserError(f"resume_mode=weights starts a new run, but {run_dir} already has "
                        f"checkpoints; set run_name=NEW_NAME")
    return True


def accept_run(run_dir: Path, cfg: DictConfig, resumed: dict | None,
               trains: bool = True) -> None:
    """The run is accepted (its checkpoint restored): only now does the folder change.
    config.yaml is written atomically on rank 0 and records the values that run (optimizer
    overrides applied on resume included); a resume refused for weights or state that do not
    fit leaves the run folder as it was, and so does one that trains nothing (`trains`
    false: the run is complete), for its config.yaml."""
    text = OmegaConf.to_yaml(cfg, resolve=True)

    def on_rank0() -> None:
        if trains or not (run_dir / "config.yaml").exists():
            write_atomic(run_dir / "config.yaml", lambda out: out.write(text))
        _bring_best_along(run_dir, resumed)

    on_main(on_rank0)


def with_history(state: dict, source: str | None) -> dict:
    """A checkpoint's metrics rows, read from the metrics.csv beside it (checkpoints of this
    format do not carry them; older ones and other programs' files keep what they have)."""
    if "history" in state or "format_version" not in state or source is None:
        return state
    csv_path = Path(source).parent / "metrics.csv"
    history = read_history(csv_path, int(state["epoch"]))
    if len(history) < int(state["epoch"]) and is_main():
        print(f"note: {csv_path} has rows for {len(history)} of the checkpoint's "
              f"{state['epoch']} epochs; metrics.csv and loss_curve.png start from those")
    return {**state, "history": history}
