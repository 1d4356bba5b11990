"""End to end: train, checkpoint, resume exactly, evaluate, predict (in-process and CLI)."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from conftest import compose, run_script
from helpers import write_cifar

from evaluate import evaluate
from predict import predict
from train import train


@pytest.fixture
def train_cfg(tmp_path):
    def _cfg(*overrides: str):
        return compose("train", [f"checkpoint.root={tmp_path}", *overrides])

    return _cfg


def _ckpt(path):
    return torch.load(path, weights_only=True)


def test_default_run_learns_the_line_and_leaves_its_files(train_cfg, tmp_path):
    train(train_cfg())
    run = tmp_path / "linear_regression"
    weights = _ckpt(run / "last.pt")["model_state_dict"]
    assert abs(weights["weights"].item() - 0.7) < 0.05
    assert abs(weights["bias"].item() - 0.3) < 0.05
    # every 50 epochs + the end, newest keep_last=3 kept; last.pt and best.pt beside them
    assert sorted(p.name for p in run.glob("*.pt")) == [
        "best.pt",
        "epoch_0200.pt",
        "epoch_0250.pt",
        "epoch_0300.pt",
        "last.pt",
    ]
    assert (run / "last.pt").stat().st_ino == (run / "epoch_0300.pt").stat().st_ino
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert [int(r["epoch"]) for r in rows] == list(range(1, 301))
    best = _ckpt(run / "best.pt")
    assert best["best"]["value"] == min(float(r["val_loss"]) for r in rows)
    assert (run / "loss_curve.png").stat().st_size > 1000
    assert "name: linear_regression" in (run / "config.yaml").read_text()


def test_new_run_over_existing_checkpoints_is_refused(train_cfg, tmp_path):
    from engine.errors import UserError

    train(train_cfg("trainer.epochs=2", "checkpoint.every_n_epochs=1"))
    before = {p.name: p.read_bytes() for p in (tmp_path / "linear_regression").glob("*.pt")}
    with pytest.raises(UserError, match="already has checkpoints.*resume=auto"):
        train(train_cfg("trainer.epochs=2"))
    after = {p.name: p.read_bytes() for p in (tmp_path / "linear_regression").glob("*.pt")}
    assert before == after


@pytest.mark.parametrize(
    "experiment,stop,total", [pytest.param("digits_cnn", 2, 4, marks=pytest.mark.slow), ("quadratic_csv", 3, 7)]
)
def test_resume_after_epoch_k_reproduces_the_uninterrupted_run(train_cfg, tmp_path, experiment, stop, total):
    common = [f"experiment={experiment}", "checkpoint.every_n_epochs=1", "scheduler=step", "scheduler.step_size=2"]
    train(train_cfg(*common, f"trainer.epochs={total}", "run_name=whole"))
    train(train_cfg(*common, f"trainer.epochs={stop}", "run_name=split"))
    train(train_cfg(*common, f"trainer.epochs={total}", "run_name=split", "resume=auto"))
    whole, split = _ckpt(tmp_path / "whole/last.pt"), _ckpt(tmp_path / "split/last.pt")
    for key in ("model_state_dict",):
        for name, tensor in whole[key].items():
            assert torch.equal(tensor, split[key][name]), name
    for index, state in whole["optimizer_state_dict"]["state"].items():
        for name, tensor in state.items():
            assert torch.equal(tensor, split["optimizer_state_dict"]["state"][index][name])
    assert whole["scheduler_state_dict"] == split["scheduler_state_dict"]
    assert (tmp_path / "whole/metrics.csv").read_text() == (tmp_path / "split/metrics.csv").read_text()


def test_resume_of_a_finished_run_does_nothing(train_cfg, tmp_path, capsys):
    train(train_cfg("trainer.epochs=2"))
    before = (tmp_path / "linear_regression/last.pt").read_bytes()
    train(train_cfg("trainer.epochs=2", "resume=auto"))
    assert "already complete" in capsys.readouterr().out
    assert (tmp_path / "linear_regression/last.pt").read_bytes() == before


@pytest.mark.slow
def test_evaluate_and_predict_digits_from_the_checkpoint_alone(train_cfg, tmp_path):
    from PIL import Image

    train(train_cfg("experiment=digits_cnn", "trainer.epochs=3"))
    ckpt = tmp_path / "digits_cnn/best.pt"
    metrics = evaluate(compose("evaluate", [f"ckpt={ckpt}"]))
    assert metrics["test_acc"] > 0.8
    saved = json.loads((tmp_path / "digits_cnn/best_eval.json").read_text())
    assert saved["test_acc"] == metrics["test_acc"]
    assert (tmp_path / "digits_cnn/best_eval_confusion.png").exists()

    from sklearn.datasets import load_digits

    images = tmp_path / "images"
    images.mkdir()
    digits = load_digits()
    for i in range(6):
        Image.fromarray((digits.images[i] * 15.9).astype("uint8")).save(images / f"{i}.png")
    out = predict(compose("predict", [f"ckpt={ckpt}", f"input={images}", f"output={tmp_path / 'preds.csv'}"]))
    rows = list(csv.DictReader(open(out)))
    assert len(rows) == 6 and all(0 < float(r["probability"]) <= 1 for r in rows)
    hits = sum(int(r["class"]) == int(digits.target[i]) for i, r in enumerate(rows))
    assert hits >= 4  # real digits, not noise: most are recognised


def test_tutorial_state_dict_evaluates_by_naming_the_model(tmp_path):
    from models.small_cnn import SmallCNN

    torch.manual_seed(0)
    model = SmallCNN(in_channels=1, image_size=8, num_classes=10)
    torch.save(model.state_dict(), tmp_path / "model_weights.pth")  # the tutorial's save
    metrics = evaluate(
        compose("evaluate", [f"weights={tmp_path / 'model_weights.pth'}", "model=small_cnn", "data=digits"])
    )
    assert 0 <= metrics["test_acc"] <= 1 and metrics["samples"] > 200


def test_regression_predict_writes_features_and_predictions(train_cfg, tmp_path):
    train(train_cfg())
    points = tmp_path / "points.csv"
    points.write_text("x\n0\n0.5\n1\n")
    out = predict(
        compose(
            "predict",
            [f"ckpt={tmp_path / 'linear_regression/best.pt'}", f"input={points}", f"output={tmp_path / 'p.csv'}"],
        )
    )
    rows = list(csv.DictReader(open(out)))
    assert list(rows[0]) == ["x", "prediction"]  # the input's own column, then the prediction
    for row in rows:
        assert abs(float(row["prediction"]) - (0.7 * float(row["x"]) + 0.3)) < 0.05


# ---------------------------------------------------------------- the CLI, as a user runs it


@pytest.mark.slow
@pytest.mark.parametrize(
    "experiment,extra",
    [
        ("linear_regression", ["trainer.epochs=3"]),
        ("quadratic_csv", ["trainer.epochs=2"]),
        ("digits_cnn", ["trainer.epochs=1"]),
    ],
)
def test_cli_train_evaluate_predict(tmp_path, experiment, extra):
    out = run_script("train.py", f"experiment={experiment}", *extra, root=tmp_path)
    assert f"done: {tmp_path}/{experiment}/last.pt" in out.stdout
    ckpt = tmp_path / experiment / "best.pt"
    run_script("evaluate.py", f"ckpt={ckpt}")
    if experiment == "digits_cnn":
        from PIL import Image

        Image.new("L", (8, 8), 128).save(tmp_path / "one.png")
        source = tmp_path / "one.png"
    else:
        source = tmp_path / "x.csv"
        source.write_text("x\n0.25\n0.75\n")
    run_script("predict.py", f"ckpt={ckpt}", f"input={source}", f"output={tmp_path / 'preds.csv'}")
    assert len((tmp_path / "preds.csv").read_text().splitlines()) >= 2


@pytest.mark.slow
def test_cli_vgg16_one_step_at_32px(tmp_path):
    write_cifar(tmp_path / "cifar", n_train=1, n_test=2)  # 5 batch files x 1 image
    data = [
        f"data.root={tmp_path / 'cifar'}",
        "data.check_integrity=false",
        "data.num_workers=0",
        "data.val_fraction=0.6",
        "data.batch_size=2",
    ]
    run_script("train.py", "experiment=vgg16_cifar10", "trainer.epochs=1", *data, root=tmp_path)
    ckpt = tmp_path / "vgg16_cifar10/last.pt"
    state = torch.load(ckpt, weights_only=True, mmap=True)
    assert state["global_step"] == 1 and "classifier.6.weight" in state["model_state_dict"]
    out = run_script("evaluate.py", f"ckpt={ckpt}", "batch_size=2")
    assert "test_acc" in out.stdout
    from PIL import Image

    Image.new("RGB", (50, 40), (10, 200, 30)).save(tmp_path / "img.png")  # resized to 32
    run_script("predict.py", f"ckpt={ckpt}", f"input={tmp_path / 'img.png'}", f"output={tmp_path / 'p.csv'}")
    assert (tmp_path / "p.csv").read_text().count("\n") == 2


@pytest.mark.slow
def test_cli_multirun_gives_each_job_its_own_run_directory(tmp_path):
    run_script("train.py", "-m", "optimizer.lr=0.1,0.01", "trainer.epochs=2", root=tmp_path)
    sweep = tmp_path / "linear_regression" / "multirun" / "optimizer.lr=0.1,0.01,trainer.epochs=2"
    runs = sorted(p.parent.name for p in sweep.glob("*/last.pt"))
    assert runs == ["optimizer.lr=0.01", "optimizer.lr=0.1"]
