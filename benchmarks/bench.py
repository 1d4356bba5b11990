"""`make bench`: the template side by side with hand-written PyTorch, every figure a ratio.

    python benchmarks/bench.py            # full run (a few minutes on 2 cores)
    python benchmarks/bench.py --quick    # small sizes, one repetition: proves it works
    python benchmarks/bench.py --only 3,5 --reps 7

Every figure compares A (the template's own code) with B (a hand-written reference) measured
in the same process run: A and B alternate (A B, then B A, ...) over several repetitions and
the median of the per-repetition ratios is reported, so slow drift of a shared machine (other
jobs, thermal, page cache) hits both sides alike. The table goes to stdout; JSON and CSV go
to bench-results/ (git-ignored).

1. step time of train.py's own loop (train.train() run in-process; its training batches are
   timed by wrapping Batches.__call__, nothing else is changed) vs a minimal hand-written loop
   with the same index batching, model, data, batch size and seed. The two run in lockstep,
   one step each in turn, and end with bit-identical weights (checked).
2. epoch time of the same template loop vs a DataLoader(TensorDataset) loop (in lockstep too).
3. checkpoint write throughput of engine.run_dir.atomic_save vs a raw sequential write of
   the same number of bytes to the same disk, both fsynced.
4. checkpoint.async=true: how long save() blocks training, as a fraction of a synchronous save.
5. restore of a checkpoint (load_checkpoint + restore_checkpoint, the resume path) vs a raw
   torch.load of the same file.
6. start-up: process start to the first training step of `python train.py` vs
   `python -c "import torch, torchvision"` (and vs a minimal hand-written training script).
7. GPU throughput: needs a GPU.
8. long runs of a tiny model, tutorial 002's workflow (quadratic CSV, batch 128, lr 1e-4, a
   checkpoint every tenth of the run, 4N = 10,000 epochs as in the tutorial): `python
   train.py` vs the tutorial's own script (benchmarks/tutorial_002.py), whole processes; and
   train.py's cost per epoch in a run 4x as long, (T(4N) - T(1)) / (4N - 1) vs
   (T(N) - T(1)) / (N - 1): 1.0 when an epoch costs the same however long the run is.
9. whole process vs a hand loop: `python train.py experiment=digits_cnn trainer.epochs=8` (a
   checkpoint every epoch) and `experiment=linear_regression trainer.epochs=300` (every 50, as
   its config) vs the script a tutorial has you write for the same training (same data,
   model, loss, optimizer, lr, batch size, seed; DataLoader, validation every epoch,
   torch.save checkpoints, a test at the end: benchmarks/hand_loop.py), whole processes
   alternated; and the time per epoch inside them (from epoch 1's line to the last epoch's
   line of each process's output). Goals: <= 1.10x (digits), <= 1.25x (linear).
10. vs PyTorch Lightning: the same two workloads as a LightningModule + Trainer
   (benchmarks/lightning_loop.py: ModelCheckpoint at the same epochs, CSVLogger, no progress
   bar or model summary), whole process and per epoch, alternated with 9's runs. Needs
   `pip install -e '.[bench]'` (skipped otherwise). 9 and 10 check that all three trained the
   same thing (epoch 1's and the final train loss; the notes give them).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import importlib.util
import io
import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

perf = time.perf_counter


# ------------------------------------------------------------------------------ results


@dataclass
class Row:
    item: str
    name: str
    a_label: str
    b_label: str
    a: float  # median of A over the repetitions (seconds, or MiB/s where unit says so)
    b: float
    unit: str  # "s" or "MiB/s"
    ratio: float  # median of the per-repetition ratios
    ratio_kind: str  # what the ratio means, e.g. "A/B", "B/A", "A-B s"
    target: str
    ok: bool | None
    reps: int
    note: str = ""
    a_all: list[float] = field(default_factory=list)
    b_all: list[float] = field(default_factory=list)
    ratio_all: list[float] = field(default_factory=list)


@dataclass
class Skipped:
    item: str
    name: str
    reason: str


def median(values: Iterable[float]) -> float:
    return float(statistics.median(list(values)))


def alternate(funcs: dict[str, Callable[[int], Any]], reps: int) -> dict[str, list[Any]]:
    """Run every function once per repetition, reversing the order on odd repetitions."""
    out: dict[str, list[Any]] = {name: [] for name in funcs}
    names = list(funcs)
    for rep in range(reps):
        for name in names if rep % 2 == 0 else names[::-1]:
            out[name].append(funcs[name](rep))
    return out


def fmt_seconds(s: float) -> str:
    if s < 1e-3:
        return f"{s * 1e6:.1f} us"
    if s < 1:
        return f"{s * 1e3:.2f} ms"
    return f"{s:.2f} s"


def fmt_value(value: float, unit: str) -> str:
    return f"{value:.0f} MiB/s" if unit == "MiB/s" else fmt_seconds(value)


def fmt_ratio(row: Row) -> str:
    if row.ratio_kind.endswith(" s"):
        return f"{row.ratio:+.2f} s"
    return f"{row.ratio:.3f}x"


def print_table(rows: list[Row | Skipped]) -> None:
    header = ("item", "measurement", "A (template)", "B (reference)", "ratio", "target", "ok")
    lines = []
    for row in rows:
        if isinstance(row, Skipped):
            lines.append((row.item, row.name, f"skipped: {row.reason}", "", "", "", ""))
            continue
        ok = "" if row.ok is None else ("yes" if row.ok else "NO")
        lines.append(
            (
                row.item,
                row.name,
                fmt_value(row.a, row.unit),
                fmt_value(row.b, row.unit),
                f"{fmt_ratio(row)} ({row.ratio_kind})",
                row.target,
                ok,
            )
        )
    widths = [max(len(str(c)) for c in col) for col in zip(header, *lines, strict=True)]
    for i, line in enumerate([header, *lines]):
        print("  ".join(str(c).ljust(w) for c, w in zip(line, widths, strict=True)).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))
    notes = [r for r in rows if isinstance(r, Row) and r.note]
    if notes:
        print()
        for row in notes:
            print(f"[{row.item} {row.name}] {row.note}")


def machine() -> dict[str, Any]:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import torchvision

        vision = torchvision.__version__
    except ImportError:
        vision = None
    return {
        "cores": os.cpu_count(),
        "cpu": cpu,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "torchvision": vision,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cuda": torch.cuda.is_available(),
    }


# ------------------------------------------------------------------ 1-2: training loops


def compose_train(overrides: list[str]):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    GlobalHydra.instance().clear()
    return cfg


class Lockstep:
    """Runs the reference loops in lockstep with train.py's loop: after each template step,
    one step of each reference, every step timed on its own. Contention from other jobs on a
    shared machine then falls on both sides alike, millisecond by millisecond.

    A template step is timed from just before its batch is fetched (for an epoch's first
    step: before Batches computes the epoch's order) to the end of its loop body; a reference
    step likewise (its first step of an epoch includes building that epoch's order or
    DataLoader iterator). Each reference keeps its own torch RNG state (dropout)."""

    def __init__(self, references: dict[str, Iterator[None]], rng_states: dict[str, torch.Tensor]) -> None:
        self.references, self.rng = references, rng_states
        self.epochs: dict[str, list[list[float]]] = {"template": [], **{k: [] for k in references}}

    def timed(self, batches: Iterable, begin: float) -> Iterator:
        for times in self.epochs.values():
            times.append([])
        it, resume = iter(batches), begin
        while True:
            try:
                item = next(it)
            except StopIteration:
                return
            yield item  # the template's loop body runs here
            self.epochs["template"][-1].append(perf() - resume)
            for name, steps in self.references.items():
                template_rng = torch.get_rng_state()
                torch.set_rng_state(self.rng[name])
                start = perf()
                next(steps)
                self.epochs[name][-1].append(perf() - start)
                self.rng[name] = torch.get_rng_state()
                torch.set_rng_state(template_rng)
            resume = perf()

    def step_time(self, name: str) -> float:
        """Mean seconds per steady step: every epoch's first step is left out (the epoch's
        order is built there, and in train.py it follows validation, with cold caches; its
        cost is in `first_step_time` and in the epoch times of item 2), as is the first
        (warm-up) epoch when there are several."""
        epochs = self.epochs[name]
        steps = [t for e in (epochs[1:] if len(epochs) > 1 else epochs) for t in e[1:]]
        return sum(steps) / len(steps)

    def first_step_time(self, name: str) -> float:
        epochs = self.epochs[name]
        return median(e[0] for e in (epochs[1:] if len(epochs) > 1 else epochs))

    def epoch_time(self, name: str) -> float:
        return median(sum(e) for e in self.epochs[name][1:])


@contextlib.contextmanager
def timed_train_batches(clock: Lockstep):
    """Observe train.py's training batches without changing its loop: Batches.__call__ (the
    shuffled training split only) is wrapped so each epoch's iteration is timed."""
    from engine.batches import Batches

    original = Batches.__call__

    def wrapped(self, epoch: int = 0, start: int = 0):
        begin = perf()
        batches = original(self, epoch, start)
        return clock.timed(batches, begin) if self.shuffle else batches

    Batches.__call__ = wrapped
    try:
        yield
    finally:
        Batches.__call__ = original


@dataclass
class Workload:
    name: str
    overrides: list[str]
    epochs: int
    reps: int
    dataloader: bool  # also item 2 (DataLoader(TensorDataset) loop)
    data: dict | None = None  # replaces cfg.data (synthetic images)


def workload_cfg(work: Workload, root: Path, run_name: str):
    from omegaconf import open_dict

    cfg = compose_train(
        [
            *work.overrides,
            f"trainer.epochs={work.epochs}",
            "trainer.device=cpu",
            f"checkpoint.every_n_epochs={work.epochs}",
            "checkpoint.every_n_steps=null",
            f"checkpoint.root={root}",
            f"run_name={run_name}",
        ]
    )
    if work.data is not None:
        with open_dict(cfg):
            cfg.data = {**work.data, "seed": int(cfg.seed)}
    return cfg


def build_hand(cfg):
    """What a hand-written script builds: same seed, data, model, loss and optimizer."""
    from hydra.utils import instantiate

    torch.manual_seed(cfg.seed)
    data = instantiate(cfg.data)
    model = instantiate(cfg.model)
    loss_fn = instantiate(cfg.loss)
    optimizer = instantiate(cfg.optimizer)(model.parameters())
    split = data.split("train")
    return (model, loss_fn, optimizer, split.x, split.y, int(cfg.data.batch_size), int(cfg.seed))


def hand_index_loop(built: tuple, epochs: int) -> Iterator[None]:
    """A minimal hand-written loop with in-memory index batching (the same epoch order);
    yields after each step."""
    from engine.batches import ORDER_SEED_STRIDE

    model, loss_fn, optimizer, x_all, y_all, batch_size, seed = built
    model.train()
    for epoch in range(1, epochs + 1):
        gen = torch.Generator().manual_seed(seed * ORDER_SEED_STRIDE + epoch)
        order = torch.randperm(len(x_all), generator=gen)
        for idx in order.split(batch_size):
            x, y = x_all[idx], y_all[idx]
            loss = loss_fn(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            yield


def hand_dataloader_loop(built: tuple, epochs: int) -> Iterator[None]:
    """The tutorial loop: DataLoader(TensorDataset(x, y), shuffle=True); yields per step."""
    from torch.utils.data import DataLoader, TensorDataset

    model, loss_fn, optimizer, x_all, y_all, batch_size, seed = built
    loader = DataLoader(
        TensorDataset(x_all, y_all), batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed)
    )
    model.train()
    for _ in range(epochs):
        for x, y in loader:
            loss = loss_fn(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            yield


def same_weights(run_dir: Path, model: torch.nn.Module) -> bool:
    state = torch.load(run_dir / "last.pt", weights_only=True, mmap=True)["model_state_dict"]
    mine = model.state_dict()
    return state.keys() == mine.keys() and all(torch.equal(state[k], mine[k]) for k in mine)


def bench_training(works: list[Workload], scratch: Path) -> list[Row]:
    import train as train_script

    rows = []
    for work in works:
        started = perf()
        root = scratch / "train"
        step_ratios, speedups, a_steps, b_steps, a_epochs, c_epochs = [], [], [], [], [], []
        first_extra: list[float] = []
        identical = True
        for rep in range(work.reps):
            cfg = workload_cfg(work, root, f"{work.name}-{rep}")
            references, rng, models = {}, {}, {}
            names = ["hand", "loader"] if work.dataloader else ["hand"]
            if rep % 2:
                names.reverse()  # which reference runs first after a template step
            for name in names:
                built = build_hand(cfg)
                rng[name], models[name] = torch.get_rng_state(), built[0]
                loop = hand_index_loop if name == "hand" else hand_dataloader_loop
                references[name] = loop(built, work.epochs)
            clock = Lockstep(references, rng)
            with timed_train_batches(clock), contextlib.redirect_stdout(io.StringIO()):
                train_script.train(cfg)
            identical = identical and same_weights(root / f"{work.name}-{rep}", models["hand"])
            shutil.rmtree(root, ignore_errors=True)
            first_extra.append(clock.first_step_time("template") - clock.first_step_time("hand"))
            a_steps.append(clock.step_time("template"))
            b_steps.append(clock.step_time("hand"))
            step_ratios.append(a_steps[-1] / b_steps[-1])
            if work.dataloader:
                a_epochs.append(clock.epoch_time("template"))
                c_epochs.append(clock.epoch_time("loader"))
                speedups.append(c_epochs[-1] / a_epochs[-1])
        ratio = median(step_ratios)
        rows.append(
            Row(
                "1",
                f"step time, {work.name}",
                "train.py loop",
                "hand-written loop",
                median(a_steps),
                median(b_steps),
                "s",
                ratio,
                "A/B",
                "<= 1.03",
                ratio <= 1.03,
                work.reps,
                note=f"same final weights as train.py: {'yes' if identical else 'NO'}; "
                f"{work.epochs} epoch(s) per repetition, steps interleaved; each epoch's "
                f"first step (not counted) took {fmt_seconds(median(first_extra))} longer "
                f"in train.py; {perf() - started:.0f} s",
                a_all=a_steps,
                b_all=b_steps,
                ratio_all=step_ratios,
            )
        )
        if work.dataloader:
            speedup = median(speedups)
            target = ">= 3" if work.name == "linear regression" else "(none)"
            rows.append(
                Row(
                    "2",
                    f"epoch time, {work.name}",
                    "train.py loop",
                    "DataLoader(TensorDataset)",
                    median(a_epochs),
                    median(c_epochs),
                    "s",
                    speedup,
                    "B/A speed-up",
                    target,
                    speedup >= 3 if target == ">= 3" else None,
                    work.reps,
                    a_all=a_epochs,
                    b_all=c_epochs,
                    ratio_all=speedups,
                )
            )
        if work.dataloader:
            rows.append(batches_only(work, root))
        print(f"  {work.name}: {perf() - started:.0f} s", flush=True)
    return rows


def batches_only(work: Workload, root: Path) -> Row:
    """The data side alone: an epoch of the template's Batches vs of the DataLoader, no model
    (per-sample Python in the DataLoader is what index batching removes)."""
    from hydra.utils import instantiate
    from torch.utils.data import DataLoader, TensorDataset

    from engine.batches import Batches

    cfg = workload_cfg(work, root, "unused")
    data = instantiate(cfg.data)
    split = data.split("train")
    batches = Batches(split, data.batch_size, torch.device("cpu"), shuffle=True, seed=cfg.seed)
    loader = DataLoader(
        TensorDataset(split.x, split.y),
        batch_size=data.batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(cfg.seed),
    )
    epochs = 50 if len(split) < 1000 else 5

    def timed_epochs(make: Callable[[int], Iterable]) -> Callable[[int], float]:
        def run(rep: int) -> float:
            times = []
            for epoch in range(epochs):
                start = perf()
                for _ in make(epoch):
                    pass
                times.append(perf() - start)
            return median(times)

        return run

    reps = max(3, work.reps)
    runs = alternate({"template": timed_epochs(batches), "loader": timed_epochs(lambda epoch: loader)}, reps)
    speedups = [c / a for a, c in zip(runs["template"], runs["loader"], strict=True)]
    return Row(
        "2",
        f"batches only (no model), {work.name}",
        "Batches (index)",
        "DataLoader(TensorDataset)",
        median(runs["template"]),
        median(runs["loader"]),
        "s",
        median(speedups),
        "B/A speed-up",
        "(none)",
        None,
        reps,
        note="an epoch of batches with no training step: the part of the epoch the template's batching controls",
        a_all=runs["template"],
        b_all=runs["loader"],
        ratio_all=speedups,
    )


# ---------------------------------------------------------------------- 3-5: checkpoints


def checkpoint_state(quick: bool) -> tuple[dict, Any, Callable[[], tuple]]:
    """A realistic training checkpoint (build_checkpoint of VGG16 + SGD momentum, as in
    experiment=vgg16_cifar10), and a factory for a fresh model/optimizer to restore into."""
    from engine.checkpoint import Progress, build_checkpoint

    cfg = compose_train(["experiment=vgg16_cifar10", "trainer.device=cpu"])

    def fresh() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        if quick:  # ~16 MiB of weights: the same code path in a fraction of a second
            model = torch.nn.Sequential(
                torch.nn.Linear(1024, 2048), torch.nn.ReLU(), torch.nn.Linear(2048, 1024), torch.nn.Linear(1024, 10)
            )
        else:
            from models.vgg16 import build_vgg16

            model = build_vgg16(num_classes=10)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
        return model, optimizer

    torch.manual_seed(0)
    model, optimizer = fresh()
    for p in model.parameters():  # one step creates the momentum buffers (non-zero data)
        p.grad = p.detach() * 1e-3
    optimizer.step()
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    progress = Progress(epoch=1, step_in_epoch=10, global_step=100, losses=[torch.tensor(0.5)] * 10)
    from omegaconf import OmegaConf

    config = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)  # as train.py
    state = build_checkpoint(
        {"model": model, "optimizer": optimizer, "scheduler": None, "scaler": scaler}, progress, config
    )
    return state, cfg, fresh


def storages(state: Any) -> list[torch.Tensor]:
    """Each distinct tensor storage of `state` once, as a flat uint8 tensor."""
    seen, out = set(), []

    def walk(obj: Any) -> None:
        if isinstance(obj, torch.Tensor):
            storage = obj.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                out.append(torch.empty(0, dtype=torch.uint8).set_(storage))
        elif isinstance(obj, dict):
            for value in obj.values():
                walk(value)
        elif isinstance(obj, (list, tuple)):
            for value in obj:
                walk(value)

    walk(state)
    return out


def raw_write(chunks: list[torch.Tensor], nbytes: int, path: Path) -> None:
    """The baseline: the same bytes written sequentially with plain write() calls, fsync."""
    written = 0
    with open(path, "wb", buffering=0) as out:
        for chunk in chunks:
            view = memoryview(chunk.numpy())[: max(0, nbytes - written)]
            while view.nbytes:
                n = out.write(view)
                written += n
                view = view[n:]
        if written < nbytes:
            out.write(bytes(nbytes - written))
        os.fsync(out.fileno())


def drop_cache(path: Path) -> None:
    """Evict one file's clean pages from the page cache (nothing else on the machine)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def bench_checkpoints(items: set[str], quick: bool, reps: int, scratch: Path) -> list[Row]:
    from engine.checkpoint import load_checkpoint, restore_checkpoint
    from engine.run_dir import CheckpointSaver, atomic_save

    folder = scratch / "ckpt"
    folder.mkdir(parents=True, exist_ok=True)
    state, cfg, fresh = checkpoint_state(quick)
    size_label = "16 MiB model" if quick else "VGG16 + SGD momentum"
    rows = []
    template_file = folder / "template.pt"
    atomic_save(state, template_file)  # warm-up, and the byte count for the raw write
    nbytes = template_file.stat().st_size
    mib = nbytes / 2**20

    if "3" in items:
        raw_file = folder / "raw.bin"
        chunks = storages(state)

        def template(rep: int) -> float:
            template_file.unlink(missing_ok=True)
            start = perf()
            atomic_save(state, template_file)
            return mib / (perf() - start)

        def raw(rep: int) -> float:
            raw_file.unlink(missing_ok=True)
            start = perf()
            raw_write(chunks, nbytes, raw_file)
            return mib / (perf() - start)

        runs = alternate({"template": template, "raw": raw}, reps)
        raw_file.unlink(missing_ok=True)
        ratios = [a / b for a, b in zip(runs["template"], runs["raw"], strict=True)]
        rows.append(
            Row(
                "3",
                f"checkpoint write, {size_label} ({mib:.0f} MiB)",
                "atomic_save",
                "raw write",
                median(runs["template"]),
                median(runs["raw"]),
                "MiB/s",
                median(ratios),
                "A/B throughput",
                ">= 0.85",
                median(ratios) >= 0.85,
                reps,
                note="both fsynced, same folder; atomic_save also renames and fsyncs the folder",
                a_all=runs["template"],
                b_all=runs["raw"],
                ratio_all=ratios,
            )
        )

    if "4" in items:
        sync_saver = CheckpointSaver(folder / "sync", keep_last=1)
        async_saver = CheckpointSaver(folder / "async", keep_last=1, background=True)
        for saver in (sync_saver, async_saver):
            saver.run_dir.mkdir(exist_ok=True)
        start = perf()
        async_saver.save(state, "step_00000000.pt")
        first_stall = perf() - start
        async_saver.wait()
        writes: list[float] = []

        def background(rep: int) -> float:
            start = perf()
            async_saver.save(state, f"step_{rep + 1:08d}.pt")
            stall = perf() - start
            async_saver.wait()  # not counted: training would go on meanwhile
            writes.append(perf() - start)
            return stall

        def sync(rep: int) -> float:
            start = perf()
            sync_saver.save(state, f"step_{rep + 1:08d}.pt")
            return perf() - start

        runs = alternate({"async": background, "sync": sync}, reps)
        async_saver.close()
        ratios = [a / b for a, b in zip(runs["async"], runs["sync"], strict=True)]
        rows.append(
            Row(
                "4",
                f"async save stall, {size_label}",
                "save() blocks (async)",
                "synchronous save",
                median(runs["async"]),
                median(runs["sync"]),
                "s",
                median(ratios),
                "A/B",
                "<= 0.05",
                median(ratios) <= 0.05,
                reps,
                note=f"the stall is the snapshot copy into reused CPU buffers; the first async "
                f"save also allocates them: {fmt_seconds(first_stall)}; the background "
                f"write then takes {fmt_seconds(median(writes))} (it shares the CPU and "
                f"memory bandwidth with training)",
                a_all=runs["async"],
                b_all=runs["sync"],
                ratio_all=ratios,
            )
        )

    if "5" in items:
        model, optimizer = fresh()
        scaler = torch.amp.GradScaler("cpu", enabled=False)

        def restore(cold: bool) -> Callable[[int], float]:
            def run(rep: int) -> float:
                if cold:
                    drop_cache(template_file)
                start = perf()
                loaded = load_checkpoint(template_file, "cpu")
                restore_checkpoint(loaded, {"model": model, "optimizer": optimizer, "scaler": scaler}, cfg, None)
                return perf() - start

            return run

        def raw_load(cold: bool) -> Callable[[int], float]:
            def run(rep: int) -> float:
                if cold:
                    drop_cache(template_file)
                start = perf()
                loaded = torch.load(template_file, weights_only=True)
                elapsed = perf() - start
                del loaded
                return elapsed

            return run

        for cold, n in ((False, reps), (True, max(1, min(reps, 3)))):
            runs = alternate({"template": restore(cold), "raw": raw_load(cold)}, n)
            ratios = [a / b for a, b in zip(runs["template"], runs["raw"], strict=True)]
            cache = "file not in page cache" if cold else "file in page cache"
            rows.append(
                Row(
                    "5",
                    f"restore, {size_label}, {cache}",
                    "load_checkpoint+restore",
                    "torch.load",
                    median(runs["template"]),
                    median(runs["raw"]),
                    "s",
                    median(ratios),
                    "A/B",
                    "<= 1.1",
                    median(ratios) <= 1.1,
                    n,
                    note=(
                        "the template verifies every record's CRC-32 and loads the weights "
                        "into the model and optimizer; torch.load only reads the file"
                        if not cold
                        else ""
                    ),
                    a_all=runs["template"],
                    b_all=runs["raw"],
                    ratio_all=ratios,
                )
            )
    shutil.rmtree(folder, ignore_errors=True)
    return rows


# ---------------------------------------------------------------------------- 6: start-up

HAND_SCRIPT = """
import os, signal, torch
torch.manual_seed(42)
x = torch.arange(0.0, 1.0, 0.02).unsqueeze(1)
y = 0.7 * x + 0.3
model = torch.nn.Linear(1, 1)
optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
loss = torch.nn.functional.l1_loss(model(x[:8]), y[:8])
optimizer.zero_grad()
loss.backward()
optimizer.step()
os.kill(os.getpid(), signal.SIGKILL)
"""
IMPORTS = "import torch, torchvision; import os, signal; os.kill(os.getpid(), signal.SIGKILL)"


def timed_process(args: list[str], env: dict[str, str]) -> float:
    start = perf()
    result = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    elapsed = perf() - start
    if result.returncode != -9:  # each command ends by SIGKILL at its end point
        raise RuntimeError(f"{' '.join(args)} exited {result.returncode} (expected SIGKILL)\n{result.stderr[-2000:]}")
    return elapsed


def bench_startup(reps: int, scratch: Path) -> list[Row]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("TEST_FAULTS", None)
    # kill_at_step=1: the test harness's fault injection (tests/faults/sitecustomize.py, first
    # on PYTHONPATH) SIGKILLs train.py right after its first optimizer step, which is exactly
    # the end point we want (no shutdown time counted).
    train_env = {**env, "TEST_FAULTS": "kill_at_step=1", "PYTHONPATH": f"{REPO / 'tests' / 'faults'}{os.pathsep}{REPO}"}
    root = scratch / "startup"

    def template(rep: int) -> float:
        return timed_process(
            [sys.executable, str(REPO / "train.py"), f"checkpoint.root={root}", f"run_name=startup-{rep}"], train_env
        )

    def imports(rep: int) -> float:
        return timed_process([sys.executable, "-c", IMPORTS], env)

    def hand(rep: int) -> float:
        return timed_process([sys.executable, "-c", HAND_SCRIPT], env)

    runs = alternate({"template": template, "imports": imports, "hand": hand}, reps)
    shutil.rmtree(root, ignore_errors=True)
    rows = []
    for key, label, target in (
        ("imports", "import torch, torchvision", "<= +0.5 s"),
        ("hand", "hand-written script", "(none)"),
    ):
        diffs = [a - b for a, b in zip(runs["template"], runs[key], strict=True)]
        diff = median(diffs)
        rows.append(
            Row(
                "6",
                "start-up to first step, default run",
                "python train.py",
                label,
                median(runs["template"]),
                median(runs[key]),
                "s",
                diff,
                "A-B s",
                target,
                diff <= 0.5 if key == "imports" else None,
                reps,
                note=(
                    "every process is stopped by SIGKILL at its end point (train.py after its "
                    "first optimizer step), so no interpreter shutdown is counted"
                    if key == "imports"
                    else "the hand-written script builds the same model and takes one SGD step: "
                    "torch imports torch._dynamo when the first optimizer is built, so both pay "
                    "that; the rest of the difference is Hydra and the template"
                ),
                a_all=runs["template"],
                b_all=runs[key],
                ratio_all=diffs,
            )
        )
    return rows


# ----------------------------------------------------------------------- 8. long runs

TUTORIAL_002 = ["experiment=quadratic_csv", "data.batch_size=128", "optimizer.lr=0.0001", "trainer.device=cpu"]


def wall_time(args: list[str], env: dict[str, str]) -> float:
    start = perf()
    result = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} exited {result.returncode}\n{result.stderr[-2000:]}")
    return perf() - start


def bench_long_runs(epochs: int, reps: int, scratch: Path, quick: bool = False) -> list[Row | Skipped]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("TEST_FAULTS", None)
    root = scratch / "long"

    def project(n: int, rep: int) -> float:
        return wall_time(
            [
                sys.executable,
                str(REPO / "train.py"),
                *TUTORIAL_002,
                f"trainer.epochs={n}",
                f"checkpoint.every_n_epochs={max(1, n // 10)}",
                f"checkpoint.root={root}",
                f"run_name=long-{n}-{rep}",
            ],
            env,
        )

    def tutorial(rep: int) -> float:
        out = root / f"tutorial-{rep}"
        out.mkdir(parents=True, exist_ok=True)
        return wall_time(
            [
                sys.executable,
                str(REPO / "benchmarks" / "tutorial_002.py"),
                str(4 * epochs),
                str(max(1, 4 * epochs // 10)),
                str(REPO / "data" / "quadratic.csv"),
                str(out),
            ],
            env,
        )

    runs = alternate(
        {
            "long": lambda r: project(4 * epochs, r),
            "tutorial": tutorial,
            "one": lambda r: project(1, r),
            "short": lambda r: project(epochs, r),
        },
        reps,
    )
    shutil.rmtree(root, ignore_errors=True)
    ratios = [a / b for a, b in zip(runs["long"], runs["tutorial"], strict=True)]
    short = [(t - t1) / (epochs - 1) for t, t1 in zip(runs["short"], runs["one"], strict=True)]
    long = [(t - t1) / (4 * epochs - 1) for t, t1 in zip(runs["long"], runs["one"], strict=True)]
    growth = [b / a for a, b in zip(short, long, strict=True)]
    return [
        Row(
            "8",
            f"tutorial 002 workflow, {4 * epochs} epochs",
            "python train.py",
            "tutorial's script",
            median(runs["long"]),
            median(runs["tutorial"]),
            "s",
            median(ratios),
            "A/B",
            "<= 1.0",
            median(ratios) <= 1.0,
            reps,
            note="whole processes (start-up, training, checkpoints, end-of-run outputs); "
            "the tutorial's script: benchmarks/tutorial_002.py",
            a_all=runs["long"],
            b_all=runs["tutorial"],
            ratio_all=ratios,
        ),
        # --quick: a few dozen epochs cost less than the noise of a process start-up, so the
        # differences of whole-process times mean nothing (they even come out negative).
        Skipped(
            "8",
            f"train.py cost per epoch, {4 * epochs} vs {epochs} epochs",
            "--quick: run lengths below the start-up noise",
        )
        if quick
        else Row(
            "8",
            f"train.py cost per epoch, {4 * epochs} vs {epochs} epochs",
            f"{4 * epochs} epochs",
            f"{epochs} epochs",
            median(long),
            median(short),
            "s",
            median(growth),
            "A/B",
            "<= 1.2",
            median(growth) <= 1.2,
            reps,
            note="per epoch: (T(n) - T(1)) / (n - 1), whole processes",
            a_all=long,
            b_all=short,
            ratio_all=growth,
        ),
    ]


# ------------------------------------------- 9-10: whole processes, hand loop, Lightning


@dataclass
class Run:
    """One whole training process: wall time, time per epoch inside it, train losses."""

    wall: float
    per_epoch: float  # (t(last epoch's line) - t(epoch 1's line)) / (epochs - 1)
    first_loss: float  # epoch 1's train loss
    final_loss: float  # the last epoch's
    head: float  # process start to epoch 1's line (start-up and the first epoch)
    tail: float  # the last epoch's line to the exit (test, outputs, shutdown)


# "epoch N ... train_loss X": train.py's epoch summary (the first and last epochs always
# print) and the reference scripts' lines, each printed (flushed) once the epoch's training,
# validation and checkpoint are done.
EPOCH_LINE = re.compile(r"^epoch (\d+)\s.*?\btrain_loss (\S+)")


def timed_run(args: list[str], env: dict[str, str], epochs: int) -> Run:
    """Run a training process to its end; its epoch lines are time-stamped as they arrive."""
    start = perf()
    proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    timer = threading.Timer(1800, proc.kill)
    timer.start()
    stamps: dict[int, float] = {}
    losses: dict[int, float] = {}
    tail: deque[str] = deque(maxlen=40)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            now = perf()
            tail.append(line)
            match = EPOCH_LINE.match(line)
            if match:
                stamps[int(match[1])], losses[int(match[1])] = now, float(match[2])
        code = proc.wait()
    finally:
        timer.cancel()
    wall = perf() - start
    if code != 0 or 1 not in stamps or epochs not in stamps:
        raise RuntimeError(
            f"{' '.join(args)} exited {code} (epoch lines seen: {sorted(stamps)[-3:]})\n{''.join(tail)[-3000:]}"
        )
    return Run(
        wall,
        (stamps[epochs] - stamps[1]) / (epochs - 1),
        losses[1],
        losses[epochs],
        stamps[1] - start,
        start + wall - stamps[epochs],
    )


@dataclass
class ProcessWorkload:
    name: str  # as in the table
    key: str  # benchmarks/workloads.py
    experiment: str
    epochs: int
    every: int  # checkpoint every N epochs, all three
    goal: float | None  # item 9's whole-process goal (train.py / hand loop)


def same_training(template: Run, other: Run) -> bool:
    """The same data, model, initial weights, loss and optimizer give nearly the same first
    epoch (only the batch order differs: the template's is its own seeded order, the others'
    the DataLoader's); after that the runs drift apart, but not by a factor of 2."""
    return abs(other.first_loss - template.first_loss) <= 0.1 * abs(template.first_loss) and abs(
        math.log(max(other.final_loss, 1e-12) / max(template.final_loss, 1e-12))
    ) <= math.log(2)


def phases(a: list[Run], b: list[Run], epochs: int) -> str:
    """Where the time goes: the median of each phase of the processes, A vs B."""
    parts = []
    for label, value in (
        ("start to epoch 1's line", lambda r: r.head),
        (f"epochs 2-{epochs}", lambda r: r.per_epoch * (epochs - 1)),
        ("last epoch's line to exit", lambda r: r.tail),
    ):
        parts.append(f"{label} {median(map(value, a)):.2f} vs {median(map(value, b)):.2f} s")
    return "; ".join(parts)


def bench_whole_process(
    items: set[str], quick: bool, reps: int, scratch: Path, threads: int | None
) -> list[Row | Skipped]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("TEST_FAULTS", None)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    lightning = "10" in items and importlib.util.find_spec("lightning") is not None
    root = scratch / "whole"
    works = [
        ProcessWorkload(
            "digits CNN", "digits", "digits_cnn", epochs=3 if quick else 8, every=1, goal=None if quick else 1.10
        ),
        ProcessWorkload(
            "linear regression",
            "linear",
            "linear_regression",
            epochs=12 if quick else 300,
            every=2 if quick else 50,
            goal=None if quick else 1.25,
        ),
    ]
    rows: list[Row | Skipped] = []
    if "9" not in items and not lightning:
        works = []  # nothing to compare train.py with
    for work in works:
        started = perf()
        label = f"{work.name} {work.epochs} epochs"
        overrides = [
            f"experiment={work.experiment}",
            f"trainer.epochs={work.epochs}",
            f"checkpoint.every_n_epochs={work.every}",
            "trainer.device=cpu",
        ]

        def template(rep: int, work=work, overrides=overrides) -> Run:
            return timed_run(
                [
                    sys.executable,
                    str(REPO / "train.py"),
                    *overrides,
                    f"checkpoint.root={root}",
                    f"run_name={work.key}-{rep}",
                ],
                env,
                work.epochs,
            )

        def script(name: str, work=work) -> Callable[[int], Run]:
            def run(rep: int) -> Run:
                return timed_run(
                    [
                        sys.executable,
                        str(REPO / "benchmarks" / f"{name}.py"),
                        work.key,
                        str(work.epochs),
                        str(work.every),
                        str(root / f"{name}-{work.key}-{rep}"),
                    ],
                    env,
                    work.epochs,
                )

            return run

        funcs: dict[str, Callable[[int], Run]] = {"template": template}
        if "9" in items:
            funcs["hand"] = script("hand_loop")
        if lightning:
            funcs["lightning"] = script("lightning_loop")
        runs = alternate(funcs, reps)
        shutil.rmtree(root, ignore_errors=True)
        ran = runs["template"]
        losses = f"train.py {ran[0].first_loss:.4g} -> {ran[0].final_loss:.4g}"
        for key, item, b_label in (("hand", "9", "hand-written loop"), ("lightning", "10", "PyTorch Lightning")):
            if key not in runs:
                continue
            other = runs[key]
            matches = all(same_training(a, b) for a, b in zip(ran, other, strict=True))
            checked = (
                f"train loss (epoch 1 -> {work.epochs}): {losses}, {b_label} "
                f"{other[0].first_loss:.4g} -> {other[0].final_loss:.4g}; "
                f"training matches: {'yes' if matches else 'NO'}"
            )
            walls = [a.wall / b.wall for a, b in zip(ran, other, strict=True)]
            epochs = [a.per_epoch / b.per_epoch for a, b in zip(ran, other, strict=True)]
            goal = work.goal if key == "hand" else None
            script_name = "hand_loop.py" if key == "hand" else "lightning_loop.py"
            rows.append(
                Row(
                    item,
                    f"whole process, {label}",
                    "python train.py",
                    b_label,
                    median(a.wall for a in ran),
                    median(b.wall for b in other),
                    "s",
                    median(walls),
                    "A/B",
                    "(none)" if goal is None else f"<= {goal:.2f}",
                    None if goal is None else (median(walls) <= goal and matches),
                    reps,
                    note=(
                        f"start to exit, alternated: train.py experiment={work.experiment} "
                        f"(checkpoint every {work.every} epoch(s)) vs benchmarks/{script_name} "
                        f"(same data, model, seed, batch size, optimizer, lr and checkpoint "
                        f"epochs; validation every epoch, a test at the end); {checked}; "
                        f"phases (medians), train.py vs {b_label}: "
                        f"{phases(ran, other, work.epochs)}"
                    ),
                    a_all=[a.wall for a in ran],
                    b_all=[b.wall for b in other],
                    ratio_all=walls,
                )
            )
            rows.append(
                Row(
                    item,
                    f"per epoch, {label}",
                    "python train.py",
                    b_label,
                    median(a.per_epoch for a in ran),
                    median(b.per_epoch for b in other),
                    "s",
                    median(epochs),
                    "A/B",
                    "(none)",
                    None,
                    reps,
                    note=f"epochs 2-{work.epochs} inside each process (train, validation, "
                    f"checkpoint), timed by its epoch lines",
                    a_all=[a.per_epoch for a in ran],
                    b_all=[b.per_epoch for b in other],
                    ratio_all=epochs,
                )
            )
        print(f"  {work.name}: {perf() - started:.0f} s", flush=True)
    if "10" in items and not lightning:
        rows.append(Skipped("10", "vs PyTorch Lightning", "pip install -e '.[bench]' for the Lightning side-by-side"))
    return rows


# -------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes and one repetition (used by the test suite)")
    parser.add_argument(
        "--reps",
        type=int,
        default=None,
        help="repetitions per figure (default: 3 per training workload, 2 for "
        "VGG16, 5 for items 3-6, 3 for items 8-10; 1 with --quick)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch.set_num_threads for items 1-5, OMP_NUM_THREADS of items 9-10's processes (default: torch's choice)",
    )
    parser.add_argument("--only", default="1,2,3,4,5,6,7,8,9,10", help="comma-separated items to run, e.g. 3,5")
    parser.add_argument(
        "--long-epochs",
        type=int,
        default=None,
        help="item 8: epochs of the shorter run (default 2500; 25 with "
        "--quick); the longer one, and the tutorial's, 4x as many",
    )
    parser.add_argument(
        "--workloads", default="linear,digits,vgg16", help="training workloads of items 1-2 (linear, digits, vgg16)"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=REPO / "bench-results",
        help="folder for the JSON and CSV results (default bench-results/)",
    )
    args = parser.parse_args(argv)
    items = {s.strip() for s in args.only.split(",") if s.strip()}
    reps = args.reps or (1 if args.quick else 5)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    scratch = out / f".scratch-{os.getpid()}"  # same disk as checkpoints/ in a fresh clone
    scratch.mkdir(parents=True, exist_ok=True)
    if args.threads or args.quick:  # quick: one thread, robust on a busy machine
        torch.set_num_threads(args.threads or 1)
    began = perf()
    info = machine()
    info["load_average_start"] = os.getloadavg()
    print(
        f"bench: {'quick' if args.quick else 'full'}, {info['cores']} cores, "
        f"{info['torch_threads']} torch threads, torch {info['torch']}, {info['cpu']}; "
        f"load average {info['load_average_start'][0]:.1f}",
        flush=True,
    )
    rows: list[Row | Skipped] = []
    try:
        if items & {"1", "2"}:
            train_reps = args.reps or (1 if args.quick else 3)
            works = [
                Workload(
                    "linear regression",
                    ["experiment=linear_regression"],
                    epochs=3 if args.quick else 30,
                    reps=train_reps,
                    dataloader=True,
                ),
                Workload(
                    "digits CNN",
                    [
                        "experiment=digits_cnn",
                        *(["data.val_fraction=0.45", "data.test_fraction=0.45"] if args.quick else []),
                    ],  # quick: 180 training images
                    epochs=2 if args.quick else 3,
                    reps=train_reps,
                    dataloader=True,
                ),
            ]
            if not args.quick:
                works.append(
                    Workload(
                        "VGG16 32x32",
                        ["experiment=vgg16_cifar10"],
                        epochs=1,
                        reps=args.reps or 2,
                        dataloader=False,
                        data={
                            "_target_": "benchmarks.synthetic.RandomImages",
                            "train_size": 224,
                            "val_size": 32,
                            "image_size": 32,
                            "in_channels": 3,
                            "num_classes": 10,
                            "batch_size": 32,
                        },
                    )
                )
            keys = {"linear regression": "linear", "digits CNN": "digits", "VGG16 32x32": "vgg16"}
            wanted = {w.strip() for w in args.workloads.split(",")}
            works = [w for w in works if keys[w.name] in wanted]
            print("items 1-2: training loops ...", flush=True)
            rows += [r for r in bench_training(works, scratch) if r.item in items]
            if args.quick and "1" in items:
                rows.append(Skipped("1", "step time, VGG16 32x32", "--quick"))
        if items & {"3", "4", "5"}:
            print("items 3-5: checkpoints ...", flush=True)
            rows += bench_checkpoints(items, args.quick, reps, scratch)
        if "6" in items:
            print("item 6: start-up ...", flush=True)
            rows += bench_startup(reps, scratch)
        if "7" in items:
            rows.append(
                Skipped(
                    "7",
                    "GPU images/s, VGG16 224x224",
                    "no GPU" if not torch.cuda.is_available() else "GPU measurement not implemented in this version",
                )
            )
        if "8" in items:
            print("item 8: long runs, tutorial 002 ...", flush=True)
            rows += bench_long_runs(
                args.long_epochs or (25 if args.quick else 2500),
                args.reps or (1 if args.quick else 3),
                scratch,
                quick=args.quick,
            )
        if items & {"9", "10"}:
            print("items 9-10: whole processes, hand loop, Lightning ...", flush=True)
            rows += bench_whole_process(
                items,
                args.quick,
                args.reps or (1 if args.quick else 3),
                scratch,
                args.threads or (1 if args.quick else None),
            )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    seconds = perf() - began
    info["load_average_end"] = os.getloadavg()
    print()
    print_table(rows)
    print(
        f"\nbench took {seconds:.0f} s; load average (1 min) at the start "
        f"{info['load_average_start'][0]:.1f}, at the end {info['load_average_end'][0]:.1f} "
        f"on {info['cores']} cores"
    )
    write_results(out, rows, info, args.quick, reps, seconds)
    return 0


def write_results(out: Path, rows: list[Row | Skipped], info: dict, quick: bool, reps: int, seconds: float) -> None:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    payload = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "quick": quick,
        "reps": reps,
        "seconds": round(seconds, 1),
        "machine": info,
        "rows": [asdict(r) | {"skipped": isinstance(r, Skipped)} for r in rows],
    }
    text = json.dumps(payload, indent=2)
    (out / f"bench-{stamp}.json").write_text(text)
    (out / "latest.json").write_text(text)
    fields = [
        "item",
        "name",
        "a_label",
        "b_label",
        "a",
        "b",
        "unit",
        "ratio",
        "ratio_kind",
        "target",
        "ok",
        "reps",
        "note",
    ]
    with open(out / "latest.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            if isinstance(row, Skipped):
                writer.writerow({"item": row.item, "name": row.name, "note": f"skipped: {row.reason}"})
            else:
                writer.writerow(asdict(row))
    print(f"results: {out / f'bench-{stamp}.json'}, {out / 'latest.csv'}")


if __name__ == "__main__":
    sys.exit(main())
