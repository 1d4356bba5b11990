"""`make bench` works end to end (quick mode; no timing is asserted) and the default run stays
lean: nothing it does not need is imported before its first training step."""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest
from conftest import REPO

from tests.faults import fault_env


@pytest.mark.slow
def test_quick_bench_prints_every_item_and_writes_results(tmp_path):
    result = subprocess.run(
        [sys.executable, "benchmarks/bench.py", "--quick", "--out", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    data = json.loads((tmp_path / "latest.json").read_text())
    rows = data["rows"]
    assert {row["item"] for row in rows} == {str(i) for i in range(1, 11)}
    measured = [row for row in rows if not row["skipped"]]
    for row in measured:
        assert math.isfinite(row["ratio"]) and row["a"] > 0 and row["b"] > 0, row
        assert len(row["a_all"]) == len(row["b_all"]) == len(row["ratio_all"]) == row["reps"]
        assert row["name"] in result.stdout  # the table
    # the hand-written loop did exactly the work of train.py's loop
    steps = [row for row in measured if row["item"] == "1"]
    assert len(steps) == 2 and all("same final weights as train.py: yes" in r["note"] for r in steps)
    # whole processes: train.py vs the hand-written loop (and Lightning), each trained the same
    for item in ("9", "10"):
        whole = [row for row in rows if row["item"] == item]
        if item == "10" and importlib.util.find_spec("lightning") is None:
            assert [row["reason"] for row in whole] == ["pip install -e '.[bench]' for the Lightning side-by-side"]
            continue
        assert [row["name"] for row in whole] == [
            "whole process, digits CNN 3 epochs",
            "per epoch, digits CNN 3 epochs",
            "whole process, linear regression 12 epochs",
            "per epoch, linear regression 12 epochs",
        ]
        assert all("training matches: yes" in row["note"] for row in whole[::2]), whole
    gpu = next(row for row in rows if row["item"] == "7")
    if not data["machine"]["cuda"]:
        assert gpu["skipped"] and gpu["reason"] == "no GPU"
    with open(tmp_path / "latest.csv", newline="") as handle:
        assert len(list(csv.DictReader(handle))) == len(rows)
    assert len(list(tmp_path.glob("bench-*.json"))) == 1
    assert not list(tmp_path.glob(".scratch-*"))  # its checkpoints are cleaned up


def test_default_run_imports_only_what_it_needs_before_the_first_step(tmp_path):
    """matplotlib, pandas, scikit-learn and torchvision cost seconds at start-up: the default
    run (linear regression) must not import them before training starts."""
    result = subprocess.run(
        [sys.executable, "-X", "importtime", str(REPO / "train.py"), f"checkpoint.root={tmp_path}", "run_name=lean"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **fault_env("kill_at_step=1")},
    )
    assert result.returncode == -9, result.stderr[-3000:]  # killed right after step 1
    imported = {
        line.rsplit("|", 1)[-1].strip().split(".")[0]
        for line in result.stderr.splitlines()
        if line.startswith("import time:")
    }
    assert "torch" in imported and "hydra" in imported
    assert not imported & {"matplotlib", "pandas", "sklearn", "torchvision", "tensorboard"}
