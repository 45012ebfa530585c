"""Exact transposable N:M tiles by min-cost flow (OR-tools), many tiles per graph.

A tile's transposable mask is a max-weight N-regular subgraph of the complete bipartite graph
rows x columns: min-cost flow with row nodes supplying N, column nodes demanding N, and row -> column arcs
of capacity 1 and cost -score. The constraint matrix is totally unimodular, so the flow optimum is the
integer optimum. All tiles of a chunk are disjoint components of one graph, built with numpy in one call,
so no Python loop runs over tiles; chunks of tiles are solved in ``torch.get_num_threads()`` processes
(OR-tools holds the GIL). OR-tools needs integer costs: scores are shifted (a constant shift
changes no optimum, every tile keeps exactly M*N entries) and quantised to 2^-30 of their range, far below
float32 resolution of the kept sums.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

__all__ = ["solve_flow"]

_CHUNK = 1 << 16  # tiles per graph: bounds memory (~70 B per arc), not a per-tile loop


def _solve_graph(sn: np.ndarray, n: int, lo: float, scale: float) -> np.ndarray:
    from ortools.graph.python import min_cost_flow

    t, m, _ = sn.shape
    cost = -np.rint((sn - lo) * scale).astype(np.int64).ravel()
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
    """Exact transposable N:M masks for score tiles ``s`` [T, M, M] (float, CPU)."""
    t = s.shape[0]
    sn = s.double().numpy()
    lo, hi = float(sn.min()), float(sn.max())
    scale = (2.0**30) / (hi - lo) if hi > lo else 0.0
    out = np.empty(sn.shape, dtype=bool)
    starts = list(range(0, t, _CHUNK))
    workers = min(torch.get_num_threads(), len(starts))
    if workers > 1:
        # OR-tools holds the GIL while solving, so the torch thread budget is spent as processes instead;
        # children only run numpy + OR-tools (no torch/OpenMP), which is what makes fork safe here
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(workers, mp_context=mp.get_context("fork")) as ex:
            parts = ex.map(_solve_graph, [sn[i:i + _CHUNK] for i in starts], [n] * len(starts),
                           [lo] * len(starts), [scale] * len(starts))
            for i, part in zip(starts, parts):
                out[i:i + _CHUNK] = part
    else:
        for i in starts:
            out[i:i + _CHUNK] = _solve_graph(sn[i:i + _CHUNK], n, lo, scale)
    return torch.from_numpy(out)
