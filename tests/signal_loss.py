"""A loss that interrupts its own process at an exact training batch (tests only).

`loss._target_=tests.signal_loss.SignalAtCall loss.at=N loss.signal=SIGTERM` sends the signal
during the N-th training batch of the process, before its backward: a stop or a kill in the
middle of a gradient-accumulation window, without any fault-injection hook in the product."""

from __future__ import annotations

import os
import signal as signals

import torch


class SignalAtCall(torch.nn.L1Loss):
    def __init__(self, signal: str = "SIGTERM", at: int = 0) -> None:
        super().__init__()
        self.signal, self.at, self.calls = signal, at, 0

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if input.requires_grad:  # training batches only (validation runs without grad)
            self.calls += 1
            if self.calls == self.at:
                os.kill(os.getpid(), getattr(signals, self.signal))
        return super().forward(input, target)
