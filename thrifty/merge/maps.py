"""Learned merge (M) and unmerge (U) matrices of FS-Merge in four parametrisations.

A merge point joins the features of K models: ``M_i`` (merged width m x model width d) takes model i's
features into the merged space (the merged feature is ``sum_i M_i a_i``, i.e. M acting on the
concatenation), ``U_i`` (d x m) takes merged features back into model i's space.

Parametrisations of one matrix W (out x in), ``E`` being the rectangular identity:
  - "full":          W is free.
  - "diagonal":      W = E diag(s) (one learned scale per input feature).
  - "lowrank":       W = W0 + A B (W0 the fixed init, rank r).
  - "diag_lowrank":  W = E diag(s) + A B (the default).
E is a fixed 0/1 pattern, the rectangular identity unless a point passes its own.
A starts at zero, B is random, so every parametrisation starts exactly at its init.

Example:
    >>> p = MergePoint(k=2, d=4, m=3, init="average", param="diag_lowrank", rank=2)
    >>> p.m(0).shape, p.u(1).shape
    (torch.Size([3, 4]), torch.Size([4, 3]))
"""
from __future__ import annotations

import math
from typing import Literal, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["Param", "Init", "PARAMS", "INITS", "LinearMap", "MergePoint", "rect_eye"]

Param = Literal["diagonal", "lowrank", "diag_lowrank", "full"]
Init = Literal["first", "average", "permute"]
PARAMS = ("diagonal", "lowrank", "diag_lowrank", "full")
INITS = ("first", "average", "permute")


def rect_eye(out: int, inp: int) -> torch.Tensor:
    """The out x in rectangular identity."""
    return torch.eye(out, inp)


class LinearMap(nn.Module):
    """One learnable out x in matrix; ``forward()`` returns it.

    It starts at ``pattern * scale``; ``pattern`` is a 0/1 matrix with at most one 1 per row and column
    (a rectangular identity, or a head-aware one for attention), the support of the "diagonal" form.
    """

    def __init__(self, pattern: torch.Tensor, scale: float = 1.0, param: Param = "full", rank: int = 8,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        if param not in PARAMS:
            raise ValueError(f"unknown parametrisation {param!r}; choose one of {PARAMS}")
        if pattern.ndim != 2:
            raise ValueError(f"a map needs a 2-D pattern, got shape {tuple(pattern.shape)}")
        out, inp = pattern.shape
        self.shape = (out, inp)
        self.param = param
        base = pattern.float() * float(scale)
        if param == "full":
            self.weight = nn.Parameter(base)
        elif param == "lowrank":
            self.register_buffer("base", base)
        else:
            self.register_buffer("pattern", pattern.float().clone())
            self.diag = nn.Parameter(torch.full((inp,), float(scale)))
        if param in ("lowrank", "diag_lowrank"):
            r = max(1, min(int(rank), out, inp))
            self.a = nn.Parameter(torch.zeros(out, r))
            self.b = nn.Parameter(torch.randn(r, inp, generator=generator) / math.sqrt(inp))

    @classmethod
    def frozen(cls, matrix: torch.Tensor) -> "LinearMap":
        """A fixed matrix (no gradients)."""
        self = cls(torch.zeros(matrix.shape), 0.0, "full")
        self.weight = nn.Parameter(matrix.detach().float().clone(), requires_grad=False)
        return self

    def forward(self) -> torch.Tensor:
        if self.param == "full":
            return self.weight
        if self.param == "lowrank":
            return self.base + self.a @ self.b
        w = self.pattern * self.diag
        return w + self.a @ self.b if self.param == "diag_lowrank" else w


class MergePoint(nn.Module):
    """K merge maps (m x d each) and/or K unmerge maps (d x m each) at one place in the network.

    ``init="first"``: M_1 = E, M_{i>1} = 0 (the merged net starts as model 1); ``"average"``: M_i = E / K
    (starts as weight averaging); ``"permute"``: like "average" with per-model patterns E P_i (the caller
    passes them: permutation matching, then averaging). Every U_i starts at its pattern transposed.
    ``pattern`` (m x d, or one per model) replaces E, e.g. to keep attention heads aligned.
    """

    def __init__(self, k: int, d: int, m: int, init: Init = "first", param: Param = "diag_lowrank", rank: int = 8,
                 has_m: bool = True, has_u: bool = True, generator: torch.Generator | None = None,
                 pattern: torch.Tensor | Sequence[torch.Tensor] | None = None) -> None:
        super().__init__()
        if init not in INITS:
            raise ValueError(f"unknown init {init!r}; choose one of {INITS}")
        self.k, self.d, self.width = k, d, m
        pats = list(pattern) if isinstance(pattern, (list, tuple)) else [rect_eye(m, d) if pattern is None
                                                                         else pattern] * k
        if len(pats) != k or any(tuple(p.shape) != (m, d) for p in pats):
            raise ValueError(f"need {k} pattern(s) of shape {m} x {d}, got {[tuple(p.shape) for p in pats]}")
        scales = [1.0] + [0.0] * (k - 1) if init == "first" else [1.0 / k] * k
        self.ms = (nn.ModuleList(LinearMap(p, s, param, rank, generator) for p, s in zip(pats, scales))
                   if has_m else None)
        self.us = nn.ModuleList(LinearMap(p.T, 1.0, param, rank, generator) for p in pats) if has_u else None

    @classmethod
    def fixed(cls, ms: Sequence[torch.Tensor] | None, us: Sequence[torch.Tensor] | None) -> "MergePoint":
        """A frozen merge point with given matrices (used by the permutation / ZipIt baselines)."""
        ref = ms[0] if ms is not None else us[0].T
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.k, self.width, self.d = len(ms if ms is not None else us), ref.shape[0], ref.shape[1]
        self.ms = nn.ModuleList(LinearMap.frozen(x) for x in ms) if ms is not None else None
        self.us = nn.ModuleList(LinearMap.frozen(x) for x in us) if us is not None else None
        return self

    def m(self, i: int) -> torch.Tensor:
        if self.ms is None:
            raise RuntimeError("this merge point has no merge maps")
        return self.ms[i]()

    def u(self, i: int) -> torch.Tensor:
        if self.us is None:
            raise RuntimeError("this merge point has no unmerge maps")
        return self.us[i]()
