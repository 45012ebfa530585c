"""Plans that mix per-layer candidates (int8, int7, W4 weight-only, FP32): one PTQ run with per-layer configs,
one ONNX export (QDQ int8, u8s8 int7, MatMulNBits W4), the cost table of the new candidates, the ILP with
several candidates per layer, and the YAML round trip."""
from __future__ import annotations

import json
import math
import warnings

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

from thrifty.core import from_yaml, to_yaml
from thrifty.plan.config import CANDIDATES, Plan, plan_from_picks, quantize_plan
from thrifty.plan.cost import deploy_graphs, measure_costs
from thrifty.plan.planner import deploy, make_plan
from thrifty.plan.solve import exhaustive, solve
from thrifty.quant import PTQ, QuantConfig, quantize
from tolerance import assert_within, gamma, unit_roundoff

MIX = {"0": "int7", "2": "w4", "4": "int8"}


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(32, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10)).eval()


def _meta(graph) -> dict:
    proto = onnx.load_from_string(graph) if isinstance(graph, bytes) else onnx.load(str(graph))
    return json.loads({p.key: p.value for p in proto.metadata_props}["thrifty.int8"])


def test_mixed_plan_yaml_round_trip_and_per_layer_configs(tmp_path):
    plan = plan_from_picks(MIX | {"6": "fp32"}, pipeline="adaquant", adaquant_iters=3)
    (tmp_path / "plan.yaml").write_text(to_yaml(plan))
    back = from_yaml((tmp_path / "plan.yaml").read_text())
    assert back == plan and back.layers["6"] is None
    assert back.layers["2"] == QuantConfig(w_bits=4, a_bits=None, group_size=32)
    assert back.layers["0"] == QuantConfig(w_bits=7, a_bits=8, w_symmetric=True)
    model, x = _mlp(), torch.randn(64, 32)
    res = quantize_plan(model, Plan({n: c for n, c in back.layers.items() if n != "6"}, "rtn"), x)
    # every layer exactly its own config: the first (int7) and last (int8) are not promoted to 8 bits
    assert res.bits == {"0": (7, 8), "2": (4, None), "4": (8, 8)}
    q = res.model
    assert q[0].slots.weight.symmetric and q[0].slots.weight.bits == 7 and q[0].slots.input.bits == 8
    assert q[2].slots.weight.group_size == 32 and q[2].slots.input is None
    assert not q[4].slots.weight.symmetric and q[4].slots.weight.group_size is None
    # the mix is one PTQ run: the loss is the mixed model's against the FP model's outputs
    assert res.final_loss > 0 and set(res.losses) == {"rtn"}
    # one shared config: the first and last layers keep it too (7 bits, not promoted), and the result records it
    res7 = quantize_plan(model, plan_from_picks({"0": "int7", "4": "int7"}), x)
    assert res7.bits == {"0": (7, 8), "4": (7, 8)} and (res7.config.w_bits, res7.config.w_symmetric) == (7, True)
    # a layer planned alone is its own first and last layer: its sensitivity is measured at its own bits
    assert quantize_plan(model, plan_from_picks({"2": "w4a8"}), x).bits == {"2": (4, 8)}
    with pytest.raises(ValueError, match="either filter= or layer_configs="):
        quantize(model, PTQ(pipeline="rtn"), x, filter=["0"], layer_configs={"0": QuantConfig()})
    with pytest.raises(TypeError, match="layer_configs values must be QuantConfigs"):
        quantize(model, PTQ(pipeline="rtn"), x, layer_configs={"0": 8})
    with pytest.raises(ValueError, match="does not combine with a budget"):
        quantize(model, PTQ(pipeline="rtn", budget=0.2), x, layer_configs={"0": QuantConfig()})
    assert CANDIDATES["w4"].accepts(nn.Linear(4, 4)) and not CANDIDATES["w4"].accepts(nn.Conv2d(1, 1, 1))


def _crossings(v: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    """1 where ``v`` lies within ``window`` of a rounding boundary (a half-integer), else 0: only there can two
    evaluations that differ by less than ``window`` round to different codes."""
    return ((v - torch.floor(v) - 0.5).abs() <= window).to(v.dtype)


@pytest.mark.numeric
@pytest.mark.parametrize("pipeline", ["rtn", "adaquant"])
def test_mixed_plan_onnx_matches_simulated_model(tmp_path, pipeline):
    # int7 (u8s8 QDQ) -> ReLU -> w4 (MatMulNBits) -> ReLU -> int8 (QDQ), in one graph
    from thrifty.bench.backends import OrtBackend, TorchBackend, optimized_op_counts
    from thrifty.bench.export import export_onnx

    model, x = _mlp(1), torch.randn(256, 32)
    plan = plan_from_picks(MIX, pipeline, adaquant_iters=10)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res, path = deploy(model, plan, x[:64], (x[:2],), tmp_path / "mix.onnx", residual_calib=False)
    meta = _meta(path)
    assert meta["w4_layers"] == {"2": {"block_size": 32, "accuracy_level": 4, "source": "group quantizer"}}
    int7 = meta["weight_containers"]["0"]
    assert int7["container"] == "int8" and int7["max_abs_code"] <= 63  # u8s8 kernels, exact on any x86 CPU
    ops = optimized_op_counts(path)
    assert ops.get("MatMulNBits") == 1 and ops.get("QuantizeLinear") == 2, ops
    q = res.model
    sim = torch.as_tensor(TorchBackend(q)((x.numpy(),)))
    exact = export_onnx(q, (x[:2],), tmp_path / "mix0.onnx", w4_accuracy_level=0)
    # The bound, per sample and output, in float64. Two float evaluations of a GEMM differ by at most
    # 2 gamma(K + a few) |a| |W| (fl below). Besides:
    #  * a quantizer: two evaluations of its input that differ by e round to different codes only where the
    #    input lies within e (plus the division's roundings) of a rounding boundary; there the code moves by
    #    at most e / s + 1 steps, elsewhere not at all (the input x is the same on both sides: only roundings);
    #  * the int32 biases of the int8/int7 layers (export_onnx's int_bias) move each output by <= s_x s_w / 2;
    #  * MatMulNBits at accuracy_level 4 quantizes its input to int8 per block of 32, scale amax / 127: each
    #    element moves by <= amax / 254 (plus a few roundings); at level 0 it computes in float (no such term).
    d, u = torch.float64, unit_roundoff()
    W = [q[i].effective_weight().detach().to(d).abs() for i in (0, 2, 4)]
    b = [q[i].bias.detach().to(d).abs() for i in (0, 2, 4)]
    (s0, z0), (s4, z4) = ((float(q[i].slots.input.scale), float(q[i].slots.input.zero_point)) for i in (0, 4))
    sw0, sw4 = (q[i].slots.weight.scale.detach().to(d).reshape(-1) for i in (0, 4))
    with torch.no_grad():
        h0 = q[1](q[0](x)).to(d)
        h1 = q[3](q[2](q[1](q[0](x)))).to(d)

    def fl(a, w, k, extra=4):  # two float evaluations of a @ w.T + b
        return 2 * gamma(k + extra) * (a @ w.T)

    v0 = x.to(d) / s0 + z0
    e0 = s0 * _crossings(v0, 8 * u * v0.abs() + 1e-12) @ W[0].T + s0 * sw0 / 2 \
        + fl(x.to(d).abs() + s0, W[0], 32) + 2 * gamma(4) * b[0]
    for level, graph in ((4, path), (0, exact)):
        ort = torch.as_tensor(OrtBackend(graph, threads=1)((x.numpy(),)))
        top = (h0 + e0).reshape(len(x), 4, 32).amax(-1, keepdim=True)  # |h0| per block, ORT's side included
        qa = (top * (1 / 254 + 4 * u)).expand(-1, -1, 32).reshape(len(x), 128) if level else 0 * h0
        e1 = (e0 + qa) @ W[1].T + fl(h0 + e0 + qa, W[1], 128, extra=4 + 8) + 2 * gamma(4) * b[1]
        v4 = h1 / s4 + z4
        m4 = _crossings(v4, e1 / s4 + 8 * u * v4.abs() + 1e-12)
        e2 = (m4 * (e1 + s4)) @ W[2].T + s4 * sw4 / 2 + fl(h1 + e1 + s4, W[2], 128) + 2 * gamma(4) * b[2]
        assert_within(ort, sim, e2, f"ORT mixed plan vs simulated ({pipeline}, MatMulNBits accuracy_level {level})")
        assert (ort.argmax(1) == sim.argmax(1)).double().mean() >= 0.95


def test_w4_export_refuses_blocks_matmulnbits_cannot_take(tmp_path):
    from thrifty.bench.export import export_onnx
    from thrifty.core import apply

    m = apply(nn.Sequential(nn.Linear(48, 8)), QuantConfig(w_bits=4, a_bits=None, group_size=24, w_estimator="minmax"))
    with pytest.raises(ValueError, match="layer '0': a 4-bit per-group weight quantizer deploys as MatMulNBits, "
                                         "whose block size must be a power of two >= 16; got group_size=24"):
        export_onnx(m, (torch.randn(2, 48),), tmp_path / "m.onnx")
    with pytest.raises(ValueError, match="w4_accuracy_level must be 0..4"):
        export_onnx(m, (torch.randn(2, 48),), tmp_path / "m.onnx", w4_accuracy_level=5)


class _ConvHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.fc1, self.fc2 = nn.Linear(8, 64), nn.Linear(64, 4)

    def forward(self, x):
        h = torch.relu(self.conv(x)).mean((2, 3))
        return self.fc2(torch.relu(self.fc1(h)))


def test_cost_table_measures_int7_and_w4(tmp_path, monkeypatch):
    monkeypatch.setenv("THRIFTY_CACHE", str(tmp_path))
    torch.manual_seed(0)
    model, x = _ConvHead().eval(), torch.randn(32, 1, 6, 6)
    cands = ("fp32", "int8", "int7", "w4")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = measure_costs(model, x, (x[:2],), (x[:4].numpy(),), ["conv", "fc1", "fc2"], cands, rounds=1,
                          min_ms=0.0, cache=False)
    assert set(t.latency_ms["conv"]) == set(t.bytes["conv"]) == {"fp32", "int8", "int7"}  # W4: Linear only
    for n, (o, k) in {"fc1": (64, 8), "fc2": (4, 64)}.items():
        assert set(t.latency_ms[n]) == set(cands) and all(math.isfinite(v) for v in t.latency_ms[n].values())
        nb = -(-k // 32)  # MatMulNBits: 16 bytes of codes, a float32 scale per block, zero points 2 per byte
        assert t.bytes[n]["w4"] == -4 * o * k + o * nb * 16 + 4 * o * nb + o * -(-nb // 2)
    for n in t.layers:  # int7 stores its codes in the same int8 container as int8
        assert t.bytes[n]["int7"] == t.bytes[n]["int8"] < 0
    for c in ("int7", "w4"):  # stored bytes add up exactly per layer
        add = t.additivity[f"all {c}"]
        assert add["predicted_bytes"] == add["measured_bytes"], (c, add)
    assert {c for d in t.pairs.values() for c in d} <= {"int8", "int7", "w4"} and "w4" in t.pairs.get("fc1|fc2", {})
    # the graphs timed: int7 in the u8s8 container, W4 as MatMulNBits
    g7, g4 = deploy_graphs(model, [{"fc1": "int7"}, {"fc1": "w4", "fc2": "w4"}], x, (x[:2],))
    assert _meta(g7)["weight_containers"]["fc1"]["container"] == "int8"
    assert set(_meta(g4)["w4_layers"]) == {"fc1", "fc2"}
    # int7 and int8 share latency terms exactly when their every-layer graphs have one structure (the int8
    # layout this machine's export picks decides); W4 (MatMulNBits) is never anyone's twin
    from thrifty.plan.cost import _facts

    every = [{n: c for n in ("conv", "fc1", "fc2")} for c in ("int8", "int7")]
    same = len({_facts(g)[1] for g in deploy_graphs(model, every, x, (x[:2],))}) == 1
    assert t.twins == ({"int7": "int8"} if same else {})
    if same:
        off = t.twin_offset["int7"]  # one term per layer for both, int7's plus one offset
        assert all(t.latency_ms[n]["int7"] - t.latency_ms[n]["int8"] == pytest.approx(off) for n in t.layers)


def test_planner_mixes_candidates_under_a_size_budget(tmp_path, monkeypatch):
    monkeypatch.setenv("THRIFTY_CACHE", str(tmp_path))
    model, x = _mlp(2), torch.randn(64, 32)
    fp = sum(p.numel() * 4 for p in model.parameters())
    # below all-int8 (~1 byte per weight): only W4 (~0.6 byte per weight) on some layers fits
    size_mb = 0.85 * fp / 4 / 1e6
    r = make_plan(model, x, (x[:2],), (x[:16].numpy(),), size_mb=size_mb, candidates=("fp32", "int8", "int7", "w4"),
                  rounds=1, refine_tol=float("inf"))
    assert r.measured["bytes"] <= size_mb * 1e6 and "w4" in r.picks.values()
    ref = exhaustive({n: r.sensitivity[n] for n in r.table.layers}, {"b": r.table.bytes},
                     {"b": size_mb * 1e6 - r.table.base_bytes})
    assert r.predicted["loss"] == pytest.approx(ref.objective, rel=1e-9, abs=1e-15)
    assert r.predicted["bytes"] == r.measured["bytes"]  # stored bytes: exact per layer
    assert from_yaml(r.plan.to_yaml()) == r.plan


# ------------------------------------------------------------------------------------ the ILP, 3-4 candidates
@st.composite
def _mixed_instances(draw):
    n = draw(st.integers(1, 5))
    layers = [f"l{i}" for i in range(n)]
    num = st.floats(-4, 4, allow_nan=False, width=32).map(lambda v: round(v, 3))
    # fp32 everywhere; int8/int7 on most layers; w4 only on some (Linear), as a real table has them
    avail = {l: ["fp32"] + [c for c in ("int8", "int7", "w4") if draw(st.booleans())] for l in layers}
    value = {l: {c: 0.0 if c == "fp32" else abs(draw(num)) for c in cs} for l, cs in avail.items()}
    costs = {r: {l: {c: 0.0 if c == "fp32" else draw(num) for c in cs} for l, cs in avail.items()}
             for r in ("ms", "bytes")}
    edges = [(a, b) for a, b in zip(layers, layers[1:]) if draw(st.booleans())]
    pairs = {"ms": {(a, b): {(c, c): draw(num) for c in set(avail[a]) & set(avail[b]) - {"fp32"}}
                    for a, b in edges}}
    budgets = {r: sum(min(v.values()) for v in costs[r].values()) + draw(st.floats(0, 6)) for r in costs}
    budgets["ms"] += sum(max(0.0, *d.values()) for d in pairs["ms"].values() if d)
    return value, costs, budgets, pairs


@settings(max_examples=80, deadline=None)
@given(_mixed_instances())
def test_ilp_matches_exhaustive_search_with_four_candidates(inst):
    value, costs, budgets, pairs = inst
    pairs = {"ms": {e: d for e, d in pairs["ms"].items() if d}}
    try:
        ref = exhaustive(value, costs, budgets, pairs=pairs)
    except ValueError:
        with pytest.raises(ValueError, match="no choice meets every budget|is infeasible"):
            solve(value, costs, budgets, pairs=pairs)
        return
    got = solve(value, costs, budgets, pairs=pairs)
    assert got.objective == pytest.approx(ref.objective, abs=1e-9 * 4 * (len(value) + 4))
    assert all(got.picks[n] in value[n] for n in value)  # a candidate a layer lacks is never picked
    for r, b in budgets.items():
        assert got.costs[r] <= b + 1e-6 * max(1.0, abs(b))


def test_tiny_transformer_mixed_plan_deploys_each_layer_as_planned(tmp_path):
    # a ViT block with every candidate: the conv patch embedding cannot take W4 (Linear only); one export holds
    # QDQ int8/int7 layers and MatMulNBits W4 layers, and ONNX Runtime keeps them through its optimiser
    from thrifty.bench.backends import OrtBackend, optimized_op_counts
    from thrifty.models.vit import ViT

    torch.manual_seed(0)
    model, x = ViT(img_size=8, patch_size=4, dim=32, depth=1, heads=2).eval(), torch.randn(8, 1, 8, 8)
    layers = ["patch_embed", "blocks.0.attn.qkv", "blocks.0.attn.proj", "blocks.0.mlp.fc1", "blocks.0.mlp.fc2", "head"]
    mods = dict(model.named_modules())
    assert [n for n in layers if not CANDIDATES["w4"].accepts(mods[n])] == ["patch_embed"]
    picks = {n: "int8" for n in layers} | {"blocks.0.attn.qkv": "int7", "blocks.0.mlp.fc1": "w4",
                                           "blocks.0.mlp.fc2": "w4", "blocks.0.attn.proj": "fp32"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res, path = deploy(model, plan_from_picks(picks), x, (x[:2],), tmp_path / "vit.onnx")
    meta = _meta(path)
    assert set(meta["w4_layers"]) == {"blocks.0.mlp.fc1", "blocks.0.mlp.fc2"}
    assert set(meta["weight_containers"]) == {n for n, c in picks.items() if c in ("int8", "int7")}
    assert meta["weight_containers"]["blocks.0.attn.qkv"]["container"] == "int8"  # 7-bit: u8s8 anywhere
    ops = optimized_op_counts(path)
    assert ops.get("MatMulNBits") == 2, ops
    out = OrtBackend(path, threads=1)((x.numpy(),))
    assert out.shape == (8, 10) and np.isfinite(out).all()


def test_cli_plan_help_names_every_registered_candidate():
    from thrifty.cli import build_parser
    from thrifty.plan.config import CANDIDATES

    sub = next(a for a in build_parser()._actions if getattr(a, "choices", None) and "plan" in a.choices)
    text = " ".join(sub.choices["plan"].format_help().split())
    listed = text.split("comma list of per-layer candidates:")[1].split("(thrifty.plan.CANDIDATES")[0]
    assert {c.strip() for c in listed.split(",")} == set(CANDIDATES)
