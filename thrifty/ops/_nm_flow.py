"""Exact transposable N:M tiles: enumeration of the valid tiles, or min-cost flow (OR-tools), many tiles at once.

Enumeration (:func:`solve_enumerate`, few valid tiles such as the 90 of 2:4) is one matmul of the scores
against the pattern matrix per chunk of tiles. Min-cost flow (:func:`solve_flow`, all others):

A tile's transposable mask is a max-weight N-regular subgraph of the complete bipartite graph
rows x columns: min-cost flow with row nodes supplying N, column nodes demanding N, and row -> column arcs
of capacity 1 and cost -score. The constraint matrix is totally unimodular, so the flow optimum is the
integer optimum. All tiles of a chunk are disjoint components of one graph, built with numpy in one call,
so no Python loop runs over tiles; chunks of tiles are solved in ``torch.get_num_threads()`` processes
(OR-tools holds the GIL).

Integer costs, per tile. OR-tools needs int64 costs whose magnitude times the node count fits in int64
(else it answers BAD_COST_RANGE), so the largest graph (a full chunk) allows ``B = 60 - bitlen(2 M chunk + 1)``
bits (39 for 8 x 8 tiles); B depends on M only, not on how many tiles a call holds. Each tile gets its own
power-of-two scale that maps its largest ``|score|`` into ``[2^(B-1), 2^B]``, so what one tile holds never
coarsens another tile's costs (a global scale let a single 1e12 weight wreck every other tile), and a tile's
costs are the same whatever else is solved with it. Consequences, per tile:

* scores at most ``2^(B-24)`` below the tile's maximum (every score, for tiles of dynamic range below
  that) are multiples of the scale's step, so their costs are exact and the mask is exactly optimal;
* otherwise each cost is off by at most half a step, ``2^(e-B-1)`` for a tile maximum in
  ``[2^(e-1), 2^e)``, and the kept sum falls short of the optimum by at most ``N M 2^(e-B)``
  (N M kept entries, two masks compared), i.e. at most ``N M 2^(1-B)`` of the tile's maximum (itself
  a lower bound of the optimum): below 2^-25 of the optimum (half a float32 ulp) for every M <= 32.

Negative scores (the padding of partial tiles) stay strictly below zero after rounding and do not set a
tile's scale, so real entries, zeros included, are always preferred to padded slots.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

__all__ = ["solve_flow", "solve_enumerate", "cost_bits", "integer_scores"]

_CHUNK = 1 << 16  # tiles per graph: bounds memory (~70 B per arc), not a per-tile loop
_COST_LIMIT_BITS = 60  # costs of B bits are accepted when B + bitlen(nodes + 1) <= 60 (2 bits of margin)


def cost_bits(m: int) -> int:
    """Bits ``B`` of the integer costs of ``m`` x ``m`` tiles (|cost| <= 2^B in a graph of up to a chunk of tiles)."""
    return _COST_LIMIT_BITS - (2 * m * _CHUNK + 1).bit_length()


def _pow2(k: Tensor) -> Tensor:
    """2^k as float64 from its bit pattern (exact; k must lie in the normal range [-1022, 1023])."""
    return ((k + 1023) << 52).view(torch.float64)


def integer_scores(s: Tensor, bits: int) -> Tensor:
    """Per-tile integer scores of ``s`` [T, M, M] (float32 or float64), ``|q| <= 2^bits``, as float64.

    Tile t is scaled by ``2^(bits - e_t)`` with its largest score in ``[2^(e_t - 1), 2^e_t)`` (exact in
    float64: a power-of-two scale only shifts exponents), then rounded to the nearest integer (ties to
    even). Negative scores (padding) do not set the scale (padding must not coarsen a tile of small
    weights); they round into ``[-2^bits, -1]``, strictly below every nonnegative score.

    Example:
        >>> integer_scores(torch.tensor([[[3.0, 0.5], [0.0, -1.0]]]), 4).tolist()
        [[[12.0, 2.0], [0.0, -4.0]]]
    """
    top = s.amax((1, 2))
    top = torch.where(top > 0, top, -s.amin((1, 2)))  # all <= 0: scale by the largest magnitude
    e = torch.frexp(top).exponent.long()  # top = f 2^e, f in [0.5, 1); frexp(0) = (0, 0)
    # the scale 2^k in two factors: k reaches bits + 1074 for float64 subnormals and 2^k itself would
    # overflow; each product is exact unless it underflows, and then the result rounds to 0 anyway
    k = bits - e
    k1 = torch.div(k, 2, rounding_mode="floor")
    q = s.double() * _pow2(k1)[:, None, None]
    q.mul_(_pow2(k - k1)[:, None, None]).round_()
    neg = s < 0
    if bool(neg.any()):
        q = torch.where(neg, q.clamp(-(2.0**bits), -1.0), q)
    return q


def solve_enumerate(pats: Tensor, s: Tensor, n: int, chunk: int = 1 << 15) -> Tensor:
    """Best of the valid tiles ``pats`` [B, M, M] for each score tile of ``s`` [T, M, M], by one matmul per
    chunk; the argmax is certified exact or recomputed on integers.

    A float pattern sum of at most M^2 terms is off by at most ``gamma A`` in any summation order (BLAS
    kernels differ per CPU), ``A`` the tile's sum of ``|s|`` and ``gamma = M^2 u / (1 - M^2 u)``. When the
    best computed sum beats the runner-up by more than twice that (with a factor 2 to spare for the
    rounding of the test itself), it is the exact maximum on every CPU. For nonnegative tiles
    ``A <= (M/N) max`` (every entry lies in a fraction N/M of the valid tiles, so the mean pattern sum is
    ``(N/M) A``), which spares a pass over the scores. The rest (ties, near ties) are
    solved again on the per-tile integer scores the flow solver uses: integers below ``2^52 / M^2`` held
    in float64 sum exactly in any order, and the first maximum wins ties. So a tile's mask depends neither
    on the CPU nor on the other tiles.
    """
    m = s.shape[-1]
    pats = pats.reshape(-1, m * m)
    flat = s.reshape(-1, m * m)
    pf = pats.to(flat.dtype).t().contiguous()
    pf64 = pats.double().t().contiguous()
    u = torch.finfo(flat.dtype).eps / 2
    gamma = m * m * u / (1 - m * m * u)
    best = torch.empty(flat.shape[0], dtype=torch.long)
    signed = bool(flat.amin() < 0) if flat.numel() else False  # padding (partial tiles) or negative scores
    for i in range(0, flat.shape[0], chunk):  # chunks bound the [tiles, B] score matrix, not a per-tile loop
        part = flat[i:i + chunk]
        sums = part @ pf
        top, idx = sums.max(1)
        second = sums.scatter_(1, idx[:, None], -math.inf).max(1).values
        mass = part.abs().sum(1) if signed else top * (1.01 * m / n)
        unsure = ((top - second) <= 4 * gamma * mass).nonzero()[:, 0]
        if len(unsure):
            exact = integer_scores(part[unsure].view(-1, m, m), 52 - (m * m).bit_length())
            idx[unsure] = (exact.view(-1, m * m) @ pf64).argmax(1)
        best[i:i + chunk] = idx
    return pats[best].view(-1, m, m)


def _solve_graph(cost: np.ndarray, n: int) -> np.ndarray:
    """Min-cost flow of the int64 arc costs ``cost`` [T, M, M] (one graph, tiles as disjoint components)."""
    from ortools.graph.python import min_cost_flow

    t, m, _ = cost.shape
    base = (np.arange(t, dtype=np.int64) * 2 * m)[:, None, None]
    tails = np.broadcast_to(base + np.arange(m)[None, :, None], (t, m, m)).ravel()
    heads = np.broadcast_to(base + m + np.arange(m)[None, None, :], (t, m, m)).ravel()
    flow = min_cost_flow.SimpleMinCostFlow()
    arcs = flow.add_arcs_with_capacity_and_unit_cost(tails, heads, np.ones_like(tails), cost.ravel())
    flow.set_nodes_supplies(np.arange(2 * m * t), np.tile(np.r_[np.full(m, n), np.full(m, -n)], t))
    status = flow.solve()
    if status != flow.OPTIMAL:
        raise RuntimeError(f"OR-tools min-cost flow failed with status {status}")
    return flow.flows(arcs).reshape(t, m, m) > 0


def solve_flow(s: Tensor, n: int) -> Tensor:
    """Exact transposable N:M masks for score tiles ``s`` [T, M, M] (finite float, CPU), each tile on its own."""
    t, m = s.shape[0], s.shape[-1]
    cost = (-integer_scores(s, cost_bits(m))).to(torch.int64).numpy()
    out = np.empty(cost.shape, dtype=bool)
    starts = list(range(0, t, _CHUNK))
    workers = min(torch.get_num_threads(), len(starts))
    if workers > 1:
        # OR-tools holds the GIL while solving, so the torch thread budget is spent as processes instead;
        # children only run numpy + OR-tools (no torch/OpenMP), which is what makes fork safe here
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(workers, mp_context=mp.get_context("fork")) as ex:
            parts = ex.map(_solve_graph, [cost[i:i + _CHUNK] for i in starts], [n] * len(starts))
            for i, part in zip(starts, parts):
                out[i:i + _CHUNK] = part
    else:
        for i in starts:
            out[i:i + _CHUNK] = _solve_graph(cost[i:i + _CHUNK], n)
    return torch.from_numpy(out)
