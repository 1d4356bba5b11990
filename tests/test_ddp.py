"""DistributedDataParallel on CPU (gloo, 2 processes), launched the way users launch it:
`python -m torch.distributed.run --standalone --nproc_per_node=2 train.py ...` (= torchrun).

The end-to-end runs share one module-scoped set of run directories, so the whole file costs
five torchrun launches; the single-process runs happen in the test process. Helper-level
checks run in two processes forked from the test process and joined by gloo.

Tolerance of DDP vs one process with the same global batch: the gradients are the same sums
taken in another order (each rank's batch mean, then the all-reduce average, instead of one
mean over the global batch), so float32 results differ by rounding only: torch.allclose with
rtol=1e-5, atol=1e-6 (observed difference on this config: 0 to ~1e-7).
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import REPO, compose

from tests.faults import fault_env

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (torch.distributed.is_available() and torch.distributed.is_gloo_available()) or sys.platform == "win32",
        reason="needs torch.distributed with gloo",
    ),
]

RTOL, ATOL = 1e-5, 1e-6
# 57 points: 36 train (5 steps of 2 x 4 per epoch), 9 val (uneven 5/4 shards), 12 test.
BASE = [
    "data=linear",
    "loss=mse",
    "data.end=1.14",
    "trainer.epochs=4",
    "trainer.global_batch_size=8",
    "optimizer.momentum=0.9",
    "checkpoint.every_n_steps=3",
    "checkpoint.every_n_epochs=1",
    "checkpoint.keep_last=10",
]
KILL_AT = 8  # mid epoch 2; the newest checkpoint then is step_00000006.pt (epoch 2, batch 1)


def torchrun(*overrides: str, root: Path, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    args = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(REPO / "train.py"),
        *overrides,
        f"checkpoint.root={root}",
    ]
    full_env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1", **(env or {})}
    for key in ("HYDRA_FULL_ERROR", "RANK", "WORLD_SIZE", "LOCAL_RANK", "TEST_FAULTS"):
        if key not in (env or {}):
            full_env.pop(key, None)
    # The timeout is the no-hang check: a rank waiting for a dead peer would run into it.
    result = subprocess.run(args, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=240)
    if check and result.returncode != 0:
        raise AssertionError(
            f"torchrun {' '.join(overrides)} exited {result.returncode}\n"
            f"--- stdout\n{result.stdout[-3000:]}\n--- stderr\n"
            f"{result.stderr[-3000:]}"
        )
    return result


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("ddp")
    ref = torchrun(*BASE, "run_name=ref", "logger=tensorboard", root=root)  # + a tracker
    killed = torchrun(*BASE, "run_name=resumed", root=root, check=False, env=fault_env(f"kill_at_step={KILL_AT}"))
    after_kill = sorted(p.name for p in (root / "resumed").glob("*.pt"))
    resumed = torchrun(*BASE, "run_name=resumed", "resume=auto", root=root)
    import train  # the single-process run, in this process: no second torch import

    train.train(compose("train", [*BASE, "run_name=single", f"checkpoint.root={root}"]))
    return SimpleNamespace(root=root, ref=ref, killed=killed, after_kill=after_kill, resumed=resumed)


def test_ddp_run_trains_and_checkpoints_on_rank_0(runs):
    out = runs.ref.stdout
    assert "distributed: 2 processes (gloo), data.batch_size=4 per process, global batch 8" in out
    assert out.count("epoch 1  step 5 ") == 1  # one progress log (rank 0), not one per rank
    assert out.count("model LinearRegressionModel: 2 parameters") == 1  # summary: rank 0 only
    run = runs.root / "ref"
    assert len(rows(run / "metrics.csv")) == 4
    assert (run / "loss_curve.png").is_file()
    assert len(list((run / "tensorboard").glob("events.out.tfevents.*"))) == 1  # rank 0 only
    assert {"epoch_0004.pt", "last.pt", "best.pt", "step_00000015.pt"} <= {p.name for p in run.glob("*.pt")}
    assert not list(run.glob(".*.tmp"))  # one writer: no temporaries left by another rank
    state = load(run / "last.pt")
    assert sorted(state["model_state_dict"]) == ["bias", "weights"]  # no `module.` prefix
    assert state["epoch"] == 4 and state["global_step"] == 20 and state["world_size"] == 2
    assert state["config"]["data"]["batch_size"] == 4  # per process, from the global 8
    shares = state["rank_states"]
    assert len(shares) == 2  # every rank's RNG and step losses, gathered on rank 0
    assert not torch.equal(shares[0]["rng_state"]["torch"], shares[1]["rng_state"]["torch"])


def test_killed_ddp_run_resumes_bitwise_equal_to_uninterrupted(runs):
    assert runs.killed.returncode != 0  # SIGKILL on both ranks; torchrun reports the failure
    assert "step_00000006.pt" in runs.after_kill and "epoch_0002.pt" not in runs.after_kill
    assert "(resumed at epoch 1, step 6)" in runs.resumed.stdout
    ref, res = load(runs.root / "ref" / "last.pt"), load(runs.root / "resumed" / "last.pt")
    for key in ("model_state_dict", "optimizer_state_dict"):
        for name, tensor in ref[key].get("state", ref[key]).items():
            other = res[key].get("state", res[key])[name]
            if isinstance(tensor, dict):
                assert all(torch.equal(tensor[k], other[k]) for k in tensor), (key, name)
            else:
                assert torch.equal(tensor, other), (key, name)
    for a, b in zip(ref["rank_states"], res["rank_states"], strict=True):
        assert torch.equal(a["rng_state"]["torch"], b["rng_state"]["torch"])
    # Train loss includes each rank's restored step losses of the interrupted epoch.
    assert rows(runs.root / "ref" / "metrics.csv") == rows(runs.root / "resumed" / "metrics.csv")


def test_ddp_matches_one_process_with_the_same_global_batch(runs):
    ddp, single = load(runs.root / "ref" / "last.pt"), load(runs.root / "single" / "last.pt")
    assert single["config"]["data"]["batch_size"] == 8 and single["world_size"] == 1
    for name, tensor in single["model_state_dict"].items():
        torch.testing.assert_close(ddp["model_state_dict"][name], tensor, rtol=RTOL, atol=ATOL)
    for a, b in zip(rows(runs.root / "ref" / "metrics.csv"), rows(runs.root / "single" / "metrics.csv"), strict=True):
        # val: 6/5 shards summed over ranks = the whole split once
        for key in ("train_loss", "val_loss"):
            assert float(a[key]) == pytest.approx(float(b[key]), rel=RTOL, abs=ATOL), key


def test_ddp_checkpoint_evaluates_and_predicts_in_one_process(runs, tmp_path):
    ckpt = runs.root / "ref" / "last.pt"
    out = tmp_path / "eval.json"
    import evaluate
    import predict

    evaluate.evaluate(compose("evaluate", [f"ckpt={ckpt}", "split=val", f"output={out}"]))
    metrics = json.loads(out.read_text())
    logged = float(rows(runs.root / "ref" / "metrics.csv")[-1]["val_loss"])
    assert metrics["samples"] == 9
    assert metrics["val_loss"] == pytest.approx(logged, rel=1e-6)
    points = tmp_path / "points.csv"
    points.write_text("x\n0.0\n0.5\n")
    preds = tmp_path / "preds.csv"
    predict.predict(compose("predict", [f"ckpt={ckpt}", f"input={points}", f"output={preds}"]))
    state = load(ckpt)["model_state_dict"]
    got = [float(r["prediction"]) for r in rows(preds)]
    want = [float(state["weights"][0] * x + state["bias"][0]) for x in (0.0, 0.5)]
    assert got == pytest.approx(want, rel=1e-5)


def test_single_process_checkpoint_resumes_under_ddp(runs):
    single = runs.root / "single"
    result = torchrun(*BASE, "run_name=grown", f"resume={single / 'epoch_0002.pt'}", root=runs.root)
    assert "(resumed at epoch 2, step 10)" in result.stdout
    assert "written by 1 process(es), this run has 2" in result.stderr
    grown = rows(runs.root / "grown" / "metrics.csv")
    assert [r["epoch"] for r in grown] == ["1", "2", "3", "4"]
    assert grown[:2] == rows(single / "metrics.csv")[:2]
    state = load(runs.root / "grown" / "last.pt")
    assert state["world_size"] == 2 and state["global_step"] == 20
    # Same global batch and an epoch boundary: the continuation matches one process too.
    for name, tensor in load(single / "last.pt")["model_state_dict"].items():
        torch.testing.assert_close(state["model_state_dict"][name], tensor, rtol=RTOL, atol=ATOL)


def test_rank_0_error_stops_every_rank_with_one_line(runs):
    # The run exists and resume is not set: rank 0 refuses; rank 1 must exit too, not hang.
    result = torchrun(*BASE, "run_name=ref", root=runs.root, check=False)
    assert result.returncode != 0
    assert result.stderr.count("already has checkpoints") == 1, result.stderr[-2000:]
    assert "error: " in result.stderr
    assert len(rows(runs.root / "ref" / "metrics.csv")) == 4  # nothing touched


# ------------------------------------------------------- helpers, in two forked processes


def _helper_checks(rank: int, store: str, tmp: str) -> None:
    import warnings

    import torch.distributed as dist
    from omegaconf import OmegaConf

    from engine import distributed as ddp
    from engine.batches import Batches, TensorSplit
    from engine.checkpoint import Progress, build_checkpoint, restore_checkpoint
    from engine.errors import UserError
    from engine.metrics import evaluate

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        assert ddp.is_distributed() and ddp.rank() == rank and ddp.world_size() == 2

        # on_main: only rank 0 runs it; everyone gets the result, or the error.
        calls = []
        assert ddp.on_main(lambda: calls.append(rank) or 42) == 42
        assert calls == ([0] if rank == 0 else [])

        def refuse():
            raise UserError("checkpoints/x already has checkpoints")

        with pytest.raises(UserError, match="already has checkpoints") as caught:
            ddp.on_main(refuse)
        assert isinstance(caught.value, ddp.FollowerError) == (rank == 1)

        assert ddp.any_rank(rank == 1) and not ddp.any_rank(False)
        assert ddp.mean_over_ranks(float(rank)) == 0.5

        # A stop signal seen by rank 1 only: acted on together, at the agreed steps only.
        stop = SimpleNamespace(reason="SIGTERM" if rank == 1 else None, out_of_time=lambda reserve: False)
        assert not ddp.should_stop(stop, 0.0, step=3, every=2)
        assert ddp.should_stop(stop, 0.0, step=4, every=2)
        assert stop.reason == ("SIGTERM" if rank == 1 else "stop requested on another rank")

        # Each rank's RNG and step losses go into rank 0's checkpoint and come back to it.
        cfg = OmegaConf.create({"checkpoint": {"monitor": "val_loss"}, "seed": 0})
        model = torch.nn.Linear(2, 1)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        torch.manual_seed(100 + rank)
        progress = Progress(epoch=1, step_in_epoch=1, global_step=6, losses=[torch.tensor(rank + 1.0)])
        parts = {"model": model, "optimizer": optimizer, "scheduler": None, "scaler": scaler}
        state = build_checkpoint(parts, progress, cfg)
        expected = torch.rand(3)
        path = Path(tmp) / "ckpt.pt"
        ddp.on_main(lambda: torch.save(state, path))
        loaded = torch.load(path, weights_only=True)
        torch.manual_seed(999)
        restored = restore_checkpoint(loaded, parts, cfg, None)
        assert torch.equal(torch.rand(3), expected)
        assert [float(x) for x in restored.losses] == [rank + 1.0]
        assert restored.step_in_epoch == 1

        # A one-process checkpoint mid-epoch: rank 0 takes its RNG, the epoch restarts.
        one = {**loaded, "world_size": 1, "step_in_epoch": 1}
        one.pop("rank_states")
        torch.manual_seed(7)
        mine = torch.get_rng_state()
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            restored = restore_checkpoint(one, parts, cfg, None)
        said = [str(w.message) for w in seen if "process(es)" in str(w.message)]
        assert (len(said) == 1 and "restarts from its first batch" in said[0]) if rank == 0 else not said
        assert restored.step_in_epoch == 0 and restored.losses == []
        assert torch.equal(torch.get_rng_state(), mine) == (rank == 1)

        # Validation over uneven shards (6 + 5) = one process over all 11 samples.
        gen = torch.Generator().manual_seed(0)
        split = TensorSplit(torch.randn(11, 2, generator=gen), torch.randint(0, 2, (11,), generator=gen))
        net = torch.nn.Linear(2, 2)
        for p in net.parameters():
            dist.broadcast(p.data, 0)
        loss = torch.nn.CrossEntropyLoss()
        whole = evaluate(net, Batches(split, 4, torch.device("cpu")), loss, True)
        part = ddp.shard(split)
        assert len(part) == (6 if rank == 0 else 5)
        sharded = evaluate(net, Batches(part, 4, torch.device("cpu")), loss, True, all_ranks=True)
        assert sharded["loss"] == pytest.approx(whole["loss"], rel=1e-6)
        assert sharded["acc"] == pytest.approx(whole["acc"], rel=1e-12)
    finally:
        dist.destroy_process_group()


def test_helpers_in_two_gloo_processes(tmp_path):
    import torch.multiprocessing as mp

    # fork: the children reuse this process's imports (a spawn would import torch twice);
    # the first optimizer imports torch._dynamo (seconds), so make it here, once.
    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    mp.start_processes(_helper_checks, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2, start_method="fork")


@pytest.mark.parametrize(("total", "world", "expected"), [(8, 2, 4), (8, 1, 8), (None, 2, 16)])
def test_global_batch_size_sets_the_per_process_batch(total, world, expected):
    from omegaconf import OmegaConf

    from engine.distributed import _resolve_batch_size

    cfg = OmegaConf.create({"trainer": {"global_batch_size": total}, "data": {"batch_size": 16}})
    _resolve_batch_size(cfg, world)
    assert cfg.data.batch_size == expected


@pytest.mark.parametrize(
    ("total", "message"), [(8, "not divisible by the 3 processes"), (0, "expected an integer >= 1")]
)
def test_bad_global_batch_size_is_one_line_error(total, message):
    from engine.cli import compose_checked, validate_train
    from engine.distributed import _resolve_batch_size
    from engine.errors import UserError

    cfg = compose_checked("train", [f"trainer.global_batch_size={total}"])
    with pytest.raises(UserError, match=message):
        validate_train(cfg)  # the value: an integer >= 1 (config.check_limits)
        _resolve_batch_size(cfg, 3)  # and a multiple of the process count
