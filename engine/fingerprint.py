"""What a checkpoint was trained on: data, global batch and model shapes, checked on resume.

Exact resume continues a run only if these are unchanged; otherwise training would go on
silently on other data (or another batch order), with best.pt and metrics.csv from the old.
The content hash is cheap: small tensors are hashed whole, large ones by a fixed strided
sample (~16M bytes); image folders by their files' names and sizes.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch

HASHED_BYTES = 16 << 20  # beyond this a tensor is hashed by a strided sample


def _tensor_digest(h: Any, tensor: Any) -> None:
    t = torch.as_tensor(tensor).detach().cpu()
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    flat = t.reshape(-1)
    if flat.numel() * flat.element_size() > HASHED_BYTES:
        flat = flat[::-(-flat.numel() * flat.element_size() // HASHED_BYTES)]
    h.update(flat.contiguous().view(torch.uint8).numpy().tobytes() if flat.numel() else b"")


def _digest(h: Any, obj: Any) -> bool:
    """Feed what identifies `obj`'s content into `h`; False when nothing is known of it."""
    from torch.utils.data import Subset

    if isinstance(obj, Subset):
        h.update(repr(list(obj.indices)).encode())
        return _digest(h, obj.dataset)
    if hasattr(obj, "x") and hasattr(obj, "y"):  # TensorSplit
        _tensor_digest(h, obj.x)
        _tensor_digest(h, obj.y)
        return True
    samples = getattr(obj, "samples", None)  # torchvision ImageFolder: (path, label) pairs
    if isinstance(samples, list):
        root = Path(str(getattr(obj, "root", "")))
        for path, label in samples:
            file = Path(path)
            name = file.relative_to(root) if file.is_relative_to(root) else file
            h.update(f"{name}\0{label}\0{file.stat().st_size}\n".encode())
        return True
    data = getattr(obj, "data", None)  # torchvision MNIST, CIFAR: arrays in memory
    if data is not None and hasattr(data, "shape"):
        _tensor_digest(h, data)
        targets = getattr(obj, "targets", None)
        if targets is not None:
            _tensor_digest(h, torch.as_tensor(targets))
        return True
    return False


def split_fingerprint(split: Any) -> dict[str, Any]:
    h = hashlib.blake2b(digest_size=16)
    known = _digest(h, split)
    return {"size": len(split), "hash": h.hexdigest() if known else None}


def run_fingerprint(data: Any, model: torch.nn.Module, global_batch: int) -> dict[str, Any]:
    return {
        "data": {name: split_fingerprint(data.split(name)) for name in ("train", "val")},
        "global_batch_size": int(global_batch),
        "model": {name: list(t.shape) for name, t in model.state_dict().items()},
    }


def changes(saved: dict[str, Any], now: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(model differences, data and batch differences), each a short phrase."""
    model = []
    before, after = saved.get("model") or {}, now["model"]
    if before and before != after:
        shapes = [f"{k} {before[k]} -> {after[k]}" for k in after
                  if k in before and before[k] != after[k]]
        missing = [k for k in before if k not in after]
        new = [k for k in after if k not in before]
        model = ([f"shapes {shapes[:3]}"] if shapes else []) + (
            [f"no longer has {missing[:3]}"] if missing else []) + (
            [f"new {new[:3]}"] if new else [])
    data = []
    for name, split in (saved.get("data") or {}).items():
        current = now["data"].get(name)
        if current is None:
            continue
        if split.get("size") != current["size"]:
            data.append(f"{name} split {split.get('size')} -> {current['size']} samples")
        elif None not in (split.get("hash"), current["hash"]) and split["hash"] != current["hash"]:
            data.append(f"{name} split content changed")
    batch = saved.get("global_batch_size")
    if batch is not None and batch != now["global_batch_size"]:
        data.append(f"global batch size {batch} -> {now['global_batch_size']} (data.batch_size"
                    f" x processes; trainer.global_batch_size=N keeps it whatever the count)")
    return model, data
