"""torchvision's VGG16, with state_dict keys identical to torchvision's (official weights load)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from engine.checkpoint import load_state_dict_file


def build_vgg16(
    num_classes: int = 1000, in_channels: int = 3, weights: str | None = None, dropout: float = 0.5
) -> nn.Module:
    from torchvision.models import vgg16

    model = vgg16(weights=None, num_classes=num_classes, dropout=dropout)
    model.avgpool = AdaptiveAvgPool2d(model.avgpool.output_size)  # no weights: keys unchanged
    if in_channels != 3:  # grayscale input: swap the first conv, keys stay the same
        first = model.features[0]
        model.features[0] = nn.Conv2d(in_channels, first.out_channels, 3, padding=1)
    if weights:
        load_state_dict_file(model, Path(weights))
    return model


class AdaptiveAvgPool2d(nn.AdaptiveAvgPool2d):
    """torchvision's pooling, trainable on CUDA with trainer.deterministic=true.

    CUDA's adaptive_avg_pool2d backward accumulates with atomics, so PyTorch raises in
    deterministic mode. Pooling is linear: there, compute it as two products with averaging
    matrices (same values up to rounding; matmul backward is deterministic)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda and torch.is_grad_enabled() and torch.are_deterministic_algorithms_enabled():
            return adaptive_avg_pool_matmul(x, self.output_size)
        return super().forward(x)


def _averaging_matrix(size_in: int, size_out: int, like: torch.Tensor) -> torch.Tensor:
    """(size_out, size_in): row i averages PyTorch's adaptive bin i, [floor(i*n/m),
    ceil((i+1)*n/m))."""
    matrix = torch.zeros(size_out, size_in, dtype=like.dtype, device=like.device)
    for i in range(size_out):
        start, end = (i * size_in) // size_out, -(-((i + 1) * size_in) // size_out)
        matrix[i, start:end] = 1.0 / (end - start)
    return matrix


def adaptive_avg_pool_matmul(x: torch.Tensor, output_size) -> torch.Tensor:
    """F.adaptive_avg_pool2d(x, output_size) for (N, C, H, W) input, by matrix products."""
    if isinstance(output_size, int):
        output_size = (output_size, output_size)
    height, width = x.shape[-2:]
    out_h = output_size[0] or height
    out_w = output_size[1] or width
    rows = _averaging_matrix(height, out_h, x)
    cols = _averaging_matrix(width, out_w, x)
    return rows @ x @ cols.T
