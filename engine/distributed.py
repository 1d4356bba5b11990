"""torch.distributed for train.py: one process per device under torchrun, nothing otherwise.

torchrun starts N copies of train.py and sets RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and
MASTER_PORT in each. When WORLD_SIZE > 1, `setup_distributed` joins the default process group
(nccl for CUDA devices, gloo for CPU) and the helpers below become collectives; without
torchrun every helper is a no-op, so `python train.py` runs the single-process code unchanged.

Rules the helpers keep, so that no rank ever waits forever for another:
  * every rank calls a collective helper at the same points in the same order;
  * rank 0 alone touches the run directory (checkpoints, metrics.csv, plots, config.yaml) in
    `on_main`, which hands its result - or its error - to every rank, and doubles as the
    barrier after a save;
  * a decision one rank can take alone (a NaN loss, a stop signal, the time budget) is
    all-reduced before anyone acts on it.
"""

from __future__ import annotations

import atexit
import functools
import os
import sys
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from omegaconf import DictConfig

from data.base import Split, TensorSplit
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
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = resolve_device(cfg.trainer.device)
    _resolve_batch_size(cfg, world)
    if world <= 1:
        return device
    if device.type == "mps":
        raise UserError("trainer.device=mps: torch.distributed has no MPS backend; run "
                        "torchrun with trainer.device=cpu, or plain python train.py on MPS")
    if device.type == "cuda":
        requested = str(cfg.trainer.device)
        if requested not in ("auto", "cuda"):
            raise UserError(f"trainer.device={requested}: under torchrun each process uses "
                            f"cuda:LOCAL_RANK; use trainer.device=auto or cuda and pick GPUs "
                            f"with CUDA_VISIBLE_DEVICES")
        index = int(os.environ.get("LOCAL_RANK", 0))
        if index >= torch.cuda.device_count():
            raise UserError(f"LOCAL_RANK={index}: only {torch.cuda.device_count()} CUDA "
                            f"device(s) on this node; lower torchrun --nproc_per_node")
        device = torch.device("cuda", index)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
        atexit.register(_shutdown)
    _comm_device = device if dist.get_backend() == "nccl" else torch.device("cpu")
    if rank() == 0:
        per_rank = int(cfg.data.batch_size)
        print(f"distributed: {world} processes ({dist.get_backend()}), data.batch_size="
              f"{per_rank} per process, global batch {per_rank * world}", flush=True)
    else:  # one progress log: the other ranks' stdout goes nowhere (stderr stays)
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - lives as long as the process
        warnings.filterwarnings("ignore", category=UserWarning)  # same warnings as rank 0
    return device


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
        raise UserError(f"trainer.global_batch_size={total!r}: expected an integer >= 1 "
                        f"or null")
    if total % world:
        raise UserError(f"trainer.global_batch_size={total}: not divisible by the {world} "
                        f"processes; pick a multiple of {world}")
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
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index]
                                   if device.type == "cuda" else None)


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
    from torch.utils.data import Subset

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


def on_main(fn: Callable[[], T]) -> T:
    """Run `fn` on rank 0 only; every rank returns its result or raises its error.

    The broadcast also makes the other ranks wait until `fn` is done (the barrier after a
    save), and an error on rank 0 stops every rank instead of leaving them waiting."""
    if not is_distributed():
        return fn()
    box: list[Any] = [None]
    if is_main():
        try:
            box[0] = ("ok", fn())
        except BaseException as err:
            box[0] = ("user" if user_error_in(err) is not None else "crash",
                      f"{type(err).__name__}: {err}")
            dist.broadcast_object_list(box, src=0)
            raise
    dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "ok":
        return value
    if kind == "user":
        raise FollowerError(f"rank 0 stopped: {value}")
    raise RuntimeError(f"rank 0 failed: {value}")


class MainOnly:
    """A proxy whose method calls run on rank 0 only (`on_main`); other attributes read
    through. Used for the Saver: only rank 0 writes checkpoints, every rank waits for it."""

    def __init__(self, target: Any) -> None:
        self._target = target

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._target, name)
        if not callable(value):
            return value

        @functools.wraps(value)
        def call(*args: Any, **kwargs: Any) -> Any:
            return on_main(lambda: value(*args, **kwargs))

        return call


def gather_to_main(obj: Any) -> list[Any] | None:
    """Every rank's `obj` (tensors moved to the CPU first) as a list on rank 0; None elsewhere."""
    if not is_distributed():
        return [obj]
    out = [None] * world_size() if is_main() else None
    dist.gather_object(obj, out, dst=0)
    return out


def should_stop(stop: Any, reserve: float | None = None, step: int | None = None,
                every: int = 1) -> bool:
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


# ------------------------------------------------------------------------- checkpoints

def rank_states(state: dict[str, Any]) -> list[dict[str, Any]] | None:
    """Each rank's resume state (RNG, this epoch's step losses), gathered on rank 0."""
    if not is_distributed():
        return None
    return gather_to_main(state)


def resume_state_for_rank(checkpoint: dict[str, Any]) -> tuple[dict | None, Any, int]:
    """(RNG state, epoch step losses, step in epoch) this rank resumes from.

    Same world size: each rank its own saved share, so the run continues bit for bit.
    Another world size (a single-process checkpoint under torchrun, or back): rank 0 takes
    the saved RNG state, the others keep their fresh seeds; a half-done epoch restarts
    from its first batch, because the per-rank slices of its order have changed."""
    saved_world = int(checkpoint.get("world_size", 1))
    step = int(checkpoint.get("step_in_epoch", 0))
    shares = checkpoint.get("rank_states")
    if saved_world == world_size():
        if shares and len(shares) == saved_world:
            mine = shares[rank()]
            return mine["rng_state"], mine["epoch_step_losses"], step
        return checkpoint.get("rng_state"), checkpoint.get("epoch_step_losses"), step
    if is_main():
        warnings.warn(f"the checkpoint was written by {saved_world} process(es), this run has "
                      f"{world_size()}: each process now sees other samples, so the result "
                      f"will not match an uninterrupted run"
                      + (f"; epoch {int(checkpoint['epoch']) + 1} restarts from its first "
                         f"batch" if step else ""), stacklevel=3)
    rng = checkpoint.get("rng_state") if is_main() else None
    if step:
        return rng, None, 0
    return rng, checkpoint.get("epoch_step_losses"), step


def load_on_rank(path: str, device: torch.device) -> dict:
    """The checkpoint rank 0 chose, read by another rank (same file system needed)."""
    from engine.checkpoint import load_checkpoint

    try:
        return load_checkpoint(path, device)
    except UserError as err:
        raise UserError(f"rank {rank()}: {err} (with several nodes, checkpoint.root must be "
                        f"on a file system every node shares)") from None


def evaluate_all(model: torch.nn.Module, batches: Any, loss_fn: Any, classification: bool,
                 autocast_ctx: Any = None) -> dict[str, float]:
    """metrics.evaluate over every rank's `shard` of the split, summed and divided once:
    the same numbers one process gets on the whole split. Runs the plain module, so no
    collective happens inside the loop and shards may differ in length."""
    from engine.metrics import evaluate

    if not is_distributed():
        return evaluate(model, batches, loss_fn, classification, autocast_ctx)
    module = unwrap(model)
    for buffer in module.buffers():  # BatchNorm statistics: rank 0's, the ones it saves
        dist.broadcast(buffer, src=0)
    local = evaluate(module, batches, loss_fn, classification, autocast_ctx)
    n = batches.samples()  # this rank's samples (trainer.limit_val_batches may cut them)
    loss_sum, hits, total = all_sum([local["loss"] * n if n else 0.0,
                                     local.get("acc", 0.0) * n if n else 0.0, float(n)])
    result = {"loss": loss_sum / total if total else float("nan")}
    if classification:
        result["acc"] = hits / total if total else float("nan")
    return result
