"""data=csv as a user brings it: random CSVs (seeded), trained with model=mlp, then predict and
evaluate from the checkpoint. The scaling is the train split's, saved in the checkpoint, and
predictions keep the input's columns in the target's units."""

from __future__ import annotations

import csv
import random

import pandas as pd
import pytest
import torch

from data.base import seeded_split
from engine.errors import UserError
from evaluate import evaluate
from predict import predict
from tests.conftest import compose
from tests.helpers import assert_one_line
from train import train

WORDS = ["alpha", "beta", "gamma", "delta", "épsilon", "zeta"]


def random_csv(seed: int, path, task: str) -> tuple[pd.DataFrame, list[str], str]:
    """A CSV of 60-150 rows, 1-6 numeric features with odd names, a target named at random."""
    rng = random.Random(seed)
    n, k = rng.randint(60, 150), rng.randint(1, 6)
    names = [f"{rng.choice(WORDS)} {i}" if rng.random() < 0.5 else f"f{i}" for i in range(k)]
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, k, generator=gen) * torch.tensor([rng.uniform(0.1, 1000) for _ in range(k)])
    x += torch.tensor([rng.uniform(-500, 500) for _ in range(k)])
    score = (x - x.mean(0)) / x.std(0) @ torch.randn(k, generator=gen)
    frame = pd.DataFrame({name: x[:, i].double().numpy() for i, name in enumerate(names)})
    target = rng.choice(["price", "y", "label value"])
    if task == "regression":
        frame[target] = (1000 + 300 * score).double().numpy()
    else:
        frame[target] = [WORDS[int(b)] for b in torch.bucketize(score, torch.tensor([-0.5, 0.5]))]
    cols = list(frame.columns)
    rng.shuffle(cols)  # the target anywhere among the columns
    frame = frame[cols]
    frame.to_csv(path, index=False, float_format="%.6g")
    return pd.read_csv(path), [c for c in cols if c != target], target  # features in file order


def train_csv(path, target, root, *extra: str) -> dict:
    return train(
        compose(
            "train",
            [
                "data=csv",
                f"data.path={path}",
                f"data.target='{target}'",
                "model=mlp",
                "trainer.epochs=3",
                "model.hidden=[16]",
                f"checkpoint.root={root}",
                "run_name=mine",
                "checkpoint.every_n_epochs=1",
                *extra,
            ],
        )
    )


@pytest.mark.parametrize("seed", range(4))
def test_random_csv_trains_predicts_and_evaluates(tmp_path, seed):
    task = "regression" if seed % 2 == 0 else "classification"
    frame, features, target = random_csv(seed, tmp_path / "mine.csv", task)
    extra = ["data.task=classification", "loss=cross_entropy"] if task == "classification" else ["loss=mse"]
    train_csv(tmp_path / "mine.csv", target, tmp_path, *extra)
    best = tmp_path / "mine" / "best.pt"
    state = torch.load(best, weights_only=True)  # plain torch, no project class
    saved = state["data_state_dict"]
    assert saved["features"] == features  # every column but the target, in file order

    # The scaling is the train split's alone (seeded split of the file's rows).
    x = torch.tensor(frame[features].to_numpy(), dtype=torch.float32)
    train_rows = seeded_split(len(frame), [0.8, 0.1, 0.1], 42)[0]
    torch.testing.assert_close(saved["mean"], x[train_rows].mean(0))
    torch.testing.assert_close(saved["std"], x[train_rows].std(0, unbiased=False))

    # predict: the input's own columns (in its order, extra ones too), then the prediction.
    rows = frame.sample(n=7, random_state=seed)
    new = rows[list(reversed(features))].assign(note="kept")
    new.to_csv(tmp_path / "new.csv", index=False, float_format="%.6g")
    out = predict(compose("predict", [f"ckpt={best}", f"input={tmp_path / 'new.csv'}", f"output={tmp_path / 'p.csv'}"]))
    written = list(csv.DictReader(open(out, encoding="utf-8")))
    added = ["prediction"] if task == "regression" else ["class", "probability"]
    assert list(written[0]) == [*reversed(features), "note", *added] and len(written) == 7

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(len(features), 16), torch.nn.ReLU())
    model.append(torch.nn.Linear(16, 1 if task == "regression" else 3))
    model.load_state_dict(state["model_state_dict"])
    inputs = torch.tensor(pd.read_csv(tmp_path / "new.csv")[features].to_numpy(), dtype=torch.float32)
    with torch.no_grad():
        outputs = model((inputs - saved["mean"]) / saved["std"])
    if task == "regression":  # in the target's units: the standardisation inverted
        expected = outputs[:, 0] * saved["target_std"] + saved["target_mean"]
        got = torch.tensor([float(r["prediction"]) for r in written])
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-3)
    else:
        assert [r["class"] for r in written] == [saved["classes"][int(i)] for i in outputs.argmax(1)]
        assert set(saved["classes"]) <= set(WORDS)

    metrics = evaluate(compose("evaluate", [f"ckpt={best}", f"output={tmp_path / 'eval.json'}"]))
    assert metrics["samples"] == len(seeded_split(len(frame), [0.8, 0.1, 0.1], 42)[2])


@pytest.mark.parametrize("seed", range(6))
def test_bad_cell_names_file_row_and_column(tmp_path, seed):
    rng = random.Random(seed)
    frame, features, target = random_csv(seed, tmp_path / "mine.csv", "regression")
    row, column = rng.randrange(len(frame)), rng.choice([*features, target])
    frame[column] = frame[column].astype(object)
    frame.loc[row, column] = rng.choice(["", "n/a", "nan", "inf", "1e39", "12,5"])
    frame.to_csv(tmp_path / "mine.csv", index=False)
    with pytest.raises(UserError) as info:
        train_csv(tmp_path / "mine.csv", target, tmp_path, "loss=mse")
    assert_one_line(info.value, str(tmp_path / "mine.csv"), f"data row {row + 1}", repr(column))
    assert not (tmp_path / "mine").exists()  # refused before the run folder


def test_text_target_needs_classification_and_unknown_labels_are_named(tmp_path):
    frame, features, target = random_csv(1, tmp_path / "mine.csv", "classification")
    with pytest.raises(UserError) as info:
        train_csv(tmp_path / "mine.csv", target, tmp_path, "loss=mse")
    assert_one_line(info.value, repr(target), "data.task=classification")
    train_csv(tmp_path / "mine.csv", target, tmp_path, "data.task=classification", "loss=cross_entropy")
    frame.loc[3, target] = "omega"  # a label training never saw
    frame.to_csv(tmp_path / "mine.csv", index=False)
    with pytest.raises(UserError) as info:
        evaluate(compose("evaluate", [f"ckpt={tmp_path / 'mine' / 'best.pt'}", f"output={tmp_path / 'e.json'}"]))
    assert_one_line(info.value, "data row 4", "'omega'", repr(target))


def test_csv_run_resumes_bit_for_bit(tmp_path):
    _, _, target = random_csv(2, tmp_path / "mine.csv", "regression")
    train_csv(tmp_path / "mine.csv", target, tmp_path / "straight", "loss=mse", "trainer.epochs=4")
    train_csv(tmp_path / "mine.csv", target, tmp_path / "stopped", "loss=mse", "trainer.epochs=2")
    train_csv(tmp_path / "mine.csv", target, tmp_path / "stopped", "loss=mse", "trainer.epochs=4", "resume=auto")
    one, two = (torch.load(tmp_path / d / "mine" / "last.pt", weights_only=True) for d in ("straight", "stopped"))
    assert one["epoch"] == two["epoch"] == 4
    for key, tensor in one["model_state_dict"].items():
        assert torch.equal(tensor, two["model_state_dict"][key]), key
    assert all(torch.equal(one["data_state_dict"][k], two["data_state_dict"][k]) for k in ("mean", "std"))


def test_crafted_data_state_is_one_line_never_a_traceback(tmp_path):
    """A hostile checkpoint's data_state_dict (seeded corruptions): predict refuses in one line."""
    _, features, target = random_csv(3, tmp_path / "mine.csv", "regression")
    train_csv(tmp_path / "mine.csv", target, tmp_path, "loss=mse")
    state = torch.load(tmp_path / "mine" / "best.pt", weights_only=True)
    pd.DataFrame({f: [1.0] for f in features}).to_csv(tmp_path / "new.csv", index=False)
    corruptions = [
        lambda d: d.update(mean=d["mean"][:-1] if len(d["mean"]) > 1 else torch.zeros(5)),
        lambda d: d.update(std=torch.zeros_like(d["std"])),
        lambda d: d.update(target_mean=torch.tensor([float("nan")])),
        lambda d: d.update(classes=["a", "b"]),
        lambda d: d.pop("features"),
        lambda d: d.update(features=[]),
        lambda d: d.update(features=5),
        lambda d: d.update(extra=torch.ones(2)),
    ]
    rng = random.Random(0)
    for index in rng.sample(range(len(corruptions)), len(corruptions)):
        crafted = {**state, "data_state_dict": dict(state["data_state_dict"])}
        corruptions[index](crafted["data_state_dict"])
        torch.save(crafted, tmp_path / "crafted.pt")
        with pytest.raises(UserError) as info:
            predict(
                compose(
                    "predict",
                    [
                        f"ckpt={tmp_path / 'crafted.pt'}",
                        f"input={tmp_path / 'new.csv'}",
                        f"output={tmp_path / 'p.csv'}",
                    ],
                )
            )
        assert_one_line(info.value, "crafted.pt", "data_state")
        assert not (tmp_path / "p.csv").exists()
