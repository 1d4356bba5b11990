"""Small fixes, one test each: --shell-completion without its subcommand, hydra.job.chdir=true,
resume keys that change no result, config.yaml of a resume that trains nothing, the export's
file mode, an int32 image in training, and exceptions raised by a config's `_target_`."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

import engine.errors
import evaluate as evaluate_script
import predict as predict_script
import train as train_script
from engine.cli import run_main
from engine.config import build
from engine.errors import UserError
from tests.conftest import REPO, compose, train_run
from tests.helpers import assert_one_line, raises_user_error

# ---------------------------------------------------------------- --shell-completion


@pytest.fixture
def hydra_env(monkeypatch):
    """run_main sets HYDRA_FULL_ERROR for the process (a script exits right after): undone."""
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    monkeypatch.delenv("COMP_LINE", raising=False)
    monkeypatch.setattr(engine.errors, "_hydra_raises_until_task", False)


BAD_COMPLETIONS = [
    [],
    ["query"],
    ["install"],
    ["install=foo"],
    ["install=bash", "query=bash"],
    ["uninstall=tcsh"],
    ["query=bash"],
]  # the last: no COMP_LINE (no shell)


def test_shell_completion_without_a_subcommand_is_one_line(hydra_env, monkeypatch, capsys):
    rng = random.Random(1)
    scripts = [(train_script, "train"), (evaluate_script, "evaluate"), (predict_script, "predict")]
    for args in BAD_COMPLETIONS:
        module, name = rng.choice(scripts)
        flag = rng.choice(["--shell-completion", "-sc"])
        monkeypatch.setattr(sys, "argv", [f"{name}.py", flag, *args])
        with pytest.raises(SystemExit) as info:
            run_main(module.main, name)
        err = capsys.readouterr().err
        assert info.value.code == 2, (args, err)
        assert err.count("\n") == 1 and err.startswith("error: --shell-completion"), err
        assert "Traceback" not in err and "install=bash" in err, err
    monkeypatch.setattr(sys, "argv", ["train.py", "-sc", "install=bash"])  # still works
    run_main(train_script.main, "train")
    assert "complete -o nospace" in capsys.readouterr().out


def test_shell_completion_script_exit_code():
    result = subprocess.run(
        [sys.executable, str(REPO / "train.py"), "--shell-completion"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO), "HYDRA_FULL_ERROR": ""},
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and "--shell-completion install=bash" in result.stderr


# ---------------------------------------------------------------- hydra.job.chdir=true


def _in_job_dir(start: Path, monkeypatch, script, *overrides: str):
    """As `python SCRIPT.py hydra.job.chdir=true ...` started in `start`: composed there, the
    task run inside Hydra's output folder (start/outputs)."""
    monkeypatch.chdir(start)
    cfg = compose(script.__name__, ["hydra.job.chdir=true", *overrides])
    job_dir = start / "outputs"
    job_dir.mkdir(exist_ok=True)
    monkeypatch.chdir(job_dir)
    return script.main.__wrapped__(cfg)  # the task as Hydra calls it (cli_errors)


def _train_in_job_dir(start: Path, monkeypatch, *overrides: str) -> dict:
    return _in_job_dir(
        start, monkeypatch, train_script, "checkpoint.root=ck", "run_name=r", "trainer.model_summary=false", *overrides
    )


def test_chdir_keeps_paths_relative_to_the_start_folder(tmp_path, monkeypatch, capsys):
    _train_in_job_dir(tmp_path, monkeypatch, "trainer.epochs=1")
    run = tmp_path / "ck" / "r"
    assert (run / "epoch_0001.pt").is_file() and (run / "export" / "model.safetensors").is_file()
    assert not list((tmp_path / "outputs").rglob("*")), "nothing in Hydra's output folder"
    capsys.readouterr()
    _train_in_job_dir(tmp_path, monkeypatch, "trainer.epochs=2", "resume=auto")
    assert f"resuming from {run / 'epoch_0001.pt'}" in capsys.readouterr().out
    assert (run / "epoch_0002.pt").is_file()
    (tmp_path / "points.csv").write_text("x\n0.1\n0.5\n")
    _in_job_dir(tmp_path, monkeypatch, predict_script, "ckpt=ck/r/best.pt", "input=points.csv", "output=preds.csv")
    assert len((tmp_path / "preds.csv").read_text().splitlines()) == 3
    assert not list((tmp_path / "outputs").rglob("*"))


@pytest.mark.slow
def test_chdir_multirun_lands_in_the_sweep_folder(tmp_path):
    """`-m hydra.job.chdir=true`: each job runs in its own folder; runs, records and summary
    still land in START/ROOT/NAME/multirun/SWEEP (not under the job's folder)."""
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "train.py"),
            "-m",
            "hydra.job.chdir=true",
            "checkpoint.root=ck",
            "trainer.epochs=1",
            "trainer.model_summary=false",
            "optimizer.lr=0.01,0.02",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO), "HYDRA_FULL_ERROR": ""},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    [sweep] = (tmp_path / "ck" / "linear_regression" / "multirun").iterdir()
    assert not list(tmp_path.glob("ck/linear_regression/multirun/*/ck"))
    rows = (sweep / "summary.csv").read_text().splitlines()
    assert len(rows) == 3 and all(",ok," in row for row in rows[1:]), rows
    assert len(list(sweep.glob("optimizer.lr=0.0[12]/best.pt"))) == 2


# ---------------------------------------------------------------- resume warnings


def test_resume_with_other_print_or_log_intervals_does_not_warn(tmp_path):
    rng = random.Random(3)
    train_run(tmp_path, "trainer.epochs=1", name="r")
    for epochs in (2, 3):
        changed = [
            f"trainer.print_every_s={rng.choice([0, 0.5, 7, 3600])}",
            f"trainer.log_every_n_steps={rng.randint(1, 99)}",
        ]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            train_run(tmp_path, "resume=auto", f"trainer.epochs={epochs}", *changed, name="r")
        assert not [w for w in caught if "will not match" in str(w.message)], changed
    with pytest.warns(UserWarning, match="grad_clip_norm.*will not match"):  # still warns
        train_run(tmp_path, "resume=auto", "trainer.epochs=4", "trainer.grad_clip_norm=1.0", name="r")


# ---------------------------------------------------------------- config.yaml untouched


def test_resume_that_trains_nothing_keeps_config_yaml(tmp_path):
    run = train_run(tmp_path, name="r")  # 2 epochs: complete
    config = run / "config.yaml"
    before = config.read_bytes()
    for overrides in (["optimizer.lr=0.5"], ["trainer.epochs=1"], ["trainer.print_every_s=9"]):
        train_run(tmp_path, "resume=auto", *overrides, name="r")  # already complete
        assert config.read_bytes() == before, overrides
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"not a database" * 99)
    refused = [
        ["data.batch_size=3"],
        ["model=quadratic"],
        # refused once the trackers open (after the checkpoint is restored)
        ["trainer.epochs=3", "logger=[csv,mlflow]", f"logger.mlflow.tracking_uri=sqlite:///{junk}"],
    ]
    for overrides in refused:
        with pytest.raises(UserError):
            train_run(tmp_path, "resume=auto", *overrides, name="r")
        assert config.read_bytes() == before, overrides
    train_run(tmp_path, "resume=auto", "trainer.epochs=3", name="r")  # trains: recorded
    assert OmegaConf.load(config).trainer.epochs == 3


# ---------------------------------------------------------------- export file mode


def test_export_follows_the_umask_like_the_other_outputs(trained_run, tmp_path):
    mode = lambda path: path.stat().st_mode & 0o777  # noqa: E731
    export = trained_run / "export"
    assert mode(export / "model.safetensors") == mode(trained_run / "config.yaml")
    assert mode(export / "model.safetensors") == mode(export / "config.yaml")
    from engine.export import export_checkpoint

    for umask in (0o077, 0o027, 0o002):
        previous = os.umask(umask)
        try:
            out = export_checkpoint(trained_run / "best.pt", tmp_path / f"e{umask:o}")
        finally:
            os.umask(previous)
        for name in ("model.safetensors", "config.yaml"):
            assert mode(out / name) == 0o666 & ~umask, (name, oct(umask))


# ---------------------------------------------------------------- int32 image in training


def test_int32_image_in_training_names_the_file(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(5)
    data_root = tmp_path / "images"
    for label in ("cat", "dog"):
        (data_root / label).mkdir(parents=True)
        for index in range(4):
            pixels = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(data_root / label / f"{index}.png")
    bad = data_root / "dog" / "deep.tif"
    value = int(rng.choice([-5, 70_000, 2**31 - 1]))  # beyond 16 bits or negative
    Image.fromarray(np.full((6, 6), value, dtype=np.int32), mode="I").save(bad)
    assert Image.open(bad).mode == "I"
    cfg = compose(
        "train",
        [
            f"checkpoint.root={tmp_path / 'ck'}",
            "data=image_folder",
            "model=small_cnn",
            "loss=cross_entropy",
            f"data.root={data_root}",
            "data.num_classes=2",
            "data.image_size=8",
            "data.num_workers=0",
            "trainer.epochs=1",
            "data.batch_size=2",
            "data.val_fraction=0.3",
            "data.test_fraction=0.3",
            "trainer.model_summary=false",
        ],
    )
    raises_user_error(train_script.train, cfg, needles=(str(bad), "image mode I"))


# ---------------------------------------------------------------- `_target_` exceptions


class OwnError(Exception):
    """An exception class of a constructor's own."""


class Exploding:
    """A `_target_` whose constructor raises an exception of its own."""

    def __init__(self, message: str = "") -> None:
        raise OwnError(message)


TARGETS = [  # (section, exception type raised by the target)
    ({"_target_": "os.environ.__getitem__", "_args_": ["NO_SUCH_VARIABLE_7F3A"]}, "KeyError"),
    ({"_target_": "operator.truediv", "_args_": [1, 0]}, "ZeroDivisionError"),
    ({"_target_": "builtins.getattr", "_args_": [1, "nope"]}, "AttributeError"),
    ({"_target_": "builtins.open", "_args_": ["/no/such/dir/x"]}, "FileNotFoundError"),
    ({"_target_": "math.sqrt", "_args_": [-1]}, "ValueError"),
    ({"_target_": "math.exp", "_args_": [1000]}, "OverflowError"),
    ({"_target_": "json.loads", "_args_": ["{"]}, "JSONDecodeError"),
    ({"_target_": "codecs.decode", "_args_": ["x", "no-such-codec"]}, "LookupError"),
    ({"_target_": "os.path.join"}, "TypeError"),
    ({"_target_": f"{__name__}.Exploding", "message": "boom"}, "OwnError"),
    ({"_target_": f"{__name__}.Exploding"}, "OwnError"),
    ({"_target_": "builtins.dict", "_partial_": True, "_args_": [[1]]}, "TypeError"),
]


def test_any_exception_of_a_target_is_one_line():
    rng = random.Random(7)
    for section, kind in rng.sample(TARGETS, len(TARGETS)):
        key = rng.choice(["data", "loss", "optimizer", "scheduler"])
        cfg = OmegaConf.create(section)
        with pytest.raises(UserError) as info:
            built = build(cfg, key)
            built()  # a `_partial_` target is called later (optimizer(params)): checked too
        assert_one_line(info.value, f"{key}._target_={section['_target_']}", kind)


def test_target_from_the_command_line_in_training(tmp_path):
    cases = [
        (["loss._target_=os.path.join"], "TypeError"),
        (["optimizer._target_=builtins.dict"], "ValueError"),
        (["+loss.message=x", f"loss._target_={__name__}.Exploding"], "OwnError"),
        (["loss._target_=builtins.dict"], "built a dict"),
    ]
    for index, (overrides, needle) in enumerate(cases):
        cfg = compose("train", [f"checkpoint.root={tmp_path}", f"run_name=r{index}", "trainer.epochs=1", *overrides])
        raises_user_error(train_script.train, cfg, needles=(overrides[-1], needle))
        assert not (tmp_path / f"r{index}").exists()


def test_a_bug_in_the_training_loop_is_still_a_traceback(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise KeyError("val_loss")

    monkeypatch.setattr(train_script, "evaluate", broken)
    with pytest.raises(KeyError):
        train_run(tmp_path, "trainer.epochs=1")
