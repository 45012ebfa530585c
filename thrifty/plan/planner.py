"""The planner: the most accurate per-layer choice within a measured latency budget and a size budget.

1. layers: every GEMM the PTQ pipeline quantizes; candidates from :data:`thrifty.plan.config.CANDIDATES`;
2. costs: :func:`thrifty.plan.cost.measure_costs` (in-context ONNX Runtime latency and bytes, cached);
3. sensitivities: the calibration loss with only that layer at that candidate, *after* the pipeline the plan
   will use (``rtn``, ``adaquant``...), so the prediction describes the deployed weights;
4. one exact ILP (:func:`thrifty.plan.solve.solve`): minimise the summed sensitivities with
   ``reference + sum latency differences + pair terms of int8 neighbours <= latency budget`` (the pair terms
   linearised exactly) and the same for bytes;
5. the plan is quantized with its pipeline, exported and timed interleaved with the FP32 graph; its measured
   latency is expressed at the table's FP32 latency (``measured["latency_ms"] = raw * base_ms / fp32 now``; the
   raw numbers are kept), so a slow spell of a shared machine between the table and the plan does not count as
   a prediction error. When it is off the prediction by more than ``refine_tol`` (10 %), or misses a budget, the
   cost model is refitted (:func:`thrifty.plan.cost.refit`: least squares over every graph the table timed
   plus the plans measured so far, each plan weighted like the whole table, so the model nearly passes through
   them) and
   the ILP is solved again, up to ``max_rounds`` plans; after a plan over the latency budget the next solve's
   budget is also cut by that plan's overrun (measured / budget), so the loop converges on a mix that fits. The uniform choices predicted to fit are measured too
   (the summed single-layer losses misjudge joint quantization, in either direction), and the plan with the
   lowest *measured* calibration loss within the budgets is kept; if none is, the most accurate of the graphs timed for the table that met both budgets (its latency
   was measured, not predicted); the same when the prediction says no plan fits the budget.

Example:
    >>> import torch, torch.nn as nn, numpy as np
    >>> model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 4)).eval()
    >>> x = torch.randn(64, 16)
    >>> r = make_plan(model, x, (x[:2],), (x[:8].numpy(),), latency_ms=1e3, size_mb=1.0, rounds=2, cache=False)
    >>> sorted(r.plan.layers), r.measured["bytes"] <= 1e6
    (['0', '2'], True)
"""
from __future__ import annotations

import math
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch.nn as nn

from thrifty.plan.config import Plan, candidate, export_plan, plan_from_picks, quantize_plan
from thrifty.plan.cost import CostTable, deploy_graphs, measure_costs, refit, weight_bytes
from thrifty.plan.timing import time_beside
from thrifty.plan.solve import min_total, solve

__all__ = ["PlanResult", "make_plan", "sensitivities", "plan_layers", "deploy"]


@dataclass
class PlanResult:
    """The chosen plan, what was predicted and measured for it, and every solve that led to it."""

    plan: Plan
    picks: dict[str, str]
    predicted: dict[str, float]  # latency_ms, bytes, loss
    measured: dict[str, float]
    budgets: dict[str, Optional[float]]
    sensitivity: dict[str, dict[str, float]]
    table: CostTable
    onnx: bytes = b""
    model: Optional[nn.Module] = None
    rounds: list[dict[str, Any]] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def latency_error(self) -> float:
        """(predicted - measured) / measured latency of the final plan."""
        return (self.predicted["latency_ms"] - self.measured["latency_ms"]) / self.measured["latency_ms"]

    def summary(self) -> str:
        n = sum(c != "fp32" for c in self.picks.values())
        p, m = self.predicted, self.measured
        return (f"plan: {n}/{len(self.picks)} layers quantized ({self.plan.pipeline}); latency predicted "
                f"{p['latency_ms']:.3f} ms, measured {m['latency_ms']:.3f} ms ({100 * self.latency_error:+.1f}%); "
                f"size {m['bytes'] / 1e6:.3f} MB; loss predicted {p['loss']:.4g}, measured {m['loss']:.4g}")


def plan_layers(model: nn.Module, calib: Any) -> list[str]:
    """The GEMM layers the PTQ pipeline quantizes (wrappable and executed on ``calib``), in execution order."""
    res = quantize_plan(model, plan_from_picks({n: "int8" for n, m in model.named_modules()
                                                if isinstance(m, (nn.Linear, nn.Conv2d))}), calib)
    if res is None:
        raise ValueError(f"plan: {type(model).__name__} has no nn.Linear/nn.Conv2d layer to plan")
    return list(res.bits)


def sensitivities(model: nn.Module, calib: Any, layers: Sequence[str], candidates: Sequence[str],
                  pipeline: str = "rtn", adaquant_iters: int = 200) -> dict[str, dict[str, float]]:
    """Calibration-loss increase of each (layer, candidate) alone, after ``pipeline`` (FP32: 0)."""
    sens: dict[str, dict[str, float]] = {}
    mods = dict(model.named_modules())
    for n in layers:
        sens[n] = {}
        for c in candidates:
            if c == "fp32":
                sens[n][c] = 0.0
            elif candidate(c).accepts(mods[n]):
                res = quantize_plan(model, plan_from_picks({n: c}, pipeline, adaquant_iters), calib)
                sens[n][c] = float(res.final_loss)  # the FP model's loss is 0: this is the increase
    return sens


def deploy(model: nn.Module, plan: Plan, calib: Any, example: tuple, path: str | Path,
           input_names: Optional[Sequence[str]] = None, residual_calib: bool = True):
    """Quantize ``model`` by ``plan`` and export it to ONNX at ``path`` (:func:`thrifty.plan.config.export_plan`:
    N:M layers stored compressed); returns (QuantResult or None, path)."""
    res = quantize_plan(model, plan, calib)
    m = model if res is None else res.model
    out = export_plan(m, plan, example, path, input_names=input_names,
                      calib=calib if residual_calib and res is not None else None)
    return res, out


def _measure(model, plan, calib, example, feed, threads, rounds, input_names, fp32: bytes,
             base_ms: float, clock: str = "wall") -> tuple[dict[str, float], bytes, Any]:
    with tempfile.TemporaryDirectory() as d:
        res, p = deploy(model, plan, calib, example, Path(d) / "plan.onnx", input_names)
        graph = p.read_bytes()
    (ref, ms), (_, noise) = time_beside(fp32, [graph], feed, threads, rounds, clock=clock)
    return {"latency_ms": ms * base_ms / ref, "raw_ms": ms, "fp32_ms": ref, "noise": noise,
            "bytes": float(weight_bytes(graph)), "loss": 0.0 if res is None else float(res.final_loss)}, graph, res


def _solve(sens, table: CostTable, latency_ms, size_mb) -> tuple[dict[str, str], dict[str, float]]:
    value = {n: {c: sens[n][c] for c in table.latency_ms[n]} for n in table.layers}
    costs = {"latency_ms": table.latency_ms, "bytes": table.bytes}
    budgets: dict[str, float] = {}
    if latency_ms is not None:
        fastest = table.fastest()[0]
        if latency_ms < fastest:
            raise ValueError(f"plan: --latency-ms {latency_ms:g} is below the fastest predicted plan "
                             f"({fastest:.3f} ms at this batch size and thread count)")
        budgets["latency_ms"] = latency_ms - table.base_ms
    if size_mb is not None:
        smallest = (table.base_bytes + min_total(table.bytes)) / 1e6
        if size_mb < smallest:
            raise ValueError(f"plan: --size-mb {size_mb:g} is below the smallest plan ({smallest:.4f} MB)")
        budgets["bytes"] = size_mb * 1e6 - table.base_bytes
    ch = solve(value, costs, budgets, "plan", pairs={"latency_ms": table.pair_terms()})
    picks = {n: str(c) for n, c in ch.picks.items()}
    ms, by = table.predict(picks)
    return picks, {"latency_ms": ms, "bytes": by, "loss": ch.objective}


def _within(tables: Sequence[CostTable], sens, latency_ms: float, size_mb: Optional[float]) -> list:
    """(predicted loss, picks, ms) of every graph timed for ``tables`` that met both budgets."""
    return [(sum(sens[n][c] for n, c in p.items()), p, ms) for t in tables for p, ms, b in t.measured
            if ms <= latency_ms and (size_mb is None or b <= size_mb * 1e6) and all(c in sens[n] for n, c in p.items())]


def make_plan(model: nn.Module, calib: Any, example: tuple, feed: Sequence[np.ndarray], *,
              latency_ms: Optional[float] = None, size_mb: Optional[float] = None,
              candidates: Sequence[str] = ("fp32", "int8"), pipeline: str = "rtn", adaquant_iters: int = 200,
              threads: int = 1, rounds: int = 7, input_names: Optional[Sequence[str]] = None,
              layers: Optional[Sequence[str]] = None, table: Optional[CostTable] = None,
              sens: Optional[dict[str, dict[str, float]]] = None, refine_tol: float = 0.10, max_rounds: int = 3,
              cache: bool = True, clock: str = "wall", compare_uniform: bool = True) -> PlanResult:
    """Plan ``model`` under ``latency_ms`` (per batch ``feed``, ``threads`` ORT threads) and ``size_mb`` (ONNX MB).

    ``calib``: calibration data (what ``thrifty.quant.quantize`` takes); ``example``: example inputs for the
    export. ``table``/``sens``: reuse a measured cost table / sensitivities (a budget sweep measures once).
    ``refine_tol``, ``max_rounds``: the correction loop (module doc; ``max_rounds=1`` measures the first plan
    only). ``clock``: see :func:`thrifty.plan.timing.time_graphs`. ``compare_uniform``: also measure each uniform
    choice (every layer at one candidate) predicted to fit, so the plan is never less accurate on the calibration
    loss than a uniform choice within the budgets. The user's model is not modified. ValueError
    when a budget is below what any plan reaches.
    """
    for name, v in (("latency_ms", latency_ms), ("size_mb", size_mb)):
        if v is not None and not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
            raise ValueError(f"plan: {name} must be a positive number, got {v!r}")
    if not isinstance(max_rounds, int) or max_rounds < 1:
        raise ValueError(f"plan: max_rounds must be a positive integer, got {max_rounds!r}")
    Plan({}, pipeline, adaquant_iters)  # validates pipeline and iterations before any work
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # per-layer PTQ runs warn that the other layers stay FP32: on purpose
        layers = list(layers) if layers is not None else plan_layers(model, calib)
        if table is None:
            table = measure_costs(model, calib, example, feed, layers, candidates, threads=threads, rounds=rounds,
                                  input_names=input_names, cache=cache, clock=clock)
            timings["costs"] = time.perf_counter() - t0
        if sens is None:
            t = time.perf_counter()
            sens = sensitivities(model, calib, layers, candidates, pipeline, adaquant_iters)
            timings["sensitivities"] = time.perf_counter() - t
        t = time.perf_counter()
        fp32 = deploy_graphs(model, [{}], calib, example, input_names)[0]
        log: list[dict[str, Any]] = []
        done: dict[str, tuple] = {}  # picks -> (graph, quantized model) of every plan measured
        model_k, what = table, "cost table"
        tighten = 1.0  # the latency budget the ILP is given, relative to the user's (below)
        for _ in range(max_rounds):
            try:
                # a cut never goes below the fastest predicted plan (nor turns the user's budget feasible)
                budget = None if latency_ms is None else \
                    max(latency_ms * tighten, min(latency_ms, model_k.fastest()[0]))
                picks, pred = _solve(sens, model_k, budget, size_mb)
            except ValueError as e:  # the prediction says no plan fits; a measured graph may still (below)
                if latency_ms is None or not (log or _within([table], sens, latency_ms, size_mb)):
                    raise
                log.append({"reference": what, "infeasible": str(e)})
                break
            k = repr(sorted(picks.items()))
            if k in done:  # the corrected model picks a plan measured already
                break
            plan = plan_from_picks(picks, pipeline, adaquant_iters)
            meas, graph, res = _measure(model, plan, calib, example, feed, threads, rounds, input_names, fp32,
                                        table.base_ms, clock)
            done[k] = (graph, res)
            err = (pred["latency_ms"] - meas["latency_ms"]) / meas["latency_ms"]
            log.append({"reference": what, "picks": picks, "predicted": pred, "measured": meas,
                        "latency_rel_error": err})
            fits = (latency_ms is None or meas["latency_ms"] <= latency_ms) and \
                (size_mb is None or meas["bytes"] <= size_mb * 1e6)
            if abs(err) <= refine_tol and fits:  # a plan off budget is refined even when predicted well
                break
            plans = [(r["picks"], r["measured"]["latency_ms"]) for r in log if "measured" in r]
            model_k = refit(table, plans, weight=max(10, len(table.measured)))
            what = f"refitted to {len(plans)} measured plan(s)"
            if latency_ms is not None and meas["latency_ms"] > latency_ms:
                # the refit passes through the plans measured, yet a new mix can miss the same way (a partly
                # quantized graph has costs no pairwise term holds): the next solve also gets the budget cut by
                # this plan's overrun, so the measured latency is driven under the budget
                tighten *= latency_ms / meas["latency_ms"]
                what += f", budget x{tighten:.3g}"
        if compare_uniform:  # the additive loss can misjudge a uniform choice: measure those predicted to fit
            for c in candidates:
                picks = {n: c if c in sens[n] else "fp32" for n in layers}
                ms, by = table.predict(picks)
                if repr(sorted(picks.items())) in done or (latency_ms is not None and ms > latency_ms * (1 + refine_tol)) \
                        or (size_mb is not None and by > size_mb * 1e6):  # bytes are predicted exactly
                    continue
                plan = plan_from_picks(picks, pipeline, adaquant_iters)
                meas, graph, res = _measure(model, plan, calib, example, feed, threads, rounds, input_names, fp32,
                                            table.base_ms, clock)
                done[repr(sorted(picks.items()))] = (graph, res)
                pred = {"latency_ms": ms, "bytes": by, "loss": sum(sens[n][p] for n, p in picks.items())}
                log.append({"reference": f"uniform {c}", "picks": picks, "predicted": pred, "measured": meas,
                            "latency_rel_error": (ms - meas["latency_ms"]) / meas["latency_ms"]})
        fits = [r for r in log if "measured" in r and (latency_ms is None or r["measured"]["latency_ms"] <= latency_ms)
                and (size_mb is None or r["measured"]["bytes"] <= size_mb * 1e6)]
        if fits:  # the most accurate plan measured within the budgets (its calibration loss, measured jointly)
            best = min(fits, key=lambda r: (r["measured"]["loss"], r["measured"]["latency_ms"]))
        elif latency_ms is not None and (ok := _within([table], sens, latency_ms, size_mb)):
            # over budget (or none predicted within it): the most accurate graph *measured* within both budgets
            loss, chosen, ms = min(ok, key=lambda o: (o[0], o[2]))
            picks = {n: chosen.get(n, "fp32") for n in layers}
            pred = {"latency_ms": ms, "bytes": float(table.predict(picks)[1]), "loss": loss}
            plan = plan_from_picks(picks, pipeline, adaquant_iters)
            meas, graph, res = _measure(model, plan, calib, example, feed, threads, rounds, input_names, fp32,
                                        table.base_ms, clock)
            done[repr(sorted(picks.items()))] = (graph, res)
            best = {"reference": "measured graphs within budget", "picks": picks, "predicted": pred,
                    "measured": meas, "latency_rel_error": (ms - meas["latency_ms"]) / meas["latency_ms"]}
            log.append(best)
        else:  # nothing measured meets the budgets: the last plan, reported as missing them
            best = [r for r in log if "measured" in r][-1]
        picks, pred, meas = best["picks"], best["predicted"], best["measured"]
        graph, res = done[repr(sorted(picks.items()))]
        plan = plan_from_picks(picks, pipeline, adaquant_iters)
        timings["solve, deploy, measure"] = time.perf_counter() - t
    return PlanResult(plan, picks, pred, meas, {"latency_ms": latency_ms, "size_mb": size_mb}, sens, table, graph,
                      None if res is None else res.model, log, timings)
