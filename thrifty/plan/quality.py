"""How the planner's report scores its points and decides, with the noise of both measures, which beats which.

Every point is scored on the same samples, so two points' qualities are compared *paired*: the standard error
of their difference comes from the per-sample differences (top-1 hits, cosines, per-row next-token NLL), and a
latency difference counts only beyond twice the timing noise. Without that, two copies of one graph (a plan
that is the uniform int7 choice) or two quantizations that differ in the fifth digit of a perplexity would be
ranked by chance.

Example:
    >>> a = dict(name="a", latency_ms=5.0, noise=0.01, quality=0.90)
    >>> b = dict(name="b", latency_ms=6.0, noise=0.01, quality=0.90)
    >>> dominates(a, b, se=0.0), dominates(b, a, se=0.0)
    (True, False)
"""
from __future__ import annotations

from typing import Any, Optional

import numpy as np

__all__ = ["METRICS", "next_token_nll", "sample_scores", "paired_se", "dominates", "targets"]

# metric name -> whether higher is better (the Pareto fronts' direction)
METRICS = {"top1": True, "cosine": True, "perplexity": False}


def next_token_nll(logits: np.ndarray, ids: np.ndarray, chunk: int = 32, per_row: bool = False):
    """Mean next-token negative log-likelihood (nats) of a causal LM's ``logits`` (``[n, T, V]``, or flattened to
    ``[n, T * V]``) on its own input ``ids`` (``[n, T]`` integer tokens): every ``T - 1`` prediction of every row,
    as :func:`thrifty.train.lm.nll` computes it in PyTorch. ``per_row``: the ``[n]`` row means instead (their
    mean is the overall one: every row has ``T - 1`` predictions).

    Example:
        >>> round(float(np.exp(next_token_nll(np.zeros((2, 5, 256), np.float32), np.zeros((2, 5), np.int64)))), 3)
        256.0
    """
    ids = np.asarray(ids)
    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer) or ids.shape[1] < 2:
        raise ValueError(f"next_token_nll: ids must be [n, T >= 2] integer tokens, got {ids.dtype} {ids.shape}")
    n, t = ids.shape
    if logits.size % (n * t):
        raise ValueError(f"next_token_nll: {logits.shape} logits do not split into {n} x {t} token positions")
    logits = logits.reshape(n, t, -1)
    if ids.max() >= logits.shape[2] or ids.min() < 0:
        raise ValueError(f"next_token_nll: token ids outside the {logits.shape[2]}-word vocabulary")
    rows = np.empty(n, np.float64)
    for i in range(0, n, chunk):
        z = logits[i:i + chunk, :-1].astype(np.float64)
        z -= z.max(-1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
        rows[i:i + chunk] = -np.take_along_axis(logp, ids[i:i + chunk, 1:, None], -1)[..., 0].mean(1)
    return rows if per_row else float(rows.mean())


def sample_scores(out: np.ndarray, metric: str, labels: Optional[np.ndarray] = None,
                  reference: Optional[np.ndarray] = None, ids: Optional[np.ndarray] = None
                  ) -> tuple[float, np.ndarray]:
    """``(metric value, per-sample scores)`` of outputs ``out`` (row i for sample i): top-1 hits against
    ``labels``, cosines to ``reference``, or per-row next-token NLL of ``ids`` (the value is then the
    perplexity, ``exp`` of their mean; otherwise the value is their mean).

    Example:
        >>> v, s = sample_scores(np.array([[0.1, 0.9], [0.8, 0.2]]), "top1", labels=np.array([1, 1]))
        >>> v, s.tolist()
        (0.5, [1.0, 0.0])
    """
    out = np.asarray(out)
    if metric == "perplexity":
        if ids is None:
            raise ValueError("sample_scores: perplexity needs the token ids")
        rows = next_token_nll(out, ids, per_row=True)
        return float(np.exp(rows.mean())), rows
    out = out.reshape(len(out), -1).astype(np.float64)
    if metric == "top1":
        if labels is None:
            raise ValueError("sample_scores: top1 needs class labels")
        s = (out.argmax(1) == np.asarray(labels)[: len(out)]).astype(np.float64)
    elif metric == "cosine":
        if reference is None:
            raise ValueError("sample_scores: cosine needs reference outputs")
        ref = np.asarray(reference, np.float64).reshape(len(reference), -1)[: len(out)]
        s = (out * ref).sum(1) / np.maximum(np.linalg.norm(out, axis=1) * np.linalg.norm(ref, axis=1), 1e-12)
    else:
        raise ValueError(f"sample_scores: metric must be one of {sorted(METRICS)}, got {metric!r}")
    return float(s.mean()), s


def paired_se(a: np.ndarray, b: np.ndarray, metric: str) -> float:
    """Standard error of the difference of two points' metric values from their per-sample scores on the same
    samples (:func:`sample_scores`); for perplexity by the delta method, ``ppl * se(mean NLL difference)``.

    Example:
        >>> round(paired_se(np.array([1.0, 1, 1, 1]), np.array([1.0, 1, 1, 0]), "top1"), 3)
        0.25
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired_se: need per-sample scores of one shape, got {a.shape} and {b.shape}")
    if len(a) < 2:
        return 0.0
    se = float(np.std(a - b, ddof=1) / np.sqrt(len(a)))
    if metric == "perplexity":
        se *= 0.5 * float(np.exp(a.mean()) + np.exp(b.mean()))
    return se


def _faster(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """``a`` runs faster than ``b`` by more than twice the larger timing noise."""
    return a["latency_ms"] < b["latency_ms"] * (1 - 2 * max(a.get("noise") or 0.0, b.get("noise") or 0.0))


def dominates(a: dict[str, Any], b: dict[str, Any], se: float = 0.0) -> bool:
    """``a`` beats ``b`` beyond the noise: not slower beyond the timing noise, not worse beyond twice the paired
    standard error ``se`` of the qualities, and faster or better beyond them. Points carry ``latency_ms``,
    ``noise`` (relative standard error) and ``quality`` (higher is better)."""
    better = lambda x, y: x["quality"] - y["quality"] > 2 * se  # noqa: E731
    return not _faster(b, a) and not better(b, a) and (_faster(a, b) or better(a, b))


def _se(report: dict[str, Any], a: str, b: str) -> float:
    se = report.get("quality_se", {})
    return float(se.get(a, {}).get(b, se.get(b, {}).get(a, 0.0)))


def targets(report: dict[str, Any]) -> list[str]:
    """The planner's targets checked on a report's points, as Markdown bullets: the chosen plan ("plan (budget)")
    within its latency budget (and its size budget, when the report has one: stored bytes, ``bytes``) and within
    10 % of its predicted latency when measured, no uniform point that is
    not slower beyond twice the timing noise being better beyond twice the paired standard error of the quality
    difference (the report's ``quality_se``; none stored: any quality difference counts), and some planner point
    that is not a copy of a uniform one (``same_as``) dominating some uniform point (no slower and no worse, and
    faster or better beyond the noise: :func:`dominates`).

        >>> pts = [dict(name="fp32", kind="uniform", latency_ms=10.0, noise=0.01, quality=0.99),
        ...        dict(name="int8", kind="uniform", latency_ms=6.0, noise=0.01, quality=0.95),
        ...        dict(name="w4a8", kind="uniform", latency_ms=6.9, noise=0.01, quality=0.985),
        ...        dict(name="plan (budget)", kind="planner", latency_ms=7.0, noise=0.01, quality=0.98,
        ...             predicted_latency_ms=7.2, latency_rel_error=0.03, latency_budget_ms=7.5),
        ...        dict(name="plan 1", kind="planner", latency_ms=5.5, noise=0.01, quality=0.96)]
        >>> print("\\n".join(targets(dict(points=pts))))
        - chosen plan within its latency budget when measured: yes (7 ms; budget 7.5 ms at the table's FP32 latency, 7.51 ms at this run's)
        - measured within 10 % of predicted: yes (+3.0%)
        - at least as good as every uniform point at the same or lower measured latency (beyond the noise): no (w4a8: 6.9 vs 7 ms, 0.985 vs 0.98 ± 0)
        - a planner point dominates a uniform one: yes (plan 1 over int8: 5.5 vs 6 ms, 0.96 vs 0.95)
    """
    sign = 1.0 if report.get("higher_is_better", True) else -1.0  # reports from before "quality" was stored
    pts = [{**p, "quality": p.get("quality", sign * p.get("accuracy", 0.0))} for p in report["points"]]
    plan = next((p for p in pts if p["name"] == "plan (budget)"), None)
    uniform = [p for p in pts if p["kind"] == "uniform"]
    out = []
    rivals = uniform
    if plan is not None and plan.get("latency_rel_error") is not None:
        budget = plan.get("latency_budget_ms")
        if budget:  # the budget is at the cost table's FP32 latency; this run's FP32 graph sets the scale
            scale = (1 + plan["latency_rel_error"]) * plan["latency_ms"] / plan["predicted_latency_ms"]
            ok = plan["latency_ms"] <= budget * scale
            verdict = "yes" if ok else "no"
            if not ok and plan["latency_ms"] <= budget * scale * (1 + 2 * (plan.get("noise") or 0.0)):
                # over by less than twice the timing noise of the measurement: no evidence that it misses
                verdict = (f"over by {_pct(plan['latency_ms'] / (budget * scale) - 1)[1:]}, within twice the "
                           f"timing noise (±{100 * plan['noise']:.1f}%)")
            out.append(f"- chosen plan within its latency budget when measured: {verdict} "
                       f"({plan['latency_ms']:.4g} ms; budget {budget:.4g} ms at the table's FP32 latency, "
                       f"{budget * scale:.4g} ms at this run's)")
        size_mb = (report.get("budgets") or {}).get("size_mb")
        if size_mb and plan.get("bytes") is not None:  # stored bytes: the same measure the planner budgets
            out.append(f"- chosen plan within its size budget: {'yes' if plan['bytes'] <= size_mb * 1e6 else 'no'} "
                       f"({plan['bytes'] / 1e6:.4g} MB of weights; budget {size_mb:.4g} MB)")
            # a uniform point over the size budget is not a choice the user has: it is left out of the comparison
            rivals = [u for u in uniform if u.get("bytes") is None or u["bytes"] <= size_mb * 1e6]
        err = plan["latency_rel_error"]
        out.append(f"- measured within 10 % of predicted: {'yes' if abs(err) <= 0.10 else 'no'} ({_pct(err)})")
        # the target is about quality: a uniform point that is not slower beyond the timing noise must not be
        # better beyond the paired noise (one only faster is the budget's business: the plan may use its slack)
        beat = [u for u in rivals if u["name"] != plan.get("same_as") and not _faster(plan, u)
                and u["quality"] - plan["quality"] > 2 * _se(report, u["name"], plan["name"])]
        why = "; ".join(f"{u['name']}: {u['latency_ms']:.4g} vs {plan['latency_ms']:.4g} ms, {u['quality']:.4g} vs "
                        f"{plan['quality']:.4g} ± {_se(report, u['name'], plan['name']):.2g}" for u in beat)
        same = f"; the plan is the uniform {plan['same_as']} choice" if plan.get("same_as") else ""
        within = " within the size budget" if size_mb else ""
        out.append(f"- at least as good as every uniform point{within} at the same or lower measured latency (beyond "
                   "the noise): " + ("yes" + same if not beat else f"no ({why})"))
    # a plan that is a copy of a uniform point adds nothing to the uniform choices: it does not count here
    names = {u["name"] for u in uniform}
    dom = [(p, u) for p in pts if p["kind"] == "planner" and p.get("same_as") not in names for u in uniform
           if p["latency_ms"] <= u["latency_ms"] and p["quality"] >= u["quality"]
           and dominates(p, u, _se(report, p["name"], u["name"]))]
    if dom:
        p, u = max(dom, key=lambda d: (d[1]["latency_ms"] - d[0]["latency_ms"]) / d[1]["latency_ms"])
        out.append(f"- a planner point dominates a uniform one: yes ({p['name']} over {u['name']}: "
                   f"{p['latency_ms']:.4g} vs {u['latency_ms']:.4g} ms, {p['quality']:.4g} vs {u['quality']:.4g})")
    else:
        out.append("- a planner point dominates a uniform one: no")
    return out


def _pct(v: Optional[float]) -> str:
    return "-" if v is None else f"{100 * v:+.1f}%"
