"""torch.distributed for train.py: one process per device under torchrun (or a SLURM / submitit
job step of several tasks); otherwise every helper is a no-op. No rank waits forever: all call
the collectives at the same points in the same order, rank 0 alone writes the run folder
(`on_main`, `rank_zero_only`), and a decision one rank can take alone (a NaN loss, a stop
signal, the time budget) is all-reduced before anyone acts on it."""

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


class FollowerError(UserError):
    """Another rank's error, re-raised here so this rank exits too; printed by that rank only."""

    quiet = True


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def is_main() -> bool:
    return rank() == 0


def rank_zero_only(fn: Callable[..., T]) -> Callable[..., T | None]:
    """Run `fn` on rank 0 only (files every rank would otherwise write at once)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> T | None:
        return fn(*args, **kwargs) if is_main() else None

    return wrapper


def setup_distributed(cfg: DictConfig) -> torch.device:
    """Resolve the device and the per-process batch size; join the process group (nccl on
    CUDA, gloo on the CPU) under torchrun. Returns this process's device (cuda:LOCAL_RANK)."""
    adopt_scheduler_env()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = resolve_device(cfg.trainer.device)
    _resolve_batch_size(cfg, world)
    if world <= 1:
        return device
    if device.type == "mps":
        raise UserError(
            "trainer.device=mps: torch.distributed has no MPS backend; run torchrun with trainer.device=cpu, "
            "or plain python train.py on MPS"
        )
    if device.type == "cuda":
        if str(cfg.trainer.device) not in ("auto", "cuda"):
            raise UserError(
                f"trainer.device={cfg.trainer.device}: under torchrun each process uses cuda:LOCAL_RANK; use "
                "trainer.device=auto or cuda and pick GPUs with CUDA_VISIBLE_DEVICES"
            )
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        if device.index >= torch.cuda.device_count():
            raise UserError(
                f"LOCAL_RANK={device.index}: only {torch.cuda.device_count()} CUDA device(s) on this node; "
                "lower torchrun --nproc_per_node"
            )
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(
            "nccl" if device.type == "cuda" else "gloo", device_id=device if device.type == "cuda" else None
        )
        atexit.register(shutdown)
    if rank() == 0:
        per_rank = int(cfg.data.batch_size)
        print(
            f"distributed: {world} processes ({dist.get_backend()}), data.batch_size={per_rank} per process, "
            f"global batch {per_rank * world}",
            flush=True,
        )
    else:  # one progress log: the other ranks' stdout goes nowhere (stderr stays)
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - lives as long as the process
        warnings.filterwarnings("ignore", category=UserWarning)  # same warnings as rank 0
    return device


# (world size, rank, local rank, node list, job id) variables of a scheduler's task
_SCHEDULERS = {
    "slurm": ("SLURM_STEP_NUM_TASKS", "SLURM_PROCID", "SLURM_LOCALID", "SLURM_STEP_NODELIST", "SLURM_JOB_ID"),
    "submitit_local": tuple(f"SUBMITIT_LOCAL_{v}" for v in ("NTASKS", "GLOBALID", "LOCALID", "NODELIST", "JOB_ID")),
}  # submitit has no node list (all tasks on this host): MASTER_ADDR is 127.0.0.1


def adopt_scheduler_env(environ: dict[str, str] | None = None) -> str | None:
    """Set torchrun's variables (where unset) from a SLURM job step or a submitit local job of
    several tasks; nothing when WORLD_SIZE is set or outside a step (a plain `python train.py`
    in an salloc shell has no SLURM_STEP_NUM_TASKS). Returns the scheduler's name, or None."""
    env = os.environ if environ is None else environ
    if "WORLD_SIZE" in env:  # torchrun (or the user) decided
        return None
    for name, (world, rank_, local, nodes, job) in _SCHEDULERS.items():
        if int(env.get(world, 1)) > 1 and rank_ in env:
            env["WORLD_SIZE"], env["RANK"], env["LOCAL_RANK"] = env[world], env[rank_], env.get(local, "0")
            env.setdefault("MASTER_ADDR", first_host(env.get(nodes, "")) or "127.0.0.1")
            # One port per job (the same in every task): jobs sharing a node do not collide.
            env.setdefault("MASTER_PORT", str(20000 + int(re.sub(r"\D", "", env.get(job, "0")) or 0) % 20000))
            return name
    return None


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: 'gpu[07-09,12],cpu1' -> 'gpu07'."""
    first = re.match(r"(?:[^,\[]|\[[^\]]*\])*", nodelist).group()  # up to a comma outside brackets
    return re.sub(r"\[([^\]\-,]*)[^\]]*\]", r"\1", first).strip()


def shutdown() -> None:
    """Destroy the process group while the interpreter is whole: left to interpreter exit, gloo's
    threads sometimes abort the process ("terminate called without an active exception")."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _resolve_batch_size(cfg: DictConfig, world: int) -> None:
    """trainer.global_batch_size (an integer >= 1 by config.check_limits) fixes the global batch:
    data.batch_size becomes global / world size, so any number of processes trains the same way."""
    total = cfg.trainer.get("global_batch_size")
    if total is None:
        return
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
    node_first = int(os.environ.get("LOCAL_RANK", 0)) == 0
    if node_first and not is_main():
        data.setup()
    dist.barrier()
    if not node_first:
        data.setup()


def wrap_model(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """DistributedDataParallel under torchrun (gradients all-reduced in backward)."""
    if not is_distributed():
        return model
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module inside torch.compile and DistributedDataParallel wrappers."""
    while isinstance(inner := getattr(model, "_orig_mod", None) or getattr(model, "module", None), torch.nn.Module):
        model = inner
    return model


def shard(split: Split) -> Split:
    """This rank's strided share of an evaluation split, without padding (so all-reduced sums
    count every sample exactly once)."""
    if not is_distributed():
        return split
    if isinstance(split, TensorSplit):
        return TensorSplit(split.x[rank() :: world_size()], split.y[rank() :: world_size()])
    return Subset(split, range(rank(), len(split), world_size()))


def all_sum(values: list[float]) -> list[float]:
    """Element-wise sum over ranks (float64; on this rank's GPU under nccl)."""
    if not is_distributed():
        return list(values)
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"  # "cuda": the current one, set_device'd
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def mean_over_ranks(value: float) -> float:
    """Mean of a per-rank value. The train loss: every rank has the same number of samples
    per step (padded like DistributedSampler), so this is the sample-weighted mean."""
    return all_sum([value])[0] / world_size()


def any_rank(flag: bool) -> bool:
    """True on every rank when it is true on any rank."""
    return all_sum([1.0 if flag else 0.0])[0] > 0


def on_main(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """`fn(*args, **kwargs)` on rank 0 only; every rank returns its result or raises its error.
    The broadcast doubles as the barrier after a save; rank 0's error stops every rank."""
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
    for tensor in tensors if is_distributed() else ():
        dist.broadcast(tensor, src=0)


def gather_to_main(obj: Any) -> list[Any] | None:
    """Every rank's `obj` (tensors moved to the CPU first) as a list on rank 0; None elsewhere."""
    if not is_distributed():
        return [obj]
    out = [None] * world_size() if is_main() else None
    dist.gather_object(obj, out, dst=0)
    return out


def should_stop(stop: Any, reserve: float | None = None, step: int | None = None, every: int = 1) -> bool:
    """Stop now? Signals and the time budget reach each rank at its own moment, so under
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
