"""Multiple-choice knapsack by integer linear programming (scipy.optimize.milp / HiGHS), several budgets.

One binary variable ``x[l, c]`` per (layer, candidate); exactly one candidate per layer; minimise the summed
(assumed additive) objective ``sum value[l][c] x[l, c]`` subject to, for every resource ``r``,
``sum cost[r][l][c] x[l, c] <= budget[r]``. Costs may be negative (a candidate faster than the reference).
:func:`thrifty.quant.allocate_bits` is the one-resource case (model bytes or bit-operations).

Example:
    >>> loss = {"a": {"fp32": 0.0, "int8": 0.3}, "b": {"fp32": 0.0, "int8": 0.1}}
    >>> ms = {"a": {"fp32": 0.0, "int8": -1.0}, "b": {"fp32": 0.0, "int8": -1.0}}
    >>> solve(loss, {"latency_ms": ms}, {"latency_ms": -1.0}).picks
    {'a': 'fp32', 'b': 'int8'}
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Hashable, Mapping

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp

__all__ = ["Choice", "solve", "exhaustive", "check_instance", "min_total"]

Table = Mapping[str, Mapping[Hashable, float]]


@dataclass(frozen=True)
class Choice:
    """The candidate picked per layer, its summed objective and its summed cost per resource."""

    picks: dict[str, Hashable]
    objective: float
    costs: dict[str, float]


def check_instance(value: Table, costs: Mapping[str, Table], what: str = "plan") -> list[str]:
    """Validate the instance (same layers and candidates everywhere, finite numbers); returns the layer order."""
    if not value:
        raise ValueError(f"{what}: no layers to choose for")
    for res, cost in costs.items():
        if set(value) != set(cost):
            raise ValueError(f"{what}: the objective and the {res} costs name different layers: "
                             f"{sorted(set(value) ^ set(cost))}")
    for name in value:
        if not value[name] or any(set(value[name]) != set(c[name]) for c in costs.values()):
            raise ValueError(f"{what}: layer {name!r} has mismatched candidates")
        vals = list(value[name].values()) + [v for c in costs.values() for v in c[name].values()]
        if not all(np.isfinite(v) for v in vals):
            raise ValueError(f"{what}: layer {name!r} has a non-finite objective or cost")
    return list(value)


def min_total(cost: Table) -> float:
    """The smallest achievable total of one resource (every layer at its cheapest candidate for it)."""
    return float(sum(min(c.values()) for c in cost.values()))


def _slack(budget: float) -> float:
    return 1e-9 * max(1.0, abs(budget))


def _totals(costs: Mapping[str, Table], picks: Mapping[str, Hashable]) -> dict[str, float]:
    return {r: float(sum(c[n][k] for n, k in picks.items())) for r, c in costs.items()}


def solve(value: Table, costs: Mapping[str, Table], budgets: Mapping[str, float], what: str = "plan") -> Choice:
    """Exact ILP: one candidate per layer minimising the summed ``value`` with every resource within budget.

    ``costs[r][layer][candidate]``, ``budgets[r]``: every resource in ``budgets`` needs a cost table (a resource
    with a table and no budget is only reported). ValueError (naming the resource and its smallest total) when no
    choice fits.
    """
    names = check_instance(value, costs, what)
    if set(budgets) - set(costs):
        raise ValueError(f"{what}: budgets {sorted(set(budgets) - set(costs))} have no cost table")
    for r, b in budgets.items():
        lo = min_total(costs[r])
        if not math.isfinite(b) or b < lo - _slack(lo):
            raise ValueError(f"{what}: the {r} budget {b:.6g} is infeasible; the smallest {r} any choice reaches is "
                             f"{lo:.6g}")
    var = [(n, k) for n in names for k in value[n]]
    c = np.array([value[n][k] for n, k in var], dtype=np.float64)
    one = np.zeros((len(names), len(var)))
    for j, (n, _k) in enumerate(var):
        one[names.index(n), j] = 1.0
    cons = [LinearConstraint(one, 1.0, 1.0)]
    for r, b in budgets.items():
        w = np.array([costs[r][n][k] for n, k in var], dtype=np.float64)
        s = max(float(np.abs(w).max()), abs(b), 1e-30)  # O(1) rows: HiGHS' tolerances are absolute
        cons.append(LinearConstraint(w[None, :] / s, -np.inf, b / s + 1e-9))
    res = milp(c, constraints=cons, integrality=np.ones(len(var)), bounds=Bounds(0, 1), options={"mip_rel_gap": 0.0})
    if res.x is None:
        if res.status == 2:  # each budget alone is reachable, all of them together are not
            raise ValueError(f"{what}: no choice meets every budget at once ({dict(budgets)}); relax one of them")
        raise RuntimeError(f"{what}: the ILP solver failed ({res.message})")
    x = np.round(res.x).astype(int)
    picks = {n: k for (n, k), xi in zip(var, x) if xi == 1}
    return Choice(picks, float(sum(value[n][k] for n, k in picks.items())), _totals(costs, picks))


def exhaustive(value: Table, costs: Mapping[str, Table], budgets: Mapping[str, float], what: str = "plan") -> Choice:
    """Brute force over all combinations (the reference for tests; exponential in the number of layers)."""
    names = check_instance(value, costs, what)
    best = None
    for combo in itertools.product(*[list(value[n]) for n in names]):
        picks = dict(zip(names, combo))
        tot = _totals(costs, picks)
        if any(tot[r] > b + _slack(b) for r, b in budgets.items()):
            continue
        val = sum(value[n][k] for n, k in picks.items())
        if best is None or val < best.objective - 1e-12:
            best = Choice(picks, float(val), tot)
    if best is None:
        raise ValueError(f"{what}: no choice meets every budget at once ({dict(budgets)})")
    return best
