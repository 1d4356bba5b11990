"""Issue 13, second share: early stopping, EMA of the weights, debug runs (fast_dev_run,
limit_train_batches, limit_val_batches, overfit_batches); each off by default and exact on
resume (a run killed and resumed with all of them on ends bitwise equal)."""

from __future__ import annotations

import csv
import json
import tempfile

import pytest
import torch
from conftest import compose

import train as train_module
from engine.batches import Batches
from engine.checkpoint import load_checkpoint
from engine.config import build
from engine.errors import UserError
from engine.training import EMA, EarlyStopping
from evaluate import evaluate
from tests.faults import fault_env
from tests.forkrun import ForkServer
from tests.resume_helpers import assert_same
from train import train


@pytest.fixture
def train_cfg(tmp_path):
    def _cfg(*overrides: str):
        return compose(
            "train", [f"checkpoint.root={tmp_path}", "trainer.device=cpu", "trainer.print_every_s=0", *overrides]
        )

    return _cfg


def _rows(path) -> list[dict]:
    with open(path) as handle:
        return list(csv.DictReader(handle))


def _ckpt(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture
def counted(monkeypatch):
    """Batches that count what they yield, per Batches object (train, val)."""
    made: list[list[int]] = []

    class Counting(Batches):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.yielded = [0]
            made.append(self.yielded)

        def __call__(self, epoch: int = 0, start: int = 0):
            for batch in super().__call__(epoch, start):
                self.yielded[0] += 1
                yield batch

    monkeypatch.setattr(train_module, "Batches", Counting)
    return made


# ----------------------------------------------------------------------- early stopping


def test_early_stopping_rule_on_a_known_history():
    stopper = EarlyStopping(patience=2, monitor="val_loss", mode="min", min_delta=0.1)
    history = [1.0, 0.8, 0.75, 0.72, 0.5, 0.45, 0.44]  # improvements > 0.1 at 1, 2, 5
    stops = [stopper.update({"val_loss": v}) for v in history]
    assert stops == [False, False, False, True, False, False, True]
    assert stopper.best == 0.5 and stopper.wait == 2
    up = EarlyStopping(patience=1, monitor="val_acc", mode="max")
    assert [up.update({"val_acc": v}) for v in (0.5, 0.6, 0.6)] == [False, False, True]


def test_early_stopping_stops_at_the_right_epoch_and_resume_auto_says_complete(train_cfg, tmp_path, capsys):
    # Nothing beats the first epoch by 1e6: epochs 2 and 3 do not improve, patience 2.
    run = (
        "early_stopping.patience=2",
        "early_stopping.min_delta=1e6",
        "trainer.epochs=10",
        "checkpoint.every_n_epochs=5",
    )
    train(train_cfg(*run))
    out = capsys.readouterr().out
    run_dir = tmp_path / "linear_regression"
    assert "stopped after epoch 3 of 10: early stopping: val_loss has not improved" in out
    assert [int(r["epoch"]) for r in _rows(run_dir / "metrics.csv")] == [1, 2, 3]
    last = _ckpt(run_dir / "last.pt")
    assert last["epoch"] == 3
    assert last["early_stopping"] == {"monitor": "val_loss", "best": last["early_stopping"]["best"], "wait": 2}
    # The end of the run as after a normal end: best.pt tested, exported.
    tested = json.loads((run_dir / "test_metrics.json").read_text())
    assert tested["epoch"] == last["best"]["epoch"] and (run_dir / "export").is_dir()
    train(train_cfg(*run, "resume=auto"))
    out = capsys.readouterr().out
    assert "already complete (3 epochs; early stopping" in out and "epoch 4" not in out
    assert len(_rows(run_dir / "metrics.csv")) == 3
    # A larger patience continues the stopped run (the counter is kept: stops at epoch 5).
    train(
        train_cfg(
            run[1], "early_stopping.patience=4", "trainer.epochs=10", "checkpoint.every_n_epochs=5", "resume=auto"
        )
    )
    assert [int(r["epoch"]) for r in _rows(run_dir / "metrics.csv")] == [1, 2, 3, 4, 5]


def test_early_stopping_off_writes_no_key(train_cfg, tmp_path):
    train(train_cfg("trainer.epochs=1"))
    last = _ckpt(tmp_path / "linear_regression" / "last.pt")
    assert "early_stopping" not in last and "ema_state_dict" not in last


# -------------------------------------------------------------------------------- EMA


def test_ema_weights_equal_a_hand_computed_ema_after_3_steps(train_cfg, tmp_path):
    decay = 0.75
    train(
        train_cfg(
            f"trainer.ema_decay={decay}",
            "trainer.epochs=1",
            "trainer.limit_train_batches=3",
            "checkpoint.every_n_steps=1",
            "checkpoint.keep_last=10",
        )
    )
    run_dir = tmp_path / "linear_regression"
    raw = [_ckpt(run_dir / f"step_{n:08d}.pt")["model_state_dict"] for n in (1, 2, 3)]
    expected = dict(raw[0])  # the first update copies the weights
    for n, weights in enumerate(raw[1:], start=1):  # warm-up: update n decays by min(decay, (1+n)/(10+n))
        d = min(decay, (1 + n) / (10 + n))
        expected = {k: d * expected[k] + (1 - d) * weights[k] for k in expected}
    got = _ckpt(run_dir / "step_00000003.pt")["ema_state_dict"]
    assert got.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-6, atol=1e-7)
        assert not torch.equal(got[key], raw[2][key])  # the average is not the raw weights


@pytest.mark.parametrize("decay", [0.5, 0.9, 0.999])
def test_ema_module_matches_hand_ema_with_warmup_on_random_steps(decay):
    """TensorFlow's/timm's warm-up: update n uses min(decay, (1+n)/(10+n)); with decay 0.5 the cap
    takes over after 8 updates, 0.9 and 0.999 stay in the warm-up for these 12."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    ema, hand = EMA(model, decay), None
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for n in range(12):
        model(torch.randn(8, 3)).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        ema.update(model, n)
        now = {k: v.detach().clone().double() for k, v in model.state_dict().items() if v.is_floating_point()}
        d = min(decay, (1 + n) / (10 + n))
        hand = now if hand is None else {k: d * hand[k] + (1 - d) * now[k] for k in hand}
    for key, value in hand.items():  # parameters and BatchNorm statistics alike
        torch.testing.assert_close(ema.state_dict()[key].double(), value, rtol=1e-6, atol=1e-7)


def test_validation_evaluate_and_export_use_the_ema_weights(train_cfg, tmp_path):
    train(train_cfg("trainer.ema_decay=0.9", "trainer.epochs=2", "checkpoint.every_n_epochs=1"))
    run_dir = tmp_path / "linear_regression"
    last = load_checkpoint(run_dir / "last.pt")
    logged = float(_rows(run_dir / "metrics.csv")[-1]["val_loss"])
    metrics = evaluate(
        compose("evaluate", [f"ckpt={run_dir / 'last.pt'}", "split=val", "device=cpu", f"output={tmp_path / 'e.json'}"])
    )
    assert metrics["val_loss"] == pytest.approx(logged, rel=1e-5)
    # The raw weights give another loss: the EMA ones were used.
    torch.save(last["model_state_dict"], tmp_path / "raw.pt")
    raw_metrics = evaluate(
        compose(
            "evaluate",
            [
                f"weights={tmp_path / 'raw.pt'}",
                "model=linear_regression",
                "data=linear",
                "split=val",
                "device=cpu",
                f"output={tmp_path / 'r.json'}",
            ],
        )
    )
    assert raw_metrics["val_loss"] != pytest.approx(logged, rel=1e-3)
    from safetensors.torch import load_file

    exported = load_file(str(run_dir / "export" / "model.safetensors"))
    best = load_checkpoint(run_dir / "best.pt")
    for key, value in best["ema_state_dict"].items():
        assert torch.equal(exported[key], value)


# ------------------------------------------------------------------------- debug runs


def test_fast_dev_run_runs_one_train_and_one_val_batch_and_writes_nothing(
    train_cfg, tmp_path, monkeypatch, counted, capsys
):
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    root = tmp_path / "runs"
    cfg = train_cfg("experiment=digits_cnn", f"checkpoint.root={root}", "trainer.fast_dev_run=true")
    row = train(cfg)
    assert row["epoch"] == 1 and row["step"] == 1
    assert [n[0] for n in counted] == [1, 1]  # train, val
    assert not root.exists() and list(scratch.iterdir()) == []
    assert "nothing was written" in capsys.readouterr().out
    assert cfg.trainer.epochs == 15 and cfg.checkpoint.root == str(root)  # caller's config


def test_limit_train_and_val_batches_int_and_fraction(train_cfg, tmp_path, counted):
    cfg = train_cfg(
        "experiment=digits_cnn",
        "trainer.epochs=2",
        "checkpoint.every_n_epochs=2",
        "trainer.limit_train_batches=3",
        "trainer.limit_val_batches=0.5",
    )
    train(cfg)
    train_count, val_count = (n[0] for n in counted)
    val_batches = len(Batches(build(cfg.data, "data").split("val"), 32, torch.device("cpu")))
    assert val_batches >= 4 and train_count == 2 * 3 and val_count == 2 * (val_batches // 2)
    last = _ckpt(tmp_path / "digits_cnn" / "last.pt")
    assert last["global_step"] == 6


def test_batches_limit_cuts_len_sizes_and_order():
    full = Batches(range(10), 3, torch.device("cpu"), shuffle=True, seed=1)
    cut = Batches(range(10), 3, torch.device("cpu"), shuffle=True, seed=1, limit=2)
    assert len(full) == 4 and len(cut) == 2 and cut.batch_sizes().tolist() == [3, 3]
    assert int(cut.batch_sizes().sum()) == 6 and int(full.batch_sizes().sum()) == 10
    assert len(Batches(range(10), 3, torch.device("cpu"), limit=0.5)) == 2
    assert len(Batches(range(10), 3, torch.device("cpu"), limit=0.01)) == 1  # at least one
    assert len(Batches(range(10), 3, torch.device("cpu"), limit=1.0)) == 4
    with pytest.raises(UserError, match="limit_train_batches"):
        cut.check_start(3)


@pytest.mark.slow
def test_overfit_batches_drives_the_training_loss_near_zero_on_digits(train_cfg, tmp_path):
    # One batch of 16 images, a step per epoch: memorised within 40 steps.
    row = train(
        train_cfg(
            "data=digits",
            "model=small_cnn",
            "trainer.overfit_batches=1",
            "data.batch_size=16",
            "optimizer.lr=0.1",
            "trainer.epochs=40",
            "checkpoint.every_n_epochs=100",
            "checkpoint.export=false",
        )
    )
    rows = _rows(tmp_path / "digits_small_cnn" / "metrics.csv")
    assert float(rows[0]["train_loss"]) > 2.0
    assert row["train_loss"] < 0.05 and row["step"] == 40
    assert row["val_loss"] < 0.05 and row["val_acc"] == 1.0  # validated on the same batches


@pytest.mark.parametrize(
    "override, key",
    [
        ("trainer.ema_decay=1.5", "trainer.ema_decay"),
        ("trainer.limit_train_batches=0", "trainer.limit_train_batches"),
        ("trainer.limit_val_batches=1.5", "trainer.limit_val_batches"),
        ("trainer.overfit_batches=-1", "trainer.overfit_batches"),
        ("early_stopping.patience=0", "early_stopping.patience"),
        ("early_stopping.min_delta=-1", "early_stopping.min_delta"),
    ],
)
def test_bad_values_are_one_line_errors_naming_the_key(train_cfg, override, key):
    with pytest.raises(UserError) as info:
        train(train_cfg(override, "early_stopping.patience=3") if "patience" not in override else train_cfg(override))
    assert str(info.value).startswith(f"{key}=") and "\n" not in str(info.value)


def test_ill_typed_new_checkpoint_keys_are_refused(train_cfg, tmp_path):
    train(train_cfg("trainer.epochs=1", "trainer.ema_decay=0.9", "early_stopping.patience=2"))
    good = _ckpt(tmp_path / "linear_regression" / "last.pt")
    for key, value in (
        ("early_stopping", {"monitor": "val_loss", "best": "x", "wait": 1}),
        ("early_stopping", {"monitor": "val_loss", "best": 1.0, "wait": -1}),
        ("early_stopping", [1]),
        ("ema_state_dict", {"weight": 3}),
        ("ema_state_dict", None),
    ):
        torch.save({**good, key: value}, tmp_path / "bad.pt")
        with pytest.raises(UserError, match=f"key '{key}'"):
            load_checkpoint(tmp_path / "bad.pt")


# ---------------------------------------------------------------------- exact resume

RUN = (
    "trainer.epochs=8",
    "trainer.limit_train_batches=3",
    "trainer.ema_decay=0.9",
    "early_stopping.patience=2",
    "early_stopping.min_delta=1e6",
    "checkpoint.every_n_steps=2",
    "checkpoint.every_n_epochs=1",
    "trainer.device=cpu",
    "trainer.print_every_s=0",
)


@pytest.mark.slow
def test_kill_and_resume_with_early_stopping_ema_and_limits_is_bitwise_exact(tmp_path):
    server = ForkServer(tmp_path / "forkrun")  # real train.py processes, torch imported once
    try:
        _kill_and_resume(server, tmp_path)
    finally:
        server.close()


def _kill_and_resume(server: ForkServer, tmp_path) -> None:
    server.run(*RUN, "run_name=whole", root=tmp_path)
    # SIGKILL after step 8 (epoch 3, batch 2; saved at step 8): the early-stopping counter
    # (1 after epoch 2) and the EMA must come back from the step checkpoint.
    killed = server.run(*RUN, "run_name=split", root=tmp_path, check=False, env=fault_env("kill_at_step=8"))
    assert killed.returncode == -9, killed.stderr[-2000:]
    resumed = server.run(*RUN, "run_name=split", "resume=auto", root=tmp_path)
    assert "resumed at epoch 2, step 8" in resumed.stdout
    assert "stopped after epoch 3 of 8" in resumed.stdout
    whole, split = _ckpt(tmp_path / "whole" / "last.pt"), _ckpt(tmp_path / "split" / "last.pt")
    assert whole["epoch"] == 3 and whole["global_step"] == 9
    for key in (
        "epoch",
        "global_step",
        "step_in_epoch",
        "model_state_dict",
        "ema_state_dict",
        "early_stopping",
        "optimizer_state_dict",
        "rng_state",
        "epoch_step_losses",
        "best",
        "loss",
    ):
        assert_same(split[key], whole[key], key)
    assert (tmp_path / "split" / "metrics.csv").read_text() == (tmp_path / "whole" / "metrics.csv").read_text()
    again = server.run(*RUN, "run_name=split", "resume=auto", root=tmp_path)
    assert "already complete" in again.stdout


def test_a_misfit_ema_state_is_refused_before_the_run_folder_changes(train_cfg, tmp_path):
    train(train_cfg("trainer.epochs=1", "trainer.ema_decay=0.9"))
    run_dir = tmp_path / "linear_regression"
    state = _ckpt(run_dir / "last.pt")
    state["ema_state_dict"] = {k: torch.zeros(3, 3) for k in state["ema_state_dict"]}
    (run_dir / "last.pt").unlink()
    torch.save(state, run_dir / "epoch_0001.pt")
    before = (run_dir / "config.yaml").read_text()
    with pytest.raises(UserError, match="ema_state_dict: weights do not fit") as info:
        train(train_cfg("trainer.epochs=2", "trainer.ema_decay=0.9", "resume=auto"))
    assert "\n" not in str(info.value) and (run_dir / "config.yaml").read_text() == before
