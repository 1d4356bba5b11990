"""Graceful stop on SIGTERM/SIGINT: finish the step, save, exit with EXIT_INTERRUPTED.

Schedulers (SLURM, Kubernetes) send SIGTERM before killing a job; Ctrl-C sends SIGINT.
A second SIGINT aborts at once, as users expect from Ctrl-C pressed twice.
"""

from __future__ import annotations

import os
import signal
import sys
import time

from engine.errors import EXIT_ABORTED


class StopSignal:
    def __init__(self, max_time: float | None = None) -> None:
        self.reason: str | None = None
        self.deadline = time.monotonic() + max_time if max_time else None
        self._previous = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame) -> None:
        if self.reason is not None and signum == signal.SIGINT:
            print("\nsecond SIGINT: aborting without saving", file=sys.stderr, flush=True)
            os._exit(EXIT_ABORTED)
        self.reason = signal.Signals(signum).name
        print(f"\n{self.reason}: finishing the current step, then saving a checkpoint "
              f"(Ctrl-C again to abort)", file=sys.stderr, flush=True)

    def out_of_time(self, reserve: float) -> bool:
        """True when the wall-clock budget minus `reserve` seconds (a save) is spent."""
        if self.deadline is not None and time.monotonic() + reserve >= self.deadline:
            self.reason = "trainer.max_time"
            return True
        return False

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
