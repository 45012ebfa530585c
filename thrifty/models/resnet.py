"""CIFAR-style ResNet-20 (He et al. 2016, section 4.2)."""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from .registry import register_model

__all__ = ["BasicBlock", "CifarResNet", "resnet20"]


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN + shortcut, ReLU.

    Shortcut "A" (the paper's CIFAR choice) is parameter-free: subsample and zero-pad channels;
    "B" uses a 1x1 conv + BN projection when the shape changes.
    """

    def __init__(self, in_planes: int, planes: int, stride: int = 1, shortcut: Literal["A", "B"] = "A") -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut_kind = shortcut
        self.pad = 0
        self.stride = stride
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            if shortcut == "A":
                self.pad = planes - in_planes
            else:
                self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                                              nn.BatchNorm2d(planes))

    def _short(self, x: torch.Tensor) -> torch.Tensor:
        if self.shortcut_kind == "A" and (self.stride != 1 or self.pad):
            x = x[:, :, :: self.stride, :: self.stride]
            return F.pad(x, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
        return self.shortcut(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self._short(x))


class CifarResNet(nn.Module):
    """Stem conv3x3(16) + 3 stages (16, 32, 64) of ``n`` BasicBlocks + global average pool + ``head``.

    Global average pooling makes it accept any input size >= 8.
    """

    def __init__(self, depth: int = 20, in_chans: int = 1, num_classes: int = 10, width: int = 16,
                 shortcut: Literal["A", "B"] = "A") -> None:
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 (20, 32, 44, 56, ...), got {depth}")
        if shortcut not in ("A", "B"):
            raise ValueError(f"shortcut must be 'A' or 'B', got {shortcut!r}")
        n = (depth - 2) // 6
        widths = (width, 2 * width, 4 * width)
        self.conv1 = nn.Conv2d(in_chans, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        in_planes = width
        stages = []
        for i, planes in enumerate(widths):
            blocks = []
            for j in range(n):
                blocks.append(BasicBlock(in_planes, planes, 2 if (i > 0 and j == 0) else 1, shortcut))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.head = nn.Linear(in_planes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or min(x.shape[-2:]) < 8:
            raise ValueError(f"ResNet expects (N, C, H, W) with H, W >= 8, got {tuple(x.shape)}")
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return x.mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))


@register_model("resnet20")
def resnet20(in_chans: int = 1, num_classes: int = 10, width: int = 16, shortcut: Literal["A", "B"] = "A") -> CifarResNet:
    """CIFAR ResNet-20 (0.27 M parameters at width 16).

    Example:
        >>> m = resnet20(in_chans=1, num_classes=10)
        >>> m(torch.zeros(2, 1, 32, 32)).shape
        torch.Size([2, 10])
    """
    return CifarResNet(20, in_chans, num_classes, width, shortcut)
