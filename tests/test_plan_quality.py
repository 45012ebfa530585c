"""The report's paired comparisons: per-sample scores, paired standard errors and the noise-aware targets."""
from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from thrifty.bench.accuracy import score_outputs
from thrifty.plan.quality import dominates, next_token_nll, paired_se, sample_scores, targets


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 6), st.integers(2, 7), st.integers(2, 9), st.integers(0, 2**31 - 1))
def test_row_nlls_average_to_the_overall_nll(n, t, v, seed):
    rng = np.random.default_rng(seed)
    logits, ids = rng.normal(size=(n, t, v)).astype(np.float32) * 3, rng.integers(0, v, (n, t))
    rows = next_token_nll(logits, ids, chunk=2, per_row=True)
    assert rows.shape == (n,) and rows.mean() == pytest.approx(next_token_nll(logits, ids), rel=1e-12)
    # brute force: one row, one position at a time
    for i in range(n):
        want = -np.mean([logits[i, j].astype(np.float64)[ids[i, j + 1]]
                         - math.log(np.exp(logits[i, j].astype(np.float64)).sum()) for j in range(t - 1)])
        assert rows[i] == pytest.approx(want, rel=1e-9, abs=1e-12)


def test_sample_scores_agree_with_the_benchmark_scorer():
    rng = np.random.default_rng(0)
    out, ref, labels = rng.normal(size=(40, 5)), rng.normal(size=(40, 5)), rng.integers(0, 5, 40)
    s = score_outputs(dict(enumerate(out)), labels, ref)
    v, hits = sample_scores(out, "top1", labels=labels)
    assert v == pytest.approx(s["top1"]) and set(np.unique(hits)) <= {0.0, 1.0}
    v, cos = sample_scores(out, "cosine", reference=ref)
    assert v == pytest.approx(s["cosine_mean"], rel=1e-6) and cos.min() == pytest.approx(s["cosine_min"], rel=1e-6)
    ids = rng.integers(0, 5, (4, 10))
    v, rows = sample_scores(rng.normal(size=(4, 10, 5)), "perplexity", ids=ids)
    assert v == pytest.approx(math.exp(rows.mean()))
    for metric, kw in (("top1", {}), ("cosine", {}), ("perplexity", {}), ("bleu", {"labels": labels})):
        with pytest.raises(ValueError, match=metric if metric == "bleu" else "needs"):
            sample_scores(out, metric, **kw)


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 2000))
def test_paired_se_of_one_disagreement_is_one_over_n(n):
    # one sample out of n flips: the difference is 1/n and its standard error is exactly 1/n, so a one-sample
    # accuracy difference is never beyond twice the noise
    a, b = np.ones(n), np.ones(n)
    b[n // 2] = 0.0
    assert paired_se(a, b, "top1") == pytest.approx(1.0 / n, rel=1e-9)


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 50), st.integers(0, 2**31 - 1), st.floats(-0.5, 0.5))
def test_paired_se_properties(n, seed, shift):
    rng = np.random.default_rng(seed)
    a, b = rng.normal(size=n), rng.normal(size=n)
    assert paired_se(a, b, "cosine") == pytest.approx(paired_se(b, a, "cosine"))
    assert paired_se(a, a, "cosine") == 0.0
    # a constant per-sample shift is a sure difference: no paired noise however noisy the samples are
    assert paired_se(a, a + shift, "cosine") == pytest.approx(0.0, abs=1e-12)
    # perplexity: the delta method, ppl times the standard error of the mean NLL difference
    ppl = 0.5 * (math.exp(a.mean()) + math.exp(b.mean()))
    assert paired_se(a, b, "perplexity") == pytest.approx(ppl * np.std(a - b, ddof=1) / math.sqrt(n))
    assert paired_se(a[:1], b[:1], "top1") == 0.0
    with pytest.raises(ValueError, match="one shape"):
        paired_se(a, b[:-1], "top1")


_pt = st.builds(lambda ms, noise, q: dict(name="x", latency_ms=ms, noise=noise, quality=q),
                st.floats(0.1, 100), st.floats(0, 0.05), st.floats(-10, 1))


@settings(max_examples=200, deadline=None)
@given(_pt, _pt, st.floats(0, 0.1))
def test_dominance_is_asymmetric_and_irreflexive(a, b, se):
    assert not (dominates(a, b, se) and dominates(b, a, se))
    assert not dominates(a, dict(a), se)
    # a copy of a point that is faster beyond the noise, at the same quality, dominates it
    fast = {**a, "latency_ms": a["latency_ms"] * (1 - 2 * a["noise"]) * 0.99}
    assert dominates(fast, a, se) and not dominates(a, fast, se)


def _report(plan_same_as=None, se=None):
    pts = [dict(name="int8", kind="uniform", latency_ms=3.563, noise=0.010, quality=-7.466800),
           dict(name="int7", kind="uniform", latency_ms=3.564, noise=0.011, quality=-7.466822),
           dict(name="plan (budget)", kind="planner", latency_ms=3.564, noise=0.011, quality=-7.466822,
                predicted_latency_ms=3.67, latency_rel_error=0.03, latency_budget_ms=4.5)]
    if plan_same_as:
        pts[-1]["same_as"] = plan_same_as
    rep = dict(points=pts)
    if se is not None:
        rep["quality_se"] = {"plan (budget)": {"int8": se, "int7": 0.0}}
    return rep


def test_targets_weigh_quality_differences_against_their_paired_noise():
    line = lambda rep: next(t for t in targets(rep) if "at least as good" in t)  # noqa: E731
    # int8 is 2e-5 perplexity better: without per-sample noise that counts, with a paired error of 1e-3 it does not
    assert line(_report()).endswith("no (int8: 3.563 vs 3.564 ms, -7.467 vs -7.467 ± 0)")
    assert line(_report(se=1e-3)).endswith(": yes")
    assert line(_report("int7", se=1e-3)).endswith("yes; the plan is the uniform int7 choice")
    assert line(_report(se=1e-6)).startswith("- at least as good") and "no (int8" in line(_report(se=1e-6))
    # a plan that is a copy of a uniform point does not dominate it
    dom = next(t for t in targets(_report("int7", se=1e-3)) if "dominates" in t)
    assert dom.endswith(": no")


def test_targets_judge_the_budgets_with_the_timing_noise_and_the_size_budget():
    def rep(ms, size_mb=None, int8_bytes=2e6):
        r = _report()
        plan = r["points"][-1]
        # predicted 3.67 at the table's scale, error +3 % at this run's: the budget 4.5 ms is 4.5 * ms / 3.563 here
        plan.update(latency_ms=ms, predicted_latency_ms=ms * 1.03, latency_budget_ms=4.5, bytes=1.5e6)
        r["points"][0]["bytes"] = int8_bytes
        r["budgets"] = {"latency_ms": 4.5, "size_mb": size_mb}
        return r

    line = lambda r, k: next(t for t in targets(r) if k in t)  # noqa: E731
    assert ": yes (" in line(rep(4.5), "latency budget")
    # the budget at this run's scale is 4.5 ms; 1 % over with ±1.1 % noise is no evidence of a miss, 3 % over is
    assert "over by 1.0%, within twice the timing noise (±1.1%)" in line(rep(4.545), "latency budget")
    assert ": no (" in line(rep(4.65), "latency budget")
    # without a size budget the faster int8 point beats the plan on quality (no paired noise stored); with one
    # that int8 exceeds, int8 is not a choice the user has
    assert "no (int8" in line(rep(4.4), "at least as good")
    assert line(rep(4.4, size_mb=1.6), "at least as good").endswith("within the size budget at the same or lower "
                                                                     "measured latency (beyond the noise): yes")
    assert "no (int8" in line(rep(4.4, size_mb=2.5), "at least as good")
    assert ": yes (1.5 MB of weights; budget 1.6 MB)" in line(rep(4.4, size_mb=1.6), "size budget")
    assert ": no (1.5 MB" in line(rep(4.4, size_mb=1.4), "size budget")
