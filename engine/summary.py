"""Model summary printed at the start of training: parameter counts, size, and a table of
the leaf layers with their output shapes for a sample batch (forward hooks; no torchinfo).

The sample forward runs under torch.no_grad() in eval mode inside a forked RNG, and every
module's train/eval flag is put back: the run's random streams and weights are untouched,
so a run with the summary is bitwise the run without it (and exact resume is unaffected).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from engine.batches import Split, TensorSplit

MAX_ROWS = 30  # big models (VGG16: ~40 leaf calls): the first and last MAX_ROWS // 2


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(total, trainable) parameters; a parameter shared by two modules counts once."""
    params = list(model.parameters())
    return (sum(p.numel() for p in params),
            sum(p.numel() for p in params if p.requires_grad))


def size_mib(model: nn.Module) -> float:
    """Memory of the parameters and buffers (what a checkpoint of the weights holds)."""
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors) / 2**20


def sample_batch(split: Split, n: int = 2) -> torch.Tensor:
    """The inputs of the first `n` samples of a split (no shuffling: no RNG)."""
    if isinstance(split, TensorSplit):
        return split.x[:n]
    return torch.stack([torch.as_tensor(split[i][0]) for i in range(min(n, len(split)))])


def _shape(output: Any) -> str:
    if isinstance(output, torch.Tensor):
        return str(list(output.shape))
    if isinstance(output, (tuple, list)):
        return ", ".join(_shape(o) for o in output) or "-"
    if isinstance(output, dict):
        return ", ".join(f"{k}: {_shape(v)}" for k, v in output.items()) or "-"
    return type(output).__name__


def layer_rows(model: nn.Module, inputs: torch.Tensor) -> list[tuple[str, str, str, str]]:
    """(name, type, output shape, parameters) per call of each leaf module, in call order;
    a module called again (a shared pool) shows "(reused)" for its parameters. Leaves the
    forward never called are listed last with shape "-"."""
    leaves = {name: m for name, m in model.named_modules() if not any(m.children())}
    rows: list[tuple[str, str, str, str]] = []
    called: set[str] = set()

    def hook_for(name: str):
        def hook(module: nn.Module, _args: Any, output: Any) -> None:
            params = sum(p.numel() for p in module.parameters())
            rows.append((name, type(module).__name__, _shape(output),
                         "(reused)" if name in called else f"{params:,}"))
            called.add(name)
        return hook

    handles = [m.register_forward_hook(hook_for(name)) for name, m in leaves.items()]
    modes = {m: m.training for m in model.modules()}
    devices = [inputs.device] if inputs.device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            model.eval()  # dropout draws nothing in eval mode; fork_rng guards the rest
            model(inputs)
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes.items():  # each module's own flag (frozen BN stays)
            module.training = training
    for name, m in leaves.items():
        if name not in called:
            params = sum(p.numel() for p in m.parameters())
            rows.append((name, type(m).__name__, "-", f"{params:,}"))
    return rows


def _table(rows: list[tuple[str, str, str, str]], max_rows: int) -> list[str]:
    if len(rows) > max_rows:
        half = max_rows // 2
        skipped = ("...", f"({len(rows) - 2 * half} more layers)", "", "")
        rows = rows[:half] + [skipped] + rows[-half:]
    header = ("layer", "type", "output shape", "params")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(4)]
    return ["  " + "  ".join([r[0].ljust(widths[0]), r[1].ljust(widths[1]),
                              r[2].ljust(widths[2]), r[3].rjust(widths[3])]).rstrip()
            for r in [header, *rows]]


def model_summary(model: nn.Module, split: Split, device: torch.device,
                  max_rows: int = MAX_ROWS) -> str:
    """The summary text for `model` on the first samples of `split`."""
    if any(isinstance(p, nn.parameter.UninitializedParameter) for p in model.parameters()):
        return (f"model {type(model).__name__}: lazy (uninitialised) parameters; no summary "
                f"before the first batch (trainer.model_summary=false hides this line)")
    total, trainable = parameter_counts(model)
    lines = [f"model {type(model).__name__}: {total:,} parameters ({trainable:,} trainable, "
             f"{total - trainable:,} frozen), {size_mib(model):.2f} MiB with buffers"]
    try:
        with torch.random.fork_rng(devices=[]):  # a Dataset drawing in __getitem__
            inputs = sample_batch(split).to(device)
        rows = layer_rows(model, inputs)
    except Exception as err:  # the summary never decides whether a run starts
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        lines.append(f"  (no layer table: the forward of a sample batch failed: {first[:200]})")
        return "\n".join(lines)
    lines.append(f"  layers for an input batch of shape {list(inputs.shape)}:")
    return "\n".join(lines + _table(rows, max_rows))
