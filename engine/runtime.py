"""Device choice, seeding and RNG state as plain tensors (so checkpoints load weights-only)."""

from __future__ import annotations

import contextlib
import os
import random
import re

import numpy as np
import torch

from engine.errors import UserError

PRECISIONS = ("32", "bf16-mixed", "16-mixed")
NUMPY_STATE = ("kind", "keys", "pos", "has_gauss", "cached_gaussian")  # np.random.get_state()'s tuple


def max_workers() -> int:
    """Most DataLoader workers a config may ask for: each is a copy of the process (1e6 ran out of memory)."""
    return 4 * (os.cpu_count() or 1)


def resolve_device(name: str) -> torch.device:
    name = str(name)
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("mps" if torch.backends.mps.is_available() else "cpu")
    if not re.fullmatch(r"cpu|mps|cuda(:\d+)?", name):
        raise UserError(f"trainer.device={name!r}: expected one of auto, cpu, cuda, cuda:N, mps")
    device, count = torch.device(name), torch.cuda.device_count()  # count: 0 without CUDA
    if device.type == "cuda" and (device.index or 0) >= count:
        raise UserError(f"trainer.device={name}: {count} CUDA device(s) on this machine; use cpu or auto")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"trainer.device={name}: MPS is not available on this machine; use cpu or auto")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


def set_deterministic(enabled: bool) -> None:
    """Deterministic kernels for exact resume on CUDA; cudnn.benchmark otherwise."""
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(enabled)  # also off again after an in-process run
    torch.backends.cudnn.deterministic = enabled
    torch.backends.cudnn.benchmark = not enabled


def rng_state() -> dict:
    """Python, NumPy, torch CPU and every CUDA device, as tensors and plain values."""
    version, mt, gauss = random.getstate()
    numpy = dict(zip(NUMPY_STATE, np.random.get_state(), strict=True))
    numpy["keys"] = torch.from_numpy(numpy["keys"].astype(np.int64))
    python = {"version": version, "state": torch.tensor(mt), "gauss": gauss}  # int64: every value fits
    state = {"python": python, "numpy": numpy, "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    python = state["python"]
    random.setstate((python["version"], tuple(python["state"].tolist()), python["gauss"]))
    numpy = {**state["numpy"], "keys": state["numpy"]["keys"].numpy().astype(np.uint32)}
    np.random.set_state(tuple(numpy[key] for key in NUMPY_STATE))
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        for index, cuda_state in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state.cpu(), index)


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The forward pass's autocast; none at 32-bit (trainer.precision is checked in engine/config.py)."""
    dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(str(precision))
    return torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()
