"""Batched augmentations in torch: every sample of a batch gets its own random draw.

Images (N, C, H, W): `augment` with an `AugmentConfig` (affine, random crop, flip, cutout). 1-D signals
(N, L) or (N, C, L), e.g. MNIST-1D: `augment_signal` with a `SignalAugmentConfig` (circular shift, amplitude
scale, linear shear, noise, cutout of a segment), mirroring the transformations MNIST-1D is generated with.
Randomness comes from torch's global RNG (the training loop reseeds it per step and rank). The image
defaults suit the bundled digits (no horizontal flip: a flipped 2 or 7 is not a digit).

Example:
    >>> x = torch.randn(8, 1, 32, 32)
    >>> augment(x, AugmentConfig(crop_padding=4, cutout=8)).shape
    torch.Size([8, 1, 32, 32])
    >>> augment_signal(torch.randn(8, 40), SignalAugmentConfig(shift=4, cutout=6)).shape
    torch.Size([8, 40])
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from thrifty.core import Config, register_config, register_pipeline

__all__ = ["AugmentConfig", "augment", "random_crop", "hflip", "random_affine", "cutout", "resize",
           "SignalAugmentConfig", "augment_signal"]


@register_config
@dataclass(frozen=True)
class AugmentConfig(Config):
    """Which augmentations `augment` applies, in this order: affine, crop, flip, cutout.

    ``rotate`` in degrees, ``translate`` as a fraction of the size, ``scale`` a (min, max) range,
    ``crop_padding`` pixels of replicate padding for a random crop, ``cutout`` the side of a zeroed square.

    Args:
        crop_padding: pixels of replicate padding for a random crop (0: no crop).
        flip: random horizontal flips.
        rotate: largest random rotation, in degrees.
        translate: largest random translation, as a fraction of the size.
        scale: (min, max) range of the random scale factor.
        cutout: side of a zeroed square at a random place (0: none).
    """

    crop_padding: int = 2
    flip: bool = False
    rotate: float = 10.0
    translate: float = 0.0
    scale: tuple[float, float] = (0.9, 1.1)
    cutout: int = 0

    def __post_init__(self) -> None:
        if self.crop_padding < 0 or self.cutout < 0 or self.rotate < 0 or not 0 <= self.translate < 1:
            raise ValueError(f"AugmentConfig: invalid values {self}")
        if len(self.scale) != 2 or not 0 < self.scale[0] <= self.scale[1]:
            raise ValueError(f"AugmentConfig.scale must be (min, max) with 0 < min <= max, got {self.scale}")


def _check(x: torch.Tensor) -> None:
    if x.dim() != 4:
        raise ValueError(f"augmentations expect an image batch (N, C, H, W), got shape {tuple(x.shape)}")


def random_crop(x: torch.Tensor, padding: int) -> torch.Tensor:
    """Pad by ``padding`` (replicating the border) and crop back at a random offset per sample."""
    _check(x)
    if padding == 0:
        return x
    n, _, h, w = x.shape
    xp = F.pad(x, (padding,) * 4, mode="replicate")
    dy = torch.randint(0, 2 * padding + 1, (n,))
    dx = torch.randint(0, 2 * padding + 1, (n,))
    rows = (dy[:, None] + torch.arange(h))[:, :, None]  # (n, h, 1)
    cols = (dx[:, None] + torch.arange(w))[:, None, :]  # (n, 1, w)
    return xp[torch.arange(n)[:, None, None], :, rows, cols].permute(0, 3, 1, 2).contiguous()


def hflip(x: torch.Tensor, p: float = 0.5) -> torch.Tensor:
    """Flip each sample left-right with probability ``p``."""
    _check(x)
    flip = torch.rand(x.shape[0]) < p
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def random_affine(x: torch.Tensor, degrees: float = 10.0, translate: float = 0.0,
                  scale: tuple[float, float] = (1.0, 1.0)) -> torch.Tensor:
    """Random rotation (+-degrees), translation (+-fraction) and zoom per sample (bilinear, border padding)."""
    _check(x)
    n = x.shape[0]
    ang = (torch.rand(n) * 2 - 1) * math.radians(degrees)
    s = scale[0] + torch.rand(n) * (scale[1] - scale[0])
    t = (torch.rand(n, 2) * 2 - 1) * translate * 2  # affine_grid coordinates span [-1, 1]
    cos, sin = torch.cos(ang) / s, torch.sin(ang) / s
    theta = torch.stack([torch.stack([cos, -sin, t[:, 0]], 1), torch.stack([sin, cos, t[:, 1]], 1)], 1)
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _window(n: int, length: int, size: int) -> torch.Tensor:
    """(n, length) bool masks of one ``size``-long window per row, centred anywhere (it may cross the ends)."""
    start = torch.randint(0, length, (n,)) - size // 2
    pos = torch.arange(length)[None, :] - start[:, None]
    return (pos >= 0) & (pos < size)


def cutout(x: torch.Tensor, size: int) -> torch.Tensor:
    """Zero one random ``size`` x ``size`` square per sample (centred anywhere, so it may cross the border)."""
    _check(x)
    if size == 0:
        return x
    n, _, h, w = x.shape
    m = _window(n, h, size)[:, :, None] & _window(n, w, size)[:, None, :]
    return x * ~m[:, None]


def augment(x: torch.Tensor, cfg: AugmentConfig = AugmentConfig()) -> torch.Tensor:
    """Apply the augmentations of ``cfg`` to an image batch; each sample draws its own randomness."""
    _check(x)
    if cfg.rotate or cfg.translate or cfg.scale != (1.0, 1.0):
        x = random_affine(x, cfg.rotate, cfg.translate, cfg.scale)
    x = random_crop(x, cfg.crop_padding)
    if cfg.flip:
        x = hflip(x)
    return cutout(x, cfg.cutout)


def resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """Resize an image batch to ``size`` x ``size`` (bilinear, antialiased when shrinking)."""
    _check(x)
    if tuple(x.shape[-2:]) == (size, size):
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


@register_config
@dataclass(frozen=True)
class SignalAugmentConfig(Config):
    """What `augment_signal` applies to 1-D signals, in this order: shift, scale, shear, noise, cutout.

    ``shift``: circular shift by up to +-shift samples (MNIST-1D's generator translates circularly);
    ``scale``: amplitude factor range; ``shear``: add a ramp ``c * linspace(-0.5, 0.5)`` with c uniform in
    +-shear; ``noise``: std of added Gaussian noise; ``cutout``: length of one zeroed segment.

    Args:
        shift: largest circular shift, in samples.
        scale: (min, max) range of the amplitude factor.
        shear: largest slope c of the added ramp c * linspace(-0.5, 0.5).
        noise: standard deviation of the added Gaussian noise.
        cutout: length of one zeroed segment (0: none).
    """

    shift: int = 4
    scale: tuple[float, float] = (0.9, 1.1)
    shear: float = 0.0
    noise: float = 0.0
    cutout: int = 0

    def __post_init__(self) -> None:
        if self.shift < 0 or self.shear < 0 or self.noise < 0 or self.cutout < 0:
            raise ValueError(f"SignalAugmentConfig: invalid values {self}")
        if len(self.scale) != 2 or not 0 < self.scale[0] <= self.scale[1]:
            raise ValueError(f"SignalAugmentConfig.scale must be (min, max) with 0 < min <= max, got {self.scale}")


register_pipeline(AugmentConfig, "transforms a batch of images, not a model",
                  "thrifty.train.augment(x, cfg) (or fit's regime=BatchAugment(augment_cfg=cfg))")
register_pipeline(SignalAugmentConfig, "transforms a batch of signals, not a model",
                  "thrifty.train.augment_signal(x, cfg) (or fit's regime=BatchAugment(augment_cfg=cfg))")


def augment_signal(x: torch.Tensor, cfg: SignalAugmentConfig = SignalAugmentConfig()) -> torch.Tensor:
    """Augment a batch of 1-D signals (N, L) or (N, C, L); each sample draws its own randomness."""
    if x.dim() not in (2, 3):
        raise ValueError(f"augment_signal expects signals (N, L) or (N, C, L), got shape {tuple(x.shape)}")
    flat = x.dim() == 2
    x = x[:, None] if flat else x
    n, _, length = x.shape
    if cfg.shift:
        k = torch.randint(-cfg.shift, cfg.shift + 1, (n,))
        idx = (torch.arange(length)[None, :] - k[:, None]) % length  # out[i] = x[i - k]: roll right by k
        x = torch.gather(x, 2, idx[:, None, :].expand_as(x))
    if cfg.scale != (1.0, 1.0):
        x = x * (cfg.scale[0] + torch.rand(n) * (cfg.scale[1] - cfg.scale[0])).to(x.dtype)[:, None, None]
    if cfg.shear:
        c = ((torch.rand(n) * 2 - 1) * cfg.shear).to(x.dtype)
        x = x + c[:, None, None] * torch.linspace(-0.5, 0.5, length, dtype=x.dtype)
    if cfg.noise:
        x = x + cfg.noise * torch.randn(x.shape, dtype=x.dtype)
    if cfg.cutout:
        x = x * ~_window(n, length, cfg.cutout)[:, None, :]
    return x[:, 0] if flat else x
