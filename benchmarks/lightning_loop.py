"""The PyTorch Lightning side-by-side of `make bench` item 10: the same workload as `python
train.py experiment=...` as a LightningModule + Trainer (pip install -e '.[bench]').

    python benchmarks/lightning_loop.py digits|linear EPOCHS EVERY OUT_DIR

Trainer(max_epochs=EPOCHS) on the CPU with Lightning's defaults except: ModelCheckpoint every
EVERY epochs (all kept), CSVLogger (the template writes metrics.csv too), no progress bar, no
model summary. Validation every epoch, a test pass at the end. One line per epoch ("epoch N
train_loss ...", flushed, after that epoch's validation and checkpoint: the benchmark times
the epochs from these lines) and one for the test. Data, model, loss, optimizer, learning
rate, batch size and seed: benchmarks/workloads.py (the template's)."""

import sys
from pathlib import Path

import lightning as L  # noqa: N812 - Lightning's spelling
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader
from workloads import SEED, WORKLOADS

NAME, EPOCHS, EVERY, OUT = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])


class Module(L.LightningModule):
    def __init__(self, work) -> None:
        super().__init__()
        self.model, self.loss_fn, self.work = work.model, work.loss_fn, work

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = self.loss_fn(self.model(x), y)
        self.log("train_loss", loss, on_step=False, on_epoch=True, batch_size=len(x))
        return loss

    def evaluate(self, batch, split: str) -> None:
        x, y = batch
        output = self.model(x)
        self.log(f"{split}_loss", self.loss_fn(output, y), batch_size=len(x))
        if self.work.classification:
            self.log(f"{split}_acc", (output.argmax(1) == y).float().mean(), batch_size=len(x))

    def validation_step(self, batch, batch_idx):
        self.evaluate(batch, "val")

    def test_step(self, batch, batch_idx):
        self.evaluate(batch, "test")

    def configure_optimizers(self):
        return self.work.make_optimizer(self.model)


class EpochLine(L.Callback):
    def on_train_epoch_end(self, trainer, module):
        shown = "  ".join(f"{k} {float(v):.4g}" for k, v in trainer.callback_metrics.items())
        print(f"epoch {trainer.current_epoch + 1}  {shown}", flush=True)


L.seed_everything(SEED, verbose=False)
work = WORKLOADS[NAME]()
module = Module(work)
train_loader = DataLoader(work.train, batch_size=work.batch_size, shuffle=True)
val_loader = DataLoader(work.val, batch_size=work.batch_size)
test_loader = DataLoader(work.test, batch_size=work.batch_size)

trainer = L.Trainer(
    accelerator="cpu",
    devices=1,
    max_epochs=EPOCHS,
    default_root_dir=OUT,
    logger=CSVLogger(OUT),
    enable_progress_bar=False,
    enable_model_summary=False,
    callbacks=[
        EpochLine(),
        ModelCheckpoint(
            dirpath=OUT / "checkpoints",
            filename="epoch_{epoch:04d}",
            auto_insert_metric_name=False,
            every_n_epochs=EVERY,
            save_top_k=-1,
        ),
    ],
)
trainer.fit(module, train_loader, val_loader)
tested = trainer.test(module, test_loader, verbose=False)[0]
print("  ".join(f"{k} {v:.4g}" for k, v in tested.items()), flush=True)
