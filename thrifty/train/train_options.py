"""``thrifty train --regime ...``: the training-regime option (a `thrifty.train.options` plugin).

Specs: ``none`` | ``augment`` (plain augmentation, = batch-aug:1) | ``batch-aug:M`` | ``mixed-size:B+`` |
``mixed-size:D+``; ``--grad-norm-adapt`` turns on BatchAugment's sqrt(m) gradient scaling.

Example:
    >>> parse_regime("batch-aug:4").m
    4
"""
from __future__ import annotations

import argparse
from typing import Any

from thrifty.train.options import TrainingOption, register_training_option
from thrifty.train.regimes import BatchAugment, MixedSize

__all__ = ["parse_regime"]


def parse_regime(spec: str | None, grad_norm_adapt: bool = False, seed: int = 0) -> Any:
    """Turn a ``--regime`` spec into a regime object (None for "none")."""
    if spec in (None, "", "none"):
        return None
    name, _, arg = str(spec).partition(":")
    if name == "augment" and not arg:
        return BatchAugment(m=1)
    if name in ("batch-aug", "batch-augment"):
        try:
            m = int(arg)
        except ValueError:
            raise ValueError(f"--regime {spec!r}: expected batch-aug:M with an integer M >= 1") from None
        return BatchAugment(m=m, grad_norm_adapt=grad_norm_adapt)
    if name == "mixed-size":
        return MixedSize(mode=arg or "D+", seed=seed)
    raise ValueError(f"unknown --regime {spec!r}; use none, augment, batch-aug:M, mixed-size:B+ or mixed-size:D+")


def _add(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training regime")
    g.add_argument("--regime", default="none",
                   help="none | augment | batch-aug:M (M augmented copies per sample) | mixed-size:B+ | mixed-size:D+")
    g.add_argument("--grad-norm-adapt", action="store_true", help="batch-aug: scale gradients by sqrt(M)")


register_training_option(TrainingOption(
    "regime", add_arguments=_add,
    regime=lambda a: parse_regime(getattr(a, "regime", None), getattr(a, "grad_norm_adapt", False),
                                  getattr(a, "seed", 0))))
