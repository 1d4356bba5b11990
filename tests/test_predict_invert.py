"""A user's own digit drawings, black on white (issue 9.13): the 8x8 digits model was trained on
white on black, so predict.py needs invert=true, and says so when it is missing."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from conftest import run_script
from PIL import Image


def _draw_black_on_white(folder: Path, count: int = 40, seed: int = 42) -> list[int]:
    """Test-split digits (never trained on) as a user's 32x32 black-on-white PNG drawings."""
    from data.digits import DigitsData

    folder.mkdir()
    test = DigitsData(seed=seed).split("test")
    pick = np.random.default_rng(seed).choice(len(test), size=count, replace=False)
    labels = []
    for n, i in enumerate(sorted(pick)):
        ink = ((test.x[i, 0].numpy() + 1.0) * 255 / 2).clip(0, 255).astype(np.uint8)
        Image.fromarray(255 - ink).resize((32, 32), Image.NEAREST).save(folder / f"{n:03d}.png")
        labels.append(int(test.y[i]))
    return labels


def _accuracy(output: Path, labels: list[int]) -> float:
    rows = list(csv.DictReader(output.open()))
    assert [Path(r["input"]).name for r in rows] == [f"{n:03d}.png" for n in range(len(labels))]
    return sum(int(r["class"]) == y for r, y in zip(rows, labels, strict=True)) / len(labels)


@pytest.mark.slow
def test_black_on_white_digits_need_invert(tmp_path):
    # 5 epochs: about 95% test accuracy on the digits themselves.
    run_script("train.py", "experiment=digits_cnn", "trainer.epochs=5", "checkpoint.export=false", root=tmp_path / "ck")
    ckpt = tmp_path / "ck" / "digits_cnn" / "best.pt"
    labels = _draw_black_on_white(tmp_path / "drawings")

    plain = run_script(
        "predict.py", f"ckpt={ckpt}", f"input={tmp_path / 'drawings'}", f"output={tmp_path / 'plain.csv'}"
    )
    assert "pass invert=true" in plain.stderr and "40 of 40" in plain.stderr, plain.stderr
    inverted = run_script(
        "predict.py",
        f"ckpt={ckpt}",
        f"input={tmp_path / 'drawings'}",
        f"output={tmp_path / 'inverted.csv'}",
        "invert=true",
    )
    assert "invert=true" not in inverted.stderr, inverted.stderr
    plain_acc = _accuracy(tmp_path / "plain.csv", labels)
    inverted_acc = _accuracy(tmp_path / "inverted.csv", labels)
    print(f"accuracy on 40 black-on-white drawings: {plain_acc:.3f} as they are, {inverted_acc:.3f} with invert=true")
    assert inverted_acc >= 0.8, (plain_acc, inverted_acc)
    assert plain_acc <= 0.4, (plain_acc, inverted_acc)

    # White-on-black files (as the digits are) need no invert and get no note.
    for png in (tmp_path / "drawings").iterdir():
        Image.fromarray(255 - np.asarray(Image.open(png))).save(png)
    same = run_script("predict.py", f"ckpt={ckpt}", f"input={tmp_path / 'drawings'}", f"output={tmp_path / 'same.csv'}")
    assert "invert" not in same.stderr, same.stderr
    assert _accuracy(tmp_path / "same.csv", labels) == inverted_acc


def test_invert_is_refused_for_csv_inputs(tmp_path):
    run_script("train.py", "trainer.epochs=1", "checkpoint.export=false", root=tmp_path)
    (tmp_path / "points.csv").write_text("x\n0.1\n0.5\n")
    result = run_script(
        "predict.py",
        f"ckpt={tmp_path / 'linear_regression' / 'best.pt'}",
        f"input={tmp_path / 'points.csv'}",
        f"output={tmp_path / 'p.csv'}",
        "invert=true",
        check=False,
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error: invert=true: ") and result.stderr.count("\n") == 1
    assert not (tmp_path / "p.csv").exists()
