"""Bit allocation by integer linear programming (scipy.optimize.milp / HiGHS).

One binary variable ``x[l, k]`` per (layer, candidate bit-width); exactly one choice per layer; minimise the
summed (assumed additive) loss increase ``sum dL[l, k] x[l, k]`` subject to ``sum cost[l, k] x[l, k] <= budget``.
The cost is model bytes (``params * bits / 8``) or bit-operations (``MACs * w_bits * a_bits``).

Example:
    >>> alloc = allocate_bits({"a": {4: 0.3, 8: 0.0}, "b": {4: 0.1, 8: 0.0}},
    ...                       {"a": {4: 2.0, 8: 4.0}, "b": {4: 2.0, 8: 4.0}}, budget=6.0)
    >>> alloc.bits
    {'a': 8, 'b': 4}
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp

__all__ = ["Allocation", "allocate_bits", "exhaustive_allocation", "min_cost"]


@dataclass(frozen=True)
class Allocation:
    """Chosen bits per layer, its summed predicted loss increase and its cost."""

    bits: dict[str, int]
    predicted_increase: float
    cost: float


def _check(sens: dict[str, dict[int, float]], cost: dict[str, dict[int, float]]) -> list[str]:
    if not sens:
        raise ValueError("bit allocation: no layers to allocate")
    if set(sens) != set(cost):
        raise ValueError(f"bit allocation: sensitivity and cost name different layers: "
                         f"{sorted(set(sens) ^ set(cost))}")
    for name in sens:
        if not sens[name] or set(sens[name]) != set(cost[name]):
            raise ValueError(f"bit allocation: layer {name!r} has mismatched candidate bit-widths")
        vals = list(sens[name].values()) + list(cost[name].values())
        if not all(np.isfinite(v) for v in vals):
            raise ValueError(f"bit allocation: layer {name!r} has a non-finite sensitivity or cost")
    return list(sens)


def min_cost(cost: dict[str, dict[int, float]]) -> float:
    """The smallest achievable total cost (every layer at its cheapest candidate)."""
    return float(sum(min(c.values()) for c in cost.values()))


def allocate_bits(sens: dict[str, dict[int, float]], cost: dict[str, dict[int, float]], budget: float,
                  unit: str = "bytes") -> Allocation:
    """Exact ILP: per-layer bit-widths minimising the summed sensitivity with total cost <= ``budget``.

    ValueError if ``budget`` is below :func:`min_cost` (the message names the smallest feasible budget).
    """
    names = _check(sens, cost)
    lo = min_cost(cost)
    if budget < lo - 1e-9 * max(1.0, abs(lo)):
        raise ValueError(f"bit allocation: budget {budget:.6g} {unit} is infeasible; the smallest feasible budget "
                         f"is {lo:.6g} {unit} (every layer at its lowest candidate bit-width)")
    var: list[tuple[str, int]] = [(n, b) for n in names for b in sorted(sens[n])]
    c = np.array([sens[n][b] for n, b in var], dtype=np.float64)
    w = np.array([cost[n][b] for n, b in var], dtype=np.float64)
    one = np.zeros((len(names), len(var)))
    for j, (n, _b) in enumerate(var):
        one[names.index(n), j] = 1.0
    # Scale costs to O(1) so HiGHS tolerances are meaningful, and relax the budget by a hair for float noise.
    s = max(float(w.max()), 1e-30)
    cons = [LinearConstraint(one, 1.0, 1.0), LinearConstraint(w[None, :] / s, -np.inf, budget / s + 1e-9)]
    res = milp(c, constraints=cons, integrality=np.ones(len(var)), bounds=Bounds(0, 1),
               options={"mip_rel_gap": 0.0})
    if res.x is None:
        raise RuntimeError(f"bit allocation: the ILP solver failed ({res.message})")
    x = np.round(res.x).astype(int)
    bits = {n: b for (n, b), xi in zip(var, x) if xi == 1}
    return Allocation(bits, float(sum(sens[n][b] for n, b in bits.items())),
                      float(sum(cost[n][b] for n, b in bits.items())))


def exhaustive_allocation(sens: dict[str, dict[int, float]], cost: dict[str, dict[int, float]],
                          budget: float) -> Allocation:
    """Brute force over all combinations (reference for tests; exponential in the number of layers)."""
    names = _check(sens, cost)
    best = None
    for combo in itertools.product(*[sorted(sens[n]) for n in names]):
        cst = sum(cost[n][b] for n, b in zip(names, combo))
        if cst > budget + 1e-9 * max(1.0, abs(budget)):
            continue
        val = sum(sens[n][b] for n, b in zip(names, combo))
        if best is None or val < best[0] - 1e-12:
            best = (val, cst, combo)
    if best is None:
        raise ValueError(f"bit allocation: budget {budget:.6g} is infeasible; the smallest feasible budget is "
                         f"{min_cost(cost):.6g}")
    return Allocation(dict(zip(names, best[2])), float(best[0]), float(best[1]))
