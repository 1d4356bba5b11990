"""Batches whose order is a pure function of (seed, epoch), not of the global RNG (as
DataLoader's RandomSampler): a resume skips an interrupted epoch's consumed batches without
loading them, and every rank of a distributed run takes its own slice of the same order."""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import multiprocessing.util  # registers its exit handler before ours (below)
import os
import signal
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset

from engine.errors import UserError, preempt_signal


@dataclass
class TensorSplit:
    """A split held in memory; the engine batches it by indexing, with no per-sample Python."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.x)


Split = TensorSplit | Dataset
ORDER_SEED_STRIDE = 1_000_003  # keeps (seed, epoch) -> generator seed collision-free in practice
MASKABLE = hasattr(signal, "pthread_sigmask")  # POSIX; Windows has no process groups anyway


def stop_signals() -> tuple[signal.Signals, ...]:
    """The graceful stop's signals (engine.training.StopSignal), which DataLoader workers leave to
    the main process; each once (a handler installed twice would be its own previous one)."""
    return tuple(dict.fromkeys(s for s in (signal.SIGINT, signal.SIGTERM, preempt_signal()) if s is not None))


def batches_per_epoch(samples: int, batch_size: int, world_size: int = 1) -> int:
    """Batches each rank runs per epoch: its ceil(samples / world_size) share (short ranks
    repeat a few samples, as DistributedSampler), in batches of `batch_size`."""
    per_rank = -(-samples // world_size)
    return -(-per_rank // batch_size)


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * ORDER_SEED_STRIDE + epoch))


def _kill_workers_at_exit() -> None:
    """multiprocessing's exit handler SIGTERMs daemonic children, then joins them with no
    timeout; DataLoader workers ignore SIGTERM (`_init_worker`), so a loader still alive at
    exit (in a traceback, after an error or a stop mid-epoch) hung the exit. Registered after
    it (atexit runs the last first), this SIGKILLs them: they hold nothing worth saving."""
    if hasattr(signal, "SIGCHLD"):  # torch's SIGCHLD handler would report them as crashed
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for child in multiprocessing.active_children():
        if child.daemon:
            child.kill()


atexit.register(_kill_workers_at_exit)


class Batches:
    """Iterable of (inputs, targets) batches on `device` for one split."""

    def __init__(
        self,
        split: Split,
        batch_size: int,
        device: torch.device,
        *,
        shuffle: bool = False,
        seed: int = 0,
        num_workers: int = 0,
        pin_memory: bool | str = False,
        rank: int = 0,
        world_size: int = 1,
        limit: int | float | None = None,
    ) -> None:
        self.split, self.batch_size, self.device, self.shuffle, self.seed = split, batch_size, device, shuffle, seed
        self.num_workers, self.rank, self.world_size = num_workers, rank, world_size
        self.pin_memory = device.type == "cuda" if pin_memory == "auto" else bool(pin_memory)  # data.pin_memory
        self.n = len(split)
        self.per_rank = -(-self.n // world_size)  # ceil: short ranks repeat a few samples
        self.count = batches_per_epoch(self.n, batch_size, world_size)
        if limit is not None:  # trainer.limit_*_batches: an int is batches, a float a fraction
            self.count = min(self.count, limit if isinstance(limit, int) else max(1, int(self.count * limit)))
        if isinstance(split, TensorSplit):  # small in-memory data lives on the device once
            self.x, self.y = split.x.to(device), split.y.to(device)

    def __len__(self) -> int:
        return self.count

    def batch_sizes(self) -> torch.Tensor:
        """Samples in each batch of an epoch (only the last one of a whole epoch is short)."""
        return (self.per_rank - torch.arange(self.count) * self.batch_size).clamp(max=self.batch_size)

    def check_start(self, start: int) -> None:
        """A resumed epoch's position must lie inside this (possibly limited) epoch."""
        if start > self.count:
            raise UserError(
                f"the checkpoint is at batch {start} of its epoch, but an epoch now has {self.count} batches "
                "(trainer.limit_train_batches / trainer.overfit_batches changed?); resume with the limits it "
                "was saved with"
            )

    def __call__(self, epoch: int = 0, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches of `epoch` from batch number `start` (none when `start` is past the last
        batch: a resume from a checkpoint saved on the epoch's last step)."""
        if start >= len(self):
            return iter(())
        if hasattr(self.split, "set_epoch"):  # data/augment.py seeds by epoch
            self.split.set_epoch(epoch)
        order = epoch_order(self.n, self.seed, epoch) if self.shuffle else torch.arange(self.n)
        if self.world_size > 1:  # as DistributedSampler: pad by wrapping, then stride
            order = torch.cat([order, order[: self.per_rank * self.world_size - self.n]])
            order = order[self.rank :: self.world_size]
        order = order[start * self.batch_size : self.count * self.batch_size]
        if isinstance(self.split, TensorSplit):
            return ((self.x[idx], self.y[idx]) for idx in order.to(self.x.device).split(self.batch_size))
        return self._loader_batches(order)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self()

    def _loader_batches(self, order: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        # An own generator: the loader must not draw worker seeds from the global RNG, or a
        # mid-epoch resume would shift the dropout stream.
        loader = DataLoader(
            self.split,
            batch_sampler=[b.tolist() for b in order.split(self.batch_size)],
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            generator=torch.Generator().manual_seed(self.seed),
            worker_init_fn=_init_worker,
        )
        # Workers fork with SIGTERM/SIGINT blocked, so a `kill -TERM -PGID` or a Ctrl-C (to the
        # whole process group) never kills one before _init_worker ignores them; the main
        # process, which saves and exits, gets them.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals()) if self.num_workers and MASKABLE else None
        try:
            batches = iter(loader)
        finally:
            if mask is not None:
                signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        non_blocking = self.device.type == "cuda"
        for x, y in batches:
            yield x.to(self.device, non_blocking=non_blocking), y.to(self.device, non_blocking=non_blocking)


def _init_worker(_worker_id: int) -> None:
    """A DataLoader worker leaves the stop to the main process (a scheduler's SIGTERM to the
    process group must not crash the run before it saves) and dies with it (prctl, even on a
    SIGKILL or the OOM killer). Its copy of the run-folder lock is dropped at fork (run_dir)."""
    for sig in stop_signals():
        signal.signal(sig, signal.SIG_IGN)
    if MASKABLE:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, stop_signals())
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG
        if os.getppid() == 1:  # the parent died before the call: follow it now
            os._exit(1)
