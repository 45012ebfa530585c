"""Exact transposable N:M tiles by min-cost flow (OR-tools), many tiles per graph.

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

import numpy as np
import torch
from torch import Tensor

__all__ = ["solve_flow", "cost_bits", "integer_scores"]

_CHUNK = 1 << 16  # tiles per graph: bounds memory (~70 B per arc), not a per-tile loop
_COST_LIMIT_BITS = 60  # costs of B bits are accepted when B + bitlen(nodes + 1) <= 60 (2 bits of margin)


def cost_bits(m: int) -> int:
    """Bits ``B`` of the integer costs of ``m`` x ``m`` tiles (|cost| <= 2^B in a graph of up to a chunk of tiles)."""
    return _COST_LIMIT_BITS - (2 * m * _CHUNK + 1).bit_length()


def integer_scores(sn: np.ndarray, bits: int) -> np.ndarray:
    """Per-tile integer scores of ``sn`` [T, M, M] (float64 holding float32 values), ``|q| <= 2^bits``.

    Tile t is scaled by ``2^(bits - e_t)`` with its largest score in ``[2^(e_t - 1), 2^e_t)`` (exact in
    float64: a power-of-two scale only shifts exponents), then rounded to the nearest integer. Negative
    scores (padding) do not set the scale (padding must not coarsen a tile of small weights); they round
    into ``[-2^bits, -1]``, strictly below every nonnegative score. Returned as float64 (exact integers).

    Example:
        >>> integer_scores(np.array([[[3.0, 0.5], [0.0, -1.0]]]), 4).tolist()
        [[[12.0, 2.0], [0.0, -4.0]]]
    """
    top = sn.max(axis=(1, 2))
    top = np.where(top > 0, top, -sn.min(axis=(1, 2)))  # all <= 0: scale by the largest magnitude
    _, e = np.frexp(top)  # top = f 2^e, f in [0.5, 1); frexp(0) = (0, 0)
    # the scale 2^k in two factors: k reaches bits + 1073 for float64 subnormals, 2^k itself would overflow;
    # each product is exact unless it underflows, and then the result rounds to 0 anyway
    k = (bits - e).astype(np.int64)
    q = sn * np.ldexp(1.0, k // 2)[:, None, None]
    q *= np.ldexp(1.0, k - k // 2)[:, None, None]
    np.rint(q, out=q)
    np.maximum(q, -(2.0**bits), out=q)
    return np.minimum(q, -1.0, out=q, where=sn < 0)


def _solve_graph(sn: np.ndarray, n: int) -> np.ndarray:
    from ortools.graph.python import min_cost_flow

    t, m, _ = sn.shape
    cost = -integer_scores(sn, cost_bits(m)).astype(np.int64).ravel()
    base = (np.arange(t, dtype=np.int64) * 2 * m)[:, None, None]
    tails = np.broadcast_to(base + np.arange(m)[None, :, None], (t, m, m)).ravel()
    heads = np.broadcast_to(base + m + np.arange(m)[None, None, :], (t, m, m)).ravel()
    flow = min_cost_flow.SimpleMinCostFlow()
    arcs = flow.add_arcs_with_capacity_and_unit_cost(tails, heads, np.ones_like(tails), cost)
    flow.set_nodes_supplies(np.arange(2 * m * t), np.tile(np.r_[np.full(m, n), np.full(m, -n)], t))
    status = flow.solve()
    if status != flow.OPTIMAL:
        raise RuntimeError(f"OR-tools min-cost flow failed with status {status}")
    return flow.flows(arcs).reshape(t, m, m) > 0


def solve_flow(s: Tensor, n: int) -> Tensor:
    """Exact transposable N:M masks for score tiles ``s`` [T, M, M] (finite float, CPU), each tile on its own."""
    t = s.shape[0]
    sn = s.double().numpy()
    out = np.empty(sn.shape, dtype=bool)
    starts = list(range(0, t, _CHUNK))
    workers = min(torch.get_num_threads(), len(starts))
    if workers > 1:
        # OR-tools holds the GIL while solving, so the torch thread budget is spent as processes instead;
        # children only run numpy + OR-tools (no torch/OpenMP), which is what makes fork safe here
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(workers, mp_context=mp.get_context("fork")) as ex:
            parts = ex.map(_solve_graph, [sn[i:i + _CHUNK] for i in starts], [n] * len(starts))
            for i, part in zip(starts, parts):
                out[i:i + _CHUNK] = part
    else:
        for i in starts:
            out[i:i + _CHUNK] = _solve_graph(sn[i:i + _CHUNK], n)
    return torch.from_numpy(out)
