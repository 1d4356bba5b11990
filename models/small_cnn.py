"""The save/load tutorial's CNN, sized from config so it fits 8x8, 28x28 and 32x32 images."""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812 - the tutorial's spelling
from torch import nn


class SmallCNN(nn.Module):
    def __init__(
        self, in_channels: int = 3, image_size: int = 32, num_classes: int = 10, padding: int | None = None
    ) -> None:
        super().__init__()
        if padding is None:
            padding = 0 if image_size >= 16 else 2  # 8x8 digits would shrink to nothing
        self.conv1 = nn.Conv2d(in_channels, 6, 5, padding=padding)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(6, 16, 5, padding=padding)
        side = image_size
        for _ in range(2):  # conv (kernel 5) then 2x2 pool, twice
            side = (side + 2 * padding - 4) // 2
        if side < 1:
            raise ValueError(f"image_size={image_size} is too small for SmallCNN with padding={padding}")
        self.fc1 = nn.Linear(16 * side * side, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)
