"""Multiple-choice knapsack by integer linear programming (scipy.optimize.milp / HiGHS), several budgets.

One binary variable ``x[l, c]`` per (layer, candidate); exactly one candidate per layer; minimise the summed
(assumed additive) objective ``sum value[l][c] x[l, c]`` subject to, for every resource ``r``,
``sum cost[r][l][c] x[l, c] <= budget[r]``. Costs may be negative (a candidate faster than the reference).
:func:`thrifty.quant.allocate_bits` is the one-resource case (model bytes or bit-operations).

Pairwise terms: ``pairs[r][(a, b)][(ca, cb)]`` adds that cost to resource ``r`` when layer ``a`` picks ``ca`` and
layer ``b`` picks ``cb`` (the latency of two adjacent int8 layers is not the sum of each alone: the
quantize/dequantize pair between them cancels). The product ``x[a, ca] x[b, cb]`` is linearised exactly by one
more binary ``y`` with ``y <= x[a, ca]``, ``y <= x[b, cb]``, ``y >= x[a, ca] + x[b, cb] - 1``; ``value_pairs``
does the same for the objective.

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
from typing import Hashable, Mapping, Optional

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp

__all__ = ["Choice", "solve", "exhaustive", "check_instance", "check_pairs", "min_total", "total"]

Table = Mapping[str, Mapping[Hashable, float]]
Pairs = Mapping[tuple[str, str], Mapping[tuple[Hashable, Hashable], float]]


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


def min_total(cost: Table, pairs: Optional[Pairs] = None) -> float:
    """The smallest achievable total of one resource (every layer at its cheapest candidate for it); with
    pairwise terms a lower bound (every negative pair term counted), exact when there are none."""
    pair_lo = sum(min(0.0, min(d.values(), default=0.0)) for d in (pairs or {}).values())
    return float(sum(min(c.values()) for c in cost.values()) + pair_lo)


def check_pairs(value: Table, pairs: Pairs, what: str, res: str) -> None:
    """Pair terms name known layers (two different ones) and candidates those layers have; finite numbers."""
    for (a, b), d in pairs.items():
        if a not in value or b not in value or a == b:
            raise ValueError(f"{what}: the {res} pair term ({a!r}, {b!r}) needs two different known layers")
        for (ca, cb), v in d.items():
            if ca not in value[a] or cb not in value[b]:
                raise ValueError(f"{what}: the {res} pair term ({a!r}, {b!r}) names candidates ({ca!r}, {cb!r}) "
                                 f"those layers do not have")
            if not np.isfinite(v):
                raise ValueError(f"{what}: the {res} pair term ({a!r}, {b!r}) is not finite")


def total(table: Table, picks: Mapping[str, Hashable], pairs: Optional[Pairs] = None) -> float:
    """One resource's total of a choice: the per-layer terms plus the pair terms both of whose picks it made."""
    t = sum(table[n][k] for n, k in picks.items())
    t += sum(d.get((picks[a], picks[b]), 0.0) for (a, b), d in (pairs or {}).items() if a in picks and b in picks)
    return float(t)


def _slack(budget: float) -> float:
    return 1e-9 * max(1.0, abs(budget))


def _totals(costs: Mapping[str, Table], picks: Mapping[str, Hashable],
            pairs: Optional[Mapping[str, Pairs]] = None) -> dict[str, float]:
    return {r: total(c, picks, (pairs or {}).get(r)) for r, c in costs.items()}


def _check(value, costs, budgets, what, pairs, value_pairs) -> list[str]:
    names = check_instance(value, costs, what)
    if set(budgets) - set(costs):
        raise ValueError(f"{what}: budgets {sorted(set(budgets) - set(costs))} have no cost table")
    if set(pairs or {}) - set(costs):
        raise ValueError(f"{what}: pair terms for {sorted(set(pairs or {}) - set(costs))} have no cost table")
    for r, p in (pairs or {}).items():
        check_pairs(value, p, what, r)
    check_pairs(value, value_pairs or {}, what, "objective")
    return names


def solve(value: Table, costs: Mapping[str, Table], budgets: Mapping[str, float], what: str = "plan",
          pairs: Optional[Mapping[str, Pairs]] = None, value_pairs: Optional[Pairs] = None) -> Choice:
    """Exact ILP: one candidate per layer minimising the summed ``value`` with every resource within budget.

    ``costs[r][layer][candidate]``, ``budgets[r]``: every resource in ``budgets`` needs a cost table (a resource
    with a table and no budget is only reported). ``pairs[r]`` / ``value_pairs``: pairwise terms of resource
    ``r`` / of the objective (module doc). ValueError (naming the resource and its smallest total) when no
    choice fits.
    """
    names = _check(value, costs, budgets, what, pairs, value_pairs)
    pairs = pairs or {}
    for r, b in budgets.items():
        lo = min_total(costs[r], pairs.get(r))
        if not math.isfinite(b) or b < lo - _slack(lo):
            raise ValueError(f"{what}: the {r} budget {b:.6g} is infeasible; the smallest {r} any choice reaches is "
                             f"{'at least ' if pairs.get(r) else ''}{lo:.6g}")
    var = [(n, k) for n in names for k in value[n]]
    index = {v: j for j, v in enumerate(var)}
    # one y per (layer pair, candidate pair) with a non-zero term anywhere
    ys = sorted({(a, b, ca, cb) for p in [*pairs.values(), value_pairs or {}] for (a, b), d in p.items()
                 for (ca, cb), v in d.items() if v != 0.0}, key=str)
    nv = len(var) + len(ys)
    c = np.zeros(nv)
    c[:len(var)] = [value[n][k] for n, k in var]
    for j, (a, b, ca, cb) in enumerate(ys):
        c[len(var) + j] = (value_pairs or {}).get((a, b), {}).get((ca, cb), 0.0)
    one = np.zeros((len(names), nv))
    for j, (n, _k) in enumerate(var):
        one[names.index(n), j] = 1.0
    cons = [LinearConstraint(one, 1.0, 1.0)]
    if ys:  # y <= x_a, y <= x_b, y >= x_a + x_b - 1
        lin = np.zeros((3 * len(ys), nv))
        for j, (a, b, ca, cb) in enumerate(ys):
            ia, ib, iy = index[(a, ca)], index[(b, cb)], len(var) + j
            lin[3 * j, [iy, ia]] = [1.0, -1.0]
            lin[3 * j + 1, [iy, ib]] = [1.0, -1.0]
            lin[3 * j + 2, [iy, ia, ib]] = [1.0, -1.0, -1.0]
        lo = np.tile([-np.inf, -np.inf, -1.0], len(ys))
        hi = np.tile([0.0, 0.0, np.inf], len(ys))
        cons.append(LinearConstraint(lin, lo, hi))
    for r, b in budgets.items():
        w = np.zeros(nv)
        w[:len(var)] = [costs[r][n][k] for n, k in var]
        for j, (a, bb, ca, cb) in enumerate(ys):
            w[len(var) + j] = pairs.get(r, {}).get((a, bb), {}).get((ca, cb), 0.0)
        s = max(float(np.abs(w).max()), abs(b), 1e-30)  # O(1) rows: HiGHS' tolerances are absolute
        cons.append(LinearConstraint(w[None, :] / s, -np.inf, b / s + 1e-9))
    res = milp(c, constraints=cons, integrality=np.ones(nv), bounds=Bounds(0, 1), options={"mip_rel_gap": 0.0})
    if res.x is None:
        if res.status == 2:  # each budget alone is reachable, all of them together are not
            raise ValueError(f"{what}: no choice meets every budget at once ({dict(budgets)}); relax one of them")
        raise RuntimeError(f"{what}: the ILP solver failed ({res.message})")
    x = np.round(res.x[:len(var)]).astype(int)
    picks = {n: k for (n, k), xi in zip(var, x) if xi == 1}
    return Choice(picks, total(value, picks, value_pairs), _totals(costs, picks, pairs))


def exhaustive(value: Table, costs: Mapping[str, Table], budgets: Mapping[str, float], what: str = "plan",
               pairs: Optional[Mapping[str, Pairs]] = None, value_pairs: Optional[Pairs] = None) -> Choice:
    """Brute force over all combinations (the reference for tests; exponential in the number of layers)."""
    names = _check(value, costs, budgets, what, pairs, value_pairs)
    best = None
    for combo in itertools.product(*[list(value[n]) for n in names]):
        picks = dict(zip(names, combo))
        tot = _totals(costs, picks, pairs)
        if any(tot[r] > b + _slack(b) for r, b in budgets.items()):
            continue
        val = total(value, picks, value_pairs)
        if best is None or val < best.objective - 1e-12:
            best = Choice(picks, float(val), tot)
    if best is None:
        raise ValueError(f"{what}: no choice meets every budget at once ({dict(budgets)})")
    return best
