"""`--help` of every script: its own keys, each with a description, only the groups that apply,
and examples (issue 9.14). Run as a user would, as subprocesses."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from conftest import REPO, compose, run_script
from omegaconf import DictConfig, OmegaConf

CONFIGS = REPO / "configs"
# Every config group on disk, as Hydra names them (data/augment); hydra/* are Hydra's own.
DISK_GROUPS = sorted(
    str(d.relative_to(CONFIGS))
    for d in CONFIGS.rglob("*")
    if d.is_dir() and any(d.glob("*.yaml")) and d.relative_to(CONFIGS).parts[0] != "hydra"
)
# The groups each script's help describes: train.py all of them (read from configs/ at run
# time: Hydra's $APP_CONFIG_GROUPS); evaluate.py and predict.py their own, written out.
GROUPS = {"train": DISK_GROUPS, "evaluate": ["data", "model", "loss"], "predict": ["data", "model"]}
ALL_GROUPS = sorted(p.name for p in CONFIGS.iterdir() if p.is_dir())


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))


def _leaf_keys(cfg: DictConfig) -> list[str]:
    """Every key of the script's own config (group sections have their own lines)."""
    keys = []
    for key, value in OmegaConf.to_container(cfg, resolve=False).items():
        if key in ALL_GROUPS:
            continue
        if isinstance(value, dict):
            keys += [f"{key}.{sub}" for sub in value]
        else:
            keys.append(str(key))
    return keys


@pytest.mark.parametrize("script", ["train", "evaluate", "predict"])
def test_help_describes_every_key_and_only_its_groups(script):
    out = run_script(f"{script}.py", "--help").stdout
    keys = _leaf_keys(compose(script))
    assert keys, script
    for key in keys:  # `  key   description` on a line of its own
        assert re.search(rf"^ +{re.escape(key)} +\S.*\w", out, re.M), (key, out)
    for group in GROUPS[script]:  # `group: ...` on a line of its own
        assert re.search(rf"^ *{re.escape(group)}: \S", out, re.M), (group, out)
    described = out.split("== Config with the overrides given ==")[0]  # not the composed config
    for group in set(ALL_GROUPS) - {g.split("/")[0] for g in GROUPS[script]}:  # Hydra's default lists them all
        assert not re.search(rf"\b{group}\b", described), (group, described)
    examples = out.split("== Examples ==")[1].split("==")[0]
    assert len(re.findall(rf"python {script}\.py ", examples)) == 3, examples
    assert "Powered by Hydra" not in out


def test_train_help_lists_every_option_found_in_configs():
    """Each configs/<group>/*.yaml is an option on its group's line: a new model YAML is listed
    with no edit of train.yaml's help (and no edit of this test)."""
    out = run_script("train.py", "--help").stdout
    assert DISK_GROUPS and {"data", "model", "loss", "optimizer", "experiment"} <= set(DISK_GROUPS)
    for group in DISK_GROUPS:
        line = re.search(rf"^ *{re.escape(group)}: (.*)$", out, re.M)
        assert line, (group, out)
        listed = [o.strip() for o in line.group(1).split(",")]
        assert listed == _options(group), (group, _options(group), line.group(0))


@pytest.mark.parametrize("script", ["evaluate", "predict"])
def test_inference_help_names_where_the_options_are(script):
    """evaluate.py/predict.py list their groups only (train's help has the options): nothing
    to edit there when a YAML is added."""
    out = run_script(f"{script}.py", "--help").stdout
    for group in GROUPS[script]:
        assert re.search(rf"^ +{group}: NAME of configs/{group}/NAME\.yaml", out, re.M), (group, out)
    assert "python train.py --help" in out


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
