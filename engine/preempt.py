"""Graceful stop on SIGTERM/SIGINT/SIGUSR2: finish the step, save, exit with EXIT_INTERRUPTED.

Schedulers (SLURM, Kubernetes) send SIGTERM before killing a job; Ctrl-C sends SIGINT.
A second SIGINT aborts at once, as users expect from Ctrl-C pressed twice. SIGUSR2 is the
notice SLURM sends `signal_delay_s` before a time limit (submitit's `--signal`; the variable
SUBMITIT_PREEMPT_SIGNAL names another one): after the save, the submitit launcher
(hydra_plugins/torch_template/launchers.py) finds it in `received`, requeues with resume=auto.
"""

from __future__ import annotations

import os
import signal
import sys
import time

from engine.errors import EXIT_ABORTED

# The signals that stopped a training loop of this process, read by the submitit launcher to
# tell a preemption notice (requeue) from a SIGTERM or a Ctrl-C (no requeue).
received: set[signal.Signals] = set()


def preempt_signal() -> signal.Signals | None:
    """The scheduler's notice before a time limit or preemption: SIGUSR2, or the signal
    SUBMITIT_PREEMPT_SIGNAL names, as submitit reads it (None where the OS has no SIGUSR2)."""
    name = os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2")
    return getattr(signal, f"SIG{name}", getattr(signal, "SIGUSR2", None))


class StopSignal:
    def __init__(self, max_time: float | None = None) -> None:
        self.reason: str | None = None
        self.deadline = time.monotonic() + max_time if max_time else None
        self._previous = {}
        for sig in dict.fromkeys((signal.SIGINT, signal.SIGTERM, preempt_signal())):
            if sig is not None:
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame) -> None:
        if self.reason is not None and signum == signal.SIGINT:
            print("\nsecond SIGINT: aborting without saving", file=sys.stderr, flush=True)
            os._exit(EXIT_ABORTED)
        received.add(signal.Signals(signum))
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
