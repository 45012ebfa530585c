"""Training regimes for the one loop: batch augmentation and mixed-size training (Mix & Match).

- ``BatchAugment(m)``: each batch of B samples becomes m differently augmented copies (m*B samples), same
  learning rate and number of steps (Hoffer et al., "Augment your batch"); images or 1-D signals. Under DDP
  each process
  augments its own shard, so the global batch is m * B * world.
- ``MixedSize(schedule, mode)``: every step trains at one image size drawn from the schedule; work per step
  stays about constant through a larger batch for small images (``"B+"``) or more augmented duplicates of
  the same batch (``"D+"``) (Hoffer et al., "Mix & Match"). Evaluate at a chosen size after
  `thrifty.train.bn.recalibrate_bn`.

The size drawn at a step is a pure function of (seed, step): resume and DDP processes agree on it.

Example:
    >>> from thrifty.train import fit, TrainConfig
    >>> reg = MixedSize(mode="D+")
    >>> [reg.size_at(t) for t in range(6)]  # a pure function of (seed, step)
    [32, 16, 24, 16, 32, 24]
    >>> # fit(model, splits.train, splits.test, TrainConfig(epochs=8), regime=BatchAugment(m=4))
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal, Sequence, Union

import torch

from thrifty.train.augment import AugmentConfig, SignalAugmentConfig, augment, augment_signal, resize
from thrifty.train.regime import Regime

__all__ = ["BatchAugment", "MixedSize", "SizeSchedule", "default_schedule"]


def _check_augment(x: torch.Tensor, who: str) -> None:
    if x.dim() != 4:
        raise ValueError(f"{who} needs image batches (N, C, H, W); got inputs of shape {tuple(x.shape)}")


AnyAugmentConfig = Union[AugmentConfig, SignalAugmentConfig]


class BatchAugment(Regime):
    """m differently augmented copies of every sample per batch; ``m=1`` is plain augmentation.

    Works on images (N, C, H, W) with an `AugmentConfig` and on 1-D signals (N, L) / (N, C, L) with a
    `SignalAugmentConfig`; ``augment_cfg=None`` picks the default config for whatever the data is.
    The learning rate and the number of steps are the loop's, unchanged: only the batch grows to m*B.

    ``grad_norm_adapt=True`` multiplies the gradient by sqrt(m) before the optimizer step: averaging over m
    correlated copies shrinks the gradient's noise part, and this keeps the step size of the m=1 run
    (square-root scaling for an m-times larger batch). Off by default (the paper's main setting).
    ``adapt_as=J`` scales by sqrt(J) instead of sqrt(m): ``BatchAugment(1, grad_norm_adapt=True, adapt_as=4)`` is
    the control run with m=4's larger step but without its copies.

    Example:
        >>> x, y = torch.randn(3, 40), torch.tensor([0, 1, 2])
        >>> xa, ya = BatchAugment(m=2).batch(x, y, step=0)
        >>> xa.shape, ya.tolist()
        (torch.Size([6, 40]), [0, 1, 2, 0, 1, 2])
    """

    def __init__(self, m: int = 4, augment_cfg: AnyAugmentConfig | None = None, grad_norm_adapt: bool = False,
                 adapt_as: int | None = None):
        if isinstance(m, bool) or not isinstance(m, int) or m < 1:
            raise ValueError(f"BatchAugment: m must be an integer >= 1, got {m!r}")
        if adapt_as is not None and (isinstance(adapt_as, bool) or not isinstance(adapt_as, int) or adapt_as < 1):
            raise ValueError(f"BatchAugment: adapt_as must be an integer >= 1 or None, got {adapt_as!r}")
        if augment_cfg is not None and not isinstance(augment_cfg, (AugmentConfig, SignalAugmentConfig)):
            raise TypeError(f"BatchAugment: augment_cfg must be an AugmentConfig or SignalAugmentConfig, "
                            f"got {type(augment_cfg).__name__}")
        self.m, self.augment_cfg, self.grad_norm_adapt, self.adapt_as = m, augment_cfg, grad_norm_adapt, adapt_as

    def _cfg_for(self, x: torch.Tensor) -> AnyAugmentConfig:
        cfg = self.augment_cfg
        if cfg is None:
            cfg = AugmentConfig() if x.dim() == 4 else SignalAugmentConfig()
        if isinstance(cfg, AugmentConfig):
            _check_augment(x, "BatchAugment with an AugmentConfig")
        elif x.dim() not in (2, 3):
            raise ValueError(f"BatchAugment with a SignalAugmentConfig needs signal batches (N, L) or (N, C, L); "
                             f"got inputs of shape {tuple(x.shape)}")
        return cfg

    def setup(self, model: Any, train_ds: Any, cfg: Any) -> None:
        self._cfg_for(train_ds[0][0].unsqueeze(0))

    def batch(self, x: torch.Tensor, y: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self._cfg_for(x)
        # copy k of sample i sits at k * B + i: labels repeat batch-wise, matching x.repeat
        xs = x.repeat(self.m, *([1] * (x.dim() - 1)))
        xs = augment(xs, cfg) if isinstance(cfg, AugmentConfig) else augment_signal(xs, cfg)
        return xs, y.repeat(self.m)

    def before_optimizer_step(self, model: torch.nn.Module, step: int) -> None:
        k = self.m if self.adapt_as is None else self.adapt_as
        if self.grad_norm_adapt and k > 1:
            for p in model.parameters():
                if p.grad is not None:
                    p.grad.mul_(math.sqrt(k))

    def describe(self) -> dict[str, Any]:
        aug = None if self.augment_cfg is None else {"kind": type(self.augment_cfg).__name__,
                                                      **dataclasses.asdict(self.augment_cfg)}
        return {"regime": "BatchAugment", "m": self.m, "grad_norm_adapt": self.grad_norm_adapt,
                "adapt_as": self.adapt_as, "augment": aug}


@dataclass(frozen=True)
class SizeSchedule:
    """Image sizes and their probabilities, relative to the size the batch size was tuned for."""

    sizes: tuple[int, ...]
    probs: tuple[float, ...]
    base_size: int = 32

    def __post_init__(self) -> None:
        if len(self.sizes) == 0 or len(self.sizes) != len(self.probs):
            raise ValueError(f"SizeSchedule: need as many probabilities as sizes, got {self.sizes} / {self.probs}")
        if any(not isinstance(s, int) or s < 1 for s in self.sizes) or self.base_size < 1:
            raise ValueError(f"SizeSchedule: sizes must be positive integers, got {self.sizes}")
        if any(p < 0 for p in self.probs) or abs(sum(self.probs) - 1.0) > 1e-6:
            raise ValueError(f"SizeSchedule: probabilities must be >= 0 and sum to 1, got {self.probs} "
                             f"(sum {sum(self.probs):.6g})")


def default_schedule(base_size: int = 32) -> SizeSchedule:
    """The CIFAR mix of Mix & Match scaled to ``base_size``: sizes 0.5x, 0.75x, 1x, 1.5x with p .2/.3/.3/.2."""
    sizes = tuple(int(round(base_size * f)) for f in (0.5, 0.75, 1.0, 1.5))
    return SizeSchedule(sizes, (0.2, 0.3, 0.3, 0.2), base_size)


class MixedSize(Regime):
    """One image size per step; keeps pixels per step about constant by batch size (B+) or duplicates (D+).

    For size s and r = (base_size / s)^2 (the pixel ratio):
      B+: batch = round(B * r), 1 copy;
      D+: batch = B for s <= base_size (round(B * r) for larger s), copies = max(1, round(r)), each
          copy augmented differently.
    """

    def __init__(self, schedule: SizeSchedule | None = None, mode: Literal["B+", "D+"] = "D+", *,
                 sizes: Sequence[int] | None = None, probs: Sequence[float] | None = None, base_size: int = 32,
                 augment_cfg: AugmentConfig | None = AugmentConfig(), seed: int = 0):
        if mode not in ("B+", "D+"):
            raise ValueError(f"MixedSize: mode must be 'B+' or 'D+', got {mode!r}")
        if schedule is None:
            schedule = (default_schedule(base_size) if sizes is None and probs is None else
                        SizeSchedule(tuple(sizes or ()), tuple(probs or [1 / len(sizes or [1])] * len(sizes or [])),
                                     base_size))
        self.schedule, self.mode, self.augment_cfg, self.seed = schedule, mode, augment_cfg, seed
        self._probs = torch.tensor(schedule.probs, dtype=torch.float64)

    def size_at(self, step: int) -> int:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        return self.schedule.sizes[int(torch.multinomial(self._probs, 1, generator=g))]

    def ratio(self, size: int) -> float:
        return (self.schedule.base_size / size) ** 2

    def copies(self, size: int) -> int:
        return max(1, round(self.ratio(size))) if self.mode == "D+" else 1

    def batch_size(self, step: int, base: int) -> int:
        r = self.ratio(self.size_at(step))
        if self.mode == "D+" and r >= 1:
            return base
        return max(1, round(base * r))

    def setup(self, model: torch.nn.Module, train_ds: Any, cfg: Any) -> None:
        x = train_ds[0][0].unsqueeze(0)
        _check_augment(x, "MixedSize")
        was = model.training
        model.eval()
        try:
            with torch.no_grad():
                for s in self.schedule.sizes:
                    try:
                        model(resize(x.to(next(model.parameters()).device), s))
                    except Exception as e:  # any failure means this size cannot be trained
                        raise ValueError(f"MixedSize: the model cannot take input size {s}x{s}: {e}") from None
        finally:
            model.train(was)

    def batch(self, x: torch.Tensor, y: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        _check_augment(x, "MixedSize")
        size = self.size_at(step)
        k = self.copies(size)
        x, y = (x.repeat(k, 1, 1, 1), y.repeat(k)) if k > 1 else (x, y)
        if self.augment_cfg is not None:
            x = augment(x, self.augment_cfg)
        return resize(x, size), y

    def describe(self) -> dict[str, Any]:
        return {"regime": "MixedSize", "mode": self.mode, "sizes": list(self.schedule.sizes),
                "probs": list(self.schedule.probs), "base_size": self.schedule.base_size}
