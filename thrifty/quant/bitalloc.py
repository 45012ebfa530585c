"""Bit allocation by integer linear programming (scipy.optimize.milp / HiGHS, via :mod:`thrifty.plan.solve`).

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

from dataclasses import dataclass

from thrifty.plan.solve import check_instance, exhaustive, min_total, solve

__all__ = ["Allocation", "allocate_bits", "exhaustive_allocation", "min_cost"]


@dataclass(frozen=True)
class Allocation:
    """Chosen bits per layer, its summed predicted loss increase and its cost."""

    bits: dict[str, int]
    predicted_increase: float
    cost: float


def min_cost(cost: dict[str, dict[int, float]]) -> float:
    """The smallest achievable total cost (every layer at its cheapest candidate)."""
    return min_total(cost)


def allocate_bits(sens: dict[str, dict[int, float]], cost: dict[str, dict[int, float]], budget: float,
                  unit: str = "bytes") -> Allocation:
    """Exact ILP: per-layer bit-widths minimising the summed sensitivity with total cost <= ``budget``.

    ValueError if ``budget`` is below :func:`min_cost` (the message names the smallest feasible budget).
    """
    check_instance(sens, {"cost": cost}, "bit allocation")
    lo = min_cost(cost)
    if budget < lo - 1e-9 * max(1.0, abs(lo)):
        raise ValueError(f"bit allocation: budget {budget:.6g} {unit} is infeasible; the smallest feasible budget "
                         f"is {lo:.6g} {unit} (every layer at its lowest candidate bit-width)")
    c = solve(sens, {"cost": cost}, {"cost": budget}, "bit allocation")
    return Allocation(dict(c.picks), c.objective, c.costs["cost"])  # type: ignore[arg-type]


def exhaustive_allocation(sens: dict[str, dict[int, float]], cost: dict[str, dict[int, float]],
                          budget: float) -> Allocation:
    """Brute force over all combinations (reference for tests; exponential in the number of layers)."""
    check_instance(sens, {"cost": cost}, "bit allocation")
    if budget < min_cost(cost) - 1e-9 * max(1.0, abs(budget)):
        raise ValueError(f"bit allocation: budget {budget:.6g} is infeasible; the smallest feasible budget is "
                         f"{min_cost(cost):.6g}")
    c = exhaustive(sens, {"cost": cost}, {"cost": budget}, "bit allocation")
    return Allocation(dict(c.picks), c.objective, c.costs["cost"])  # type: ignore[arg-type]
