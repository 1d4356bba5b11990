"""Files are data, never code (issue 18): a config read from a file holds no interpolation
and names no target outside the allow-list, wherever it hides.

A seeded generator crafts configs that combine every OmegaConf resolver and Hydra's special
keys at every depth and position (kwargs, list items, `_args_`, augment entries, nested
dicts, keys, `_target_` itself), writes each into a checkpoint and an export folder, and
runs it through every way a file's config is read: resume, `weights=`, evaluate/predict
(`load_for_inference`), `python -m engine.export`, and the README's `load_export_model`.
Each must end in one line naming the key, never create the marker file, never show the
secret from the environment. A .pt2 holding one is refused unread. A few cases also run as
the user does (subprocesses: exit 2).
Sweep storage (optuna.db) is covered in tests/test_sweep_storage.py.
"""

from __future__ import annotations

import copy
import os
import random
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO, run_script
from helpers import assert_one_line, deadline
from omegaconf import OmegaConf

from engine.checkpoint import load_checkpoint, load_export_model, load_state_dict_file
from engine.config import build
from engine.errors import UserError
from engine.export import export_checkpoint, export_pt2
from engine.metrics import load_for_inference

SEED = 20261206
SECRET = "s3cr3t-never-printed"  # in the environment of every case: must never be shown
RESOLVERS = (
    "oc.create",
    "oc.decode",
    "oc.env",
    "oc.select",
    "oc.deprecated",
    "oc.dict.keys",
    "oc.dict.values",
    "hydra",
    "now",
    "eval",
)  # registered or not: all refused
SPECIAL = ("_target_", "_args_", "_partial_", "_recursive_", "_convert_")


def payloads(marker: Path) -> list:
    """Hostile values: interpolations through every resolver (some would run code when
    resolved), plain and relative references, and dicts naming code directly."""
    touch = f"{{_target_: os.system, _args_: ['touch {marker}']}}"
    strings = [
        f"${{oc.create:{touch}}}",
        f"${{oc.decode:'{touch}'}}",
        "${oc.env:FILES_ARE_DATA_SECRET}",
        "x ${oc.env:FILES_ARE_DATA_SECRET} y",
        "${oc.env:${oc.select:seed}}",
        "${seed}",
        "${..seed}",
        "${.seed}",
        "\\${oc.env:FILES_ARE_DATA_SECRET}",
        "${data}",
        "${oc.select:data.path,/}",
    ]
    strings += [f"${{{resolver}:seed}}" for resolver in RESOLVERS]
    dicts = [
        {"_target_": "os.system", "_args_": [f"touch {marker}"]},
        {"_target_": "builtins.exec", "_args_": [f"open({str(marker)!r}, 'w')"]},
        {"_target_": "torch.nn.Identity", "_partial_": True},
        {"_target_": "torch.nn.Identity", "_convert_": "sideways"},
        {"_target_": "torch.nn.Identity", "_recursive_": "no"},
        {"_target_": "torch.nn.Identity", "_args_": "touch"},
    ]
    return strings + dicts


def place(section: dict, payload, rng: random.Random) -> str:
    """Put `payload` somewhere in `section` (in place); the position's kind."""
    where = rng.choice(["kwarg", "list", "args", "nested", "key", "target", "augment"])
    if isinstance(payload, dict) and where in ("key", "target"):
        where = "nested"
    if where == "kwarg":
        section[rng.choice(["path", "hidden", "extra", "batch_size"])] = payload
    elif where == "list":
        section["items"] = [rng.randrange(5) for _ in range(rng.randrange(3))] + [payload]
    elif where == "args":
        section["_args_"] = [payload]
    elif where == "nested":
        node = section
        for level in range(rng.randrange(1, 5)):
            node[f"inner{level}"] = {"keep": level}
            node = node[f"inner{level}"]
        node[rng.choice(["value", "_target_", "_args_"])] = payload
    elif where == "key":
        section[payload] = 1
    elif where == "target":
        section["_target_"] = payload
    else:
        section["augment"] = [{"_target_": "torchvision.transforms.v2.RandomHorizontalFlip", "p": 0.5}, payload]
    for key in rng.sample(SPECIAL[2:], rng.randrange(3)):  # harmless special keys beside it
        section.setdefault(key, {"_recursive_": True, "_convert_": "all", "_partial_": False}[key])
    return where


def crafted(saved: dict, rng: random.Random, marker: Path, interpolation: bool = True) -> tuple[dict, str]:
    """`saved` with hostile values placed in random sections: always one interpolation
    (refused wherever the file is read) unless `interpolation=False`, and sometimes a dict
    naming code (refused wherever the config would be built)."""
    config = copy.deepcopy(saved)
    strings = [p for p in payloads(marker) if isinstance(p, str)]
    dicts = [p for p in payloads(marker) if isinstance(p, dict)]
    chosen = ([rng.choice(strings)] if interpolation else []) + (
        [rng.choice(dicts)] if not interpolation or rng.random() < 0.5 else []
    )
    labels = []
    for payload in chosen:
        section = rng.choice(["data", "model", "loss"])
        if not isinstance(config.get(section), dict):
            config[section] = {"_target_": "torch.nn.MSELoss"}
        where = place(config[section], payload, rng)
        labels.append(f"{section}/{where}/{str(payload)[:40]}")
    return config, " + ".join(labels)


@pytest.fixture(scope="module")
def run(trained_run) -> Path:
    return trained_run


@pytest.fixture(autouse=True)
def secret(monkeypatch):
    monkeypatch.setenv("FILES_ARE_DATA_SECRET", SECRET)


def refused(fn, *args, marker: Path, **kwargs) -> str:
    """fn(...) ends in a one-line UserError within the hang guard, runs nothing, shows no
    secret; the message."""
    with deadline(10), pytest.raises(UserError) as info:
        fn(*args, **kwargs)
    message = assert_one_line(info.value)
    assert not marker.exists(), f"code ran: {message}"
    assert SECRET not in message
    return message


def write_checkpoint(run: Path, config: dict, out: Path) -> Path:
    state = torch.load(run / "best.pt", weights_only=True)
    state["config"] = config
    torch.save(state, out)
    return out


def write_export(run: Path, config: dict, out: Path) -> Path:
    out.mkdir()
    shutil.copy(run / "export" / "model.safetensors", out / "model.safetensors")
    (out / "config.yaml").write_text(yaml.safe_dump(config))
    return out


def inference_cfg(path: Path):
    return OmegaConf.create({"ckpt": str(path), "weights": None, "device": "cpu"})


@pytest.mark.parametrize("case", range(48))
def test_crafted_config_in_a_checkpoint_or_export_runs_nothing(run, tmp_path, case):
    rng = random.Random(SEED + case)
    marker = tmp_path / "MARKER"
    saved = load_checkpoint(run / "best.pt")["config"]
    config, label = crafted(saved, rng, marker)
    ckpt = write_checkpoint(run, config, tmp_path / "crafted.pt")
    folder = write_export(run, config, tmp_path / "export")
    model = torch.nn.Linear(1, 1)
    messages = [
        refused(load_checkpoint, ckpt, marker=marker),  # resume=PATH and resume=auto read it so
        refused(load_for_inference, inference_cfg(ckpt), marker=marker),  # evaluate / predict
        refused(load_state_dict_file, model, ckpt, marker=marker),  # weights=
        refused(export_checkpoint, ckpt, tmp_path / "out", marker=marker),
        refused(load_for_inference, inference_cfg(folder), marker=marker),
        refused(load_state_dict_file, model, folder, marker=marker),
        refused(load_export_model, folder, marker=marker),
    ]
    assert not (tmp_path / "out").exists(), "export wrote a refused config"
    for message in messages:  # names the file and what was refused, not its text
        assert "refused" in message or "interpolation" in message, (label, message)


@pytest.mark.parametrize("case", range(12))
def test_a_target_naming_code_is_refused_wherever_it_would_be_built(run, tmp_path, case):
    """No interpolation, only a `_target_`/`_partial_`/... naming code or misusing Hydra's
    keys: every path that builds from the file refuses it; the others never build it."""
    rng = random.Random(SEED * 3 + case)
    marker = tmp_path / "MARKER"
    saved = load_checkpoint(run / "best.pt")["config"]
    config, label = crafted(saved, rng, marker, interpolation=False)
    ckpt = write_checkpoint(run, config, tmp_path / "crafted.pt")
    folder = write_export(run, config, tmp_path / "export")
    for fn, arg in (
        (load_for_inference, inference_cfg(ckpt)),
        (export_checkpoint, ckpt),
        (load_for_inference, inference_cfg(folder)),
        (load_export_model, folder),
    ):
        message = refused(fn, arg, marker=marker)
        assert "refused" in message, (label, message)
    load_checkpoint(ckpt)  # resume reads it, but builds from the command line's config
    assert not marker.exists()


@pytest.mark.parametrize("case", range(6))
def test_crafted_config_in_a_pt2_runs_nothing(run, tmp_path, case):
    """A .pt2 is never loaded (torch.export.load is not weights-only): ckpt= and weights= refuse
    it in one line before reading it, whatever its config holds."""
    rng = random.Random(SEED * 7 + case)
    marker = tmp_path / "MARKER"
    saved = load_checkpoint(run / "best.pt")["config"]
    config, label = crafted(saved, rng, marker)
    config["model"] = saved["model"]
    if "model" in label:
        config["data"]["augment"] = [payloads(marker)[case % len(payloads(marker))]]
    path = export_pt2(torch.nn.Linear(1, 1), torch.zeros(2, 1), config, tmp_path / "model.pt2")
    assert path is not None
    weights = {"ckpt": None, "weights": str(path), "device": "cpu", "model": saved["model"], "data": saved["data"]}
    weights = OmegaConf.create(weights)  # weights= comes with model= and data= (cli.validate_inference)
    for cfg in (inference_cfg(path), weights):
        message = refused(load_for_inference, cfg, marker=marker)
        assert f"{path}: a .pt2 program is not loaded here" in message, (label, message)


def test_the_node_about_to_be_built_is_checked(tmp_path):
    """An interpolation resolved against a parent node is caught where it is instantiated,
    not only where the file was read; what is instantiated is exactly what was checked."""
    marker = tmp_path / "MARKER"
    config = OmegaConf.create(
        {
            "evil": {"_target_": "os.system", "_args_": [f"touch {marker}"]},
            "model": {"_target_": "torch.nn.Linear", "in_features": 1, "out_features": 1, "bias": "${evil}"},
        }
    )
    refused(build, config.model, "model", tmp_path / "file.pt", marker=marker)
    config.model.bias = True  # the same node, plain: builds
    assert isinstance(build(config.model, "model", tmp_path / "file.pt"), torch.nn.Linear)


def test_trusted_command_line_still_resolves(run, tmp_path):
    """Your own command line and configs/ stay trusted: an interpolation you type in a data
    override of evaluate is resolved (it is not the file's)."""
    cfg = OmegaConf.create(
        {
            "ckpt": str(run / "best.pt"),
            "weights": None,
            "device": "cpu",
            "batch": 16,
            "data": {**load_checkpoint(run / "best.pt")["config"]["data"], "batch_size": "${batch}"},
        }
    )
    loaded = load_for_inference(cfg)
    assert loaded.data.batch_size == 16


def test_scripts_refuse_a_crafted_file_in_one_line(run, tmp_path):
    """As a user runs them: every script that reads a file exits 2 with one line, and the
    marker never appears. Subprocesses in parallel (they wait on start-up)."""
    marker = tmp_path / "MARKER"
    saved = load_checkpoint(run / "best.pt")["config"]
    evil = copy.deepcopy(saved)
    evil["data"]["augment"] = [f"${{oc.create:{{_target_: os.system, _args_: ['touch {marker}']}}}}"]
    ckpt = write_checkpoint(run, evil, tmp_path / "evil.pt")
    folder = write_export(run, evil, tmp_path / "evil_export")
    points = tmp_path / "points.csv"
    points.write_text("x\n0.1\n0.5\n")
    commands = [
        ("evaluate.py", f"ckpt={ckpt}"),
        ("predict.py", f"ckpt={folder}", f"input={points}"),
        ("train.py", f"resume={ckpt}", f"checkpoint.root={tmp_path / 'ck'}", "run_name=r"),
        ("train.py", f"weights={ckpt}", f"checkpoint.root={tmp_path / 'ck'}", "run_name=w"),
        ("-m", "engine.export", str(ckpt), str(tmp_path / "out")),
    ]

    def go(command):
        env = {"FILES_ARE_DATA_SECRET": SECRET}
        if command[0] == "-m":
            import subprocess
            import sys

            return subprocess.run(
                [sys.executable, *command],
                cwd=REPO,
                capture_output=True,
                text=True,
                timeout=120,
                env={**os.environ, "PYTHONPATH": str(REPO), **env},
            )
        return run_script(command[0], *command[1:], check=False, env=env, timeout=120)

    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(go, commands))
    for command, result in zip(commands, results, strict=True):
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert result.returncode == 2, (command, result.stderr[-2000:])
        assert len(lines) == 1 and lines[0].startswith("error: "), (command, result.stderr)
        assert "interpolation" in lines[0], (command, lines[0])
        assert SECRET not in result.stdout + result.stderr
    assert not marker.exists()
    assert not (tmp_path / "out").exists()
