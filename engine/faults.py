"""Fault injection for the kill/resume tests, moved here unchanged from engine/checkpoint.py
(tests only; inert unless ENGINE_FAULT is set)."""

from __future__ import annotations

import os
import signal

# ------------------------------------------------------------ fault injection (tests only)
# ENGINE_FAULT="name=N,..." (read once, at import) arms crash points for the resume tests:
#   kill_in_write=N    SIGKILL halfway through this process's Nth checkpoint write
#   enospc_in_write=N  the Nth write fails with ENOSPC (a full disk)
#   int_in_write=N     SIGINT twice during the Nth write (Ctrl-C pressed twice while saving)
#   kill_at_step=N     SIGKILL after optimizer step N (after that step's periodic save)
#   term_at_step=N     SIGTERM after step N (a scheduler's preemption notice)
#   int_at_step=N      SIGINT after step N (Ctrl-C)

def _parse_faults(spec: str) -> dict[str, int]:
    faults = {}
    for item in filter(None, spec.split(",")):
        name, _, value = item.partition("=")
        faults[name.strip()] = int(value)
    return faults


_FAULTS = _parse_faults(os.environ.get("ENGINE_FAULT", ""))
_writes = 0
_STEP_SIGNALS = (("kill_at_step", signal.SIGKILL), ("term_at_step", signal.SIGTERM),
                 ("int_at_step", signal.SIGINT))


def fault(name: str) -> int:
    """The value of a test-only fault point, 0 when unset."""
    return _FAULTS.get(name, 0)


def step_faults(global_step: int) -> None:
    """Test-only: send the signal armed for this step to this process (no-op when unset)."""
    if _FAULTS:
        for name, sig in _STEP_SIGNALS:
            if _FAULTS.get(name) == global_step:
                os.kill(os.getpid(), sig)


class _FaultyFile:
    def __init__(self, raw, kill: bool, enospc: bool, interrupt: bool) -> None:
        self.raw, self.kill, self.enospc, self.interrupt = raw, kill, enospc, interrupt
        self.written = 0

    def write(self, data) -> int:
        if self.written > 0 and self.interrupt:  # one SIGINT per record written
            os.kill(os.getpid(), signal.SIGINT)
        if self.written > 0 and (self.kill or self.enospc):
            if self.kill:
                self.raw.flush()  # the partial file really is on disk
                os.kill(os.getpid(), signal.SIGKILL)
            raise OSError(28, "No space left on device")
        self.written += len(data)
        return self.raw.write(data)

    def __getattr__(self, name: str):
        return getattr(self.raw, name)


def _fault_wrapper(raw):
    global _writes
    _writes += 1
    return _FaultyFile(raw, kill=_FAULTS.get("kill_in_write") == _writes,
                       enospc=_FAULTS.get("enospc_in_write") == _writes,
                       interrupt=_FAULTS.get("int_in_write") == _writes)


def faulty(raw):
    """The file a checkpoint write goes to: `raw` itself unless a write fault is armed."""
    return _fault_wrapper(raw) if _FAULTS else raw
