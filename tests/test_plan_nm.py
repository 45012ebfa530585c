"""N:M storage as a planner candidate: the SparseQuant config, pruning + PTQ against the dense model, the
compressed export of exactly the pruned layers, its bytes in the cost table, and a plan under a size budget."""
from __future__ import annotations

import warnings

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn
from onnx import numpy_helper

from thrifty.bench.backends import OrtBackend, ort_session
from thrifty.bench.export import export_onnx, weight_codes_name
from thrifty.bench.nm_onnx import densify, is_nm_onnx, load_nm_onnx, runnable, save_nm_onnx
from thrifty.core import from_yaml, to_yaml
from thrifty.plan.config import CANDIDATES, Plan, SparseQuant, export_plan, plan_from_picks, quantize_plan
from thrifty.plan.cost import _facts, deploy_graphs, measure_costs, weight_bytes
from thrifty.plan.planner import make_plan
from thrifty.plan.solve import exhaustive
from thrifty.quant import PTQ, QuantConfig, quantize
from thrifty.quant.calib import as_batches, output_loss
from thrifty.sparse.weights import NM, sparsify

MIX = {"0": "int8-2:4", "2": "int8", "4": "int8-t4:8"}


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 16)).eval()


def _inits(graph: bytes) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in onnx.load_from_string(graph).graph.initializer}


def _nm_bytes(rows: int, k: int, n: int, m: int) -> int:
    """int8 codes kept (n of every m along the reduction, the tail block padded) plus their packed indices."""
    kept = rows * -(-k // m) * n
    return kept + -(-kept * max(1, (m - 1).bit_length()) // 8)


def test_sparse_quant_config_yaml_and_validation():
    plan = plan_from_picks(MIX, pipeline="adaquant", adaquant_iters=3)
    back = from_yaml(to_yaml(plan))
    assert back == plan and back.layers["4"] == SparseQuant(NM(4, 8, transposable=True))
    assert back.layers["0"].quant == QuantConfig(w_bits=8, a_bits=8, w_symmetric=True)
    with pytest.raises(ValueError, match="symmetrically"):
        SparseQuant(quant=QuantConfig(w_bits=8, a_bits=8))  # a pruned weight would be the zero point, not 0
    with pytest.raises(ValueError, match="symmetrically"):
        SparseQuant(quant=QuantConfig(w_bits=4, a_bits=None, group_size=32, w_symmetric=True))
    with pytest.raises(ValueError, match="fixed"):
        SparseQuant(NM(2, 4, recompute_every=5))
    with pytest.raises(TypeError, match="nm=NM"):
        SparseQuant(nm=QuantConfig())
    # which layers take a pattern: a reduction of at least M, and for a transposable mask M outputs too
    two, t48 = CANDIDATES["int8-2:4"], CANDIDATES["int8-t4:8"]
    assert two.accepts(nn.Linear(4, 2)) and not two.accepts(nn.Linear(3, 8))
    assert t48.accepts(nn.Linear(8, 8)) and not t48.accepts(nn.Linear(64, 4)) and not t48.accepts(nn.Linear(4, 64))
    assert two.accepts(nn.Conv2d(1, 4, 3)) and not two.accepts(nn.Embedding(10, 8))


def test_pruned_layers_are_fitted_and_scored_against_the_dense_model():
    model, x = _mlp(1), torch.randn(128, 32)
    pruned = sparsify(__import__("copy").deepcopy(model), NM(2, 4), filter=["2"])
    cfg = PTQ(w_bits=8, a_bits=8, w_symmetric=True, pipeline="rtn")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dense_ref = quantize(pruned, cfg, x, layer_configs={"2": QuantConfig(w_symmetric=True)}, reference=model)
        own_ref = quantize(pruned, cfg, x, layer_configs={"2": QuantConfig(w_symmetric=True)})
    # the same quantized model either way; only what it is compared with differs
    for a, b in zip(dense_ref.model.parameters(), own_ref.model.parameters()):
        assert torch.equal(a, b)
    # the loss against the dense model, computed here from its definition (MSE of the outputs: no labels)
    loss = output_loss("mse")
    with torch.no_grad():
        want = np.mean([float(loss(dense_ref.model(b.args[0]), model(b.args[0]))) for b in as_batches(x, 256)])
        own = np.mean([float(loss(own_ref.model(b.args[0]), pruned(b.args[0]))) for b in as_batches(x, 256)])
    assert dense_ref.final_loss == pytest.approx(want, rel=1e-5)
    assert own_ref.final_loss == pytest.approx(own, rel=1e-5, abs=1e-12) and own < want  # pruning not counted
    # through a plan: magnitude-pruned and rounded (rtn), or AdaPrune then AdaQuant, both against the dense model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rtn = quantize_plan(model, plan_from_picks({"2": "int8-2:4"}, "rtn"), x)
        ada = quantize_plan(model, plan_from_picks({"2": "int8-2:4"}, "adaquant", 200), x)
        pruned_only = __import__("copy").deepcopy(model)
        from thrifty.sparse.adaprune import adaprune

        adaprune(pruned_only, {"2": NM(2, 4)}, x, steps=200, progress=False)
    assert rtn.final_loss == pytest.approx(dense_ref.final_loss, rel=1e-6)
    with torch.no_grad():
        adaprune_loss = np.mean([float(loss(pruned_only(b.args[0]), model(b.args[0]))) for b in as_batches(x, 256)])
    # AdaPrune alone recovers most of the magnitude mask's loss; quantizing after it adds little
    assert ada.final_loss < 0.5 * rtn.final_loss and ada.final_loss < 2 * adaprune_loss
    for r in (rtn, ada):  # the 2:4 pattern survives AdaQuant: every block of 4 inputs keeps at most 2 weights
        w = r.model[2].effective_weight()
        assert (w.reshape(64, 16, 4).ne(0).sum(-1) <= 2).all() and w.ne(0).float().mean() > 0.45
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), _mlp(1).parameters()))  # user's model untouched
    with pytest.raises(TypeError, match="reference must be an nn.Module"):
        quantize(model, cfg, x, reference="dense")
    with pytest.raises(ValueError, match=r"reference model lacks the layers \['2'\]"):
        quantize(pruned, cfg, x, layer_configs={"2": QuantConfig(w_symmetric=True)}, reference=nn.Sequential())


def test_export_plan_stores_exactly_the_pruned_layers_compressed(tmp_path):
    model, x = _mlp(2), torch.randn(64, 32)
    plan = plan_from_picks(MIX)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = quantize_plan(model, plan, x)
        packed = export_plan(res.model, plan, (x[:2],), tmp_path / "plan.onnx", calib=x).read_bytes()
        dense = export_onnx(res.model, (x[:2],), tmp_path / "dense.onnx", calib=x).read_bytes()
    assert is_nm_onnx(packed) and not is_nm_onnx(dense) and is_nm_onnx(tmp_path / "plan.onnx")
    # the runtime gets the dense graph back, bit for bit, and computes the same outputs from either file
    assert onnx.load_from_string(load_nm_onnx(packed)).graph == onnx.load_from_string(dense).graph
    xs = (x[:16].numpy(),)
    np.testing.assert_array_equal(OrtBackend(tmp_path / "plan.onnx", threads=1)(xs), OrtBackend(dense, threads=1)(xs))
    assert ort_session(packed, threads=1).get_inputs()[0].shape[1] == 32
    # what a session is given: the dense bytes of a compressed file, anything else as it is (a path stays a path)
    assert runnable(packed) == load_nm_onnx(packed) == load_nm_onnx(tmp_path / "plan.onnx")
    assert runnable(dense) is dense and runnable(tmp_path / "dense.onnx") == str(tmp_path / "dense.onnx")
    with pytest.raises(ValueError, match="dense.onnx: not an N:M-compressed ONNX file"):
        densify(onnx.load(str(tmp_path / "dense.onnx")), str(tmp_path / "dense.onnx"))
    # only the SparseQuant layers are compressed (the int8 layer's codes stay dense), each in its own pattern
    inits = _inits(packed)
    assert weight_codes_name("2") in inits and weight_codes_name("0") not in inits
    assert {k for k in inits if k.endswith("::nm_values")} == {"0.wq::nm_values", "4.wq::nm_values"}
    saved = weight_bytes(dense) - weight_bytes(packed)
    assert saved == 64 * 32 - _nm_bytes(64, 32, 2, 4) + 16 * 64 - _nm_bytes(16, 64, 4, 8)
    # the simulated model: pruned codes are zero codes, so the int8 layer next to them is untouched
    codes = _inits(dense)
    assert (codes["0.wq"].astype(np.int16) != (128 if codes["0.wq"].dtype == np.uint8 else 0)).sum() <= 64 * 32 // 2


def test_save_nm_onnx_layers_argument_names_what_it_cannot_store(tmp_path):
    model, x = _mlp(3), torch.randn(64, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = quantize_plan(model, plan_from_picks({"0": "int8-2:4", "2": "int8"}), x)
    p = export_onnx(res.model, (x[:2],), tmp_path / "m.onnx", calib=x)
    with pytest.raises(ValueError, match="'0.wq' is not stored 1:4 sparse"):
        save_nm_onnx(p, tmp_path / "a.onnx", layers={"0.wq": (1, 4)})
    with pytest.raises(ValueError, match=r"\['2.wq'\] are not GEMM weights"):
        save_nm_onnx(p, tmp_path / "b.onnx", layers={"2.wq": (2, 4)})  # asymmetric int8: zero point per channel
    assert not (tmp_path / "a.onnx").exists() and not (tmp_path / "b.onnx").exists()
    info = save_nm_onnx(p, tmp_path / "c.onnx", layers={"0.wq": (2, 4)})
    assert info["layers"] == {"0.wq": "2:4"} and info["stored_bytes"] == _nm_bytes(64, 32, 2, 4)


def _conv_net() -> nn.Module:
    # conv (4 x 3 x 3 reduction) + BatchNorm (folded by PTQ) -> pooled -> two Linears
    return nn.Sequential(nn.Conv2d(4, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 8))


def test_cost_table_bytes_of_nm_layers_are_exact_and_twins_follow_the_runtime_graph(tmp_path, monkeypatch):
    monkeypatch.setenv("THRIFTY_CACHE", str(tmp_path))
    torch.manual_seed(0)
    model, x = _conv_net().eval(), torch.randn(32, 4, 6, 6)
    cands = ("fp32", "int8", "int7", "int8-2:4")
    layers = ["0", "5", "7"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = measure_costs(model, x, (x[:2],), (x[:4].numpy(),), layers, cands, rounds=1, min_ms=0.0, cache=False)
        mix = deploy_graphs(model, [{"0": "int8-2:4", "5": "int8", "7": "int8-2:4"}], x, (x[:2],))[0]
        every = deploy_graphs(model, [{n: c for n in layers} for c in cands[1:]], x, (x[:2],))
    # a pruned layer stores n/m of its int8 codes plus 2 bits per kept code: exactly what the table holds
    for n, (rows, k) in {"0": (16, 36), "5": (64, 16), "7": (8, 64)}.items():
        assert t.bytes[n]["int8"] - t.bytes[n]["int8-2:4"] == rows * k - _nm_bytes(rows, k, 2, 4)
    # stored bytes add up exactly, for the all-N:M graph and for a mix with int8
    add = t.additivity["all int8-2:4"]
    assert add["predicted_bytes"] == add["measured_bytes"]
    assert t.predict({"0": "int8-2:4", "5": "int8", "7": "int8-2:4"})[1] == weight_bytes(mix)
    # the runtime runs the dense symmetric int8 graph: the same kernels as int7 where the two share a structure
    # (structure of the decompressed graph), so their latency terms are tied exactly when the structures match
    shape = {c: _facts(g)[1] for c, g in zip(cands[1:], every)}
    root = lambda c: t.twins.get(c, c)  # noqa: E731
    for a in cands[1:]:
        for b in cands[1:]:
            assert (root(a) == root(b)) == (shape[a] == shape[b]), (a, b, t.twins)
    assert is_nm_onnx(every[2]) and not is_nm_onnx(every[1])


def test_planner_picks_nm_storage_when_only_it_meets_the_size_budget(tmp_path, monkeypatch):
    monkeypatch.setenv("THRIFTY_CACHE", str(tmp_path))
    model, x = _mlp(4), torch.randn(64, 32)
    cands = ("fp32", "int8", "int8-2:4")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = measure_costs(model, x, (x[:2],), (x[:16].numpy(),), ["0", "2", "4"], cands, rounds=1, cache=False)
    int8 = t.base_bytes + sum(t.bytes[n]["int8"] for n in t.layers)
    size_mb = (int8 - 600) / 1e6  # all-int8 does not fit: some layer must be stored 2:4
    r = make_plan(model, x, (x[:2],), (x[:16].numpy(),), size_mb=size_mb, candidates=cands, table=t, rounds=1,
                  refine_tol=float("inf"), compare_uniform=False)
    assert r.measured["bytes"] <= size_mb * 1e6 and "int8-2:4" in r.picks.values()
    assert r.predicted["bytes"] == r.measured["bytes"]  # stored bytes, exact per layer
    ref = exhaustive({n: r.sensitivity[n] for n in t.layers}, {"b": t.bytes}, {"b": size_mb * 1e6 - t.base_bytes})
    assert r.predicted["loss"] == pytest.approx(ref.objective, rel=1e-9, abs=1e-15)
    assert is_nm_onnx(r.onnx) and isinstance(r.plan.layers[next(n for n, c in r.picks.items() if c != "fp32"
                                                                  and c != "int8")], SparseQuant)
    assert from_yaml(r.plan.to_yaml()) == r.plan and isinstance(r.plan, Plan)


def test_a_model_already_transposable_sparse_loses_nothing_to_the_mask():
    # the exact transposable mask keeps the most magnitude: on weights that are T4:8 sparse already it keeps every
    # nonzero one, so int8-t4:8 quantizes exactly what plain symmetric int8 does
    model, x = _mlp(5), torch.randn(64, 32)
    sparse = sparsify(__import__("copy").deepcopy(model), NM(4, 8, transposable=True), filter=["2"])
    with torch.no_grad():
        model[2].weight.copy_(sparse[2].effective_weight())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t48 = quantize_plan(model, plan_from_picks({"2": "int8-t4:8"}), x)
        sym = quantize_plan(model, Plan({"2": QuantConfig(w_symmetric=True)}), x)
    assert torch.equal(t48.model[2].effective_weight(), sym.model[2].effective_weight())
    assert t48.final_loss == pytest.approx(sym.final_loss, rel=1e-6, abs=1e-12)


def test_cli_plan_with_nm_storage_writes_a_compressed_model(tmp_path, monkeypatch, capsys):
    from thrifty.cli import main

    monkeypatch.setenv("THRIFTY_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "p"
    # the digits MLP has 84,480 GEMM weights: all int8 needs ~0.089 MB, so 0.075 MB needs some layers stored 2:4
    assert main(["plan", "--model", "mlp", "--dataset", "digits", "--out", str(out), "--size-mb", "0.075",
                 "--candidates", "fp32,int8,int8-2:4", "--batch", "8", "--rounds", "1", "--sweep", "0",
                 "--max-samples", "64", "--calib-per-class", "1", "--loadgen-s", "0", "--max-rounds", "1"]) == 0
    printed = capsys.readouterr().out
    plan = from_yaml((out / "plan.yaml").read_text())
    assert any(isinstance(c, SparseQuant) for c in plan.layers.values())
    assert is_nm_onnx(out / "model.onnx") and "stores its N:M layers compressed" in printed
    assert weight_bytes((out / "model.onnx").read_bytes()) <= 0.075e6
    rep = __import__("json").loads((out / "report.json").read_text())
    assert rep["plan"]["meets_size"] and "int8-2:4" in {p["name"] for p in rep["points"]}
    assert "- chosen plan within its size budget: yes" in (out / "report.md").read_text()
