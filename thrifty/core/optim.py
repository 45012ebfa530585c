"""The optimisation hyper-parameters every trained pipeline shares, as one nested config.

``TrainConfig``, ``FSMerge``, ``DistillMerge`` and ``Synth`` each hold an ``optim: OptimConfig`` field with
their own defaults (``FSMerge().optim.lr`` is 1e-2, ``DistillMerge().optim.lr`` 1e-3); what differs between
them (the optimizer, the schedule, warmup) stays in the pipeline's own config. In YAML it is a nested
mapping (``optim: {lr: 0.05}``; keys left out keep the outer config's defaults), on the command line
``--optim.lr 0.05``.

Example:
    >>> from thrifty.merge import FSMerge
    >>> cfg = FSMerge(optim=FSMerge().optim.replace(steps=50))
    >>> cfg.optim
    OptimConfig(steps=50, lr=0.01, batch_size=64, weight_decay=0.0)
    >>> round(cfg.optim.cosine_lr(25, 50), 6)
    0.005
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from thrifty.core.apply import register_pipeline
from thrifty.core.config import Config, register_config

__all__ = ["OptimConfig"]


@register_config
@dataclass(frozen=True)
class OptimConfig(Config):
    """Steps, learning rate, batch size and weight decay of an optimisation; nested in a pipeline's config.

    Args:
        steps: optimiser steps (TrainConfig: 0 means from ``epochs``).
        lr: peak learning rate.
        batch_size: samples per step.
        weight_decay: weight decay of the optimiser.
    """

    steps: int = 100
    lr: float = 1e-3
    batch_size: int = 64
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        checks = {"steps": isinstance(self.steps, int) and not isinstance(self.steps, bool) and self.steps >= 0,
                  "lr": self.lr > 0, "batch_size": self.batch_size >= 1, "weight_decay": self.weight_decay >= 0}
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"OptimConfig.{name}: invalid value {getattr(self, name)!r}")

    def cosine_lr(self, step: int, total: int) -> float:
        """``lr`` on a cosine from its peak at step 0 to zero at ``total`` steps."""
        return self.lr * 0.5 * (1 + math.cos(math.pi * step / max(total, 1)))


register_pipeline(OptimConfig, "is part of a pipeline's config (the optim field of TrainConfig, FSMerge, DistillMerge, "
                  "Synth)", "e.g. thrifty.train.fit(model, TrainConfig(optim=...), train_ds)")
