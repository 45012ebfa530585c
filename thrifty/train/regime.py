"""The regime protocol: how training regimes plug into the one loop (`thrifty.train.fit`).

A regime is any object with some of these methods (all optional; :class:`Regime` gives no-op defaults):

    setup(model, train_ds, cfg)          once before the first step; validate here (bad sizes, m < 1, ...)
                                         so errors come before any training happens
    batch_size(step, base) -> int        how many samples the loader draws for this step (per process);
                                         must be a pure function of (step, base) so resume and DDP agree
    batch(x, y, step) -> (x, y)          transform the drawn batch (augment, duplicate, resize); may change
                                         the batch size and the input size
    before_optimizer_step(model, step)   after backward (gradients already all-reduced under DDP), before
                                         the optimizer: gradient-norm adaptation, clipping, ...
    on_step_end(state)                   after the optimizer step, with the loop's StepState

Randomness inside a regime should come from torch's global RNG: the loop reseeds it every step from
(seed, step, rank), which keeps resume exact and gives each DDP process its own stream.

Example:
    >>> class Flip(Regime):
    ...     def batch(self, x, y, step):
    ...         return x.flip(-1), y
    >>> reg = Compose(Flip(), Flip())
    >>> import torch
    >>> x, y = reg.batch(torch.arange(3.0).view(1, 3), torch.zeros(1), 0)
    >>> x.tolist()
    [[0.0, 1.0, 2.0]]
"""
from __future__ import annotations

from typing import Any

import torch

__all__ = ["Regime", "Compose"]


class Regime:
    """No-op base for regimes; subclass and override what you need (see module docstring)."""

    def setup(self, model: torch.nn.Module, train_ds: Any, cfg: Any) -> None:
        return None

    def batch_size(self, step: int, base: int) -> int:
        return base

    def batch(self, x: torch.Tensor, y: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        return x, y

    def before_optimizer_step(self, model: torch.nn.Module, step: int) -> None:
        return None

    def on_step_end(self, state: Any) -> None:
        return None

    def describe(self) -> dict[str, Any]:
        """JSON-able description recorded in histories and reports."""
        return {"regime": type(self).__name__}


class Compose(Regime):
    """Apply several regimes in order (batch transforms chain; batch_size is asked of each in turn)."""

    def __init__(self, *regimes: Any):
        self.regimes = [r for r in regimes if r is not None]

    def setup(self, model, train_ds, cfg):
        for r in self.regimes:
            if hasattr(r, "setup"):
                r.setup(model, train_ds, cfg)

    def batch_size(self, step, base):
        for r in self.regimes:
            if hasattr(r, "batch_size"):
                base = r.batch_size(step, base)
        return base

    def batch(self, x, y, step):
        for r in self.regimes:
            if hasattr(r, "batch"):
                x, y = r.batch(x, y, step)
        return x, y

    def before_optimizer_step(self, model, step):
        for r in self.regimes:
            if hasattr(r, "before_optimizer_step"):
                r.before_optimizer_step(model, step)

    def on_step_end(self, state):
        for r in self.regimes:
            if hasattr(r, "on_step_end"):
                r.on_step_end(state)

    def describe(self):
        return {"regime": "Compose", "parts": [getattr(r, "describe", lambda: {"regime": type(r).__name__})()
                                               for r in self.regimes]}
