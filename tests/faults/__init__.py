"""The test harness's fault injection (tests/faults/sitecustomize.py), from the test side.

`fault_env("kill_at_step=5")` is the environment that arms a kill point in a `python train.py`
or torchrun subprocess (or a fork-server child): TEST_FAULTS, and this folder first on
PYTHONPATH so that the interpreter imports the injecting sitecustomize at start-up."""

from __future__ import annotations

import os
from pathlib import Path

FAULTS_DIR = Path(__file__).resolve().parent
REPO = FAULTS_DIR.parents[1]


def fault_env(spec: str) -> dict[str, str]:
    """Environment entries arming `spec` ("name=N,...", see sitecustomize.py) in a child."""
    return {"TEST_FAULTS": spec, "PYTHONPATH": f"{FAULTS_DIR}{os.pathsep}{REPO}"}
