"""torch.distributed for train.py: one process per device under torchrun, nothing otherwise.

torchrun starts N copies of train.py and sets RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and
MASTER_PORT in each. When WORLD_SIZE > 1, `setup_distributed` joins the default process group
(nccl for CUDA devices, gloo for CPU) and the helpers below become collectives; without
torchrun every helper is a no-op, so `python train.py` runs the single-process code unchanged.
A SLURM job step or a submitit job of several tasks takes the same path (adopt_scheduler_env).

Rules the helpers keep, so that no rank ever waits forever for another:
  * every rank calls a collective helper at the same points in the same order;
  * rank 0 alone touches the run directory (checkpoints, metrics.csv, plots, config.yaml):
    the callers say so at each write, with `on_main` (which hands its result - or its error -
    to every rank, and doubles as the barrier after a save) or `rank_zero_only`;
  * a decision one rank can take alone (a NaN loss, a stop signal, the time budget) is
    all-reduced before anyone acts on it.
"""

from __future__ import annotations

import atexit
import functools
import os
import re
import sys
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from omegaconf import DictConfig
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Subset

from engine.batches import Split, TensorSplit
from engine.errors import UserError, user_error_in
from engine.runtime import resolve_device

T = TypeVar("T")

_comm_device = torch.device("cpu")  # where collective tensors live: the GPU under nccl


class FollowerError(UserError):
    """Another rank's error, re-raised here so this rank exits too; printed by that rank only."""

    quiet = True


# ------------------------------------------------------------------------------ who am I


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0)) if is_distributed() else 0


def is_main() -> bool:
    return rank() == 0


def rank_zero_only(fn: Callable[..., T]) -> Callable[..., T | None]:
    """Run `fn` on rank 0 only (files every rank would otherwise write at once)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> T | None:
        return fn(*args, **kwargs) if is_main() else None

    return wrapper


# ----------------------------------------------------------------------------- set up


def setup_distributed(cfg: DictConfig) -> torch.device:
    """Resolve the device and the per-process batch size; join the process group under
    torchrun. Returns this process's device (cuda:LOCAL_RANK on GPUs)."""
    global _comm_device
    adopt_scheduler_env()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = resolve_device(cfg.trainer.device)
    _resolve_batch_size(cfg, world)
    if world <= 1:
        return device
    if device.type == "mps":
        raise UserError(
            "trainer.device=mps: torch.distributed has no MPS backend; run "
            "torchrun with trainer.device=cpu, or plain python train.py on MPS"
        )
    if device.type == "cuda":
        requested = str(cfg.trainer.device)
        if requested not in ("auto", "cuda"):
            raise UserError(
                f"trainer.device={requested}: under torchrun each process uses "
                f"cuda:LOCAL_RANK; use trainer.device=auto or cuda and pick GPUs "
                f"with CUDA_VISIBLE_DEVICES"
            )
        index = int(os.environ.get("LOCAL_RANK", 0))
        if index >= torch.cuda.device_count():
            raise UserError(
                f"LOCAL_RANK={index}: only {torch.cuda.device_count()} CUDA "
                f"device(s) on this node; lower torchrun --nproc_per_node"
            )
        device = torch.device("cuda", index)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
        atexit.register(_shutdown)
    _comm_device = device if dist.get_backend() == "nccl" else torch.device("cpu")
    if rank() == 0:
        per_rank = int(cfg.data.batch_size)
        print(
            f"distributed: {world} processes ({dist.get_backend()}), data.batch_size="
            f"{per_rank} per process, global batch {per_rank * world}",
            flush=True,
        )
    else:  # one progress log: the other ranks' stdout goes nowhere (stderr stays)
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - lives as long as the process
        warnings.filterwarnings("ignore", category=UserWarning)  # same warnings as rank 0
    return device


# (world size, rank, local rank, node list, job id) variables of a scheduler's task
_SCHEDULERS = {
    "slurm": ("SLURM_STEP_NUM_TASKS", "SLURM_PROCID", "SLURM_LOCALID", "SLURM_STEP_NODELIST", "SLURM_JOB_ID"),
    "submitit_local": (
        "SUBMITIT_LOCAL_NTASKS",
        "SUBMITIT_LOCAL_GLOBALID",
        "SUBMITIT_LOCAL_LOCALID",
        None,
        "SUBMITIT_LOCAL_JOB_ID",
    ),
}


def adopt_scheduler_env(environ: dict[str, str] | None = None) -> str | None:
    """Set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT (where unset) from a
    SLURM job step or a submitit local job, so that one process per task joins the process
    group as under torchrun. Nothing when torchrun set WORLD_SIZE, or outside a scheduler's
    task (a plain `python train.py` in an salloc shell is not a step: no
    SLURM_STEP_NUM_TASKS). Returns the scheduler's name, or None."""
    env = os.environ if environ is None else environ
    if "WORLD_SIZE" in env:  # torchrun (or the user) decided
        return None
    for name, (world, rank_, local, nodes, job) in _SCHEDULERS.items():
        if world in env and rank_ in env:
            if int(env[world]) <= 1:
                return None
            env["WORLD_SIZE"], env["RANK"] = env[world], env[rank_]
            env["LOCAL_RANK"] = env.get(local, "0")
            env.setdefault("MASTER_ADDR", first_host(env.get(nodes, "")) if nodes else "")
            if not env["MASTER_ADDR"]:
                env["MASTER_ADDR"] = "127.0.0.1"
            # One port per job (the same in every task): jobs sharing a node do not collide.
            env.setdefault("MASTER_PORT", str(20000 + int(re.sub(r"\D", "", env.get(job, "0")) or 0) % 20000))
            return name
    return None


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: 'gpu[07-09,12],cpu1' -> 'gpu07' (what
    `scontrol show hostnames | head -1` says)."""
    depth, end = 0, len(nodelist)
    for i, ch in enumerate(nodelist):  # the first group ends at a comma outside brackets
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            end = i
            break
    return re.sub(r"\[([^\]\-,]*)[^\]]*\]", r"\1", nodelist[:end]).strip()


def _shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _resolve_batch_size(cfg: DictConfig, world: int) -> None:
    """trainer.global_batch_size, when set, fixes the global batch: data.batch_size (per
    process) becomes global / world size, so the same command trains the same way on any
    number of processes."""
    total = cfg.trainer.get("global_batch_size")
    if total is None:
        return
    if isinstance(total, bool) or not isinstance(total, int) or total < 1:
        raise UserError(f"trainer.global_batch_size={total!r}: expected an integer >= 1 or null")
    if total % world:
        raise UserError(
            f"trainer.global_batch_size={total}: not divisible by the {world} processes; pick a multiple of {world}"
        )
    cfg.data.batch_size = total // world


def setup_data(data: Any) -> None:
    """Prepare the data (downloads, caches) once per node before the other ranks read it:
    rank 0 first (its error reaches every rank), then each node's first rank, then the rest."""
    if not is_distributed():
        return
    on_main(data.setup)
    if not is_main() and local_rank() == 0:
        data.setup()
    dist.barrier()
    if local_rank() != 0:
        data.setup()


def wrap_model(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """DistributedDataParallel under torchrun (gradients all-reduced in backward)."""
    if not is_distributed():
        return model
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module inside torch.compile and DistributedDataParallel wrappers."""
    while True:
        inner = getattr(model, "_orig_mod", None) or getattr(model, "module", None)
        if not isinstance(inner, torch.nn.Module):
            return model
        model = inner


def rank_args() -> dict[str, int]:
    """Batches(rank=..., world_size=...): each rank's slice of the same (seed, epoch) order."""
    return {"rank": rank(), "world_size": world_size()}


def shard(split: Split) -> Split:
    """This rank's strided share of an evaluation split, without padding (so all-reduced
    sums count every sample exactly once)."""
    if not is_distributed():
        return split
    r, w = rank(), world_size()
    if isinstance(split, TensorSplit):
        return TensorSplit(split.x[r::w], split.y[r::w])
    return Subset(split, range(r, len(split), w))


# ----------------------------------------------------------------------------- collectives


def all_sum(values: list[float]) -> list[float]:
    """Element-wise sum over ranks (float64)."""
    if not is_distributed():
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=_comm_device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def mean_over_ranks(value: float) -> float:
    """Mean of a per-rank value. The train loss: every rank has the same number of samples
    per step (padded like DistributedSampler), so this is the sample-weighted mean."""
    if not is_distributed():
        return value
    return all_sum([value])[0] / world_size()


def any_rank(flag: bool) -> bool:
    """True on every rank when it is true on any rank."""
    if not is_distributed():
        return flag
    return all_sum([1.0 if flag else 0.0])[0] > 0


def on_main(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run `fn(*args, **kwargs)` on rank 0 only; every rank returns its result or raises its
    error.

    The broadcast also makes the other ranks wait until `fn` is done (the barrier after a
    save), and an error on rank 0 stops every rank instead of leaving them waiting."""
    if not is_distributed():
        return fn(*args, **kwargs)
    box: list[Any] = [None]
    if is_main():
        try:
            box[0] = ("ok", fn(*args, **kwargs))
        except BaseException as err:
            box[0] = ("user" if user_error_in(err) is not None else "crash", f"{type(err).__name__}: {err}")
            dist.broadcast_object_list(box, src=0)
            raise
    dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "ok":
        return value
    if kind == "user":
        raise FollowerError(f"rank 0 stopped: {value}")
    raise RuntimeError(f"rank 0 failed: {value}")


def broadcast_from_main(tensors: Any) -> None:
    """Overwrite each tensor with rank 0's values (in place), e.g. BatchNorm statistics."""
    if not is_distributed():
        return
    for tensor in tensors:
        dist.broadcast(tensor, src=0)


def gather_to_main(obj: Any) -> list[Any] | None:
    """Every rank's `obj` (tensors moved to the CPU first) as a list on rank 0; None elsewhere."""
    if not is_distributed():
        return [obj]
    out = [None] * world_size() if is_main() else None
    dist.gather_object(obj, out, dst=0)
    return out


def should_stop(stop: Any, reserve: float | None = None, step: int | None = None, every: int = 1) -> bool:
    """Stop now? Signals and the time budget arrive on each rank at its own moment, so under
    torchrun the ranks agree on every `every`-th step (and at epoch ends, step=None); one
    rank stopping alone would leave the others waiting in the next all-reduce."""
    local = stop.reason is not None or (reserve is not None and stop.out_of_time(reserve))
    if not is_distributed():
        return local
    if step is not None and step % every:
        return False
    if any_rank(local):
        stop.reason = stop.reason or "stop requested on another rank"
        return True
    return False
