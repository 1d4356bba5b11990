"""What the kill/resume tests share: reading and comparing checkpoints bit for bit, the
oracle of complete files, and the module-scoped fixtures (fork server, image folder)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine.errors import UserError
from engine.run_dir import verify
from tests.forkrun import ForkServer

# What an interrupted-and-resumed run must have exactly as the uninterrupted one.
COMPARED = (
    "epoch",
    "global_step",
    "step_in_epoch",
    "model_state_dict",
    "optimizer_state_dict",
    "scheduler_state_dict",
    "rng_state",
    "epoch_step_losses",
    "best",
    "loss",
)


def fork_server(timeout: float = 120):
    """A module-scoped `server` fixture (one fork server per test file):
    `server = fork_server()` at a test module's top level."""

    @pytest.fixture(scope="module")
    def server(tmp_path_factory):
        started = ForkServer(tmp_path_factory.mktemp("forkrun"), timeout=timeout)
        yield started
        started.close()

    return server


def image_folder(seed: int):
    """A module-scoped `images` fixture: two classes (cat, dog) of 20 random 8x8 PNGs."""

    @pytest.fixture(scope="module")
    def images(tmp_path_factory) -> Path:
        from PIL import Image

        root = tmp_path_factory.mktemp("images")
        gen = torch.Generator().manual_seed(seed)
        for label in ("cat", "dog"):
            (root / label).mkdir()
            for index in range(20):
                pixels = torch.randint(0, 256, (8, 8, 3), dtype=torch.uint8, generator=gen)
                Image.fromarray(pixels.numpy()).save(root / label / f"{index}.png")
        return root

    return images


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same(a, b, where: str = "") -> None:
    """Bitwise equality of nested checkpoint values (tensors with torch.equal)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{where}: {a.keys()} {b.keys()}"
        for key in a:
            assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def assert_same_run(run_dir: Path, reference: Path, epochs: int | None = None, best: bool = True) -> None:
    """last.pt (the COMPARED keys), best.pt's weights (`best`) and metrics.csv of `run_dir`
    equal `reference`'s; with `epochs`, both ran that many epochs."""
    final, expected = load(run_dir / "last.pt"), load(reference / "last.pt")
    if epochs is not None:
        assert final["epoch"] == epochs
    for key in COMPARED:
        assert_same(final[key], expected[key], key)
    if best:
        assert_same(
            load(run_dir / "best.pt")["model_state_dict"], load(reference / "best.pt")["model_state_dict"], "best.pt"
        )
    rows = (run_dir / "metrics.csv").read_text()
    assert rows == (reference / "metrics.csv").read_text()
    if epochs is not None:
        assert len(rows.splitlines()) == epochs + 1  # header + one row per epoch


def complete_files(run_dir: Path) -> dict[str, tuple[int, int]]:
    """The test's own oracle: every *.pt file that passes the zip CRC check and loads
    weights-only, with its (global_step, epoch)."""
    found = {}
    for path in run_dir.glob("*.pt"):
        try:
            verify(path)
            state = load(path)
        except (UserError, RuntimeError, EOFError, OSError):
            continue
        found[path.name] = (state["global_step"], state["epoch"])
    return found


def newest(run_dir: Path) -> tuple[int, int]:
    return max(complete_files(run_dir).values(), default=(0, 0))


def assert_all_complete(run_dir: Path) -> None:
    """Atomic writes: whatever happened, every file named *.pt is a whole checkpoint."""
    names = sorted(p.name for p in run_dir.glob("*.pt"))
    assert sorted(complete_files(run_dir)) == names


def one_line_error(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert "Traceback" not in result.stderr, result.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]
