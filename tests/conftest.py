"""Shared helpers: run the three scripts as a user would, and compose configs with Hydra."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run_script(script: str, *overrides: str, root: Path | None = None, check: bool = True,
               env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python <script> <overrides>` from the repo root, checkpoints under `root`."""
    args = [sys.executable, str(REPO / script), *overrides]
    if root is not None and script == "train.py":
        args.append(f"checkpoint.root={root}")
    full_env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1", **(env or {})}
    full_env.pop("HYDRA_FULL_ERROR", None)
    result = subprocess.run(args, cwd=REPO, env=full_env, capture_output=True, text=True,
                            timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{script} {' '.join(overrides)} exited {result.returncode}\n"
                             f"--- stdout\n{result.stdout[-3000:]}\n--- stderr\n"
                             f"{result.stderr[-3000:]}")
    return result


@pytest.fixture
def compose():
    """compose("train", ["experiment=digits_cnn"]) -> the DictConfig train.py would get."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    import engine.config_schema  # noqa: F401 - registers the schemas the configs name

    def _compose(config_name: str, overrides: list[str] | None = None):
        from hydra.core.hydra_config import HydraConfig
        from omegaconf import open_dict

        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
            cfg = hydra_compose(config_name=config_name, overrides=overrides or [],
                                return_hydra_config=True)
        # As under @hydra.main: `${hydra:runtime.choices.data}` (the default run name) resolves.
        HydraConfig.instance().set_config(cfg)
        with open_dict(cfg):
            del cfg["hydra"]
        return cfg

    yield _compose
    GlobalHydra.instance().clear()
