"""What a loaded file may hold: bounded size and depth, no reference cycles, no tensor that
claims more memory than its storage has. Used for checkpoints, export configs and .pt2
sample inputs: anything read from a file before it is walked or copied."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from engine.errors import UserError

# A weights-only file can still describe huge things in a few bytes: a stride-0 tensor of
# billions of elements, or a list that holds the same list twice, nested 30 levels deep
# (2**30 elements once anything walks it). These checks run on the loaded objects, in time
# proportional to the file's own size, before anything expands them.
MAX_NODES = 1_000_000  # containers and leaves of a whole checkpoint, counted as expanded
MAX_DEPTH = 64
MAX_CONFIG_NODES = 20_000  # a config is a few hundred nodes; OmegaConf is slow beyond this
MAX_CONFIG_DEPTH = 32
OVERLAP_SLACK = 1 << 20  # bytes a tensor may claim beyond its storage (an expand()ed buffer)


class TooBig(Exception):  # noqa: N818 - callers turn it into a UserError naming the file
    """A structure over the limits; the message says where and which limit."""


def expanded_size(obj: Any, max_nodes: int = MAX_NODES, max_depth: int = MAX_DEPTH,
                  what: str = "") -> int:
    """Nodes `obj` has when every shared reference is expanded (what a recursive walk such
    as OmegaConf.create or yaml.dump visits), computed once per distinct container, so a
    "billion laughs" structure is measured in microseconds. Raises TooBig (a cycle, too
    deep, too many nodes, or a tensor that claims more memory than its storage holds)."""
    sizes: dict[int, int] = {}
    active: set[int] = set()

    def size(node: Any, depth: int, where: str) -> int:
        if isinstance(node, torch.Tensor):
            _check_tensor_memory(node, where)
            return 1
        if not isinstance(node, (dict, list, tuple)):
            return 1
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in active:
            raise TooBig(f"{where or 'the file'} contains itself (a reference cycle)")
        if depth > max_depth:
            raise TooBig(f"{where or 'the file'} is nested deeper than {max_depth} levels")
        active.add(key)
        total = 1
        items = node.items() if isinstance(node, dict) else enumerate(node)
        for name, value in items:
            total += size(value, depth + 1, f"{where}[{name!r}]")
            if total > max_nodes:
                raise TooBig(f"{where or 'the file'} holds more than {max_nodes} values "
                              f"(counting shared references once per use)")
        active.discard(key)
        sizes[key] = total
        return total

    return size(obj, 0, what)


def _check_tensor_memory(tensor: torch.Tensor, where: str) -> None:
    """A tensor whose strides overlap (stride 0) claims more elements than its storage has:
    any copy (.tolist(), .unbind(), .to()) materialises them all."""
    if tensor.layout != torch.strided:
        raise TooBig(f"{where}: a {tensor.layout} tensor (only dense tensors are expected)")
    claimed = tensor.numel() * tensor.element_size()
    stored = tensor.untyped_storage().nbytes()
    if claimed > stored + OVERLAP_SLACK:
        raise TooBig(f"{where}: a tensor of shape {tuple(tensor.shape)} with strides "
                      f"{tensor.stride()} claims {claimed} bytes from a {stored}-byte storage")


def check_structure(state: Any, source: Path | str) -> None:
    """Bounded size and depth, no cycles, no overlapping tensors; config much smaller."""
    try:
        expanded_size(state)
        if isinstance(state, dict) and isinstance(state.get("config"), (dict, list)):
            expanded_size(state["config"], MAX_CONFIG_NODES, MAX_CONFIG_DEPTH, "['config']")
    except TooBig as err:
        raise UserError(f"{source}: refused: {err}") from None
