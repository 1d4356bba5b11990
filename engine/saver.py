"""The run directory's checkpoint files: periodic saves, last.pt, best.pt and retention."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from engine.checkpoint import atomic_link, atomic_save, prune


class Saver:
    """Writes `epoch_NNNN.pt` / `step_NNNNNNNN.pt`, then points last.pt at it, then prunes.

    Order matters for crash safety: a file is durable before last.pt names it, and old files
    are deleted only after that. `saved` (kept in each checkpoint) lists the periodic files
    this run wrote, so retention never deletes a file it did not write."""

    def __init__(self, run_dir: Path, keep_last: int, saved: list[str] | None = None) -> None:
        self.run_dir, self.keep_last = run_dir, keep_last
        self.saved = list(saved or [])
        self.last_seconds = 0.0  # duration of the latest save, for trainer.max_time

    def save(self, state: dict[str, Any], name: str, best: bool = False) -> Path:
        start = time.monotonic()
        path = self.run_dir / name
        if name not in self.saved:
            self.saved.append(name)
        state["saved_files"] = list(self.saved)
        atomic_save(state, path)
        atomic_link(path, self.run_dir / "last.pt")
        if best:
            atomic_link(path, self.run_dir / "best.pt")
        self.saved = prune(self.run_dir, self.saved, self.keep_last)
        self.last_seconds = time.monotonic() - start
        return path

    def save_best_only(self, state: dict[str, Any]) -> Path:
        """best.pt for an epoch that is not a periodic save: a full, resumable file."""
        state["saved_files"] = list(self.saved)
        path = self.run_dir / "best.pt"
        atomic_save(state, path)
        return path
