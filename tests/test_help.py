"""`--help` of every script: its own keys, each with a description, only the groups that apply,
and examples (issue 9.14). Run as a user would, as subprocesses."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from conftest import REPO, compose, run_script
from omegaconf import DictConfig, OmegaConf

GROUPS = {
    "train": ["experiment", "data", "model", "loss", "optimizer", "scheduler", "hparams_search", "logger"],
    "evaluate": ["data", "model", "loss"],
    "predict": ["data", "model"],
}
ALL_GROUPS = sorted(p.name for p in (REPO / "configs").iterdir() if p.is_dir())


def _leaf_keys(cfg: DictConfig, groups: list[str]) -> list[str]:
    """Every key of the script's own config (group sections have their own lines)."""
    keys = []
    for key, value in OmegaConf.to_container(cfg, resolve=False).items():
        if key in groups:
            continue
        if isinstance(value, dict):
            keys += [f"{key}.{sub}" for sub in value]
        else:
            keys.append(str(key))
    return keys


@pytest.mark.parametrize("script", ["train", "evaluate", "predict"])
def test_help_describes_every_key_and_only_its_groups(script):
    out = run_script(f"{script}.py", "--help").stdout
    keys = _leaf_keys(compose(script), GROUPS[script])
    assert keys, script
    for key in keys:  # `  key   description` on a line of its own
        assert re.search(rf"^ +{re.escape(key)} +\S.*\w", out, re.M), (key, out)
    for group in GROUPS[script]:  # every option of the group, as files in configs/<group>/
        line = re.search(rf"^ +{group}: (.*)$", out, re.M)
        assert line, (group, out)
        options = sorted(p.stem for p in (REPO / "configs" / group).glob("*.yaml"))
        assert all(o in line.group(1) for o in options), (group, options, line.group(0))
    for group in set(ALL_GROUPS) - set(GROUPS[script]):  # Hydra's default lists them all
        assert not re.search(rf"\b{group}\b", out), (group, out)
    examples = out.split("== Examples ==")[1].split("==")[0]
    assert len(re.findall(rf"python {script}\.py ", examples)) == 3, examples
    assert "Powered by Hydra" not in out


def test_train_help_shows_the_composed_config_with_overrides():
    out = run_script("train.py", "experiment=digits_cnn", "--help").stdout
    assert "name: digits_cnn" in out and "_target_: models.small_cnn.SmallCNN" in out


def test_export_help_prints_usage_not_an_error():
    for flag in ("--help", "-h"):
        result = subprocess.run(
            [sys.executable, "-m", "engine.export", flag], cwd=REPO, capture_output=True, text=True, timeout=120
        )
        assert result.returncode == 0, result.stderr
        assert "usage: python -m engine.export" in result.stdout
        assert "checkpoint file not found" not in result.stdout + result.stderr
        assert "out_dir" in result.stdout and "model.safetensors" in result.stdout
    missing = subprocess.run(
        [sys.executable, "-m", "engine.export"], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert missing.returncode == 2 and "usage:" in missing.stderr
