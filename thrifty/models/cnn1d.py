"""Small 1-D CNN for signals such as MNIST-1D: conv1..convN (kernel k, 'same' padding) -> global average pool -> head."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .registry import register_model

__all__ = ["CNN1d", "cnn1d"]


class CNN1d(nn.Module):
    """[conv_i -> (bn_i) -> ReLU] * len(channels) -> mean over length -> head.

    Accepts (N, L) signals (treated as one channel) or (N, C, L). Layers are attributes ``conv1, conv2, ...``
    (``bn1, ...`` with batchnorm) and ``head``. The global average pool makes the model length-agnostic and
    insensitive to where a pattern sits in the signal, which is what shift augmentation teaches.
    """

    def __init__(self, in_chans: int = 1, channels: Sequence[int] = (32, 64, 64), num_classes: int = 10,
                 kernel_size: int = 5, batchnorm: bool = True) -> None:
        super().__init__()
        channels = tuple(channels)
        if in_chans < 1 or num_classes < 1 or not channels or any(c < 1 for c in channels):
            raise ValueError(f"CNN1d sizes must be positive: in_chans={in_chans}, channels={channels}, "
                             f"num_classes={num_classes}")
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"CNN1d kernel_size must be odd and positive ('same' padding), got {kernel_size}")
        self.in_chans = in_chans
        self.depth = len(channels)
        self.batchnorm = batchnorm
        prev = in_chans
        for i, c in enumerate(channels, start=1):
            setattr(self, f"conv{i}", nn.Conv1d(prev, c, kernel_size, padding=kernel_size // 2, bias=not batchnorm))
            if batchnorm:
                setattr(self, f"bn{i}", nn.BatchNorm1d(c))
            prev = c
        self.head = nn.Linear(prev, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:
            x = x.unsqueeze(1)
        if x.dim() != 3 or x.shape[1] != self.in_chans:
            raise ValueError(f"CNN1d expects (N, L) or (N, {self.in_chans}, L) input, got shape {tuple(x.shape)}")
        for i in range(1, self.depth + 1):
            x = getattr(self, f"conv{i}")(x)
            if self.batchnorm:
                x = getattr(self, f"bn{i}")(x)
            x = F.relu(x)
        return self.head(x.mean(dim=2))


@register_model("cnn1d")
def cnn1d(in_chans: int = 1, channels: Sequence[int] = (32, 64, 64), num_classes: int = 10, kernel_size: int = 5,
          batchnorm: bool = True) -> CNN1d:
    """1-D CNN factory (three conv layers by default).

    Example:
        >>> cnn1d(num_classes=10)(torch.zeros(3, 40)).shape
        torch.Size([3, 10])
    """
    return CNN1d(in_chans, tuple(channels), num_classes, kernel_size, batchnorm)
