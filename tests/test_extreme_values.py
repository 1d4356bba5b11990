"""Extreme values (issue 11, items 5-8): configs that ask for too much, overrides Hydra
trips over, images and CSV values that would lose their content silently. Each one ends in
one line naming the key, file, row or mode, exit code 2, before any work starts."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import REPO, compose, run_script
from helpers import assert_one_line

from engine.cli import check_command_line
from engine.config import build
from engine.errors import UserError


def train_config_error(overrides: list[str], capsys) -> str:
    """The one line train.py gives for these overrides: from the command-line check, or else
    from building the data and model (train.py's next steps, still before any file)."""
    try:
        check_command_line("train", overrides)
    except SystemExit as stop:
        assert stop.code == 2
        lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(lines) == 1 and "Traceback" not in lines[0], lines
        return lines[0]
    cfg = compose("train", overrides)
    with pytest.raises(UserError) as info:
        build(cfg.data, "data")
        build(cfg.model, "model")
    return assert_one_line(info.value)


# --------------------------------------------------------------- items 5 and 6: configs

CONFIG_CASES = {
    "seed=99999999999999999999": "seed",
    "data.start=5": "data.start",
    "data.step=0": "data.step",
    "data.step=-0.02": "data.step",
    "data.step=nan": "data.step",
    "data.end=inf": "data.end",
    "data.step=1e-9": "samples",
    "data.batch_size=1e20": "data.batch_size",
    "data.batch_size=100000000000000000000": "data.batch_size",
    "optimizer.lr=1e308": "optimizer.lr",
    "+data.num_workers=-1": "data.num_workers",
    "+data.num_workers=1000000": "data.num_workers",
    "experiment=digits_cnn data.num_classes=-3": "data.num_classes",
    "scheduler=step scheduler.step_size=0": "scheduler.step_size",
    "scheduler=cosine scheduler.T_max=0": "scheduler.T_max",
    "=5": "=5",
    "data=[1,2]": "data=[1,2]",
    "~trainer": "trainer",
    "~optimizer": "optimizer",
    "optimizer=null": "optimizer=null",
    "loss=null": "loss=null",
    "scheduler=null": "scheduler=null",
}


@pytest.mark.parametrize("overrides", sorted(CONFIG_CASES))
def test_config_values_out_of_range_are_one_line(overrides, capsys):
    line = train_config_error(overrides.split(), capsys)
    assert CONFIG_CASES[overrides] in line, line


def test_abstract_data_module_as_model_or_data():
    from omegaconf import OmegaConf, open_dict

    from engine.config import check_target_section

    for key in ("data", "model"):
        cfg = compose("train", [])
        with open_dict(cfg):
            cfg[key] = OmegaConf.create({"_target_": "data.base.DataModule", "batch_size": 8})
        with pytest.raises(UserError) as info:
            check_target_section(cfg[key], key)
        assert_one_line(info.value, f"{key}._target_=data.base.DataModule")


def test_huge_synthetic_data_set_is_refused_before_any_work(tmp_path):
    """data.step=1e-9 reached 14 GB before; now one line, and no run folder."""
    result = run_script(
        "train.py", "data.step=1e-9", f"checkpoint.root={tmp_path}", "debug=false", check=False, timeout=120
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "data.step" in result.stderr and result.stderr.strip().count("\n") == 0
    assert not any(tmp_path.iterdir())


def test_export_without_arguments_is_one_line():
    result = subprocess.run(
        [sys.executable, "-m", "engine.export"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "usage" in result.stderr


WORKER_SCRIPT = r"""
import os, sys, time, torch
from torch.utils.data import Dataset
from engine.batches import Batches

class Slow(Dataset):
    def __len__(self):
        return 8
    def __getitem__(self, i):
        time.sleep(120)  # a busy worker: PyTorch's own parent check never runs
        return torch.zeros(1), torch.zeros(1)

batches = Batches(Slow(), 1, torch.device("cpu"), num_workers=2)
iterator = iter(batches)
import threading
threading.Thread(target=lambda: next(iterator), daemon=True).start()
deadline = time.time() + 60
while time.time() < deadline:
    children = set()
    for task in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{task}/children") as f:
            children.update(f.read().split())
    if len(children) >= 2:
        print(" ".join(sorted(children)), flush=True)
        break
    time.sleep(0.1)
time.sleep(300)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl is Linux-only")
def test_data_loader_workers_die_with_the_run():
    """SIGKILL the training process (as the OOM killer did): its workers go with it."""
    proc = subprocess.Popen(
        [sys.executable, "-c", WORKER_SCRIPT],
        cwd=REPO,
        text=True,
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        workers = [int(pid) for pid in proc.stdout.readline().split()]
        assert len(workers) >= 2
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    deadline = time.monotonic() + 60  # a hang guard, not a timing assertion
    alive = workers
    while alive and time.monotonic() < deadline:
        alive = [pid for pid in alive if _running(pid)]
        time.sleep(0.1)
    assert not alive, f"workers {alive} outlived the run"


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


# ---------------------------------------------------------------- item 7: image contents


def test_16_bit_png_keeps_its_values(tmp_path):
    from PIL import Image

    from data.images import image_transform, load_images

    rng = np.random.default_rng(7)
    values = np.sort(rng.choice(65536, size=398, replace=False)).astype(np.uint16)
    pixels = np.resize(values, (20, 20))
    Image.fromarray(pixels).save(tmp_path / "deep.png")
    for channels in (1, 3):
        _, x = load_images(tmp_path / "deep.png", image_transform(20, channels))
        restored = (x[0, 0] * 0.5 + 0.5).numpy()  # undo Normalize(0.5, 0.5)
        assert np.unique(restored.round(6)).size == 398
        assert np.allclose(restored, pixels / 65535, atol=1e-5)


def test_float_tiff_keeps_its_values(tmp_path):
    from PIL import Image

    from data.images import image_transform, load_images

    pixels = np.random.default_rng(3).random((16, 16), dtype=np.float32)
    Image.fromarray(pixels).save(tmp_path / "float.tif")
    _, x = load_images(tmp_path / "float.tif", image_transform(16, 1))
    assert np.allclose((x[0, 0] * 0.5 + 0.5).numpy(), pixels, atol=1e-5)


def test_image_of_unsupported_range_is_refused_naming_the_mode(tmp_path):
    from PIL import Image

    from data.images import image_transform, load_images

    Image.fromarray(np.full((8, 8), -3.0, dtype=np.float32)).save(tmp_path / "neg.tif")
    with pytest.raises(UserError) as info:
        load_images(tmp_path / "neg.tif", image_transform(8, 1))
    assert_one_line(info.value, "neg.tif", "mode F")


# ------------------------------------------------------------ item 8: non-finite numbers


def test_predict_csv_value_beyond_float32_is_refused(trained_run, tmp_path):
    points = tmp_path / "points.csv"
    points.write_text("x\n0.5\n1e39\n")
    result = run_script(
        "predict.py",
        f"ckpt={trained_run / 'best.pt'}",
        f"input={points}",
        f"output={tmp_path / 'preds.csv'}",
        check=False,
        timeout=120,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    line = result.stderr.strip()
    assert "\n" not in line and "points.csv" in line and "row 2" in line and "'x'" in line
    assert not (tmp_path / "preds.csv").exists()


@pytest.mark.parametrize("value", ["1e39", "-4e38", "1e20"])
def test_training_csv_value_that_overflows_is_refused(tmp_path, value):
    """1e39 overflows float32 itself; 1e20 fits, but its square (a feature) does not."""
    data = tmp_path / "train.csv"
    data.write_text("x,y\n" + "".join(f"{i / 10},{i / 5}\n" for i in range(9)) + f"{value},1\n")
    cfg = compose("train", ["experiment=quadratic_csv", f"data.path={data}"])
    module = build(cfg.data, "data")
    with pytest.raises(UserError) as info:
        module.split("train")
    assert_one_line(info.value, "train.csv", "row 10", "'x'")
