"""Experiment tracking (configs/logger/, engine/loggers.py): the group composes one or several
trackers; a run SIGKILLed after training past its last checkpoint (or before its first) has
given the trackers only what its checkpoint holds, and once resumed shows each step once in
TensorBoard and one value per epoch in the same MLflow run."""

from __future__ import annotations

import csv
import random
from pathlib import Path

import pytest
import torch
from conftest import compose

from engine.checkpoint import check_checkpoint
from engine.errors import UserError
from engine.loggers import check_logger_config
from tests.faults import fault_env
from tests.resume_helpers import fork_server

server = fork_server()
# linear data: 4 optimizer steps per epoch; every step logged to TensorBoard
RUN = (
    "data=linear",
    "trainer.epochs=6",
    "trainer.log_every_n_steps=1",
    "run_name=r",
    "checkpoint.export=true",
    "trainer.model_summary=false",
)
EPOCHS, STEPS_PER_EPOCH = 6, 4


def test_logger_group_composes_one_or_several():
    assert list(compose("train")["logger"]) == ["csv"]  # the default: metrics.csv only
    assert list(compose("train", ["logger=tensorboard"])["logger"]) == ["tensorboard"]
    both = compose("train", ["logger=[csv,tensorboard,mlflow]"])["logger"]
    assert list(both) == ["csv", "tensorboard", "mlflow"]
    root = compose("train", ["logger=mlflow", "checkpoint.root=/x"])
    assert root.logger.mlflow.tracking_uri == "sqlite:////x/mlflow.db"


@pytest.mark.parametrize(
    "section, message",
    [
        ({"wandb": {}}, "logger.wandb: unknown tracker"),
        ({"tensorboard": {"flush_sec": 3}}, "logger.tensorboard.flush_sec: unknown key"),
        ({"mlflow": "x"}, "logger.mlflow.(expected a mapping)"),
        ({"tensorboard": {"flush_secs": 0}}, "logger.tensorboard.flush_secs=0: expected whole"),
    ],
)
def test_logger_config_mistakes_are_one_line_errors(section, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_logger_config(section)


def test_checkpoint_loggers_key_is_checked():
    check_checkpoint({"loggers": {"mlflow_run_id": "0123abcd"}}, "f.pt")
    rows = torch.tensor([[3.0, 0.5], [4.0, float("nan")]], dtype=torch.float64)
    check_checkpoint({"loggers": {"tensorboard_step": 3, "tensorboard_losses": rows}}, "f.pt")
    check_checkpoint({"loggers": {"tensorboard_step": 9, "tensorboard_losses": torch.zeros(0, 2).double()}}, "f.pt")
    for bad in (
        {"mlflow_run_id": 5},
        {"mlflow": "x"},
        {"mlflow_run_id": ""},
        ["x"],
        {"tensorboard_step": 0},
        {"tensorboard_step": True},
        {"tensorboard_step": 2.0},
        {"tensorboard_step": 4, "tensorboard_losses": rows},  # a step before the start
        {"tensorboard_losses": rows.float()},
        {"tensorboard_losses": rows.flip(0)},  # not rising
        {"tensorboard_losses": rows + 0.5},  # not whole steps
        {"tensorboard_losses": torch.tensor([[float("nan"), 1.0]], dtype=torch.float64)},
        {"tensorboard_losses": rows[:, 0]},
        {"tensorboard_losses": [[3, 0.5]]},
    ):
        with pytest.raises(UserError, match="key 'loggers'"):
            check_checkpoint({"loggers": bad}, "f.pt")


def test_crafted_loggers_keys_are_one_line_errors(tmp_path):
    """Seeded: a trained run's `loggers` with random entries (run ids, resend steps, loss rows
    of any dtype and shape, NaN, huge numbers) loads or is refused in one line naming it."""
    from conftest import train_run
    from helpers import assert_one_line

    from engine.checkpoint import load_checkpoint

    run = train_run(tmp_path, "logger=tensorboard", "trainer.epochs=1", "trainer.model_summary=false")
    state = torch.load(run / "last.pt", weights_only=True)
    assert set(state["loggers"]) == {"tensorboard_step", "tensorboard_losses"}
    rng = random.Random(21)
    values = [None, True, -1, 0, 1, 3, 10**13, 2.5, float("nan"), "x", "", "é" * 300, [], [[3, 0.5]], {"a": 1}]
    values += [torch.zeros(()), torch.zeros(3), torch.zeros(2, 3), torch.zeros(1, 2, dtype=torch.int64)]
    values += [torch.tensor([[3.0, 1.0], [float("inf"), 1.0]], dtype=torch.float64), torch.zeros(0, 2).double()]
    keys = ["tensorboard_step", "tensorboard_losses", "mlflow_run_id", "wandb_id", "other", 5]
    refused = 0
    for _ in range(60):
        crafted = dict(state["loggers"])
        for _key in range(rng.randint(1, 3)):
            crafted[rng.choice(keys)] = rng.choice(values)
        torch.save({**state, "loggers": crafted}, tmp_path / "crafted.pt")
        try:
            load_checkpoint(tmp_path / "crafted.pt")
        except UserError as err:
            assert_one_line(err, "crafted.pt", "key 'loggers'")
            refused += 1
    assert refused >= 50  # a few random entries are valid ones


def test_a_checkpoint_records_what_its_hand_over_sends(tmp_path):
    """The step loss handed over with a step checkpoint on an epoch's last step shares its step
    with the epoch row the next checkpoint hands over: that checkpoint records it too, as a
    resume from it purges that step and sends it all again."""
    from types import SimpleNamespace

    from engine.loggers import Loggers, TensorBoardLogger

    progress = SimpleNamespace(global_step=0)
    loggers = Loggers(tmp_path / "metrics.csv", [TensorBoardLogger(tmp_path, {}, [], 0, 30)], {}, progress, [])
    assert loggers.state_dict()["tensorboard_step"] == 1
    for step in (1, 2, 3, 4):
        progress.global_step = step
        loggers.log_step(step, torch.tensor(step / 10))
    held = loggers.state_dict()  # the step checkpoint at step 4, then its hand-over
    assert held["tensorboard_step"] == 1 and held["tensorboard_losses"][:, 0].tolist() == [1, 2, 3, 4]
    loggers.hand_over()()
    loggers.log_epoch({"epoch": 1, "step": 4, "train_loss": 0.25})
    held = loggers.state_dict()
    assert held["tensorboard_step"] == 4 and held["tensorboard_losses"].tolist() == [[4.0, float(torch.tensor(0.4))]]
    loggers.hand_over()()
    assert loggers.state_dict()["tensorboard_step"] == 5 and not len(loggers.state_dict()["tensorboard_losses"])
    check_checkpoint({"loggers": held}, "f.pt")
    loggers.finish(tmp_path, [], {})


@pytest.mark.parametrize("handed", [False, True])
def test_a_resume_sends_again_what_its_checkpoint_handed_over_or_not(tmp_path, handed):
    """A checkpoint durable, its hand-over not run (or run) when the process died: the resume
    purges TensorBoard from that hand-over's first step and sends it again, each step once."""
    from types import SimpleNamespace

    from engine.loggers import open_loggers

    cfg = compose("train", ["logger=[csv,tensorboard]", "resume=auto", f"checkpoint.root={tmp_path}"])
    rows = [{"epoch": e, "step": 4 * e, "train_loss": 1 / e} for e in (1, 2, 3)]
    progress = SimpleNamespace(global_step=0, history=[])
    killed = open_loggers(cfg, tmp_path, None, progress)
    for epoch in (1, 2):
        for step in range(4 * epoch - 3, 4 * epoch + 1):
            killed.log_step(step, torch.tensor(step / 100))
        progress.global_step = 4 * epoch
        killed.log_epoch(rows[epoch - 1])
        held, send = killed.state_dict(), killed.hand_over()  # the checkpoint is durable
        if epoch == 1 or handed:
            send()
    killed.trackers[0].writer.close()

    progress = SimpleNamespace(global_step=8, history=rows[:2])
    resumed = open_loggers(cfg, tmp_path, {"loggers": held}, progress)
    for step in range(9, 13):
        resumed.log_step(step, torch.tensor(step / 100))
    resumed.log_epoch(rows[2])
    resumed.hand_over()()
    resumed.trackers[0].writer.close()
    scalars = _scalars(tmp_path / "tensorboard")
    assert scalars["train_loss_step"] == [(step, pytest.approx(step / 100)) for step in range(1, 13)]
    assert scalars["train_loss"] == [(row["step"], pytest.approx(row["train_loss"])) for row in rows]


def test_a_resend_sorts_after_a_killed_file_of_the_same_second(tmp_path):
    """TensorBoard reads event files in name order, and a name starts with its second: a
    resume in the second of the killed process's file (whose host and pid sort later) must
    still purge what that file holds and resend it after it."""
    import time

    from engine.loggers import TensorBoardLogger

    killed = TensorBoardLogger(tmp_path / "killed", {}, [], 0, 30)
    killed.send([{"step": step, "train_loss_step": 1.0} for step in range(1, 5)])
    killed.close("KILLED")
    folder = tmp_path / "tensorboard"
    folder.mkdir()
    stamp = int(time.time())
    next(iter((tmp_path / "killed" / "tensorboard").iterdir())).rename(
        folder / f"events.out.tfevents.{stamp:010d}.zzz.99999.0"
    )
    resumed = TensorBoardLogger(tmp_path, {}, [], 2, 30, start=3)  # the hand-over of 3 and 4 resent
    resumed.send([{"step": step, "train_loss_step": 0.5} for step in range(3, 9)])
    resumed.close("FINISHED")
    assert _scalars(folder)["train_loss_step"] == [(1, 1.0), (2, 1.0)] + [(step, 0.5) for step in range(3, 9)]


def _csv_rows(run_dir: Path) -> list[dict]:
    with open(run_dir / "metrics.csv", newline="") as rows:
        return list(csv.DictReader(rows))


def _scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def _kill_and_resume(server, root: Path, extra: tuple[str, ...], kill_at: int) -> Path:
    killed = server.run(*RUN, *extra, root=root, env=fault_env(f"kill_at_step={kill_at}"), check=False)
    assert killed.returncode == -9, killed.stderr
    server.run(*RUN, *extra, "resume=auto", root=root)
    return root / "r"


@pytest.mark.slow
@pytest.mark.parametrize(
    "save, kill_at",
    [
        ("checkpoint.every_n_epochs=2", 14),  # resumes at the end of epoch 2; epoch 3 was logged
        ("checkpoint.every_n_steps=4", 17),  # a step checkpoint on epoch 4's last batch
        ("checkpoint.every_n_steps=3", 17),  # mid-epoch (step 15); epoch 4's row was logged
    ],
)
def test_tensorboard_shows_each_step_once_after_kill_and_resume(server, tmp_path, save, kill_at):
    killed = server.run(
        *RUN, save, "logger=[csv,tensorboard]", root=tmp_path, env=fault_env(f"kill_at_step={kill_at}"), check=False
    )
    assert killed.returncode == -9, killed.stderr
    run_dir = tmp_path / "r"
    before = _scalars(run_dir / "tensorboard")
    # the killed run trained past its last checkpoint, and logged exactly what that holds
    assert len(_csv_rows(run_dir)) == kill_at // STEPS_PER_EPOCH
    held = torch.load(run_dir / "last.pt", weights_only=True)
    assert held["global_step"] < kill_at
    assert [s for s, _ in before["val_loss"]] == [e * STEPS_PER_EPOCH for e in range(1, held["epoch"] + 1)]
    assert [s for s, _ in before["train_loss_step"]] == list(range(1, held["global_step"] + 1))
    resumed = server.run(
        *RUN, save, "logger=tensorboard", "logger.tensorboard.flush_secs=5", "resume=auto", root=tmp_path
    )
    assert "differs from the checkpoint" not in resumed.stderr  # trackers change no training

    scalars = _scalars(run_dir / "tensorboard")
    epoch_ends = [e * STEPS_PER_EPOCH for e in range(1, EPOCHS + 1)]
    rows = _csv_rows(run_dir)
    for tag in ("train_loss", "val_loss", "lr", "epoch"):
        assert [s for s, _ in scalars[tag]] == epoch_ends, tag
        assert [v for _, v in scalars[tag]] == pytest.approx([float(r[tag]) for r in rows], rel=1e-6), tag
    assert [s for s, _ in scalars["train_loss_step"]] == list(range(1, EPOCHS * STEPS_PER_EPOCH + 1))
    assert [s for s, _ in scalars["test_loss"]] == [EPOCHS * STEPS_PER_EPOCH]


@pytest.mark.slow
def test_mlflow_run_continues_with_one_value_per_epoch(server, tmp_path):
    mlflow = pytest.importorskip("mlflow")
    extra = ("logger=[csv,mlflow]", "checkpoint.every_n_epochs=2")
    killed = server.run(*RUN, *extra, root=tmp_path, env=fault_env("kill_at_step=14"), check=False)
    assert killed.returncode == -9, killed.stderr
    run_dir = tmp_path / "r"
    run_id = torch.load(run_dir / "epoch_0002.pt", weights_only=True)["loggers"]["mlflow_run_id"]
    client = mlflow.tracking.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    # the killed run trained epoch 3 after its last checkpoint (epoch 2), and did not log it
    assert len(_csv_rows(run_dir)) == 3
    assert [m.step for m in client.get_metric_history(run_id, "val_loss")] == [1, 2]

    server.run(*RUN, *extra, "resume=auto", root=tmp_path)
    assert torch.load(run_dir / "last.pt", weights_only=True)["loggers"] == {
        "mlflow_run_id": run_id
    }  # the same MLflow run, continued
    rows = _csv_rows(run_dir)
    for key in ("train_loss", "val_loss", "lr"):
        history = sorted((m.step, m.timestamp, m.value) for m in client.get_metric_history(run_id, key))
        assert [step for step, _, _ in history] == list(range(1, EPOCHS + 1)), key
        assert [v for _, _, v in history] == pytest.approx([float(r[key]) for r in rows])
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.metrics["val_loss"] == pytest.approx(float(rows[-1]["val_loss"]))
    assert run.data.params["trainer.epochs"] == str(EPOCHS)
    assert run.data.params["data._target_"].startswith("data.")
    assert "test_loss" in run.data.metrics
    assert len(client.search_runs([run.info.experiment_id])) == 1
    names = {a.path for a in client.list_artifacts(run_id)}
    assert names == {"best.pt", "export"}
    exported = {a.path for a in client.list_artifacts(run_id, "export")}
    assert "export/model.safetensors" in exported

    # A branch from an earlier checkpoint into a new folder is a new MLflow run: the first
    # run keeps all its epochs.
    server.run(
        *RUN, *extra, f"resume={run_dir / 'epoch_0002.pt'}", "run_name=branch", "trainer.epochs=3", root=tmp_path
    )
    branch = torch.load(tmp_path / "branch" / "last.pt", weights_only=True)["loggers"]
    assert branch["mlflow_run_id"] != run_id
    assert [m.step for m in client.get_metric_history(branch["mlflow_run_id"], "val_loss")] == [1, 2, 3]
    assert len(client.get_metric_history(run_id, "val_loss")) == EPOCHS


@pytest.mark.slow
def test_a_kill_before_the_first_checkpoint_leaves_no_tracker_values(server, tmp_path):
    """resume=auto starts over when there is no checkpoint: TensorBoard shows each step once,
    and MLflow has one run (the killed process's, taken again) with one value per epoch."""
    mlflow = pytest.importorskip("mlflow")
    extra = ("logger=[csv,tensorboard,mlflow]",)  # the first checkpoint: epoch 6, the last
    killed = server.run(*RUN, *extra, root=tmp_path, env=fault_env("kill_at_step=10"), check=False)
    assert killed.returncode == -9, killed.stderr
    run_dir = tmp_path / "r"
    assert not list(run_dir.glob("*.pt")) and len(_csv_rows(run_dir)) == 2
    assert not list((run_dir / "tensorboard").iterdir())  # no event file yet
    client = mlflow.tracking.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    [run] = client.search_runs([client.get_experiment_by_name("r").experiment_id])
    assert run.data.metrics == {}

    server.run(*RUN, *extra, "resume=auto", root=tmp_path)
    scalars = _scalars(run_dir / "tensorboard")
    assert [s for s, _ in scalars["train_loss_step"]] == list(range(1, EPOCHS * STEPS_PER_EPOCH + 1))
    assert [s for s, _ in scalars["val_loss"]] == [e * STEPS_PER_EPOCH for e in range(1, EPOCHS + 1)]
    [after] = client.search_runs([run.info.experiment_id])
    assert after.info.run_id == run.info.run_id and after.info.status == "FINISHED"
    assert torch.load(run_dir / "last.pt", weights_only=True)["loggers"]["mlflow_run_id"] == run.info.run_id
    rows = _csv_rows(run_dir)
    for key in ("train_loss", "val_loss", "lr"):
        history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
        assert [step for step, _ in history] == list(range(1, EPOCHS + 1)), key
        assert [v for _, v in history] == pytest.approx([float(r[key]) for r in rows])


@pytest.mark.slow
def test_tensorboard_chosen_on_resume_gets_the_earlier_epochs(server, tmp_path):
    server.run(*RUN, "trainer.epochs=2", root=tmp_path)  # metrics.csv only
    server.run(*RUN, "trainer.epochs=4", "logger=tensorboard", "resume=auto", root=tmp_path)
    scalars = _scalars(tmp_path / "r" / "tensorboard")
    assert [s for s, _ in scalars["val_loss"]] == [4, 8, 12, 16]
    assert [s for s, _ in scalars["train_loss_step"]] == list(range(9, 17))  # from the resume
    assert [float(r["val_loss"]) for r in _csv_rows(tmp_path / "r")] == pytest.approx(
        [v for _, v in scalars["val_loss"]], rel=1e-6
    )


def test_a_classifier_logs_its_test_confusion_matrix(tmp_path):
    """best.pt on the test split: counts[true][predicted] in test_metrics.json (they add up
    to the test samples and their diagonal to test_acc), drawn in TensorBoard as a figure."""
    import json

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from train import train

    train(
        compose(
            "train",
            [
                "data=digits",
                "model=small_cnn",
                "trainer.epochs=1",
                "trainer.limit_train_batches=4",
                "logger=[csv,tensorboard]",
                f"checkpoint.root={tmp_path}",
                "run_name=cm",
                "trainer.device=cpu",
                "checkpoint.export=false",
                "trainer.model_summary=false",
            ],
        )
    )
    metrics = json.loads((tmp_path / "cm" / "test_metrics.json").read_text())
    counts = torch.tensor(metrics["confusion_matrix"])
    assert counts.shape == (10, 10) and int(counts.sum()) == metrics["samples"]
    assert int(counts.diag().sum()) / metrics["samples"] == pytest.approx(metrics["test_acc"])
    events = EventAccumulator(str(tmp_path / "cm" / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    assert "test_confusion_matrix" in events.Tags()["images"]


@pytest.fixture(scope="module")
def uninterrupted(server, tmp_path_factory) -> dict[str, list[tuple[int, float]]]:
    """TensorBoard's scalars of a run never killed (the step losses do not depend on the cadence)."""
    root = tmp_path_factory.mktemp("uninterrupted")
    server.run(*RUN, "logger=[csv,tensorboard]", "checkpoint.export=false", root=root)
    return _scalars(root / "r" / "tensorboard")


def _random_case(seed: int) -> tuple[tuple[str, ...], list[str]]:
    """A checkpoint cadence (epochs, steps or both; async or not) and one or two kill points:
    at a step (before the first checkpoint too), right after the first checkpoint is durable
    (before its links and hand-over), or right after TensorBoard got a hand-over (not MLflow)."""
    rng = random.Random(seed)
    cadence = rng.choice(
        [("checkpoint.every_n_epochs=2",), ("checkpoint.every_n_epochs=3",), ("checkpoint.every_n_epochs=6",)]
        + [("checkpoint.every_n_steps=3",), ("checkpoint.every_n_epochs=1", "checkpoint.every_n_steps=5")]
    )
    extra = (*cadence, f"checkpoint.async={rng.choice(['true', 'false'])}", "logger=[csv,tensorboard,mlflow]")
    # (a kill after the write of the run's last checkpoint: test_a_kill_before_the_last_links_...)
    first = [f"kill_at_step={rng.randint(1, 23)}", f"kill_in_hand_over={rng.randint(1, 3)}"]
    first += ["kill_after_write=1"] if "every_n_epochs=6" not in cadence[0] else []
    faults = [rng.choice(first)]
    if rng.random() < 0.5:  # a second kill in the resumed process
        faults += [rng.choice([f"kill_at_step={rng.randint(1, 23)}", f"kill_in_hand_over={rng.randint(1, 3)}"])]
    return extra, faults


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 2, 3, 5, 7])  # of 12 tried: each kind of kill, the run's end
def test_random_kills_leave_each_value_once_in_every_tracker(server, uninterrupted, tmp_path, seed):
    """Seeded kills (`_random_case`), then resume=auto to the end: TensorBoard reads each step
    once with the uninterrupted run's values, MLflow has one run with one value per epoch."""
    mlflow = pytest.importorskip("mlflow")
    extra, faults = _random_case(seed)
    why = f"seed {seed}: {extra} {faults}"
    for fault in faults:
        killed = server.run(*RUN, *extra, "resume=auto", root=tmp_path, env=fault_env(fault), check=False)
        assert killed.returncode in (-9, 0), (why, killed.stderr[-2000:])  # 0: the write never came
    server.run(*RUN, *extra, "resume=auto", root=tmp_path)

    run_dir, ends = tmp_path / "r", [e * STEPS_PER_EPOCH for e in range(1, EPOCHS + 1)]
    scalars, rows = _scalars(run_dir / "tensorboard"), _csv_rows(run_dir)
    for tag in ("train_loss", "val_loss", "lr", "epoch"):
        assert [s for s, _ in scalars[tag]] == ends, (why, tag)
        assert [v for _, v in scalars[tag]] == pytest.approx([float(r[tag]) for r in rows], rel=1e-6), (why, tag)
    assert scalars["train_loss_step"] == uninterrupted["train_loss_step"], why
    assert [s for s, _ in scalars["test_loss"]] == [ends[-1]], why
    client = mlflow.tracking.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    [run] = client.search_runs([client.get_experiment_by_name("r").experiment_id])
    assert run.info.status == "FINISHED", why
    assert torch.load(run_dir / "last.pt", weights_only=True)["loggers"]["mlflow_run_id"] == run.info.run_id
    for key in ("train_loss", "val_loss", "lr", "test_loss"):
        history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
        epochs = [EPOCHS] if key == "test_loss" else list(range(1, EPOCHS + 1))
        assert [step for step, _ in history] == epochs, (why, key)
        if key != "test_loss":
            assert [v for _, v in history] == pytest.approx([float(r[key]) for r in rows]), (why, key)


@pytest.mark.parametrize("every", [6, 3])  # the run's only checkpoint; the 2nd of two
def test_a_kill_before_the_last_links_resumes_to_a_complete_run(server, tmp_path, every):
    """SIGKILL right after the last checkpoint is renamed into place, before last.pt/best.pt
    point at it: resume=auto mends the links and makes the end of the run (test, export)."""
    extra = (f"checkpoint.every_n_epochs={every}", "logger=[csv,tensorboard]")
    kill = f"kill_after_write={EPOCHS // every}"
    killed = server.run(*RUN, *extra, root=tmp_path, env=fault_env(kill), check=False)
    assert killed.returncode == -9, killed.stderr[-2000:]
    run_dir = tmp_path / "r"
    assert (run_dir / "epoch_0006.pt").is_file() and not (run_dir / "test_metrics.json").exists()
    done = server.run(*RUN, *extra, "resume=auto", root=tmp_path)
    assert "already complete" in done.stdout, done.stdout
    assert (run_dir / "last.pt").samefile(run_dir / "epoch_0006.pt")
    best = torch.load(run_dir / "best.pt", weights_only=True)
    assert best["epoch"] == best["best"]["epoch"]
    assert (run_dir / "test_metrics.json").is_file() and (run_dir / "export" / "model.safetensors").is_file()
