"""Trackers that cannot start or keep going (engine/loggers.py): an MLflow store or server it
cannot use, a TensorBoard folder it cannot write, are one line and exit 2 with the run folder
untouched (config.yaml, checkpoints, metrics.csv); no server is waited for minutes; two runs
may create a new mlflow.db at once; a disk filling mid-run is one warning line (tracking
stops, training goes on); an event file named with a future time is not waited for."""

from __future__ import annotations

import hashlib
import os
import random
import socket
import sqlite3
import string
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, run_script, train_run
from helpers import deadline, raises_user_error, snapshot

from engine.loggers import MLflowLogger, TensorBoardLogger
from tests.faults.sitecustomize import install

mlflow = pytest.importorskip("mlflow")

EMPTY = hashlib.sha256(b"").hexdigest()
NEVER_SET = ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT", "MLFLOW_ALLOW_FILE_STORE")


@pytest.fixture(autouse=True)
def _mlflow_defaults(monkeypatch):
    """MLflow's own defaults (4 minutes of retries for a missing server, no file store)."""
    for name in NEVER_SET:
        monkeypatch.delenv(name, raising=False)


def _open_mlflow(uri: str) -> MLflowLogger:
    return MLflowLogger(uri, "e", Path("r"), "r", {"a": 1}, [], None, artifacts=False)


def _one_error_line(result: subprocess.CompletedProcess, *needles: str) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr[-3000:]
    assert lines[0].startswith("error: ") and "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


# ------------------------------------------------------------------------------ MLflow


@pytest.mark.parametrize("seed", range(3))
def test_a_corrupt_mlflow_db_is_one_line(tmp_path, seed):
    rng = random.Random(seed)
    db = tmp_path / "mlflow.db"
    garbage = rng.randbytes(rng.randint(200, 20000))
    db.write_bytes(garbage)
    raises_user_error(_open_mlflow, f"sqlite:///{db}", needles=(str(db), "not a database", "expected"))
    assert db.read_bytes() == garbage


@pytest.mark.slow  # SQLite waits 5 s (MLflow: 20 s) for the lock before it says so
def test_a_locked_mlflow_db_is_one_line(tmp_path):
    db = tmp_path / "mlflow.db"
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")  # another process writing to it, for good
    holder.execute("CREATE TABLE t (x)")
    try:
        with deadline(60):
            raises_user_error(_open_mlflow, f"sqlite:///{db}", needles=(str(db), "database is locked"))
    finally:
        holder.close()


def _garbage_uris(seed: int, count: int) -> list[str]:
    rng = random.Random(seed)
    chars = string.ascii_letters + string.digits + ":/._-?#%@"
    return ["".join(rng.choice(chars) for _ in range(rng.randint(1, 40))) for _ in range(count)]


@pytest.mark.parametrize("uri", ["file:///nonexistent", "foo://bar", "garbage", *_garbage_uris(0, 4)])
def test_an_unusable_tracking_uri_is_one_line(tmp_path, monkeypatch, uri):
    monkeypatch.chdir(tmp_path)  # a path MLflow might take as a folder: not in the repo
    existed = Path("/nonexistent").exists()
    raises_user_error(_open_mlflow, uri, needles=(f"tracking_uri={uri}:", "expected"))
    assert Path("/nonexistent").exists() == existed
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("listening", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_no_server_is_one_line_in_seconds(listening):
    """A port nobody listens on, and one that takes the connection but never answers (5 s):
    MLflow alone retries for about 4 minutes; the start-up probe tries once."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))  # bound, not listening: the connection is refused
    if listening:
        sock.listen()  # the kernel accepts; nothing ever answers
    uri = f"http://127.0.0.1:{sock.getsockname()[1]}"
    try:
        with deadline(10):  # a hang guard
            raises_user_error(
                _open_mlflow, uri, needles=(uri, "timed out" if listening else "Connection refused", "expected")
            )
    finally:
        sock.close()
    assert not any(name in os.environ for name in NEVER_SET)  # the probe's settings undone


CHILD = """
import sys, time, os
from pathlib import Path
from engine.loggers import MLflowLogger
go = Path(sys.argv[1])
(go.parent / f"ready.{os.getpid()}").touch()
while not go.exists():
    time.sleep(0.005)
for db in sys.argv[2:]:
    logger = MLflowLogger(f"sqlite:///{db}", "e", Path(f"r{os.getpid()}"), "r", {"a": 1}, [],
                          None, artifacts=False)
    logger.send([{"epoch": 1, "step": 4, "val_loss": 0.5}])
    logger.close("FINISHED")
"""


@pytest.mark.slow
def test_two_runs_may_create_a_new_mlflow_db_at_once(tmp_path):
    """Without the lock around the store's first use, the second of two processes creating
    the tables fails (duplicate column, a migration step done twice)."""
    dbs = [tmp_path / f"store{i}" / "mlflow.db" for i in range(3)]
    go = tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    children = [
        subprocess.Popen(
            [sys.executable, "-c", CHILD, str(go), *map(str, dbs)],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    try:
        with deadline(120):
            while len(list(tmp_path.glob("ready.*"))) < len(children):
                time.sleep(0.01)
        go.touch()  # both start at the same moment, imports done
        results = [child.communicate(timeout=120) for child in children]
    finally:
        for child in children:
            child.kill()
    for child, (_, err) in zip(children, results, strict=True):
        assert child.returncode == 0, err[-3000:]
    for db in dbs:
        client = mlflow.tracking.MlflowClient(f"sqlite:///{db}")
        runs = client.search_runs([client.get_experiment_by_name("e").experiment_id])
        assert sorted(r.info.status for r in runs) == ["FINISHED", "FINISHED"]


def test_a_disk_filling_mid_run_is_one_warning_line(tmp_path, capsys):
    """SQLite's max_page_count makes the store full as a full disk does ('database or disk
    is full'); MLflow also logs that error with its traceback, which is not shown."""
    from sqlalchemy import event, text

    logger = _open_mlflow(f"sqlite:///{tmp_path / 'mlflow.db'}")
    engine = logger.client._tracking_client.store.engine
    with engine.connect() as connection:
        pages = connection.execute(text("PRAGMA page_count")).scalar()
    engine.dispose()  # new connections, each limited to the pages the file has now
    event.listen(engine, "connect", lambda dbapi, _: dbapi.execute(f"PRAGMA max_page_count = {pages}"))
    capsys.readouterr()
    rng = random.Random(0)
    for epoch in range(1, 1000):
        logger.send([{"epoch": epoch, "step": epoch, "train_loss": rng.random(), "val_loss": rng.random(), "lr": 0.1}])
        if logger.failed:
            break
    logger.send([{"epoch": epoch + 1, "step": epoch + 1, "train_loss": 0.5}])
    logger.finish(tmp_path, [{"epoch": epoch + 1}], {"test_loss": 0.5}, again=False)
    logger.close("FINISHED")
    out, err = capsys.readouterr()
    assert logger.failed and err == ""
    assert len(out.splitlines()) == 1, out
    assert out.startswith("warning: mlflow: ") and "database or disk is full" in out, out


# ------------------------------------------------------------------------------ TensorBoard


def _open_tensorboard(run_dir: Path, step: int = 0) -> TensorBoardLogger:
    return TensorBoardLogger(run_dir, {"a": 1}, [], step, flush_secs=30)


def _stamp(kind: str | int) -> int:
    """A time a killed run's event file can be named with that sorts after a file made now:
    a far one, the next second, or a seeded random later one (a clock set back, a copied
    file) or 9-digit one (TensorBoard compares the names as text). Computed in the test, not
    at collection: pytest-xdist workers must collect the same test ids."""
    now = int(time.time())
    if kind == "far":
        return 99999999999
    if kind == "next second":
        return now + 1
    rng = random.Random(kind)
    return rng.choice([rng.randint(now + 3, 10**11 - 1), rng.randint(2 * 10**8, 10**9 - 1)])


def _steps(folder: Path) -> list[int]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    events.Reload()
    return sorted(e.step for e in events.Scalars("train_loss_step"))


@pytest.mark.parametrize("kind", ["far", 0, 1, 2, "next second"])
def test_an_event_file_named_in_the_future_is_not_waited_for(tmp_path, capsys, kind):
    """A killed run's event file (steps 1-4) whose name sorts after the resume's (a future
    time, or the same second): never waited for, and each step shows once whichever file
    TensorBoard reads first."""
    stamp = _stamp(kind)
    killed = _open_tensorboard(tmp_path / "killed")
    killed.send([{"step": step, "train_loss_step": 1.0} for step in range(1, 5)])
    killed.close("KILLED")
    folder = tmp_path / "tensorboard"
    folder.mkdir()
    (tmp_path / "killed" / "tensorboard").iterdir().__next__().rename(
        folder / f"events.out.tfevents.{stamp}.zzz.99999.0"
    )
    capsys.readouterr()
    with deadline(10):  # a hang guard: it used to sleep until that time
        resumed = _open_tensorboard(tmp_path, step=4)
        resumed.send([{"step": step, "train_loss_step": 0.5} for step in range(5, 9)])
        resumed.close("FINISHED")
    assert capsys.readouterr().out == ""
    assert _steps(folder) == list(range(1, 9))


def test_a_tensorboard_path_that_is_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "tensorboard").write_text("not a folder")
    raises_user_error(_open_tensorboard, tmp_path, needles=(str(tmp_path / "tensorboard"), "not a folder"))
    assert (tmp_path / "tensorboard").read_text() == "not a folder"


@pytest.mark.parametrize("made", [True, False])
def test_a_read_only_tensorboard_folder_is_one_line(tmp_path, capsys, made):
    """Read-only (as root chmod stops no write: the faults harness refuses them): no thread
    prints a traceback either."""
    folder = tmp_path / "tensorboard"
    if made:
        folder.mkdir()
    undo = install(read_only=[str(folder if made else tmp_path)])
    try:
        raises_user_error(_open_tensorboard, tmp_path, needles=(str(folder), "Read-only file system"))
    finally:
        undo()
    assert capsys.readouterr().err == ""
    assert list(folder.iterdir()) == [] if made else not folder.exists()


# ------------------------------------------------------------------------------ train.py


@pytest.mark.slow
@pytest.mark.parametrize("case", ["corrupt mlflow.db", "tensorboard is a file"])
def test_a_resume_with_a_tracker_that_cannot_start_changes_nothing(tmp_path, case):
    root = tmp_path
    train_run(root, "trainer.model_summary=false", name="lin")  # no trackers but metrics.csv
    if case == "corrupt mlflow.db":
        (root / "mlflow.db").write_bytes(random.Random(1).randbytes(5000))
        logger, needles = "logger=[csv,mlflow]", ("mlflow.db", "not a database")
    else:
        (root / "lin" / "tensorboard").write_text("x")
        logger, needles = "logger=[csv,tensorboard]", ("tensorboard", "not a folder")
    before = snapshot(root)
    result = run_script(
        "train.py",
        "run_name=lin",
        "trainer.epochs=3",
        "resume=auto",
        "checkpoint.every_n_epochs=1",
        "trainer.model_summary=false",
        logger,
        root=root,
        check=False,
    )
    _one_error_line(result, *needles)
    assert snapshot(root) == before | ({"mlflow.db.lock": EMPTY} if "mlflow" in logger else {})


@pytest.mark.slow
def test_train_with_no_server_stops_in_seconds(tmp_path):
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    uri = f"http://127.0.0.1:{closed.getsockname()[1]}"
    try:  # the subprocess timeout is the hang guard: MLflow alone retries for 4 minutes
        result = run_script(
            "train.py",
            "run_name=srv",
            "logger=[csv,mlflow]",
            f"logger.mlflow.tracking_uri={uri}",
            "trainer.model_summary=false",
            root=tmp_path,
            check=False,
            timeout=60,
        )
    finally:
        closed.close()
    _one_error_line(result, f"tracking_uri={uri}:", "Connection refused")
    assert not (tmp_path / "srv" / "config.yaml").exists()
