"""k-fold cross-validation (`-m cv=3fold|5fold`): the fold split of data/base.py (train and val
pooled, stratified for classifiers, fixed by the seed, test untouched), for every data module,
the one-line refusals, and a 3-fold digits sweep whose summary's mean ± std is checked by hand."""

from __future__ import annotations

import csv
import json
import random
import statistics
from pathlib import Path

import pytest
import torch
from conftest import compose, run_script, train_run
from PIL import Image
from torch.utils.data import Subset, TensorDataset

from data.base import fold_assignment, fold_splits, split_labels
from engine.batches import TensorSplit
from engine.config import build
from engine.errors import UserError


def _check_folds(assignment: torch.Tensor, folds: int, labels: torch.Tensor | None) -> None:
    n = len(assignment)
    assert set(assignment.tolist()) <= set(range(folds))  # every sample in exactly one fold
    sizes = torch.bincount(assignment, minlength=folds)
    assert int(sizes.sum()) == n and int(sizes.max() - sizes.min()) <= 1
    if labels is not None:  # each class: |count in a fold - its count / folds| < 1
        for c in labels.unique():
            count = torch.bincount(assignment[labels == c], minlength=folds).float()
            assert float((count - int((labels == c).sum()) / folds).abs().max()) < 1


@pytest.mark.parametrize("case", range(40))
def test_fold_assignment_is_disjoint_covering_stratified_and_seeded(case):
    rng = random.Random(case)
    n, folds, seed = rng.randint(2, 300), rng.randint(2, 7), rng.randint(0, 2**31)
    folds = min(folds, n)
    labels = torch.tensor([rng.randint(0, rng.randint(1, 5)) for _ in range(n)]) if case % 2 else None
    assignment = fold_assignment(n, folds, seed, labels)
    _check_folds(assignment, folds, labels)
    assert torch.equal(assignment, fold_assignment(n, folds, seed, labels))  # fixed by the seed
    if n >= 20:
        assert not torch.equal(assignment, fold_assignment(n, folds, seed + 1, labels))


def _pool_check(splits: dict, folded: list[dict], key) -> None:
    """Each fold's val: disjoint from the others, their union = train + val exactly; each
    fold's train = the pool minus its val; test: the same object."""
    pool = sorted(key(splits["train"]) + key(splits["val"]))
    vals = [key(f["val"]) for f in folded]
    assert sorted(v for val in vals for v in val) == pool
    for f, val in zip(folded, vals, strict=True):
        assert sorted(key(f["train"]) + val) == pool
        assert f["test"] is splits["test"]


def test_fold_splits_of_tensor_and_dataset_splits():
    gen = torch.Generator().manual_seed(0)
    x, y = torch.arange(60.0).unsqueeze(1), torch.randint(0, 3, (60,), generator=gen)
    tensors = {"train": TensorSplit(x[:40], y[:40]), "val": TensorSplit(x[40:50], y[40:50]), "test": object()}
    folded = [fold_splits(tensors, i, 4, 7, stratify=True) for i in range(4)]
    _pool_check(tensors, folded, lambda s: s.x[:, 0].tolist())
    for f in folded:  # labels travel with their samples
        assert torch.equal(f["val"].y, y[f["val"].x[:, 0].long()])
    # Subsets of one data set (image_folder, torchvision) and a plain Dataset pair
    full = TensorDataset(x, y)
    full.targets = y.tolist()
    subsets = {"train": Subset(full, list(range(0, 40))), "val": Subset(full, list(range(40, 50))), "test": object()}
    folded = [fold_splits(subsets, i, 4, 7, stratify=True) for i in range(4)]
    _pool_check(subsets, folded, lambda s: list(s.indices))
    assert all(f["val"].dataset is full for f in folded)  # one data set: checkpoint digests stay exact
    assert split_labels(folded[0]["val"]).tolist() == [int(y[i]) for i in folded[0]["val"].indices]
    plain = {"train": TensorDataset(x[:40], y[:40]), "val": TensorDataset(x[40:50], y[40:50]), "test": None}
    folded = [fold_splits(plain, i, 4, 7, stratify=True) for i in range(4)]
    _pool_check(plain, folded, lambda s: [float(s[i][0]) for i in range(len(s))])
    with pytest.raises(UserError, match=r"cv.folds=51: more folds than the 50 samples"):
        fold_splits(tensors, 0, 51, 7, stratify=False)


def _image_root(root: Path) -> Path:
    for label, color in (("cat", (255, 0, 0)), ("dog", (0, 0, 255))):
        (root / label).mkdir(parents=True)
        for i in range(12):
            Image.new("RGB", (8, 8), (color[0], i * 10, color[2])).save(root / label / f"{i}.png")
    return root


@pytest.mark.parametrize("data", ["linear", "digits", "csv", "quadratic_csv", "image_folder"])
def test_every_data_module_splits_into_folds(tmp_path, data):
    extra = {
        "csv": [f"data.path={Path('data/quadratic.csv').resolve()}", "data.target=y"],
        "image_folder": [f"data.root={_image_root(tmp_path / 'img')}", "data.num_classes=2", "data.num_workers=0"],
    }.get(data, [])
    cfg = compose("train", [f"data={data}", *extra])
    plain = build(cfg.data, "data")
    n = len(plain.split("train")) + len(plain.split("val"))
    folded = []
    for fold in range(3):
        module = build(cfg.data, "data")
        module.use_fold(fold, 3)
        folded.append({name: module.split(name) for name in ("train", "val", "test")})
        assert len(module.split("train")) + len(module.split("val")) == n
        assert len(module.split("test")) == len(plain.split("test"))
        if module.task == "classification":  # stratified: each class's val count within 1 of its share
            pool = torch.cat([split_labels(module.split("train")), split_labels(module.split("val"))])
            val = split_labels(module.split("val"))
            for c in pool.unique():
                assert abs(int((val == c).sum()) - int((pool == c).sum()) / 3) < 1
    sizes = sorted(len(f["val"]) for f in folded)
    assert sum(sizes) == n and sizes[-1] - sizes[0] <= 1


def test_cv_folds_without_a_fold_or_a_fold_without_folds_is_one_line(tmp_path):
    with pytest.raises(UserError, match=r"cv.folds=3 without cv.fold.*-m"):
        train_run(tmp_path, "cv=3fold", name="no_m")
    with pytest.raises(UserError, match=r"cv.fold=1: needs cv.folds"):
        train_run(tmp_path, "cv.fold=1", name="no_folds")
    with pytest.raises(UserError, match=r"cv.fold=3: expected an integer >= 0 and < cv.folds \(3\)"):
        train_run(tmp_path, "cv=3fold", "cv.fold=3", name="out")


def test_a_fold_run_resumes_exactly_and_refuses_another_fold(tmp_path):
    run = train_run(tmp_path, "cv=3fold", "cv.fold=0", "trainer.epochs=1", name="f0")
    again = train_run(tmp_path, "cv=3fold", "cv.fold=0", "trainer.epochs=2", "resume=auto", name="f0")
    assert again == run and len((run / "metrics.csv").read_text().splitlines()) == 3
    with pytest.raises(UserError, match=r"split.*since the checkpoint, so an exact resume is impossible"):
        train_run(tmp_path, "cv=3fold", "cv.fold=1", "trainer.epochs=3", f"resume={run / 'last.pt'}", name="f1")
    # evaluate.py: the fold's own val split (the one best.pt was picked on); predict.py as for any run
    best = min(float(row["val_loss"]) for row in _rows(run / "metrics.csv"))
    run_script("evaluate.py", f"ckpt={run / 'best.pt'}", "split=val", f"output={tmp_path / 'val.json'}")
    assert json.loads((tmp_path / "val.json").read_text())["val_loss"] == pytest.approx(best, rel=1e-5)
    (tmp_path / "x.csv").write_text("x\n0.5\n")
    run_script("predict.py", f"ckpt={run / 'best.pt'}", f"input={tmp_path / 'x.csv'}", f"output={tmp_path / 'p.csv'}")
    assert len((tmp_path / "p.csv").read_text().splitlines()) == 2


def test_a_crafted_cv_section_in_a_checkpoint_is_one_line():
    from engine.config import saved_sections

    good = compose("train", [])
    base = {k: dict(good[k]) for k in ("data", "model")}
    for cv, needle in (
        ("x", "expected a section"),
        ({"folds": 3, "fold": 5}, "cv.fold=5"),
        ({"folds": "a"}, "cv.folds"),
    ):
        with pytest.raises(UserError, match=needle):
            saved_sections({**base, "cv": cv}, "f.pt")


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_three_fold_cv_on_digits_gives_mean_and_std_over_the_folds(tmp_path):
    args = ("-m", "cv=3fold", "experiment=digits_cnn", "trainer.epochs=1", "data.batch_size=64")
    fast = ("trainer.model_summary=false", "checkpoint.export=false")
    result = run_script("train.py", *args, *fast, root=tmp_path, timeout=300)
    [sweep] = (tmp_path / "digits_cnn" / "multirun").iterdir()
    assert sweep.name == "cv=3fold,data.batch_size=64,experiment=digits_cnn,trainer.epochs=1"
    runs = sorted(sweep.glob("cv.fold=*"))
    assert [r.name for r in runs] == ["cv.fold=0", "cv.fold=1", "cv.fold=2"] and str(sweep) in result.stdout
    best = [min(float(row["val_loss"]) for row in _rows(run / "metrics.csv")) for run in runs]
    tests = [json.loads((run / "test_metrics.json").read_text()) for run in runs]
    [cv] = _rows(sweep / "summary_cv.csv")
    assert cv["folds_done"] == "3" and cv["folds"] == "3" and "cv.fold" not in cv["overrides"]
    assert float(cv["best_val_loss_mean"]) == pytest.approx(statistics.fmean(best))
    assert float(cv["best_val_loss_std"]) == pytest.approx(statistics.stdev(best))
    for metric in ("test_loss", "test_acc"):
        values = [t[metric] for t in tests]
        assert float(cv[f"{metric}_mean"]) == pytest.approx(statistics.fmean(values))
        assert float(cv[f"{metric}_std"]) == pytest.approx(statistics.stdev(values))
    assert len({t["test_loss"] for t in tests}) == 3  # three different models on the one test split
    md = (sweep / "summary.md").read_text()
    assert md.startswith("# Cross-validation") and "| 3 of 3 |" in md
    assert f"{statistics.fmean(best):.6g} ± {statistics.stdev(best):.6g}" in md
