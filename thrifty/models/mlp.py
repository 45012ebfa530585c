"""Plain multilayer perceptron with named layers fc1..fcN and head."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .registry import register_model

__all__ = ["MLP", "mlp"]


class MLP(nn.Module):
    """flatten -> [fc_i -> (bn_i) -> ReLU] * len(hidden) -> head.

    Layers are attributes ``fc1, fc2, ...`` (and ``bn1, ...`` if batchnorm) and ``head``, so filters
    like "fc*" address them by name.
    """

    def __init__(self, in_features: int = 64, hidden: Sequence[int] = (256, 256), num_classes: int = 10,
                 batchnorm: bool = False) -> None:
        super().__init__()
        if in_features < 1 or num_classes < 1 or any(h < 1 for h in hidden):
            raise ValueError(f"MLP sizes must be positive: in_features={in_features}, hidden={tuple(hidden)}, "
                             f"num_classes={num_classes}")
        self.in_features = in_features
        self.depth = len(hidden)
        self.batchnorm = batchnorm
        prev = in_features
        for i, h in enumerate(hidden, start=1):
            setattr(self, f"fc{i}", nn.Linear(prev, h, bias=not batchnorm))
            if batchnorm:
                setattr(self, f"bn{i}", nn.BatchNorm1d(h))
            prev = h
        self.head = nn.Linear(prev, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        if x.shape[1] != self.in_features:
            raise ValueError(f"MLP expects {self.in_features} input features, got {x.shape[1]}")
        for i in range(1, self.depth + 1):
            x = getattr(self, f"fc{i}")(x)
            if self.batchnorm:
                x = getattr(self, f"bn{i}")(x)
            x = F.relu(x)
        return self.head(x)


@register_model("mlp")
def mlp(in_features: int = 64, hidden: Sequence[int] = (256, 256), num_classes: int = 10,
        batchnorm: bool = False) -> MLP:
    """MLP factory.

    Example:
        >>> mlp(in_features=40)(torch.zeros(3, 40)).shape
        torch.Size([3, 10])
    """
    return MLP(in_features, tuple(hidden), num_classes, batchnorm)
