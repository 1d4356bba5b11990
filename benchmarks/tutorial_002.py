"""Tutorial 002's own training script (the reference of `make bench` item 8), as the tutorial
writes it: a pandas CSV Dataset, DataLoader(batch_size=128, shuffle, drop_last), Linear(2, 1)
on [x², x], MSE + SGD(lr=1e-4), a general checkpoint every 1000 of 10000 epochs.

    python benchmarks/tutorial_002.py [EPOCHS [EVERY [CSV [OUT_DIR]]]]

Only the epoch count, the checkpoint interval and the paths are parameters; the loop is the
tutorial's (it prints nothing)."""

import sys
from pathlib import Path

import pandas as pd
import torch
from torch import nn, optim
from torch.utils.data import DataLoader, Dataset

EPOCHS = int(sys.argv[1]) if len(sys.argv) > 1 else 10000
EVERY = int(sys.argv[2]) if len(sys.argv) > 2 else 1000
CSV = sys.argv[3] if len(sys.argv) > 3 else "data/quadratic.csv"
OUT = Path(sys.argv[4] if len(sys.argv) > 4 else ".")


class CustomDataset(Dataset):
    def __init__(self, file_path):
        df = pd.read_csv(file_path)
        self.x = df.iloc[:, 0].values
        self.y = df.iloc[:, 1].values
        self.length = len(df)

    def __getitem__(self, index):
        x = torch.FloatTensor([self.x[index] ** 2, self.x[index]])
        y = torch.FloatTensor([self.y[index]])
        return x, y

    def __len__(self):
        return self.length


class CustomModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(2, 1)

    def forward(self, x):
        return self.layer(x)


train_dataset = CustomDataset(CSV)
train_dataloader = DataLoader(train_dataset, batch_size=128, shuffle=True, drop_last=True)

device = "cuda" if torch.cuda.is_available() else "cpu"
model = CustomModel().to(device)
criterion = nn.MSELoss().to(device)
optimizer = optim.SGD(model.parameters(), lr=0.0001)

checkpoint = 1
for epoch in range(EPOCHS):
    cost = 0.0
    for x, y in train_dataloader:
        x = x.to(device)
        y = y.to(device)
        output = model(x)
        loss = criterion(output, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        cost += loss
    cost = cost / len(train_dataloader)
    if (epoch + 1) % EVERY == 0:
        torch.save(
            {
                "model": "CustomModel",
                "epoch": epoch,
                "model_state_dict": model.state_dict(),
                "optimizer_state_dict": optimizer.state_dict(),
                "cost": cost,
                "description": f"CustomModel checkpoint-{checkpoint}",
            },
            OUT / f"checkpoint-{checkpoint}.pt",
        )
        checkpoint += 1
