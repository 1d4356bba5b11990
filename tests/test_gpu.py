"""GPU switches on a real CUDA device; skipped where there is none (never emulated on CPU).

VGG16 (torchvision) trains on a generated 32x32 image folder with each trainer switch; a
CUDA checkpoint evaluates on the CPU; a deterministic CUDA run killed mid-epoch resumes bit
for bit (VGG16's dropout makes that depend on the restored CUDA RNG state); with two or more
GPUs, torchrun uses nccl.
"""

from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, run_script

from tests.faults import fault_env

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize(
    ("shape", "size"),
    [((2, 3, 1, 1), (7, 7)), ((2, 3, 8, 8), (7, 7)), ((1, 2, 13, 11), (7, 5)), ((1, 2, 5, 9), (None, 4))],
)
def test_vgg16_deterministic_pooling_equals_adaptive_avg_pool(shape, size):
    """The matmul pooling VGG16 uses on CUDA in deterministic mode (the math, on the CPU)."""
    import torch.nn.functional as F  # noqa: N812

    from models.vgg16 import adaptive_avg_pool_matmul

    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    want, got = F.adaptive_avg_pool2d(x, size), adaptive_avg_pool_matmul(x, size)
    torch.testing.assert_close(got, want)
    grad = torch.randn_like(want)
    torch.testing.assert_close(torch.autograd.grad(got, x, grad)[0], torch.autograd.grad(want, x, grad)[0])


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """Two classes of 24 noisy 32x32 PNGs, told apart by brightness."""
    from PIL import Image

    root = tmp_path_factory.mktemp("images")
    gen = torch.Generator().manual_seed(0)
    for label, base in (("dark", 60), ("light", 190)):
        (root / label).mkdir()
        for i in range(24):
            pixels = (base + 40 * torch.randn(32, 32, 3, generator=gen)).clamp(0, 255)
            Image.fromarray(pixels.to(torch.uint8).numpy()).save(root / label / f"{i}.png")
    return root


def vgg(images: Path, *overrides: str) -> list[str]:
    return [
        "model=vgg16",
        "loss=cross_entropy",
        "data=image_folder",
        f"data.root={images}",
        "data.num_classes=2",
        "data.batch_size=8",
        "data.num_workers=0",
        "data.val_fraction=0.25",
        "data.test_fraction=0.0",
        "optimizer.lr=0.01",
        "optimizer.momentum=0.9",
        "trainer.device=cuda",
        "trainer.epochs=2",
        "checkpoint.every_n_epochs=1",
        *overrides,
    ]


def last_row(run: Path) -> dict:
    with open(run / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))[-1]


SWITCHES = {
    "fp32": ["trainer.precision=32"],
    "bf16": ["trainer.precision=bf16-mixed"],
    "fp16": ["trainer.precision=16-mixed"],
    "channels_last": ["trainer.channels_last=true", "trainer.precision=bf16-mixed"],
    "compile": ["trainer.compile=true", "trainer.epochs=1"],
    "deterministic": ["trainer.deterministic=true"],
}


@pytest.mark.slow
@cuda
@pytest.mark.parametrize("switch", list(SWITCHES))
def test_vgg16_trains_on_cuda_with_each_switch(images, tmp_path, switch):
    overrides = SWITCHES[switch]
    if any("bf16" in o for o in overrides) and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bfloat16")
    run_script("train.py", *vgg(images, *overrides, f"run_name={switch}"), root=tmp_path)
    row = last_row(tmp_path / switch)
    assert math.isfinite(float(row["train_loss"])) and math.isfinite(float(row["val_loss"]))
    state = torch.load(tmp_path / switch / "last.pt", map_location="cpu", weights_only=True)
    assert "cuda" in state["rng_state"]  # the CUDA generators travel with the checkpoint
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in state["model_state_dict"])
    if switch == "fp16":  # the GradScaler's state is saved for exact resume
        assert state["scaler_state_dict"]["scale"] > 0
    else:
        assert state["scaler_state_dict"] is None


@pytest.mark.slow
@cuda
def test_cuda_checkpoint_evaluates_on_cpu(images, tmp_path):
    run_script("train.py", *vgg(images, "trainer.epochs=1", "run_name=gpu"), root=tmp_path)
    out = tmp_path / "eval.json"
    run_script("evaluate.py", f"ckpt={tmp_path / 'gpu' / 'last.pt'}", "device=cpu", "split=val", f"output={out}")
    metrics = json.loads(out.read_text())
    assert metrics["val_loss"] == pytest.approx(
        float(last_row(tmp_path / "gpu")["val_loss"]), rel=1e-3
    )  # CPU vs cuDNN kernels: rounding


@pytest.mark.slow
@cuda
def test_deterministic_cuda_run_resumes_exactly(images, tmp_path):
    args = vgg(images, "trainer.deterministic=true", "checkpoint.every_n_steps=3")
    run_script("train.py", *args, "run_name=ref", root=tmp_path)
    killed = run_script("train.py", *args, "run_name=res", root=tmp_path, check=False, env=fault_env("kill_at_step=5"))
    assert killed.returncode != 0 and (tmp_path / "res" / "step_00000003.pt").is_file()
    run_script("train.py", *args, "run_name=res", "resume=auto", root=tmp_path)
    ref, res = (
        torch.load(tmp_path / name / "last.pt", map_location="cpu", weights_only=True) for name in ("ref", "res")
    )
    for key, tensor in ref["model_state_dict"].items():
        assert torch.equal(tensor, res["model_state_dict"][key]), key
    assert last_row(tmp_path / "ref") == last_row(tmp_path / "res")


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_torchrun_uses_nccl_on_two_gpus(tmp_path):
    import subprocess

    args = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(REPO / "train.py"),
        "experiment=digits_cnn",
        "trainer.epochs=2",
        "trainer.device=cuda",
        f"checkpoint.root={tmp_path}",
        "run_name=nccl",
    ]
    result = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "distributed: 2 processes (nccl)" in result.stdout
    state = torch.load(tmp_path / "nccl" / "last.pt", map_location="cpu", weights_only=True)
    assert state["world_size"] == 2 and len(state["rank_states"]) == 2
    run_script("evaluate.py", f"ckpt={tmp_path / 'nccl' / 'last.pt'}", "device=cpu", f"output={tmp_path / 'eval.json'}")
