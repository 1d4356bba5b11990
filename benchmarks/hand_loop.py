"""The hand-written reference of `make bench` item 9: the training script a PyTorch tutorial
would have you write, for the same workload as `python train.py experiment=...`.

    python benchmarks/hand_loop.py digits|linear EPOCHS EVERY OUT_DIR

DataLoader(TensorDataset), shuffled; per epoch a training pass and a validation pass; every
EVERY epochs a general checkpoint with torch.save (epoch, model, optimizer, loss); a test pass
at the end. One line per epoch ("epoch N  train_loss ...", flushed: the benchmark times the
epochs from these lines) and one for the test. Data, model, loss, optimizer, learning rate,
batch size and seed: benchmarks/workloads.py (the template's)."""

import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from workloads import WORKLOADS

NAME, EPOCHS, EVERY, OUT = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])

work = WORKLOADS[NAME]()
model, loss_fn = work.model, work.loss_fn
optimizer = work.make_optimizer(model)
train_loader = DataLoader(work.train, batch_size=work.batch_size, shuffle=True)
val_loader = DataLoader(work.val, batch_size=work.batch_size)
test_loader = DataLoader(work.test, batch_size=work.batch_size)


def evaluate(loader: DataLoader, split: str) -> str:
    model.eval()
    total, correct = 0.0, 0
    with torch.no_grad():
        for x, y in loader:
            output = model(x)
            total += loss_fn(output, y).item() * len(x)
            if work.classification:
                correct += (output.argmax(1) == y).sum().item()
    n = len(loader.dataset)
    accuracy = f"  {split}_acc {correct / n:.4g}" if work.classification else ""
    return f"{split}_loss {total / n:.4g}{accuracy}"


OUT.mkdir(parents=True, exist_ok=True)
for epoch in range(1, EPOCHS + 1):
    model.train()
    total = 0.0
    for x, y in train_loader:
        loss = loss_fn(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        total += loss.item() * len(x)
    train_loss = total / len(train_loader.dataset)
    val = evaluate(val_loader, "val")
    if epoch % EVERY == 0 or epoch == EPOCHS:
        torch.save(
            {
                "epoch": epoch,
                "model_state_dict": model.state_dict(),
                "optimizer_state_dict": optimizer.state_dict(),
                "loss": train_loss,
            },
            OUT / f"epoch_{epoch:04d}.pt",
        )
    print(f"epoch {epoch}  train_loss {train_loss:.4g}  {val}", flush=True)

print(evaluate(test_loader, "test"), flush=True)
