"""How the tests run the product: the three scripts as a user runs them (`run_script`), their
configs through Hydra's compose API (`compose`), and a small finished run (`train_run`, and
the module-scoped `trained_run` fixture built on it)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest
from omegaconf import DictConfig

import engine.config  # noqa: F401 - registers the schemas the configs name

REPO = Path(__file__).resolve().parents[1]


def run_script(
    script: str,
    *overrides: str,
    root: Path | None = None,
    check: bool = True,
    env: dict | None = None,
    timeout: float = 300,
) -> subprocess.CompletedProcess:
    """`python <script> <overrides>` from the repo root, checkpoints under `root`."""
    args = [sys.executable, str(REPO / script), *overrides]
    if root is not None and script == "train.py":
        args.append(f"checkpoint.root={root}")
    full_env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1", **(env or {})}
    full_env.pop("HYDRA_FULL_ERROR", None)
    result = subprocess.run(args, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(
            f"{script} {' '.join(overrides)} exited {result.returncode}\n"
            f"--- stdout\n{result.stdout[-3000:]}\n--- stderr\n"
            f"{result.stderr[-3000:]}"
        )
    return result


def compose(config_name: str, overrides: Sequence[str] = ()) -> DictConfig:
    """The config `<config_name>.py <overrides>` gets under @hydra.main, e.g.
    compose("train", ["experiment=digits_cnn"]). A plain function, so fixtures of any scope
    can use it. Hydra's own exception if the overrides do not compose: tests of the one-line
    message call the product's `engine.cli.compose_checked` instead."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
            cfg = hydra_compose(config_name=config_name, overrides=list(overrides), return_hydra_config=True)
    finally:
        GlobalHydra.instance().clear()
    # As under @hydra.main: `${hydra:runtime.choices.data}` (the default run name) resolves.
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


def train_run(root: Path, *overrides: str, name: str = "run") -> Path:
    """Train in-process (linear regression, 2 epochs unless overridden); the run folder."""
    import train

    train.train(
        compose(
            "train",
            [
                f"checkpoint.root={root}",
                f"run_name={name}",
                "trainer.epochs=2",
                "checkpoint.every_n_epochs=1",
                *overrides,
            ],
        )
    )
    return root / name


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    """A finished 2-epoch linear-regression run `lin` (epoch_0001.pt, epoch_0002.pt, last.pt,
    best.pt, export/), trained once per test module, in a root of its own."""
    return train_run(tmp_path_factory.mktemp("root"), name="lin")


@pytest.fixture
def points(tmp_path) -> Path:
    """A small CSV of inputs for predict on the linear-regression run."""
    path = tmp_path / "points.csv"
    path.write_text("x\n0.1\n0.5\n0.9\n")
    return path


# The longest single tests start first, so that with `pytest -n 2` (make test-full) the other
# worker works through the rest meanwhile instead of both waiting on them at the end.
LONGEST_FIRST = ("test_readme.py::test_readme_runs_in_order", "test_cli_vgg16_one_step_at_32px")


def pytest_collection_modifyitems(config, items) -> None:
    items.sort(key=lambda item: not any(name in item.nodeid for name in LONGEST_FIRST))
