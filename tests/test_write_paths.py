"""Where the scripts write (issues 10.6, 10.7, 11.2): a run folder changes only once its run
is accepted, no script writes over a checkpoint, export, metrics.csv or config.yaml, and a
read-only or full disk is one line naming the path and the OS error, exit 2, no temporary
left behind.

The tests run as root on this machine, where chmod does not stop a write, so a read-only or
full disk is injected from outside the product: tests/faults/sitecustomize.py wraps the
calls that write (imported at start-up by a subprocess that has it on PYTHONPATH; installed
and removed around the call by the in-process cases).
"""

from __future__ import annotations

import importlib.util
import json
import os
import runpy
import shutil
import sys
from pathlib import Path

import pytest
from conftest import REPO, compose, run_script
from helpers import snapshot

import evaluate as evaluate_script
import predict as predict_script
import train as train_script
from engine.errors import EXIT_BAD_INPUT, UserError, cli_errors
from engine.export import export_checkpoint

FAULTS = REPO / "tests" / "faults"
_spec = importlib.util.spec_from_file_location("write_faults", FAULTS / "sitecustomize.py")
write_faults = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(write_faults)


def copy_run(run: Path, root: Path) -> Path:
    """A copy of the run folder under `root` that keeps its hard links (last.pt, best.pt)."""
    dest = root / run.name
    dest.mkdir(parents=True)
    seen: dict[int, Path] = {}
    for path in sorted(run.rglob("*")):
        target = dest / path.relative_to(run)
        if path.is_dir():
            target.mkdir()
        elif path.stat().st_ino in seen:
            os.link(seen[path.stat().st_ino], target)
        else:
            shutil.copy2(path, target)
            seen[path.stat().st_ino] = target
    return dest


def temporaries(folder: Path) -> list[str]:
    return [str(p) for p in folder.rglob("*") if p.name.endswith(".tmp")]


def without_config(files: dict[str, str]) -> dict[str, str]:
    return {name: digest for name, digest in files.items() if name != "config.yaml"}


def cli(fn, config: str, overrides: list[str], capsys) -> tuple[int, str]:
    """A script's main as its command line runs it: (exit code, stderr)."""
    cfg = compose(config, overrides)
    try:
        cli_errors(fn)(cfg)
        code = 0
    except SystemExit as done:
        code = done.code
    return code, capsys.readouterr().err


def export_cli(*args: str, capsys) -> tuple[int, str]:
    """`python -m engine.export ARGS`, in-process."""
    argv = sys.argv
    sys.argv = ["engine.export", *args]
    try:
        runpy.run_path(str(REPO / "engine" / "export.py"), run_name="__main__")
        code = 0
    except SystemExit as done:
        code = done.code
    finally:
        sys.argv = argv
    return code, capsys.readouterr().err


def assert_error_line(err: str, *needles: str) -> None:
    """stderr holds one `error:` line naming each needle, and no traceback."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"


# ----------------------------------------------------- 10.6: the run folder changes when accepted


def test_a_refused_resume_changes_nothing_in_the_run_folder(trained_run, tmp_path, capsys):
    """Resuming with a model the weights do not fit is refused, and config.yaml (written only
    after the checkpoint is restored) still describes the run's real model."""
    folder = copy_run(trained_run, tmp_path)
    before = snapshot(folder)
    code, err = cli(
        train_script.train,
        "train",
        [f"checkpoint.root={tmp_path}", "run_name=lin", "trainer.epochs=3", "resume=auto", "model=quadratic"],
        capsys,
    )
    assert code == EXIT_BAD_INPUT
    assert_error_line(err, "weights do not fit")
    assert snapshot(folder) == before
    assert "linear_regression" in (folder / "config.yaml").read_text()


def test_export_never_writes_into_a_run_folder(trained_run, tmp_path, capsys):
    """`python -m engine.export best.pt RUN_DIR` is refused in one line (it replaced the run's
    config.yaml), as is a folder whose config.yaml is not an export's; exporting again over
    an earlier export is fine."""
    folder = copy_run(trained_run, tmp_path)
    before = snapshot(folder)
    code, err = export_cli(str(folder / "best.pt"), str(folder), capsys=capsys)
    assert code == EXIT_BAD_INPUT
    assert_error_line(err, str(folder), "run folder")
    assert snapshot(folder) == before

    other = tmp_path / "other"
    other.mkdir()
    (other / "config.yaml").write_text("mine: true\n")
    with pytest.raises(UserError, match="config.yaml that is not an export's"):
        export_checkpoint(folder / "best.pt", other)
    assert (other / "config.yaml").read_text() == "mine: true\n"

    for _ in range(2):  # a new export folder, then the same folder again
        assert export_cli(str(folder / "best.pt"), str(tmp_path / "exp"), capsys=capsys)[0] == 0
    assert sorted(p.name for p in (tmp_path / "exp").iterdir()) == ["config.yaml", "model.safetensors"]


# ------------------------------------------------- 10.7: read-only and full disks, one line each


@pytest.fixture
def faults():
    """faults(read_only=[...], full=[...]) arms the injected OS errors for this test only."""
    undo = []

    def arm(read_only=(), full=()):
        undo.append(write_faults.install([str(p) for p in read_only], list(full)))

    yield arm
    for uninstall in undo:
        uninstall()


READ_ONLY_CASES = [
    "resume",
    "new_run",
    "evaluate",
    "evaluate_output_elsewhere",
    "predict",
    "export",
    "resume_with_corrupt_newest",
]


@pytest.mark.parametrize("case", READ_ONLY_CASES)
def test_read_only_folder(case, trained_run, tmp_path, points, faults, capsys):
    folder = copy_run(trained_run, tmp_path / "root")
    read_only, needles = folder, [str(folder), "Read-only file system"]
    train_args = [
        f"checkpoint.root={tmp_path / 'root'}",
        "run_name=lin",
        "trainer.epochs=3",
        "checkpoint.every_n_epochs=1",
        "resume=auto",
    ]
    if case == "resume_with_corrupt_newest":
        newest = folder / "epoch_0002.pt"  # last.pt and best.pt are links to it: all corrupt
        newest.write_bytes(newest.read_bytes()[:5000])
        # The run-folder lock is taken before anything is read or set aside: its open fails
        # first, and the corrupt file stays as it was (the snapshot check below).
        needles = [str(folder), "Read-only file system"]
    if case == "new_run":
        read_only = tmp_path / "root"
        train_args[1], needles[0] = "run_name=new", str(tmp_path / "root" / "new")
    if case == "predict":
        read_only = tmp_path / "out"
        read_only.mkdir()
        needles[0] = str(read_only / "p.csv")
    before = snapshot(read_only)
    faults(read_only=[read_only])

    if case in ("resume", "new_run", "resume_with_corrupt_newest"):
        code, err = cli(train_script.train, "train", train_args, capsys)
    elif case.startswith("evaluate"):
        output = [f"output={tmp_path / 'out' / 'm.json'}"] if case.endswith("elsewhere") else []
        code, err = cli(evaluate_script.evaluate, "evaluate", [f"ckpt={folder / 'best.pt'}", *output], capsys)
    elif case == "predict":
        code, err = cli(
            predict_script.predict,
            "predict",
            [f"ckpt={folder / 'best.pt'}", f"input={points}", f"output={read_only / 'p.csv'}"],
            capsys,
        )
    else:
        code, err = export_cli(str(folder / "best.pt"), capsys=capsys)

    if case == "evaluate_output_elsewhere":  # writes only where output= says, plot beside it
        assert code == 0, err
        assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["m.json", "m_predictions.png"]
    else:
        assert code == EXIT_BAD_INPUT
        assert_error_line(err, *needles)
    assert snapshot(read_only) == before
    assert temporaries(tmp_path) == []


FULL_DISK_CASES = {  # what fills up -> the file the error line names
    "train_config": ("*/.config.yaml.*", "config.yaml"),
    "train_metrics": ("*/.metrics.csv.*", "metrics.csv"),
    "evaluate_json": ("*/.m.json.*", "m.json"),
    "evaluate_plot": ("*/.m_predictions.png.*", "m_predictions.png"),
    "predict_csv": ("*/.p.csv.*", "p.csv"),
    "export_config": ("*/exp/.config.yaml.*", "exp/config.yaml"),
}


@pytest.mark.parametrize("case", sorted(FULL_DISK_CASES))
def test_full_disk(case, trained_run, tmp_path, points, faults, capsys):
    pattern, named = FULL_DISK_CASES[case]
    folder = copy_run(trained_run, tmp_path / "root")
    before = snapshot(folder)
    faults(full=[pattern])
    out = tmp_path / "out"
    if case.startswith("train"):
        code, err = cli(
            train_script.train,
            "train",
            [
                f"checkpoint.root={tmp_path / 'root'}",
                "run_name=lin",
                "trainer.epochs=3",
                "checkpoint.every_n_epochs=1",
                "resume=auto",
            ],
            capsys,
        )
    elif case.startswith("evaluate"):
        code, err = cli(
            evaluate_script.evaluate, "evaluate", [f"ckpt={folder / 'best.pt'}", f"output={out / 'm.json'}"], capsys
        )
    elif case == "predict_csv":
        code, err = cli(
            predict_script.predict,
            "predict",
            [f"ckpt={folder / 'best.pt'}", f"input={points}", f"output={out / 'p.csv'}"],
            capsys,
        )
    else:
        code, err = export_cli(str(folder / "best.pt"), str(out / "exp"), capsys=capsys)
    assert code == EXIT_BAD_INPUT
    assert_error_line(err, named, "No space left on device")
    assert temporaries(tmp_path) == []
    if case.startswith("train"):  # nothing the run had is lost (config.yaml: run accepted)
        assert without_config(snapshot(folder)) == without_config(before)


def test_full_disk_at_resume_start_from_the_command_line(trained_run, tmp_path):
    """The reported case, as a user meets it: `resume=auto` on a full disk crashed in
    write_csv and left .metrics.csv.tmp."""
    folder = copy_run(trained_run, tmp_path)
    before = snapshot(folder)
    env = {"PYTHONPATH": f"{FAULTS}{os.pathsep}{REPO}", "WRITE_FAULT_ENOSPC": str(folder / ".metrics.csv*")}
    result = run_script(
        "train.py",
        "run_name=lin",
        "trainer.epochs=3",
        "checkpoint.every_n_epochs=1",
        "resume=auto",
        root=tmp_path,
        env=env,
        check=False,
    )
    assert result.returncode == EXIT_BAD_INPUT, result.stderr
    assert_error_line(result.stderr, str(folder / "metrics.csv"), "No space left on device")
    assert temporaries(tmp_path) == []
    assert without_config(snapshot(folder)) == without_config(before)


# ---------------------------------------- 11.2: output= never overwrites what it must not


def test_evaluate_output_onto_a_checkpoint_link_is_refused(trained_run, tmp_path):
    """The reported command: `evaluate.py ckpt=run/best.pt output=run/last.pt` wrote JSON
    into the file best.pt, last.pt and epoch_0002.pt share."""
    folder = copy_run(trained_run, tmp_path)
    before = snapshot(folder)
    result = run_script("evaluate.py", f"ckpt={folder / 'best.pt'}", f"output={folder / 'last.pt'}", check=False)
    assert result.returncode == EXIT_BAD_INPUT, result.stderr
    assert_error_line(result.stderr, f"output={folder / 'last.pt'}")
    assert snapshot(folder) == before


EVALUATE_TARGETS = [
    "epoch_0002.pt",
    "epoch_0001.pt",
    "metrics.csv",
    "config.yaml",
    "export/model.safetensors",
    "export/config.yaml",
    "export",
]


@pytest.mark.parametrize("target", EVALUATE_TARGETS)
def test_evaluate_never_overwrites_a_run_file(target, trained_run, tmp_path, capsys):
    folder = copy_run(trained_run, tmp_path)
    before = snapshot(folder)
    code, err = cli(
        evaluate_script.evaluate, "evaluate", [f"ckpt={folder / 'last.pt'}", f"output={folder / target}"], capsys
    )
    assert code == EXIT_BAD_INPUT
    assert_error_line(err, f"output={folder / target}")
    assert snapshot(folder) == before


def test_predict_never_overwrites_its_input_or_a_checkpoint(trained_run, tmp_path, points, capsys):
    folder = copy_run(trained_run, tmp_path / "root")
    disguised = tmp_path / "weights.csv"  # a hard link to a checkpoint under a .csv name
    os.link(folder / "best.pt", disguised)
    foreign = tmp_path / "table.csv"
    foreign.write_text("a,b\n1,2\n")
    before = snapshot(tmp_path)
    for target in (folder / "metrics.csv", points, disguised, foreign):
        code, err = cli(
            predict_script.predict,
            "predict",
            [f"ckpt={folder / 'best.pt'}", f"input={points}", f"output={target}"],
            capsys,
        )
        assert code == EXIT_BAD_INPUT
        assert_error_line(err, f"output={target}")
    assert snapshot(tmp_path) == before


def test_own_outputs_are_rewritten(trained_run, tmp_path, points, capsys):
    """evaluate's JSON and plot, and predict's CSV, are replaced on a second run."""
    folder = copy_run(trained_run, tmp_path / "root")
    for _ in range(2):
        assert (
            cli(
                evaluate_script.evaluate,
                "evaluate",
                [f"ckpt={folder / 'best.pt'}", f"output={tmp_path / 'm.json'}"],
                capsys,
            )[0]
            == 0
        )
        assert (
            cli(
                predict_script.predict,
                "predict",
                [f"ckpt={folder / 'best.pt'}", f"input={points}", f"output={tmp_path / 'p.csv'}"],
                capsys,
            )[0]
            == 0
        )
    assert json.loads((tmp_path / "m.json").read_text())["source"] == str(folder / "best.pt")
    assert (tmp_path / "m_predictions.png").is_file()
    assert (tmp_path / "p.csv").read_text().startswith("x,prediction\n")  # the input's column, the prediction
