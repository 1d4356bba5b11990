"""The trainer features of train.py's loop: lr schedules, accumulation windows, EMA, early stopping,
fast_dev_run, the graceful stop (signals, max_time), the model summary. Value ranges: engine/config.py."""

from __future__ import annotations

import contextlib
import copy
import functools
import math
import os
import signal
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR, LRScheduler
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from engine import distributed as ddp
from engine.batches import Split, TensorSplit, stop_signals
from engine.checkpoint import load_model_state
from engine.config import build
from engine.errors import EXIT_ABORTED, UserError, first_line

# ------------------------------------------------------------------ schedules, accumulation
# With scheduler.interval=step these keys are scaled by optimizer steps per epoch: schedule
# lengths stay in epochs (the curve gets smooth, not shorter).
EPOCH_KEYS = ("T_max", "step_size", "warmup_epochs", "epochs")


class WarmupCosine:
    """lr factor: (t+1)/(warmup+1) while t < warmup, then cosine from 1 to `floor` at step `total`.
    An object, so LambdaLR saves its settings in the checkpoint (another trainer.epochs is refused)."""

    def __init__(self, warmup: int, total: int, floor: float) -> None:
        self.warmup, self.total, self.floor = warmup, total, floor

    def __call__(self, t: int) -> float:
        if t < self.warmup:
            return (t + 1) / (self.warmup + 1)
        progress = min(1.0, (t - self.warmup) / max(1, self.total - self.warmup))
        return self.floor + (1 - self.floor) * 0.5 * (1 + math.cos(math.pi * progress))


def warmup_cosine(optimizer: Optimizer, warmup_epochs: int = 5, min_lr: float = 0.0, epochs: int = 100) -> LambdaLR:
    """configs/scheduler/warmup_cosine.yaml: linear warm-up, then cosine decay to `min_lr`."""
    floor = min_lr / optimizer.param_groups[0]["lr"]  # lr > 0: engine/config.py
    return LambdaLR(optimizer, WarmupCosine(warmup_epochs, epochs, floor))


def build_scheduler(cfg: DictConfig, optimizer: Optimizer, batches: int) -> tuple[LRScheduler | None, bool]:
    """(scheduler or None, whether it steps per optimizer step); `batches`: per epoch on this rank."""
    if not cfg.get("scheduler"):
        return None, False
    section = OmegaConf.to_container(cfg.scheduler, resolve=True)
    per_step = section.pop("interval", "epoch") == "step"
    steps = math.ceil(batches / int(cfg.trainer.get("accumulate_grad_batches", 1)))
    for key in EPOCH_KEYS if per_step else ():
        if isinstance(section.get(key), int):
            section[key] *= steps
    return build(section, "scheduler")(optimizer), per_step


def window_length(batch: int, batches: int, size: int) -> int:
    """Batches in the accumulation window holding `batch` (1-based) of an epoch of `batches`:
    `size`, or fewer for the epoch's last window when `size` does not divide the epoch."""
    return min(size, batches - (batch - 1) // size * size)


# ------------------------------------------------------------------- stateful features
class EMA:
    """`trainer.ema_decay`: a moving average of the weights and buffers (torch's AveragedModel; the
    first step copies) with TensorFlow's warm-up, as timm and Lightning users know it: the decay of
    update n (optimizer steps before it) is min(decay, (1 + n) / (10 + n)), so a short run is not
    stuck near its first weights. n is the run's global_step: exact on resume. Checkpoints keep it
    beside the raw weights; validation, best.pt, test and exports use it (checkpoint.inference_weights)."""

    def __init__(self, model: nn.Module, decay: float, channels_last: bool = False) -> None:
        self.decay, self.decay_now = decay, decay
        average = lambda ema, current, n: get_ema_multi_avg_fn(self.decay_now)(ema, current, n)  # noqa: E731
        self.averaged = AveragedModel(model, multi_avg_fn=average, use_buffers=True)
        self.module = self.averaged.module  # the averaged model, what validation runs
        if channels_last:  # as train.py trains the model
            self.module.to(memory_format=torch.channels_last)

    def update(self, model: nn.Module, step: int) -> None:
        """`step`: optimizer steps done before this one (train.py: progress.global_step)."""
        self.decay_now = min(self.decay, (1 + step) / (10 + step))
        self.averaged.update_parameters(model)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        load_model_state(self.module, state, "checkpoint ema_state_dict")
        self.averaged.n_averaged.fill_(1)  # only 0 (copy, not average) matters; saved after a step


class EarlyStopping:
    """`early_stopping.patience`: stop once `monitor` has not improved by more than `min_delta` for
    `patience` epochs in a row (Lightning's rule); its counter is in the checkpoint."""

    def __init__(self, patience: int, monitor: str, mode: str, min_delta: float = 0.0) -> None:
        # str(): the config's Choice enums; the state must be plain to load weights_only
        self.patience, self.monitor, self.mode = patience, str(monitor), str(mode)
        self.min_delta, self.wait = min_delta, 0  # wait: epochs since the last improvement
        self.best: float | None = None

    @property
    def stopped(self) -> bool:
        return self.wait >= self.patience

    def update(self, row: dict[str, Any]) -> bool:
        """Record an epoch's metrics row; True when the run should stop now."""
        value = float(row[self.monitor])
        if self.best is None:
            better = math.isfinite(value)
        else:
            better = value < self.best - self.min_delta if self.mode == "min" else value > self.best + self.min_delta
        self.best, self.wait = (value, 0) if better else (self.best, self.wait + 1)
        return self.stopped

    @property
    def reason(self) -> str:
        best = "none" if self.best is None else f"{self.best:.4g}"
        since = f"for {self.wait} epochs (patience {self.patience}, best {best})"
        return f"early stopping: {self.monitor} has not improved by more than {self.min_delta:g} {since}"

    def state_dict(self) -> dict[str, Any]:
        return {"monitor": self.monitor, "best": self.best, "wait": self.wait}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("monitor") == self.monitor:
            self.best, self.wait = state.get("best"), state["wait"]  # checkpoint.py checked the kinds
        elif ddp.is_main():  # another metric: its counter does not apply
            print(f"resume: early stopping now monitors {self.monitor}, not {state.get('monitor')}; its count restarts")


# ------------------------------------------------------------------------- debug runs
def fast_dev_run(cfg: DictConfig, fit: Callable[[DictConfig], dict]) -> dict:
    """`trainer.fast_dev_run=true` (Lightning's name): `fit` one epoch of one train and one val
    batch in a scratch checkpoint root, removed after: nothing written. Returns its row."""
    cfg = copy.deepcopy(cfg)  # the caller's config stays as it was
    with tempfile.TemporaryDirectory(prefix="fast_dev_run-") as scratch, open_dict(cfg):
        batches = {"limit_train_batches": 1, "limit_val_batches": 1, "overfit_batches": None}
        trainer = {"epochs": 1, "max_time": None, **batches}
        checkpoint = {"root": scratch, "every_n_steps": None, "async": False, "export": False}
        stopping = {"patience": None}
        cfg.merge_with({"resume": None, "trainer": trainer, "checkpoint": checkpoint, "early_stopping": stopping})
        row = fit(cfg)
        if ddp.is_distributed():  # every rank done before rank 0 removes the folder
            torch.distributed.barrier()
    losses = ", ".join(f"{k} {v:.4g}" for k, v in row.items() if k.endswith("loss"))
    print(f"fast_dev_run: one train batch and one val batch ran ({losses}); nothing was written")
    return row


# ---------------------------------------------------------------------- graceful stop
# The signals that stopped a training loop of this process: the submitit launcher requeues after
# the preemption notice, not after SIGTERM or Ctrl-C.
received: set[signal.Signals] = set()


class StopSignal:
    """SIGTERM, SIGINT or the preemption notice (batches.stop_signals) sets `reason`: the loop
    finishes the step, saves and exits with EXIT_INTERRUPTED; a second SIGINT aborts at once.
    `max_time`: seconds of wall clock."""

    def __init__(self, max_time: float | None = None) -> None:
        self.reason: str | None = None
        self.deadline = time.monotonic() + max_time if max_time else None
        self._previous = {sig: signal.signal(sig, self._handle) for sig in stop_signals()}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.reason is not None and signum == signal.SIGINT:
            print("\nsecond SIGINT: aborting without saving", file=sys.stderr, flush=True)
            os._exit(EXIT_ABORTED)
        received.add(signal.Signals(signum))
        self.reason = signal.Signals(signum).name
        message = f"\n{self.reason}: finishing the current step, then saving a checkpoint (Ctrl-C again to abort)"
        print(message, file=sys.stderr, flush=True)

    def out_of_time(self, reserve: float) -> bool:
        """True once the wall-clock budget minus `reserve` seconds (a save) is spent."""
        if self.deadline is not None and time.monotonic() + reserve >= self.deadline:
            self.reason = "trainer.max_time"
        return self.reason == "trainer.max_time"

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


# ---------------------------------------------------------------------- model summary
MAX_ROWS = 30  # big models (VGG16: ~40 leaf calls): the first and last MAX_ROWS // 2
Row = tuple[str, str, str, str]  # a leaf call: name, type, output shape, params


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(total, trainable) parameters; a parameter shared by two modules counts once."""
    params = list(model.parameters())
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


def size_mib(model: nn.Module) -> float:
    """Memory of the parameters and buffers (what a checkpoint of the weights holds)."""
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]) / 2**20


def _shape(output: Any) -> str:
    if isinstance(output, torch.Tensor):
        return str(list(output.shape))
    if isinstance(output, dict):
        return ", ".join(f"{k}: {_shape(v)}" for k, v in output.items()) or "-"
    if isinstance(output, (tuple, list)):
        return ", ".join(_shape(o) for o in output) or "-"
    return type(output).__name__


def _lazy(model: nn.Module) -> bool:
    """A lazy model is sized by its first batch: nothing to check or show before."""
    return any(isinstance(p, nn.parameter.UninitializedParameter) for p in model.parameters())


@contextlib.contextmanager
def _probe(model: nn.Module, device: torch.device) -> Iterator[tuple[list[Row], list[tuple[str, nn.Module, Any]]]]:
    """Forwards of `model` inside record, by forward hooks (no torchinfo), a row per leaf call
    ("(reused)" params for a module called again) and the leaf calls under way (where a failing
    forward failed). Eval, no grad, forked RNG, train flags put back: the fit check and the
    summary leave a run bitwise as it would be without them."""
    rows: list[Row] = []
    entered: list[tuple[str, nn.Module, Any]] = []

    def began(name: str, module: nn.Module, args: Any) -> None:
        entered.append((name, module, args))

    def ended(name: str, module: nn.Module, _args: Any, output: Any) -> None:
        entered.pop()
        params = "(reused)" if any(row[0] == name for row in rows) else f"{parameter_counts(module)[0]:,}"
        rows.append((name, type(module).__name__, _shape(output), params))

    handles = [m.register_forward_pre_hook(functools.partial(began, n)) for n, m in _leaves(model)]
    handles += [m.register_forward_hook(functools.partial(ended, n)) for n, m in _leaves(model)]
    modes = {m: m.training for m in model.modules()}
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad():
            model.eval()
            yield rows, entered
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes.items():  # each module's own flag (frozen BN stays)
            module.training = training


def _leaves(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name, m) for name, m in model.named_modules() if not any(m.children())]


def layer_rows(model: nn.Module, inputs: torch.Tensor) -> list[Row]:
    """The summary's table: a row per leaf call of `model(inputs)` in order, then one with
    shape "-" per leaf never called."""
    with _probe(model, inputs.device) as (rows, _):
        model(inputs)
    called = {row[0] for row in rows}
    return rows + [
        (n, type(m).__name__, "-", f"{parameter_counts(m)[0]:,}") for n, m in _leaves(model) if n not in called
    ]


def _table(rows: list[Row]) -> list[str]:
    if len(rows) > MAX_ROWS:
        half = MAX_ROWS // 2
        rows = rows[:half] + [("...", f"({len(rows) - 2 * half} more layers)", "", "")] + rows[-half:]
    table = [("layer", "type", "output shape", "params"), *rows]
    widths = [max(len(r[i]) for r in table) for i in range(4)]
    return [
        "  " + "  ".join([*(r[i].ljust(widths[i]) for i in range(3)), r[3].rjust(widths[3])]).rstrip() for r in table
    ]


def sample_batch(split: Split, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The first two samples of `split` as a batch (forked RNG: a Dataset drawing in __getitem__)."""
    with torch.random.fork_rng(devices=[]):
        if isinstance(split, TensorSplit):
            return split.x[:2].to(device), split.y[:2].to(device)
        pairs = [split[i] for i in range(min(2, len(split)))]
        return tuple(torch.stack([torch.as_tensor(p[k]) for p in pairs]).to(device) for k in (0, 1))


def check_fits(model: nn.Module, loss_fn: Any, split: Split, device: torch.device, cfg: DictConfig) -> None:
    """A model that does not fit the data (or a loss that does not fit the model) stops here, before
    the run folder is touched: one line with the layer, the input shape it got and the key to change."""
    if _lazy(model):
        return
    x, y = sample_batch(split, device)
    what = f"model={_choice(cfg, 'model')} does not fit data={_choice(cfg, 'data')}"
    keys = "data.image_size, data.in_channels" if x.dim() == 4 else "data.features"
    with _probe(model, device) as (_, entered):
        try:
            output = model(x)
        except Exception as err:
            where = "its forward"
            if entered:
                name, module, args = entered[-1]
                shapes = [list(a.shape) for a in args if isinstance(a, torch.Tensor)]
                where = f"layer {name} ({type(module).__name__}) got input of shape {shapes[0] if shapes else '?'}"
            raise UserError(
                f"{what}: {where} ({first_line(err, 120)}); the data gives inputs of shape {list(x.shape)}: "
                f"change {keys} or the model"
            ) from None
        try:
            with warnings.catch_warnings():  # MSELoss warns of broadcasting, then fails
                warnings.simplefilter("ignore")
                loss_fn(output, y)
        except Exception as err:
            raise UserError(
                f"loss {type(loss_fn).__name__} does not fit the model's output {list(output.shape)} and targets "
                f"{list(y.shape)} ({first_line(err, 120)}); class labels: loss=cross_entropy (log_softmax "
                f"outputs: loss=nll), numbers: loss=mse or l1"
            ) from None


def _choice(cfg: DictConfig, group: str) -> str:
    """What the command line picked for `group` (its _target_ when composed without Hydra's runtime)."""
    try:
        return str(HydraConfig.get().runtime.choices[group])
    except Exception:  # tests, the compose API
        return str(OmegaConf.select(cfg, f"{group}._target_", default="?"))


def model_summary(model: nn.Module, split: Split, device: torch.device) -> str:
    """What train.py prints at the start (`trainer.model_summary`): parameter counts, size, and
    the layer table for the first two samples of `split`."""
    if _lazy(model):
        why = "lazy (uninitialised) parameters; no summary before the first batch"
        return f"model {type(model).__name__}: {why} (trainer.model_summary=false hides this line)"
    total, trainable = parameter_counts(model)
    counts = f"{total:,} parameters ({trainable:,} trainable, {total - trainable:,} frozen)"
    lines = [f"model {type(model).__name__}: {counts}, {size_mib(model):.2f} MiB with buffers"]
    try:
        inputs = sample_batch(split, device)[0]
        rows = layer_rows(model, inputs)
    except Exception as err:  # the summary never decides whether a run starts
        lines.append(f"  (no layer table: the forward of a sample batch failed: {first_line(err)})")
    else:
        lines += [f"  layers for an input batch of shape {list(inputs.shape)}:", *_table(rows)]
    return "\n".join(lines)
