"""The README's "Your own project" walk, as a new user follows it, in a scratch copy of the
repository: a copied third-party network on resized digits, a CSV with no code, a dataset YAML,
evaluate, predict with named columns, Ctrl-C and resume. Then the template's own config and help
tests pass with the user's model and dataset added and no other edit."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest
from conftest import REPO
from test_readme import bash_commands, readme_blocks, runnable, save_titled, scratch_copy

pytestmark = pytest.mark.slow


def section_blocks(title: str = "## Your own project"):
    text = (REPO / "README.md").read_text()
    start = text.index(title)
    first, last = text[:start].count("\n") + 1, text[: text.index("\n## ", start + 1)].count("\n") + 1
    return [b for b in readme_blocks(text) if first <= b.line <= last]


def test_the_walk_runs_as_written_and_the_template_tests_still_pass(tmp_path):
    work = scratch_copy(tmp_path / "repo")
    env = {k: v for k, v in os.environ.items() if k not in ("HYDRA_FULL_ERROR", "PYTHONPATH", "TEST_FAULTS")}
    blocks = section_blocks()
    saved = [save_titled(b, work) for b in blocks if b.title]
    ran = []
    for block in blocks:
        for number, command in bash_commands(block) if block.lang == "bash" and not block.title else []:
            result = subprocess.run(
                ["bash", "-c", f"set -o pipefail\n{runnable(command)}"],
                cwd=work,
                env=env,
                capture_output=True,
                text=True,
            )
            assert result.returncode == 0, (
                f"README.md line {number}: {command}\n{result.stdout[-2000:]}\n{result.stderr}"
            )
            ran.append((command, result.stdout + result.stderr))
    assert len(ran) >= 8

    # What the user wrote: a model in 2 files, a dataset in 1, each at most 40 lines.
    model_files = [p for p in saved if "mnist_net" in p.name]
    data_files = [p for p in saved if p.parent.name == "data"]
    assert len(model_files) == 2 and len(data_files) == 1
    assert sum(len(p.read_text().splitlines()) for p in model_files) <= 40
    assert sum(len(p.read_text().splitlines()) for p in data_files) <= 40

    runs = work / "checkpoints"
    assert json.loads((runs / "mnist_net" / "test_metrics.json").read_text())["test_acc"] > 0.5
    rows = list(csv.reader(open(work / "diabetes_preds.csv")))
    header = next(csv.reader(open(work / "diabetes.csv")))
    assert rows[0] == [*header[:10], "prediction"] and len(rows) == 4  # the input's own columns
    assert all(0 < float(r[-1]) < 400 for r in rows[1:])  # in the target's units, not standardised
    # stopped by Ctrl-C and by max_time, resumed: one metrics row per epoch, none twice
    runs_long = [out for command, out in ran if "mnist_long" in command]
    # Ctrl-C: a checkpoint and exit 3, or (a loaded machine) a stop during start-up; never an error
    assert "stopped: exit 124" in runs_long[1] and ("saved" in runs_long[1] or "Ctrl-C" in runs_long[1])
    assert "resumed at epoch" in runs_long[2] and "stopped again: exit 3" in runs_long[2], runs_long[2][-1000:]
    epochs = [int(r["epoch"]) for r in csv.DictReader(open(runs / "mnist_long" / "metrics.csv"))]
    assert epochs == list(range(1, len(epochs) + 1))

    # A model that does not fit: one line, exit 2, no run folder.
    misfit = subprocess.run(
        [sys.executable, "train.py", "model=mnist_net", "data=digits", "loss=nll", "run_name=misfit"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
    )
    assert misfit.returncode == 2 and len(misfit.stderr.strip().splitlines()) == 1, misfit.stderr
    assert "layer fc1 (Linear)" in misfit.stderr and "data.image_size" in misfit.stderr
    assert not (runs / "misfit").exists()

    # The template's own tests find the new model and dataset and pass, with no test edited.
    tests = ["tests/test_configs.py", "tests/test_help.py", "tests/test_optimizer_switch.py"]
    collected = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *tests],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
    )
    assert "mnist_net" in collected.stdout and "diabetes" in collected.stdout, collected.stdout[-2000:]
    suite = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
    )
    assert suite.returncode == 0, suite.stdout[-3000:]
