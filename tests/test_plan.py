"""thrifty.plan: the multiple-choice ILP against exhaustive search, the Plan config, the measured cost table
and its cache, and the deployed plan against thrifty's simulated model."""
from __future__ import annotations

import copy
import json
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

import thrifty
from thrifty.core import from_yaml, to_yaml
from thrifty.plan import cost as cost_mod
from thrifty.plan.config import Plan, plan_from_picks, quantize_plan
from thrifty.plan.cost import CostTable, cache_path, measure_costs, refit
from thrifty.plan.planner import deploy, make_plan
from thrifty.plan.report import pareto_front
from thrifty.plan.solve import exhaustive, min_total, solve
from thrifty.quant import QuantConfig
from thrifty.sparse import NM


# ------------------------------------------------------------------------------------------------ the ILP
@st.composite
def _instances(draw):
    n = draw(st.integers(1, 5))
    k = draw(st.integers(1, 3))
    num = st.floats(-4, 4, allow_nan=False, width=32).map(lambda v: round(v, 3))
    layers = [f"l{i}" for i in range(n)]
    cands = [f"c{j}" for j in range(k)]
    value = {l: {c: abs(draw(num)) for c in cands} for l in layers}
    resources = draw(st.lists(st.sampled_from(["ms", "bytes"]), min_size=1, max_size=2, unique=True))
    costs = {r: {l: {c: draw(num) for c in cands} for l in layers} for r in resources}
    budgets = {}
    for r in resources:
        lo = min_total(costs[r])
        hi = float(sum(max(v.values()) for v in costs[r].values()))
        budgets[r] = lo + draw(st.floats(0, 1)) * (hi - lo)  # each budget alone is reachable
    return value, costs, budgets


@st.composite
def _pair_instances(draw):
    value, costs, budgets = draw(_instances())
    num = st.floats(-4, 4, allow_nan=False, width=32).map(lambda v: round(v, 3))
    layers = list(value)
    edges = draw(st.lists(st.tuples(st.sampled_from(layers), st.sampled_from(layers)).filter(lambda e: e[0] != e[1]),
                          max_size=4, unique=True)) if len(layers) > 1 else []
    def terms(a, b):
        combos = [(ca, cb) for ca in value[a] for cb in value[b]]
        keep = draw(st.lists(st.sampled_from(combos), min_size=1, max_size=len(combos), unique=True))
        return {k: draw(num) for k in keep}
    pairs = {r: {e: terms(*e) for e in edges} for r in costs}
    value_pairs = {e: {k: abs(v) for k, v in terms(*e).items()} for e in edges if draw(st.booleans())}
    for r in budgets:  # widen the budgets by what the pair terms can add, so that many instances are feasible
        budgets[r] += draw(st.floats(0, 1)) * sum(max(0.0, *d.values()) for d in pairs[r].values())
    return value, costs, budgets, pairs, value_pairs


@settings(max_examples=80, deadline=None)
@given(_pair_instances())
def test_ilp_with_pair_terms_matches_exhaustive_search(inst):
    value, costs, budgets, pairs, value_pairs = inst
    try:
        ref = exhaustive(value, costs, budgets, pairs=pairs, value_pairs=value_pairs)
    except ValueError:
        with pytest.raises(ValueError, match="no choice meets every budget|is infeasible"):
            solve(value, costs, budgets, pairs=pairs, value_pairs=value_pairs)
        return
    got = solve(value, costs, budgets, pairs=pairs, value_pairs=value_pairs)
    scale = max(1.0, max(abs(v) for d in value.values() for v in d.values()))
    assert got.objective == pytest.approx(ref.objective, abs=1e-9 * scale * (len(value) + 4))
    for r, b in budgets.items():  # feasible, and the reported totals (pairs included) are the choice's own
        assert got.costs[r] <= b + 1e-6 * max(1.0, abs(b))
        own = sum(costs[r][n][c] for n, c in got.picks.items()) + sum(
            d.get((got.picks[a], got.picks[b2]), 0.0) for (a, b2), d in pairs[r].items())
        assert got.costs[r] == pytest.approx(own)


def test_ilp_pair_terms_by_hand():
    # two layers each 1 ms faster in int8 alone, but a boundary costs: int8 next to int8 saves 1.5 ms more
    value = {"a": {"fp32": 0.0, "int8": 0.2}, "b": {"fp32": 0.0, "int8": 0.1}}
    ms = {"a": {"fp32": 0.0, "int8": 0.5}, "b": {"fp32": 0.0, "int8": 0.5}}
    pair = {("a", "b"): {("int8", "int8"): -2.5}}
    # additive: nothing is faster than FP32; with the pair term only both together (-1.5 ms) meet -1
    with pytest.raises(ValueError, match="infeasible"):
        solve(value, {"ms": ms}, {"ms": -1.0})
    got = solve(value, {"ms": ms}, {"ms": -1.0}, pairs={"ms": pair})
    assert got.picks == {"a": "int8", "b": "int8"} and got.costs["ms"] == pytest.approx(-1.5)
    with pytest.raises(ValueError, match="pair term \\('a', 'c'\\) needs two different known layers"):
        solve(value, {"ms": ms}, {"ms": 0.0}, pairs={"ms": {("a", "c"): {("int8", "int8"): 1.0}}})
    with pytest.raises(ValueError, match="names candidates \\('int8', 'w4'\\)"):
        solve(value, {"ms": ms}, {"ms": 0.0}, pairs={"ms": {("a", "b"): {("int8", "w4"): 1.0}}})
    with pytest.raises(ValueError, match="pair terms for \\['bytes'\\] have no cost table"):
        solve(value, {"ms": ms}, {"ms": 0.0}, pairs={"bytes": pair})


@settings(max_examples=80, deadline=None)
@given(_instances())
def test_ilp_matches_exhaustive_search(inst):
    value, costs, budgets = inst
    try:
        ref = exhaustive(value, costs, budgets)
    except ValueError:  # budgets reachable one at a time but not together: the ILP must say so too
        with pytest.raises(ValueError, match="no choice meets every budget"):
            solve(value, costs, budgets)
        return
    got = solve(value, costs, budgets)
    scale = max(1.0, max(abs(v) for d in value.values() for v in d.values()))
    assert got.objective == pytest.approx(ref.objective, abs=1e-9 * scale * len(value))
    for r, b in budgets.items():  # the ILP's choice is feasible and its reported totals are its own
        assert got.costs[r] <= b + 1e-6 * max(1.0, abs(b))
        assert got.costs[r] == pytest.approx(sum(costs[r][n][c] for n, c in got.picks.items()))


def test_ilp_edge_cases():
    value = {"a": {"fp32": 0.0, "int8": 0.5}, "b": {"fp32": 0.0, "int8": 0.5}}
    ms = {"a": {"fp32": 0.0, "int8": -1.0}, "b": {"fp32": 0.0, "int8": -1.0}}
    # ties: either layer may be quantized, the loss is the same
    assert solve(value, {"ms": ms}, {"ms": -1.0}).objective == pytest.approx(0.5)
    with pytest.raises(ValueError, match="ms budget -3 is infeasible; the smallest ms any choice reaches is -2"):
        solve(value, {"ms": ms}, {"ms": -3.0})
    with pytest.raises(ValueError, match="non-finite"):
        solve({"a": {"x": float("nan")}}, {"ms": {"a": {"x": 0.0}}}, {"ms": 1.0})
    with pytest.raises(ValueError, match="mismatched candidates"):
        solve({"a": {"x": 0.0, "y": 1.0}}, {"ms": {"a": {"x": 0.0}}}, {"ms": 1.0})
    with pytest.raises(ValueError, match="no layers"):
        solve({}, {"ms": {}}, {"ms": 1.0})
    with pytest.raises(ValueError, match="no cost table"):
        solve(value, {"ms": ms}, {"bytes": 1.0})
    # per-layer candidate sets may differ (a candidate a layer does not accept is simply absent)
    v2 = {"a": {"fp32": 0.0, "int8": 0.1}, "b": {"fp32": 0.0}}
    c2 = {"a": {"fp32": 0.0, "int8": -1.0}, "b": {"fp32": 0.0}}
    assert solve(v2, {"ms": c2}, {"ms": -0.5}).picks == {"a": "int8", "b": "fp32"}


def test_pareto_front_by_brute_force():
    rng = np.random.default_rng(0)
    pts = [{"name": str(i), "x": float(rng.integers(0, 5)), "y": float(rng.integers(0, 5))} for i in range(30)]
    front = set(pareto_front(pts, "x", "y"))
    for p in pts:
        dominated = any(q["x"] <= p["x"] and q["y"] >= p["y"] and (q["x"], q["y"]) != (p["x"], p["y"]) for q in pts)
        assert (p["name"] in front) == (not dominated)


# ------------------------------------------------------------------------------------------------ the Plan config
def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(32, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10)).eval()


def test_plan_yaml_round_trip_and_apply(tmp_path):
    plan = Plan({"0": QuantConfig(w_bits=8, a_bits=8), "2": NM(2, 4), "4": None}, pipeline="adaquant",
                adaquant_iters=5)
    text = to_yaml(plan)
    (tmp_path / "plan.yaml").write_text(text)
    back = from_yaml((tmp_path / "plan.yaml").read_text())
    assert back == plan and isinstance(back.layers["2"], NM) and back.layers["4"] is None
    m = thrifty.apply(_mlp(), back)
    assert type(m[0].slots.weight).__name__ == "UniformQuantizer"
    assert m[2].slots.weight is not None and m[4].slots.weight is None  # N:M mask; the FP32 layer untouched
    assert plan_from_picks({"0": "int8", "4": "fp32"}).layers == {"0": QuantConfig(w_bits=8, a_bits=8), "4": None}
    with pytest.raises(ValueError, match="unknown plan candidate 'int3'"):
        plan_from_picks({"0": "int3"})
    with pytest.raises(TypeError, match="layer '0' has int"):
        Plan({"0": 8})
    with pytest.raises(ValueError, match="pipeline"):
        Plan({}, pipeline="magic")
    with pytest.raises(ValueError, match="PTQ takes QuantConfig and SparseQuant layers; \\{'2': 'NM'\\} are not"):
        quantize_plan(_mlp(), plan, torch.randn(16, 32))
    with pytest.raises(ValueError, match="does not have"):
        quantize_plan(_mlp(), Plan({"fc9": QuantConfig()}), torch.randn(16, 32))


# ------------------------------------------------------------------------------------------------ costs and cache
def _fake_timer(ms_of):
    """A stand-in for time_graphs: ``ms_of(graph)`` per graph, consumed lazily like the real one."""
    def timer(graphs, *a, spread=False, each=None, **k):
        out = []
        for g in graphs:
            if each is not None:
                each(g)
            out.append(ms_of(g))
        return (out, [0.0] * len(out)) if spread else out
    return timer


def _fake_beside(ms_of):
    """A stand-in for time_beside: ``ms_of(graph)`` for ``ref`` and each graph."""
    timer = _fake_timer(ms_of)
    return lambda ref, graphs, *a, each=None, **k: timer([ref, *graphs], spread=True, each=each)


def test_cost_table_measures_bytes_and_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("THRIFTY_CACHE", str(tmp_path / "cache"))
    model, x = _mlp(), torch.randn(64, 32)
    before = copy.deepcopy(model.state_dict())
    layers = ["0", "2", "4"]
    t = measure_costs(model, x, (x[:2],), (x[:16].numpy(),), layers, threads=1, rounds=2)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the user's model untouched
    # int8 stores 1 byte per weight instead of 4 (plus per-channel scales/zero points and QDQ nodes)
    for n, (o, i) in {"0": (128, 32), "2": (128, 128), "4": (10, 128)}.items():
        assert t.latency_ms[n]["fp32"] == 0.0 and t.bytes[n]["fp32"] == 0.0
        assert -4 * o * i < t.bytes[n]["int8"] < -3 * o * i + 64 * o + 2048
    add = t.additivity["all int8"]  # stored bytes are each layer's own initializers: exactly additive
    assert add["predicted_bytes"] == add["measured_bytes"]
    p = cache_path(t.key)
    assert p.is_file() and json.loads(p.read_text())["key"] == t.key
    # the key names what the numbers depend on: the layer pairs measured and the method among them
    assert t.key["edges"] == [["0", "2"], ["2", "4"]] == t.edges
    assert t.key["method"] == "pairwise, two-sided, 3 mixes (seed 0), 3 anchors, twins tied with an offset"
    # 3 random mixes drawn; a draw that repeats a graph already timed is no held-out check, and of 3 layers in a
    # chain only {0, 4} is not timed anyway
    assert t.mix_check == {} or (t.mix_check["graphs"] == 1 and t.mix_check["max_abs_rel_error"] >= 0)
    assert set(t.pairs) == {"0|2", "2|4"} and t.noise >= 0.0
    assert len(t.load) == 2 and all(v >= 0 for v in t.load)  # the load it was measured under travels with it
    monkeypatch.setattr(cost_mod, "time_beside", lambda *a, **k: pytest.fail("a cached table was measured again"))
    again = measure_costs(model, x, (x[:2],), (x[:16].numpy(),), layers, threads=1, rounds=2)
    assert again == CostTable.from_json(p.read_text()) and again.latency_ms == t.latency_ms
    assert again.predict({"0": "int8", "2": "int8"}) == t.predict({"0": "int8", "2": "int8"})
    for other in ({"threads": 2}, {"pairwise": False}, {"check_additivity": False}, {"candidates": ("fp32", "w4a8")},
                  {"mixes": 0}, {"anchors": 1}, {"seed": 1}):
        with pytest.raises(pytest.fail.Exception):  # another thread count / method / candidates: another entry
            measure_costs(model, x, (x[:2],), (x[:16].numpy(),), layers, **({"threads": 1, "rounds": 2} | other))
    p.write_text("{not json")  # a corrupt entry is measured again, with a warning, and rewritten
    monkeypatch.setattr(cost_mod, "time_beside", _fake_beside(lambda g: 1.0))
    with pytest.warns(UserWarning, match="unreadable cost cache"):
        fresh = measure_costs(model, x, (x[:2],), (x[:16].numpy(),), layers, threads=1, rounds=2)
    assert fresh.base_ms == 1.0 and CostTable.from_json(p.read_text()).base_ms == 1.0
    with pytest.raises(ValueError, match="layers the model does not have: \\['fc'\\]"):
        measure_costs(model, x, (x[:2],), (x[:16].numpy(),), ["fc"])
    with pytest.raises(ValueError, match="include 'fp32'"):
        measure_costs(model, x, (x[:2],), (x[:16].numpy(),), layers, candidates=("int8",))


def test_time_graphs_ratios_groups_and_clocks():
    # graphs timed in groups (max_sessions) each with graph 0: every graph gets a latency and a spread, in order;
    # the same graph twice is the reference's latency up to noise (a ratio of medians of positive times)
    from thrifty.plan.cost import deploy_graphs, time_graphs

    x = torch.randn(8, 32)
    g = deploy_graphs(_mlp(), [{}], x, (x[:2],))[0]
    seen = []
    ms, se = time_graphs([g] * 5, (x.numpy(),), 1, rounds=3, max_sessions=2, spread=True, clock="cpu",
                         each=seen.append, min_ms=0.1)
    assert len(ms) == len(se) == len(seen) == 5 and all(m > 0 for m in ms) and all(s >= 0 for s in se)
    # time_beside: the reference in 3 anchor sessions, reported once; each() sees every graph once, ref first
    from thrifty.plan.timing import time_beside

    other = deploy_graphs(_mlp(), [{"0": "int8"}], x, (x[:2],))[0]
    seen.clear()
    ms, se = time_beside(g, [other, other], (x.numpy(),), 1, rounds=3, max_sessions=4, clock="cpu", min_ms=0.1,
                         each=seen.append)
    assert len(ms) == len(se) == 3 and seen == [g, other, other] and all(m > 0 for m in ms)
    with pytest.raises(ValueError, match="anchors must be >= 1"):
        time_beside(g, [other], (x.numpy(),), 1, anchors=0)
    with pytest.raises(ValueError, match="clock must be one of \\['cpu', 'wall'\\], got 'gpu'"):
        time_graphs([g], (x.numpy(),), 1, clock="gpu")
    with pytest.raises(ValueError, match="rounds must be >= 1"):
        time_graphs([g], (x.numpy(),), 1, rounds=0)


def test_time_graphs_cancels_slow_rounds_and_averages_anchor_sessions(monkeypatch):
    # Synthetic runtime: graph g takes true[g] ms times its round's slowdown (a shared machine's slow spell hits
    # every graph of a round) times its session's own speed (where its memory landed). With unbiased sessions
    # the slowdowns cancel exactly; with biased anchors a group's graphs move by the geometric mean of its
    # anchors' biases, not by one session's.
    import thrifty.bench.backends as backends_mod
    import thrifty.plan.timing as timing_mod
    from thrifty.plan.timing import time_graphs

    true = {b"a": 10.0, b"b": 8.0, b"c": 7.5, b"d": 12.0, b"e": 9.0}

    class Session:  # sessions of the anchor graph alternate 2 % fast and 2 % slow
        def __init__(self, g, threads=None):
            n = sum(c.g == g for c in created)
            self.g, self.bias = g, (1.02 if n % 2 else 1 / 1.02) if g == b"a" else 1.0
            created.append(self)

    def rounds(backends, feed, n, *a, seed=0, **k):
        slow = 1.0 + 0.5 * np.arange(n) / n + 0.3 * seed  # every round and group slower than the last
        return np.array([[true[b.g] * b.bias * s for s in slow] for b in backends])

    monkeypatch.setattr(backends_mod, "OrtBackend", Session)
    monkeypatch.setattr(timing_mod, "_round_times", rounds)
    created: list = []
    graphs = [b"a", b"a", b"b", b"c", b"d", b"e"]
    ms, se = time_graphs(graphs, (), 1, rounds=5, max_sessions=4, anchors=2, spread=True)
    assert len(created) == 2 * (2 + 2) and len(ms) == len(se) == 6  # 2 groups of 2 graphs beside the 2 anchors
    # each group's own slow-down cancels, and its two anchors' biases do (their geometric mean is 1): every graph
    # keeps its true ratio to the anchor graph
    ref = true[b"a"] * np.median([1 + 0.5 * r / 5 + 0.3 * k for r in range(5) for k in range(2)])
    assert ref / 1.02 <= min(ms[:2]) <= max(ms[:2]) <= ref * 1.02
    for g, m in zip(graphs[2:], ms[2:]):
        assert m == pytest.approx(true[g] / true[b"a"] * np.sqrt(ms[0] * ms[1]))
    # one anchor (group 0's session 2 % fast, group 1's 2 % slow): each session's luck lands on its whole group
    created.clear()
    one = time_graphs(graphs[1:], (), 1, rounds=5, max_sessions=3, anchors=1)
    r = [m / (true[g] / true[b"a"] * one[0]) for g, m in zip(graphs[2:], one[1:])]
    assert r[0] == pytest.approx(r[1]) and r[2] == pytest.approx(r[3]) and r[0] / r[2] == pytest.approx(1.02 ** 2)
    with pytest.raises(ValueError, match="anchors must be >= 1"):
        time_graphs(graphs, (), 1, anchors=0)


def test_cost_table_is_two_sided_on_an_interaction_model(monkeypatch):
    # A synthetic runtime where int8 layers save 2 ms each and every fp32<->int8 boundary costs 1.5 ms: the
    # additive model (pairwise=False) takes each layer's two-sided difference, by hand; the pairwise model is
    # exact on such a runtime (per layer plus per boundary), for every one of the 2^3 assignments.
    import itertools

    import thrifty.plan.graph as graph_mod

    layers = ["0", "2", "4"]

    def ms(picks: dict) -> float:
        seq = ["fp32"] + [picks.get(n, "fp32") for n in layers] + ["fp32"]
        return 10.0 - 2.0 * seq.count("int8") + 1.5 * sum(a != b for a, b in zip(seq, seq[1:]))

    fake = lambda m, picks, *a, **k: [json.dumps(dict(p)).encode() for p in picks]  # noqa: E731
    monkeypatch.setattr(cost_mod, "deploy_graphs", fake)
    monkeypatch.setattr(cost_mod, "iter_graphs", fake)
    monkeypatch.setattr(graph_mod, "layer_edges", lambda *a, **k: [("0", "2"), ("2", "4")])
    monkeypatch.setattr(cost_mod, "time_beside", _fake_beside(lambda g: ms(json.loads(g))))
    monkeypatch.setattr(cost_mod, "_facts", lambda g: (len(g), g.decode()))  # the fake graphs are not ONNX
    args = (_mlp(), torch.randn(8, 32), (torch.randn(2, 32),), (np.zeros((4, 32), np.float32),), layers)
    t = measure_costs(*args, cache=False, pairwise=False, mixes=0)  # no mixes: nothing refits the averages
    every = {n: "int8" for n in layers}
    for n in layers:
        lo = ms({n: "int8"}) - ms({})
        hi = ms(every) - ms(every | {n: "fp32"})
        assert t.latency_ms[n]["int8"] == pytest.approx(0.5 * (lo + hi))
    add = t.additivity["all int8"]
    assert add["measured_ms"] == ms(every) and add["one_sided_predicted_ms"] == pytest.approx(ms({}) + sum(
        ms({n: "int8"}) - ms({}) for n in layers))
    assert abs(add["latency_rel_error"]) < abs(add["one_sided_rel_error"])
    assert t.pairs == {} and t.key["method"] == "two-sided, 3 anchors, twins tied with an offset"
    pw = measure_costs(*args, cache=False)
    # the pair term of two int8 neighbours: both boundaries to FP32 (3 ms) replaced by none between them
    assert pw.pairs == {"0|2": {"int8": pytest.approx(-3.0)}, "2|4": {"int8": pytest.approx(-3.0)}}
    for combo in itertools.product(["fp32", "int8"], repeat=3):
        picks = dict(zip(layers, combo))
        assert pw.predict(picks)[0] == pytest.approx(ms(picks)), picks
    assert pw.additivity["all int8"]["latency_rel_error"] == pytest.approx(0.0, abs=1e-12)
    assert pw.fastest() == (pytest.approx(ms(every)), every)


def test_random_mixes_check_the_model_and_join_its_fit(monkeypatch):
    # Six layers in a chain on a runtime that is per layer plus per boundary (which the pairwise model is exact
    # on) plus a term no pair sees: 0.8 ms more once four or more layers are int8 (say, a cache that int8
    # weights stop overflowing). The mixes measure the error on graphs the model was not fitted to; fitted to
    # them too, it predicts the mixes better than before.
    import thrifty.plan.graph as graph_mod

    layers = [str(i) for i in range(6)]

    def exact(picks: dict) -> float:
        seq = ["fp32"] + [picks.get(n, "fp32") for n in layers] + ["fp32"]
        return 20.0 - 2.0 * seq.count("int8") + 1.5 * sum(a != b for a, b in zip(seq, seq[1:]))

    def ms(picks: dict) -> float:
        return exact(picks) + 0.8 * (sum(c == "int8" for c in picks.values()) >= 4)

    fake = lambda m, picks, *a, **k: [json.dumps(dict(p)).encode() for p in picks]  # noqa: E731
    monkeypatch.setattr(cost_mod, "deploy_graphs", fake)
    monkeypatch.setattr(cost_mod, "iter_graphs", fake)
    monkeypatch.setattr(graph_mod, "layer_edges", lambda *a, **k: list(zip(layers, layers[1:])))
    monkeypatch.setattr(cost_mod, "_facts", lambda g: (len(g), g.decode()))
    monkeypatch.setattr(cost_mod, "plan_from_picks", lambda q: q)
    args = (torch.nn.Sequential(*[torch.nn.Linear(4, 4) for _ in layers]), torch.randn(8, 4), (torch.randn(2, 4),),
            (np.zeros((4, 4), np.float32),), layers)
    monkeypatch.setattr(cost_mod, "time_beside", _fake_beside(lambda g: exact(json.loads(g))))
    t = measure_costs(*args, cache=False, mixes=12)
    assert t.mix_check["graphs"] >= 5 and t.mix_check["max_abs_rel_error"] == pytest.approx(0.0, abs=1e-9)
    monkeypatch.setattr(cost_mod, "time_beside", _fake_beside(lambda g: ms(json.loads(g))))
    none = measure_costs(*args, cache=False, mixes=0)
    t = measure_costs(*args, cache=False, mixes=12)
    assert none.mix_check == {} and "mixes" not in none.key["method"]
    mixes = [p for p, _, _ in t.measured if p not in [q for q, _, _ in none.measured]]
    assert len(mixes) == t.mix_check["graphs"] >= 5
    before = np.median([abs(none.predict(p)[0] - ms(p)) / ms(p) for p in mixes])
    after = np.median([abs(t.predict(p)[0] - ms(p)) / ms(p) for p in mixes])
    assert t.mix_check["median_abs_rel_error"] == pytest.approx(before) and before > 0.005 and after < before
    with pytest.raises(ValueError, match="mixes must be >= 0"):
        measure_costs(*args, cache=False, mixes=-1)


def test_twin_candidates_share_their_latency_terms(monkeypatch):
    # int7 and int8 deploy to graphs of one structure (only the codes' values differ); int7 saves 0.1 ms more
    # per layer (its all-zero weight zero points skip a correction) and the timings carry a per-graph error.
    # Untied, each candidate gets its own noisy estimate per layer, and the ILP would pick, layer by layer,
    # whichever came out faster; tied, each layer and pair has one term for both plus one offset per twin, and
    # refitting keeps that form.
    import itertools
    import zlib

    import thrifty.plan.graph as graph_mod

    layers = [str(i) for i in range(5)]

    def ms(picks: dict) -> float:
        seq = ["fp32"] + [picks.get(n, "fp32") for n in layers] + ["fp32"]
        quant = [c != "fp32" for c in seq]
        err = (zlib.crc32(json.dumps(sorted(picks.items())).encode()) % 1000) / 1000 - 0.5  # +-0.5 ms
        return 30.0 - 2.0 * sum(quant) - 0.1 * seq.count("int7") + 1.5 * sum(a != b for a, b in zip(quant, quant[1:])) \
            + 0.2 * err

    fake = lambda m, picks, *a, **k: [json.dumps(dict(p)).encode() for p in picks]  # noqa: E731
    monkeypatch.setattr(cost_mod, "deploy_graphs", fake)
    monkeypatch.setattr(cost_mod, "iter_graphs", fake)
    monkeypatch.setattr(graph_mod, "layer_edges", lambda *a, **k: list(zip(layers, layers[1:])))
    monkeypatch.setattr(cost_mod, "time_beside", _fake_beside(lambda g: ms(json.loads(g))))
    monkeypatch.setattr(cost_mod, "plan_from_picks", lambda q: q)
    args = (torch.nn.Sequential(*[torch.nn.Linear(4, 4) for _ in layers]), torch.randn(8, 4), (torch.randn(2, 4),),
            (np.zeros((4, 4), np.float32),), layers, ("fp32", "int8", "int7"))
    monkeypatch.setattr(cost_mod, "_facts", lambda g: (len(g), g.decode()))  # every graph its own structure
    apart = measure_costs(*args, cache=False)
    assert apart.twins == {} == apart.twin_offset
    assert len({round(apart.latency_ms[n]["int7"] - apart.latency_ms[n]["int8"], 9) for n in layers}) > 1
    monkeypatch.setattr(cost_mod, "_facts", lambda g: (len(g), g.decode().replace("int7", "int8")))
    t = measure_costs(*args, cache=False)
    off = t.twin_offset["int7"]
    assert t.twins == {"int7": "int8"} and off == pytest.approx(-0.1, abs=0.1)
    for n in layers:
        assert t.latency_ms[n]["int7"] - t.latency_ms[n]["int8"] == pytest.approx(off)
    for d in t.pairs.values():
        assert d["int7"] == d["int8"]
    for combo in itertools.product(["int8", "int7"], repeat=len(layers)):
        assert t.predict(dict(zip(layers, combo)))[0] == pytest.approx(
            t.predict(dict.fromkeys(layers, "int8"))[0] + off * combo.count("int7"))
    again = refit(t, [({"0": "int7", "1": "int8"}, 25.0)], weight=10)
    for n in layers:
        assert again.latency_ms[n]["int7"] - again.latency_ms[n]["int8"] == pytest.approx(again.twin_offset["int7"])


def test_mixed_pairs_share_the_boundary_of_candidates_that_quantize_inputs_alike(monkeypatch):
    # A runtime where int8 saves 2 ms, int7 2.5 ms, W4 weight-only 1 ms per layer, and each boundary between a
    # float-input layer (fp32, w4) and a u8-input one (int8, int7) costs 1.5 ms. Only same-candidate pairs are
    # timed; an int8 -> int7 pair crosses no boundary, which the derived mixed term (the mean of the two
    # measured ones) knows: the model is exact on all 4^3 assignments, and the ILP's fastest plan is the
    # exhaustive one.
    import itertools

    import thrifty.plan.graph as graph_mod
    from thrifty.plan.cost import pair_weights

    layers, cands = ["0", "2", "4"], ("fp32", "int8", "int7", "w4")
    save, quant_in = {"fp32": 0.0, "int8": 2.0, "int7": 2.5, "w4": 1.0}, {"int8", "int7"}

    def ms(picks: dict) -> float:
        seq = ["fp32"] + [picks.get(n, "fp32") for n in layers] + ["fp32"]
        return 10.0 - sum(save[c] for c in seq) + 1.5 * sum((a in quant_in) != (b in quant_in)
                                                             for a, b in zip(seq, seq[1:]))

    fake = lambda m, picks, *a, **k: [json.dumps(dict(p)).encode() for p in picks]  # noqa: E731
    monkeypatch.setattr(cost_mod, "deploy_graphs", fake)
    monkeypatch.setattr(cost_mod, "iter_graphs", fake)
    monkeypatch.setattr(graph_mod, "layer_edges", lambda *a, **k: [("0", "2"), ("2", "4")])
    monkeypatch.setattr(cost_mod, "time_beside", _fake_beside(lambda g: ms(json.loads(g))))
    monkeypatch.setattr(cost_mod, "_facts", lambda g: (len(g), g.decode()))
    t = measure_costs(_mlp(), torch.randn(8, 32), (torch.randn(2, 32),), (np.zeros((4, 32), np.float32),), layers,
                      candidates=cands, cache=False)
    assert t.pairs["0|2"] == {"int8": pytest.approx(-3.0), "int7": pytest.approx(-3.0), "w4": pytest.approx(0.0)}
    assert pair_weights(t.pairs["0|2"], "int8", "int7") == {"int8": 0.5, "int7": 0.5}
    assert pair_weights(t.pairs["0|2"], "int8", "w4") == {} == pair_weights(t.pairs["0|2"], "fp32", "int8")
    every = [dict(zip(layers, combo)) for combo in itertools.product(cands, repeat=3)]
    for picks in every:
        assert t.predict(picks)[0] == pytest.approx(ms(picks)), picks
    best = min(every, key=ms)
    assert t.fastest() == (pytest.approx(ms(best)), best)
    # the solver's form of the terms and predict() agree (the ILP optimises what predict() reports)
    terms = t.pair_terms()
    assert terms[("0", "2")][("int8", "int7")] == pytest.approx(-3.0) and ("int8", "w4") not in terms[("0", "2")]


# ------------------------------------------------------------------------------------------------ the planner
def test_planner_meets_size_budget_and_is_the_ilp_optimum(tmp_path, monkeypatch):
    monkeypatch.setenv("THRIFTY_CACHE", str(tmp_path / "cache"))
    model, x = _mlp(1), torch.randn(64, 32)
    fp_bytes = sum(p.numel() * 4 for p in model.parameters())
    # room for FP32 layer "2" only if both others are int8, or for layers "0" and "4" in FP32 alone
    size_mb = (fp_bytes - 0.8 * 128 * 128 * 3) / 1e6
    r = make_plan(model, x, (x[:2],), (x[:16].numpy(),), size_mb=size_mb, rounds=2, refine_tol=float("inf"),
                  compare_uniform=False)
    assert r.measured["bytes"] <= size_mb * 1e6 and r.picks["2"] == "int8"
    ref = exhaustive({n: r.sensitivity[n] for n in r.table.layers}, {"b": r.table.bytes},
                     {"b": size_mb * 1e6 - r.table.base_bytes})
    assert r.predicted["loss"] == pytest.approx(ref.objective, rel=1e-9, abs=1e-15)
    assert from_yaml(r.plan.to_yaml()) == r.plan
    assert abs(r.predicted["bytes"] - r.measured["bytes"]) <= 0.01 * r.measured["bytes"]
    assert r.measured["loss"] >= 0.0 and len(r.rounds) == 1
    with pytest.raises(ValueError, match="size-mb 0.001 is below the smallest plan"):
        make_plan(model, x, (x[:2],), (x[:16].numpy(),), size_mb=0.001, rounds=2, table=r.table,
                  sens=r.sensitivity, layers=r.table.layers)
    # a latency off the prediction: the model is refitted to the measured plans and the ILP solved again. Table:
    # each int8 layer saves 0.2 ms; "runtime": 0.1 ms (the int8 layers counted from the export's metadata), so
    # only all three layers meet 0.75 ms. Round 1 takes the two least sensitive (0.6 predicted, 0.8 measured);
    # each refit moves the savings of the layers measured towards 0.1 ms (the table's -0.2 ms is the prior), so
    # later rounds try other pairs (0.8 measured each) until all three are taken (at most the 3 pairs first).
    import dataclasses

    import onnx

    import thrifty.plan.planner as planner_mod

    def int8_layers(g: bytes) -> int:
        meta = {p.key: p.value for p in onnx.load_from_string(g).metadata_props}
        return json.loads(meta["thrifty.int8"])["quantized_layers"] if "thrifty.int8" in meta else 0

    monkeypatch.setattr(planner_mod, "time_beside", _fake_beside(lambda g: 1.0 - 0.1 * int8_layers(g)))
    flat = dataclasses.replace(r.table, base_ms=1.0, measured=[], pairs={},
                               latency_ms={n: {c: -0.2 * (c != "fp32") for c in d} for n, d in r.table.latency_ms.items()})
    r2 = make_plan(model, x, (x[:2],), (x[:16].numpy(),), latency_ms=0.75, rounds=2, table=flat,
                   sens=r.sensitivity, layers=r.table.layers, cache=False, max_rounds=5)
    refs = [d["reference"] for d in r2.rounds]
    assert 2 <= len(refs) <= 5 and refs[0] == "cost table"
    assert all(f.startswith(f"refitted to {i} measured plan(s)") for i, f in enumerate(refs[1:], 1))
    # every plan over the 0.75 ms budget also cuts the next solve's budget by its overrun
    cut = 1.0
    for d, f in zip(r2.rounds, refs[1:]):
        cut *= 0.75 / d["measured"]["latency_ms"]
        assert f.endswith(f", budget x{cut:.3g}")
    assert [sum(c == "int8" for c in d["picks"].values()) for d in r2.rounds] == [2] * (len(refs) - 1) + [3]
    first = r2.rounds[0]
    assert sum(c == "int8" for c in first["picks"].values()) == 2 and first["measured"]["latency_ms"] == pytest.approx(0.8)
    assert first["latency_rel_error"] == pytest.approx((0.6 - 0.8) / 0.8)
    assert r2.picks == {n: "int8" for n in r.table.layers} and r2.measured["latency_ms"] == pytest.approx(0.7)
    assert abs(r2.latency_error) <= 0.1
    with pytest.raises(ValueError, match="max_rounds must be a positive integer"):
        make_plan(model, x, (x[:2],), (x[:16].numpy(),), latency_ms=1.0, table=flat, sens=r.sensitivity,
                  layers=r.table.layers, max_rounds=0)
    # ... and when no measured plan meets the budget, the most accurate graph of the table within it is taken
    monkeypatch.setattr(planner_mod, "time_beside", _fake_beside(lambda g: 1.0))
    timed = dataclasses.replace(flat, measured=[({}, 1.0, 1), ({"2": "int8"}, 0.9, 1)])
    r3 = make_plan(model, x, (x[:2],), (x[:16].numpy(),), latency_ms=0.95, rounds=2, table=timed,
                   sens=r.sensitivity, layers=r.table.layers, cache=False)
    assert [d["reference"] for d in r3.rounds][-1] == "measured graphs within budget"
    assert r3.predicted["latency_ms"] == 0.9 and r3.picks == {"0": "fp32", "2": "int8", "4": "fp32"}
    # a budget the additive prediction calls infeasible, met by a graph that was measured: that graph is taken
    slow = dataclasses.replace(flat, latency_ms={n: {c: float(c != "fp32") for c in d} for n, d in flat.latency_ms.items()},
                               measured=[({}, 1.0, 1), ({n: "int8" for n in r.table.layers}, 0.5, 1)])
    r4 = make_plan(model, x, (x[:2],), (x[:16].numpy(),), latency_ms=0.8, rounds=2, table=slow,
                   sens=r.sensitivity, layers=r.table.layers, cache=False)
    assert [d["reference"] for d in r4.rounds] == ["cost table", "measured graphs within budget"]
    assert "infeasible" in r4.rounds[0] and set(r4.picks.values()) == {"int8"}
    with pytest.raises(ValueError, match="below the fastest predicted plan"):  # nothing measured fits either
        make_plan(model, x, (x[:2],), (x[:16].numpy(),), latency_ms=0.4, rounds=2, table=slow,
                  sens=r.sensitivity, layers=r.table.layers, cache=False)



def test_planner_keeps_a_uniform_choice_the_summed_losses_misjudge(tmp_path, monkeypatch):
    # Sensitivities that call layer "0" cheap at int7: the ILP mixes int7 into an otherwise int8 plan. Jointly
    # measured, the 7-bit layer costs more than its int8 version, so uniform int8 (also within the size budget,
    # which leaves no room for FP32) has the lower calibration loss and is kept.
    monkeypatch.setenv("THRIFTY_CACHE", str(tmp_path / "cache"))
    model, x = _mlp(1), torch.randn(64, 32)
    table = measure_costs(model, x, (x[:2],), (x[:16].numpy(),), ["0", "2", "4"], ("fp32", "int8", "int7"), rounds=2)
    sens = {n: {"fp32": 0.0, "int8": 1.0, "int7": 0.5 if n == "0" else 2.0} for n in table.layers}
    size_mb = table.predict({n: "int8" for n in table.layers})[1] * 1.0001 / 1e6
    kw = dict(size_mb=size_mb, candidates=("fp32", "int8", "int7"), rounds=2, table=table, sens=sens,
              layers=table.layers, cache=False, refine_tol=float("inf"))
    mixed = make_plan(model, x, (x[:2],), (x[:16].numpy(),), compare_uniform=False, **kw)
    assert mixed.picks == {"0": "int7", "2": "int8", "4": "int8"} and len(mixed.rounds) == 1
    r = make_plan(model, x, (x[:2],), (x[:16].numpy(),), **kw)
    refs = [d["reference"] for d in r.rounds]
    assert refs == ["cost table", "uniform int8", "uniform int7"]  # FP32 is over the size budget: not measured
    assert r.rounds[1]["measured"]["loss"] < r.rounds[0]["measured"]["loss"]
    assert r.picks == {n: "int8" for n in table.layers}
    assert r.measured["loss"] == min(d["measured"]["loss"] for d in r.rounds)
    assert r.measured["bytes"] <= size_mb * 1e6


def test_deployed_plan_matches_simulated_model(tmp_path):
    from tolerance import assert_within, forward_bound

    from thrifty.bench.backends import OrtBackend, TorchBackend, optimized_op_counts

    model, x = _mlp(2), torch.randn(256, 32)
    plan = plan_from_picks({"0": "int8", "2": "fp32", "4": "int8"})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res, path = deploy(model, plan, x[:64], (x[:2],), tmp_path / "plan.onnx", residual_calib=False)
    sim = TorchBackend(res.model)((x.numpy(),))
    ort = OrtBackend(path, threads=1)((x.numpy(),))
    # Same integer grids; float roundings may flip an input code of a quantized layer by one step. A flip of
    # layer 0's input moves h0 by at most s0 |W0| (row sums); ReLU and layer 2 (FP32) pass it on through |W2|;
    # layer 4's input code then moves by at most that plus one step s4, and its output by |W4| times that.
    W = [getattr(res.model[i], "effective_weight", lambda i=i: res.model[i].weight)().detach().abs().double()
         for i in (0, 2, 4)]
    s0, s4 = float(res.model[0].slots.input.scale), float(res.model[4].slots.input.scale)
    d0 = s0 * W[0].sum(1)
    d2 = W[1] @ d0
    flip = W[2] @ (d2 + s4)
    bound = flip.float() + forward_bound(model, torch.as_tensor(sim))
    assert_within(torch.as_tensor(ort), torch.as_tensor(sim), bound, "ORT plan vs simulated")
    assert (ort.argmax(1) == sim.argmax(1)).mean() >= 0.95
    # one activation quantizer per planned layer survives ORT's optimiser (which kernels run is the export's
    # business: a Gemm with a float bias is not fused to QGemm by ONNX Runtime 1.32)
    assert optimized_op_counts(path).get("QuantizeLinear") == 2


# ------------------------------------------------------------------------------------------------ the CLI
def test_cli_plan_writes_plan_onnx_and_report(tmp_path, monkeypatch, capsys):
    from thrifty.cli import main

    monkeypatch.setenv("THRIFTY_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "p"
    base = ["plan", "--model", "mlp", "--dataset", "digits", "--out", str(out)]
    assert main(base + ["--rounds", "1"]) == 2
    assert "give a budget: --latency-ms and/or --size-mb" in capsys.readouterr().err
    assert main(base + ["--size-mb", "1", "--candidates", "int8"]) == 2
    assert "--candidates must include fp32" in capsys.readouterr().err
    assert main(base + ["--size-mb", "0.2", "--batch", "8", "--rounds", "1", "--sweep", "0", "--max-samples", "64",
                        "--calib-per-class", "1", "--loadgen-s", "0", "--clock", "cpu", "--max-rounds", "1"]) == 0
    plan = from_yaml((out / "plan.yaml").read_text())
    assert isinstance(plan, Plan) and set(plan.layers) == {"fc1", "fc2", "head"} and plan.quantized()
    assert (out / "model.onnx").stat().st_size <= 0.2e6
    rep = json.loads((out / "report.json").read_text())
    names = {p["name"] for p in rep["points"]}
    assert {"fp32", "int8", "w4a8", "ort quantize_static", "plan (budget)"} <= names and rep["plan"]["meets_size"]
    assert set(rep["pareto_size"]) <= names and (out / "report.png").stat().st_size > 0
    assert "| plan (budget) | planner |" in (out / "report.md").read_text()
    # --clock and --max-rounds reach the planner: CPU-clock timings, one plan solved and measured (no refit
    # round), then the uniform choices that fit the size budget (int8; FP32 does not fit 0.2 MB)
    assert rep["clock"] == "cpu" and "(cpu clock)" in (out / "report.md").read_text()
    assert [r["reference"] for r in rep["plan"]["rounds"] if "measured" in r] == ["cost table", "uniform int8"]


def test_cli_plan_parses_clock_and_max_rounds(capsys):
    from thrifty.cli import build_parser

    base = ["plan", "--model", "mlp", "--size-mb", "1"]
    args = build_parser().parse_args(base)
    assert (args.clock, args.max_rounds) == ("wall", 3)  # the defaults of plan_report / make_plan
    args = build_parser().parse_args(base + ["--clock", "cpu", "--max-rounds", "5"])
    assert (args.clock, args.max_rounds) == ("cpu", 5)
    for bad, msg in ((["--clock", "gpu"], "invalid choice: 'gpu'"), (["--max-rounds", "0"], "--max-rounds"),
                     (["--max-rounds", "two"], "--max-rounds")):
        with pytest.raises(SystemExit) as e:  # argparse's usage error
            build_parser().parse_args(base + bad)
        assert e.value.code == 2 and msg in capsys.readouterr().err, bad


def test_sensitivities_are_measured_after_the_plans_pipeline():
    from thrifty.plan.planner import sensitivities

    model, x = _mlp(3), torch.randn(64, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rtn = sensitivities(model, x, ["0", "2"], ["fp32", "w4a8"], "rtn")
        ada = sensitivities(model, x, ["0", "2"], ["fp32", "w4a8"], "adaquant", adaquant_iters=20)
    for n in ("0", "2"):
        assert rtn[n]["fp32"] == ada[n]["fp32"] == 0.0 and rtn[n]["w4a8"] > 0.0
        # AdaQuant is kept only where it lowers the calibration loss (keep_if_better): never above RTN
        assert ada[n]["w4a8"] <= rtn[n]["w4a8"] * (1 + 1e-6)
    assert any(ada[n]["w4a8"] < rtn[n]["w4a8"] for n in ("0", "2"))  # and it does optimise something


def test_derived_graphs_match_a_direct_ptq_run():
    # a table's graphs come from one PTQ run with the FP32 layers' slots emptied: the same ONNX graph (node for
    # node, initializer sizes) as quantizing only those layers
    import onnx

    from thrifty.plan.cost import deploy_graphs
    from thrifty.plan.planner import deploy

    model, x = _mlp(4), torch.randn(64, 32)
    picks = {"0": "fp32", "2": "int8", "4": "fp32"}
    derived = onnx.load_from_string(deploy_graphs(model, [picks], x, (x[:2],), residual_calib=False)[0])
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, p = deploy(model, plan_from_picks(picks), x, (x[:2],), Path(d) / "m.onnx", residual_calib=False)
        direct = onnx.load(str(p))
    assert [n.op_type for n in derived.graph.node] == [n.op_type for n in direct.graph.node]
    assert sorted((i.name, tuple(i.dims)) for i in derived.graph.initializer) == \
        sorted((i.name, tuple(i.dims)) for i in direct.graph.initializer)


class _BNNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.c2, self.b2 = nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        x = torch.relu(self.b1(self.c1(x)))
        x = torch.relu(self.b2(self.c2(x)))
        return self.fc(x.mean((2, 3)))


def test_cost_bytes_are_additive_with_batchnorm(monkeypatch, tmp_path):
    # PTQ folds BatchNorms into the convs: every graph of a table must come from the folded copy, or each
    # layer's difference would also count removing all the BatchNorms (a regression: resnet20 predicted 15 kB
    # for a 306 kB all-int8 graph)
    monkeypatch.setenv("THRIFTY_CACHE", str(tmp_path))
    torch.manual_seed(0)
    model, x = _BNNet().eval(), torch.randn(32, 1, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = measure_costs(model, x, (x[:2],), (x[:4].numpy(),), ["c1", "c2", "fc"], rounds=1, cache=False)
    add = t.additivity["all int8"]
    # stored bytes (initializers) are exactly additive (the bug was off by both BatchNorms' bytes once per layer,
    # 1576 bytes here)
    assert add["predicted_bytes"] == add["measured_bytes"], add


def test_ort_quantize_static_baseline_fuses_every_gemm():
    # the comparison point is ORT's quantizer at its best: BatchNorms folded first, every conv/Gemm integer
    from thrifty.bench.backends import optimized_op_counts
    from thrifty.bench.export import export_onnx
    from thrifty.plan.report import ort_quantize_static

    torch.manual_seed(0)
    model, x = _BNNet().eval(), torch.randn(16, 1, 8, 8)
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        fp32 = export_onnx(model, (x[:2],), Path(d) / "m.onnx").read_bytes()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ops = optimized_op_counts(ort_quantize_static(fp32, [{"input_0": x[:8].numpy()}, {"input_0": x[8:].numpy()}]))
    assert ops.get("QLinearConv", 0) == 2 and ops.get("QGemm", 0) == 1 and "Conv" not in ops, ops
    assert "BatchNormalization" not in ops and ops.get("QuantizeLinear", 0) <= 2, ops  # no float BN between Q/DQ
