"""Pure math for permutation matching: correlations, Hungarian assignment, MLP weight matching.

A permutation is stored as an index vector ``perm`` with ``perm[j]`` = the unit of model B matched to unit
j of model A, i.e. the matrix P with P[j, perm[j]] = 1 maps B's features onto A's order (``P @ b``).

Example:
    >>> import torch
    >>> a = torch.randn(100, 5)
    >>> match_features(a, a[:, [3, 0, 4, 1, 2]]).tolist()
    [1, 3, 4, 0, 2]
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

__all__ = ["assign", "correlation", "match_features", "perm_matrix", "weight_matching", "head_aware_match",
           "zip_pairs"]


def assign(score: torch.Tensor) -> torch.Tensor:
    """perm maximising sum_j score[j, perm[j]] (Hungarian algorithm)."""
    if score.ndim != 2 or score.shape[0] != score.shape[1]:
        raise ValueError(f"assign needs a square score matrix, got shape {tuple(score.shape)}")
    s = score.detach().double().cpu().numpy()
    if not np.isfinite(s).all():
        raise ValueError("assign: score matrix contains NaN or inf")
    rows, cols = linear_sum_assignment(s, maximize=True)
    perm = np.empty(len(rows), dtype=np.int64)
    perm[rows] = cols
    return torch.from_numpy(perm)


def perm_matrix(perm: torch.Tensor) -> torch.Tensor:
    """P with P[j, perm[j]] = 1."""
    n = len(perm)
    p = torch.zeros(n, n)
    p[torch.arange(n), perm] = 1.0
    return p


def correlation(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pearson correlation between the columns of a (n x d) and b (n x d) -> d x d; constant columns give 0."""
    a = a.reshape(-1, a.shape[-1]).double()
    b = b.reshape(-1, b.shape[-1]).double()
    a = a - a.mean(0)
    b = b - b.mean(0)
    na, nb = a.norm(dim=0), b.norm(dim=0)
    c = (a.T @ b) / (na[:, None] * nb[None, :]).clamp_min(1e-12)
    return torch.where((na[:, None] > 0) & (nb[None, :] > 0), c, torch.zeros_like(c)).float()


def match_features(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Activation matching: perm aligning b's units to a's by maximal total correlation."""
    if a.shape[-1] != b.shape[-1]:
        raise ValueError(f"feature widths differ: {a.shape[-1]} vs {b.shape[-1]}")
    return assign(correlation(a, b))


def head_aware_match(corr_qk: torch.Tensor, corr_v: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Match attention units: heads to heads (one head perm shared by q, k and v, scored by the best
    within-head assignments), then dims within each matched head pair (q and k share theirs, since
    only q.k matters; v has its own). Returns full perms (perm_qk, perm_v)."""
    d = corr_qk.shape[0]
    if d % heads or corr_qk.shape != corr_v.shape:
        raise ValueError(f"head_aware_match: shapes {tuple(corr_qk.shape)}, {tuple(corr_v.shape)}, heads={heads}")
    dh = d // heads
    blk = lambda c, i, j: c[i * dh:(i + 1) * dh, j * dh:(j + 1) * dh]
    inner_qk = [[assign(blk(corr_qk, i, j)) for j in range(heads)] for i in range(heads)]
    inner_v = [[assign(blk(corr_v, i, j)) for j in range(heads)] for i in range(heads)]
    r = torch.arange(dh)
    hs = torch.tensor([[float(blk(corr_qk, i, j)[r, inner_qk[i][j]].sum() + blk(corr_v, i, j)[r, inner_v[i][j]].sum())
                        for j in range(heads)] for i in range(heads)])
    hp = assign(hs)
    pqk = torch.cat([hp[i] * dh + inner_qk[i][int(hp[i])] for i in range(heads)])
    pv = torch.cat([hp[i] * dh + inner_v[i][int(hp[i])] for i in range(heads)])
    return pqk, pv


def weight_matching(wa: Sequence[torch.Tensor], ba: Sequence[torch.Tensor], wb: Sequence[torch.Tensor],
                    bb: Sequence[torch.Tensor], max_iter: int = 100, seed: int = 0) -> list[torch.Tensor]:
    """Git Re-Basin weight matching for a chain of Linear layers (hidden layers only; no head term).

    ``wa[l]`` (d_l x d_{l-1}) and ``ba[l]`` are model A's hidden layers; returns one perm per hidden layer
    such that permuting B's units by them maximises sum_l <W_l^A, P_l W_l^B P_{l-1}^T> + <b^A, P b^B>.
    Coordinate ascent over layers in random order until no perm changes.
    """
    depth = len(wa)
    perms = [torch.arange(w.shape[0]) for w in wa]
    rng = np.random.default_rng(seed)
    for _ in range(max_iter):
        changed = False
        for l in rng.permutation(depth):
            wb_in = wb[l][:, perms[l - 1]] if l > 0 else wb[l]  # B's inputs already in A's order
            score = wa[l].double() @ wb_in.double().T + ba[l].double()[:, None] @ bb[l].double()[None, :]
            if l + 1 < depth:
                nxt = wb[l + 1][perms[l + 1]]  # B's next-layer outputs in A's order
                score = score + wa[l + 1].double().T @ nxt.double()
            new = assign(score)
            if not torch.equal(new, perms[l]):
                perms[l], changed = new, True
        if not changed:
            break
    return perms


def zip_pairs(corr: torch.Tensor) -> list[tuple[int, int]]:
    """ZipIt-style greedy pairing of 2d features (two models' units, concatenated) into d pairs: repeatedly
    take the most correlated remaining pair, within or across models. ``corr`` is the 2d x 2d correlation."""
    n = corr.shape[0]
    if corr.ndim != 2 or n != corr.shape[1] or n % 2:
        raise ValueError(f"zip_pairs needs an even square correlation matrix, got {tuple(corr.shape)}")
    c = corr.detach().double().clone()
    c.fill_diagonal_(-float("inf"))
    pairs = []
    for _ in range(n // 2):
        a, b = divmod(int(torch.argmax(c)), n)
        pairs.append((min(a, b), max(a, b)))
        c[[a, b], :] = -float("inf")
        c[:, [a, b]] = -float("inf")
    return sorted(pairs)
