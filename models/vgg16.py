"""torchvision's VGG16, with state_dict keys identical to torchvision's (official weights load)."""

from __future__ import annotations

from pathlib import Path

from torch import nn


def build_vgg16(num_classes: int = 1000, in_channels: int = 3, weights: str | None = None,
                dropout: float = 0.5) -> nn.Module:
    from torchvision.models import vgg16

    model = vgg16(weights=None, num_classes=num_classes, dropout=dropout)
    if in_channels != 3:  # grayscale input: swap the first conv, keys stay the same
        first = model.features[0]
        model.features[0] = nn.Conv2d(in_channels, first.out_channels, 3, padding=1)
    if weights:
        from engine.checkpoint import load_state_dict_file

        load_state_dict_file(model, Path(weights))
    return model
