"""thrifty.plan on token inputs (a causal LM scored by perplexity, an encoder with input_ids + attention_mask
scored by cosine to FP32) and the cost table's residual calibration done once per table."""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn

from thrifty.bench.harness import Samples
from thrifty.plan.report import next_token_nll, pareto_front, plan_report

V, T = 16, 6  # vocabulary, tokens per window


class _TinyLM(nn.Module):
    """Token ids -> next-token logits [batch, T, V] (a causal LM's interface, without attention)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.fc1, self.fc2 = nn.Embedding(V, 8), nn.Linear(8, 32), nn.Linear(32, V)

    def forward(self, input_ids):
        return self.fc2(torch.relu(self.fc1(self.emb(input_ids))))


class _TinyEncoder(nn.Module):
    """(input_ids, attention_mask) -> a mean-pooled 8-d embedding over the unmasked tokens (MiniLM's interface)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.fc1, self.fc2 = nn.Embedding(V, 8), nn.Linear(8, 32), nn.Linear(32, 8)

    def forward(self, input_ids, attention_mask):
        h = self.fc2(torch.relu(self.fc1(self.emb(input_ids))))
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        return (h * m).sum(1) / m.sum(1).clamp_min(1.0)


def test_next_token_nll_matches_the_torch_nll():
    from thrifty.train.lm import nll

    torch.manual_seed(0)
    model = _TinyLM().eval()
    ids = torch.randint(0, V, (5, T))
    with torch.no_grad():
        logits = model(ids).numpy()
    # float32 log-softmax (torch) against float64 (numpy): a relative 1e-6 per term covers V = 16 terms' rounding
    assert next_token_nll(logits, ids.numpy(), chunk=2) == pytest.approx(nll(model, ids), rel=1e-5)
    # flattened [n, T * V] outputs (what the report's ONNX Runtime scoring gives) are the same numbers
    assert next_token_nll(logits.reshape(5, -1), ids.numpy()) == next_token_nll(logits, ids.numpy())
    with pytest.raises(ValueError, match="integer tokens"):
        next_token_nll(logits, ids.numpy().astype(np.float32))
    with pytest.raises(ValueError, match="vocabulary"):
        next_token_nll(logits, ids.numpy() + V)


def test_pareto_front_follows_a_lower_is_better_metric():
    # the report puts quality = -perplexity on the Pareto axis: the lower perplexity must win
    pts = [{"name": "a", "ms": 1.0, "ppl": 10.0}, {"name": "b", "ms": 1.0, "ppl": 12.0}]
    for p in pts:
        p["quality"] = -p["ppl"]
    assert pareto_front(pts, "ms", "quality") == ["a"]


@pytest.mark.parametrize("kind", ["lm", "encoder"])
def test_plan_report_on_token_inputs(kind, tmp_path, monkeypatch):
    monkeypatch.setenv("THRIFTY_CACHE", str(tmp_path))
    torch.manual_seed(0)
    ids = torch.randint(0, V, (48, T))
    if kind == "lm":
        model, names, metric = _TinyLM().eval(), ["input_ids"], "perplexity"
        samples = Samples((ids[:16].numpy(),), None, "lm")
        calib = [{"input_ids": b} for b in ids[16:].split(16)]
    else:
        mask = torch.ones_like(ids)
        mask[::2, T // 2:] = 0  # padded sentences
        model, names, metric = _TinyEncoder().eval(), ["input_ids", "attention_mask"], "cosine"
        samples = Samples((ids[:16].numpy(), mask[:16].numpy()), None, "text")
        calib = [{"input_ids": b, "attention_mask": m} for b, m in zip(ids[16:].split(16), mask[16:].split(16))]
    example = tuple(torch.from_numpy(a) for a in samples.batch([0, 1]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res, rep = plan_report(model, calib, example, samples, latency_ms=None, size_mb=1.0, batch=8, rounds=1,
                               sweep=0, input_names=names, max_rounds=1, metric=metric)
    assert rep["metric"] == metric and rep["higher_is_better"] == (metric == "cosine")
    pts = {p["name"]: p for p in rep["points"]}
    assert {"fp32", "int8", "plan (budget)"} <= set(pts) and not rep["points_skipped"], rep["points_skipped"]
    if kind == "lm":
        # the FP32 graph's perplexity is the PyTorch model's (ONNX Runtime's float32 GEMMs: a relative 1e-4)
        from thrifty.train.lm import nll

        assert pts["fp32"]["accuracy"] == pytest.approx(math.exp(nll(model, ids[:16])), rel=1e-4)
        assert all(p["quality"] == -p["accuracy"] for p in rep["points"])
    else:
        assert pts["fp32"]["accuracy"] == pytest.approx(1.0, abs=1e-5)  # cosine of the FP32 graph to itself
        assert 0.9 < pts["int8"]["accuracy"] <= 1.0 + 1e-6
    assert set(res.picks) == {"fc1", "fc2"} and rep["plan"]["meets_size"]
    # every planner point has a paired standard error against every uniform point; one that quantizes what a
    # uniform point does is that point (one graph, one timing, one score)
    uniform = [p["name"] for p in rep["points"] if p["kind"] == "uniform"]
    assert set(rep["quality_se"]) == {"plan (budget)"} and set(rep["quality_se"]["plan (budget)"]) == set(uniform)
    assert all(se >= 0 for se in rep["quality_se"]["plan (budget)"].values())
    plan = pts["plan (budget)"]
    mine = {n for n, c in res.picks.items() if c != "fp32"}
    if not mine:
        assert plan["same_as"] == "fp32"
    if "same_as" in plan:
        src = pts[plan["same_as"]]
        assert (plan["latency_ms"], plan["accuracy"]) == (src["latency_ms"], src["accuracy"])
        assert rep["quality_se"]["plan (budget)"][src["name"]] == 0.0
    # evaluate_graph scores a graph as the report does, and names what it cannot score
    from thrifty.bench.export import export_onnx
    from thrifty.plan.report import evaluate_graph

    g = export_onnx(model, example, tmp_path / "fp32.onnx", input_names=names).read_bytes()
    assert evaluate_graph(g, samples, metric=metric, reference=ref_out(g, samples)) == pytest.approx(
        pts["fp32"]["accuracy"], rel=1e-6)
    with pytest.raises(ValueError, match="metric must be"):
        evaluate_graph(g, samples, metric="bleu")
    with pytest.raises(ValueError, match="needs class labels"):
        evaluate_graph(g, samples, metric="top1")
    with pytest.raises(ValueError, match="pass reference outputs"):
        evaluate_graph(g, samples, metric="cosine")


def ref_out(graph: bytes, samples) -> np.ndarray:
    from thrifty.plan.report import _outputs

    return _outputs(graph, samples, 1)


def test_cost_graphs_calibrate_residuals_once(monkeypatch):
    # a table's graphs share one residual calibration pass; nodes and initializer sizes are unchanged
    import onnx

    import thrifty as th
    import thrifty.bench.int8_graph as ig
    from thrifty.plan.cost import iter_graphs

    torch.manual_seed(0)
    model = th.models.create("resnet20", width=4).eval()
    x = torch.rand(32, 1, 8, 8)
    layers = ["layer1.0.conv1", "layer1.0.conv2", "layer2.0.conv2"]
    # all FP32; a conv that feeds no Add (no residual quantizer); one that does; another block's, whose Add the
    # first calibration pass finds too (not residual in that graph); all three
    picks = [{}, {layers[0]: "int8"}, {layers[1]: "int8"}, {layers[2]: "int8"}, {n: "int8" for n in layers}]
    calls = []
    inner = ig._calibrate
    monkeypatch.setattr(ig, "_calibrate", lambda *a, **k: calls.append(a[1]) or inner(*a, **k))
    sig = {}
    for reuse in (False, True):
        calls.clear()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            gs = [onnx.load_from_string(g) for g in iter_graphs(model, picks, x, (x[:2],), reuse_ranges=reuse)]
        sig[reuse] = [([n.op_type for n in g.graph.node], sorted((i.name, tuple(i.dims)) for i in g.graph.initializer))
                      for g in gs]
        if reuse:
            assert len(calls) == 1, calls  # the first graph with residual Adds calibrates all its Add tensors
        else:
            # every graph with a quantized conv in front of a residual Add calibrates its own: each conv2, all
            assert len(calls) == 3, calls
    assert sig[True] == sig[False]


# ------------------------------------------------------------------------------ the causal LM's data path
def _tiny_llama():
    from thrifty.models import create

    torch.manual_seed(0)
    return create("tinyllama", hidden=32, layers=1, heads=2, intermediate=64).eval()


def test_lm_workload_and_its_calibration_windows():
    """load_workload(model, "lm"): held-out byte windows of --seq-len tokens with an all-ones mask; calibration:
    10 x per_class random training windows of that length, in batches of 32, the same for the same seed."""
    from thrifty.bench.api import calibration_data, load_workload
    from thrifty.data.lm import lm_windows

    wl = load_workload(_tiny_llama(), "lm", seq_len=16, max_samples=5)
    assert wl.samples.name == "lm@16" and wl.input_names == ["input_ids", "attention_mask"]
    ids, mask = wl.samples.inputs
    assert ids.shape == mask.shape == (5, 16) and (mask == 1).all() and ids.dtype == np.int64
    assert (ids == lm_windows("test", 16, n=5).numpy()).all()
    calib = calibration_data(wl, per_class=4)
    assert [b["input_ids"].shape for b in calib] == [(32, 16), (8, 16)]
    assert all((b["attention_mask"] == 1).all() for b in calib)
    again = calibration_data(wl, per_class=4)
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(calib, again))
    with pytest.raises(ValueError, match="byte-level text .* model '_tinyencoder' has vocab_size None"):
        load_workload(_TinyEncoder(), "lm")


def test_cli_plan_on_the_causal_lm_scores_perplexity(tmp_path, monkeypatch):
    """``thrifty plan --model tinyllama``: the LM's held-out windows, its calibration windows and perplexity (the
    pretrained model replaced by a small random one, which is all the data path needs)."""
    import json

    import thrifty.train.lm as lm
    from thrifty.cli import main

    monkeypatch.setenv("THRIFTY_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(lm, "pretrained_lm", lambda *a, **k: _tiny_llama())
    out = tmp_path / "p"
    assert main(["plan", "--model", "tinyllama", "--seq-len", "8", "--max-samples", "8", "--batch", "4",
                 "--size-mb", "1", "--rounds", "1", "--sweep", "0", "--calib-per-class", "1", "--loadgen-s", "0",
                 "--clock", "cpu", "--max-rounds", "1", "--out", str(out)]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["metric"] == "perplexity" and rep["higher_is_better"] is False
    pts = {p["name"]: p for p in rep["points"]}
    assert 1.0 < pts["fp32"]["accuracy"] < 256 * 1.5  # a random byte model: perplexity near the vocabulary
    assert "lm_head" in rep["plan"]["picks"] or "lm_head" in (out / "plan.yaml").read_text()


def test_plan_experiment_combines_one_workload_runs(tmp_path):
    """``experiments/plan.py --combine``: results/plan.* from the saved --only runs, each with its own command."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    saved = json.loads((root / "results" / "plan_resnet20-digits32.json").read_text())
    saved["command"] = "python experiments/plan.py --only resnet20-digits32"
    (tmp_path / "plan_resnet20-digits32.json").write_text(json.dumps(saved))
    env = {**os.environ, "PYTHONPATH": str(root), "MPLBACKEND": "Agg"}
    p = subprocess.run([sys.executable, str(root / "experiments" / "plan.py"), "--combine", "--out", str(tmp_path)],
                       capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr
    res = json.loads((tmp_path / "plan.json").read_text())
    assert set(res) == {"resnet20-digits32", "command", "environment"}
    assert res["resnet20-digits32"]["command"] == saved["command"]
    md = (tmp_path / "plan.md").read_text()
    assert f"Produced by `{saved['command']}`." in md and "Targets (" in md and (tmp_path / "plan.png").is_file()
    (tmp_path / "plan_resnet20-digits32.json").unlink()
    p = subprocess.run([sys.executable, str(root / "experiments" / "plan.py"), "--combine", "--out", str(tmp_path)],
                       capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode != 0 and "--combine: no plan_<workload>.json" in p.stderr
