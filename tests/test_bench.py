"""thrifty.bench: LoadGen scenarios on a tiny model, log parsing, int8 ONNX export, accuracy checker, bad input."""
from __future__ import annotations

import json
import os
import time

import numpy as np
import pytest
import torch
import torch.nn as nn

from thrifty.bench import (BenchConfig, OrtBackend, Samples, TorchBackend, calibrate, check_accuracy, export_onnx,
                           optimized_op_counts, parse_summary_text, quant_layers, run, run_loadgen, server_search)
from thrifty.bench.report import write_report
from tolerance import assert_within, forward_bound

SERVER_INVALID = """================================================
MLPerf Results Summary
================================================
SUT name : PySUT
Scenario : Server
Mode     : PerformanceOnly
Completed samples per second    : 187.61
Result is : INVALID
  Performance constraints satisfied : NO
  Min duration satisfied : Yes
  Min queries satisfied : Yes
  Early stopping satisfied: NO
Recommendations:
 * Reduce target QPS to improve latency.
Early Stopping Result:
 * Run unsuccessful.
 * Processed 190 queries.
 * Would need to run at least 269 more queries,
 with the run being successful if every additional
 query were under latency.

================================================
Additional Stats
================================================
Scheduled samples per second : 187.85
Min latency (ns)                : 1140784
Mean latency (ns)               : 1535318
50.00 percentile latency (ns)   : 1218132
99.00 percentile latency (ns)   : 64884001

================================================
Test Parameters Used
================================================
samples_per_query : 1
target_qps : 200
target_latency (ns): 50000000
min_duration (ms): 1000
min_query_count : 50
"""


def _tiny_data(n: int = 256, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 16, generator=g)
    w = torch.randn(16, 4, generator=g)
    return torch.utils.data.TensorDataset(x, (x @ w).argmax(1))


def test_all_scenarios_tiny_model_subprocess(tmp_path):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    ds = _tiny_data()
    s = BenchConfig(min_duration_s=0.2, server_latency_ms=200, server_max_probes=3)
    m.train()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    r = run(m, s, ds, scenarios="all", backend="torch", outdir=tmp_path, variant="tiny")
    assert m.training and all(torch.equal(before[k], v) for k, v in m.state_dict().items())  # untouched
    sc = r["scenarios"]
    assert set(sc) == {"SingleStream", "MultiStream", "Server", "Offline"}
    for name, x in sc.items():
        assert x["valid"], (name, x["reasons"])
        assert x["reasons"] == []
        assert (tmp_path / "tiny").joinpath(name if name != "Server" else "Server/final",
                                            "mlperf_log_summary.txt").is_file()
    assert sc["SingleStream"]["metric"] == "p90_latency_ms" and sc["MultiStream"]["metric"] == "p99_latency_ms"
    assert sc["Offline"]["value"] > 0 and sc["Server"]["max_qps"] > 0
    assert 1 <= len([p for p in sc["Server"]["probes"] if not p.get("rerun")]) <= 3  # re-runs of INVALID rates aside
    # the reported maximum is the highest probed rate whose LoadGen run was VALID (its latency is LoadGen's call,
    # with early stopping, not something to assert against the clock of a loaded machine)
    srv = sc["Server"]
    assert srv["latency_bound_ms"] == 200 and "99.00" in srv["percentiles_ms"]
    assert srv["max_qps"] == max(p["target_qps"] for p in srv["probes"] if p["valid"])
    # accuracy mode: LoadGen's logged responses are the model's outputs for every sample
    acc = r["accuracy"]["metrics"]
    expect = float((m(ds.tensors[0]).argmax(1) == ds.tensors[1]).float().mean())
    assert acc["n"] == 256 and acc["agreement"] == 1.0 and acc["top1"] == pytest.approx(expect)
    written = json.loads((tmp_path / "tiny" / "result.json").read_text())
    assert written["variant"] == "tiny"
    # written results hold no absolute path (portable, nothing about the machine); log folders relative to the file
    assert not _absolute_strings(written, str(tmp_path))
    assert written["scenarios"]["Server"]["logdir"] == "Server/final"
    assert (tmp_path / "tiny" / written["scenarios"]["Offline"]["logdir"] / "mlperf_log_summary.txt").is_file()
    files = write_report([r], tmp_path / "report")
    assert not _absolute_strings(json.loads((tmp_path / "report" / "results.json").read_text()), str(tmp_path))
    assert "| tiny | torch | Offline | VALID |" in (tmp_path / "report" / "report.md").read_text()
    assert len(files["plots"]) >= 2


def _absolute_strings(obj, root: str) -> list[str]:
    """Strings in ``obj`` that are absolute paths or mention ``root`` (the folder the run wrote into)."""
    if isinstance(obj, dict):
        return [s for v in obj.values() for s in _absolute_strings(v, root)]
    if isinstance(obj, list):
        return [s for v in obj for s in _absolute_strings(v, root)]
    return [obj] if isinstance(obj, str) and (os.path.isabs(obj) or root in obj) else []


def test_portable_paths_rewrites_only_absolute_paths_under_path_keys(tmp_path):
    from thrifty.bench.report import portable_paths

    res = {"logdir": str(tmp_path / "m" / "Offline"), "path": "rel/x.onnx", "note": "/not/a/path/key",
           "rows": [{"path": str(tmp_path.parent / "w.safetensors"), "n": 3}], "t": ("a",)}
    out = portable_paths(res, tmp_path)
    assert out == {"logdir": "m/Offline", "path": "rel/x.onnx", "note": "/not/a/path/key",
                   "rows": [{"path": "../w.safetensors", "n": 3}], "t": ["a"]}
    assert res["logdir"] == str(tmp_path / "m" / "Offline")  # a copy: the caller's dict is unchanged


def test_parse_summary_invalid_reasons():
    r = parse_summary_text(SERVER_INVALID)
    assert r["valid"] is False and r["scenario"] == "Server"
    assert r["metric"] == "samples_per_second" and r["value"] == pytest.approx(187.61)
    assert r["constraints"] == {"performance_constraints": False, "min_duration": True, "min_queries": True,
                                "early_stopping": False}
    assert r["percentiles_ms"]["99.00"] == pytest.approx(64.884001)
    assert r["params"]["target_latency (ns)"] == 50000000
    text = " ".join(r["reasons"])
    assert "exceeds the latency bound 50 ms" in text and "early-stopping" in text and "269 more" in text
    assert "Reduce target QPS" in text
    with pytest.raises(ValueError, match="not a LoadGen summary"):
        parse_summary_text("hello : world\n")


def _sleepy(ms: float):
    def f(xs):
        time.sleep(ms / 1e3)
        return xs[0].sum(1, keepdims=True)
    return f


def test_invalid_run_explained_in_words(tmp_path):
    data = Samples((np.random.rand(64, 4).astype(np.float32),))
    s = BenchConfig(scenario="Server", min_duration_s=0.2, min_query_count=40, server_latency_ms=1.0)
    be = _sleepy(4.0)
    calib = calibrate(be, data, s, budget_s=0.1)
    r = run_loadgen(be, data, s, tmp_path / "srv", calib, target_qps=200)
    assert r["valid"] is False
    assert any("exceeds the latency bound 1 ms" in x for x in r["reasons"])
    # the search refuses a bound below the fastest single-sample latency
    with pytest.raises(ValueError, match="below the model's fastest single-sample latency"):
        server_search(be, data, s, tmp_path / "search", calib)


def test_bad_inputs(tmp_path):
    data = Samples((np.random.rand(32, 4).astype(np.float32),))
    s = BenchConfig(scenario="Offline", min_duration_s=0.1)
    with pytest.raises(TypeError, match="cannot be serialised"):
        calibrate(lambda xs: {"logits": xs[0]}, data, s)
    with pytest.raises(TypeError, match="cannot be serialised"):
        calibrate(lambda xs: np.array(["a"] * len(xs[0])), data, s)
    calib = calibrate(lambda xs: xs[0], data, s, budget_s=0.05)
    with pytest.raises(ValueError, match="larger than the dataset"):
        run_loadgen(lambda xs: xs[0], data, BenchConfig(performance_sample_count=100), tmp_path / "a", calib)
    with pytest.raises(ValueError, match="hours"):
        run_loadgen(_sleepy(1), data, BenchConfig(scenario="SingleStream", min_duration_s=20000),
                    tmp_path / "b", dict(calib, single_median_s=0.001))
    # official lengths are allowed only explicitly, and the check names the scenario
    with pytest.raises(ValueError, match="SingleStream would run for about"):
        BenchConfig(scenario="SingleStream", min_query_count=10**7).check_duration(0.01)
    assert BenchConfig.official("Server").queries_needed() == 270336
    with pytest.raises(ValueError, match="scenario must be one of"):
        BenchConfig(scenario="Batch")
    with pytest.raises(ValueError, match="same leading"):
        Samples((np.zeros((3, 2)), np.zeros((4, 2))))
    with pytest.raises(ValueError, match="backend must be one of"):
        run(nn.Linear(16, 4), None, _tiny_data(8), backend="tensorrt", outdir=tmp_path)
    with pytest.raises(TypeError, match="not supported"):
        run(nn.Linear(16, 4), None, [1, 2, 3], outdir=tmp_path)


def test_accuracy_checker(tmp_path):
    outs = np.eye(4, dtype=np.float32)[[0, 1, 2, 3, 0]]
    log = [{"seq_id": i, "qsl_idx": i, "data": outs[i].tobytes().hex()} for i in range(5)]
    (tmp_path / "mlperf_log_accuracy.json").write_text(json.dumps(log))
    r = check_accuracy(tmp_path, labels=np.array([0, 1, 2, 3, 3]), reference=outs, n=5)
    assert r["top1"] == pytest.approx(0.8) and r["agreement"] == 1.0 and r["cosine_min"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="4 of 5 samples"):
        (tmp_path / "x").mkdir()
        (tmp_path / "x" / "mlperf_log_accuracy.json").write_text(json.dumps(log[:4]))
        check_accuracy(tmp_path / "x", n=5)
    (tmp_path / "bad.json").write_text(json.dumps([{"qsl_idx": 0, "data": "abc"}]))
    with pytest.raises(ValueError, match="malformed entry"):
        check_accuracy(tmp_path / "bad.json")


class _ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x)))
        x = torch.relu(self.conv2(x))
        return self.fc(x.mean((2, 3)))


def _quantize(m: nn.Module, x: torch.Tensor, symmetric: bool) -> nn.Module:
    from thrifty.nn import gemm_layers, wrap
    from thrifty.quant import UniformQuantizer

    for name in ("conv", "conv2", "fc"):
        setattr(m, name, wrap(getattr(m, name)))
    for _, layer in gemm_layers(m):
        layer.add("weight", UniformQuantizer(8, symmetric=symmetric, per_channel=True).init_from(layer.weight))
        layer.add("input", UniformQuantizer(8).calibrate())
    with torch.no_grad():
        m(x)
    for _, layer in gemm_layers(m):
        layer.slots.input.freeze()
    return m


@pytest.mark.parametrize("symmetric", [True, False])
def test_onnx_int8_export_roundtrip(tmp_path, symmetric):
    torch.manual_seed(0)
    m = _ConvNet().eval()
    with torch.no_grad():  # non-trivial BN, including negative scales (sign flip of the integer codes)
        m.bn.weight.copy_(torch.tensor([1.5, -0.7, 0.9, 1.2, -1.1, 0.5, 2.0, 0.8]))
        m.bn.running_mean.uniform_(-0.2, 0.2)
        m.bn.running_var.uniform_(0.5, 1.5)
    x = torch.rand(64, 1, 12, 12)
    import copy

    q = _quantize(copy.deepcopy(m), x[:32], symmetric)
    path = export_onnx(q, (x[:2],), tmp_path / "q.onnx", input_names=["x"], signed_weights=True)
    layers = {lq.name: lq for lq in quant_layers(q)}
    assert set(layers) == {"conv", "conv2", "fc"}
    import onnx
    from onnx import numpy_helper

    inits = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer}
    fc_scale = q.fc.slots.weight.scale.detach().numpy()
    np.testing.assert_array_equal(inits["fc.w_scale"], fc_scale)  # the PTQ quantizer's own parameters
    assert inits["fc.wq"].dtype == np.int8  # unsigned codes are stored shifted by 128 (u8s8 kernels)
    assert float(inits["conv2.x_scale"]) == pytest.approx(float(q.conv2.slots.input.scale))
    # the unsigned container holds the same dequantized weights, every code and zero point shifted by 128
    p2 = export_onnx(q, (x[:2],), tmp_path / "q2.onnx", input_names=["x"], signed_weights=False)
    inits2 = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(p2)).graph.initializer}
    for layer in layers:
        assert inits2[f"{layer}.wq"].dtype == np.uint8
        np.testing.assert_array_equal(inits2[f"{layer}.wq"].astype(np.int16) - 128, inits[f"{layer}.wq"])
        np.testing.assert_array_equal(inits2[f"{layer}.w_zp"].astype(np.int16) - 128, inits[f"{layer}.w_zp"])
    sim = TorchBackend(q)((x.numpy(),))
    # u8u8 kernels widen to 16 bits before multiplying: exact integer products on every x86 CPU
    ort = OrtBackend(p2, threads=1)((x.numpy(),))
    # same integer grids: only float rounding and rare tie flips differ. Upstream flips move the pooled fc input
    # by far less than its step, so each fc input code is off by at most one step: |W_fc| * step, plus rounding.
    w_fc = (inits["fc.wq"].astype(np.float64) - inits["fc.w_zp"].reshape(-1, 1)) * inits["fc.w_scale"].reshape(-1, 1)
    flip = float(q.fc.slots.input.scale) * np.abs(w_fc).sum(1)
    assert_within(torch.as_tensor(ort), torch.as_tensor(sim),
                  torch.as_tensor(flip) + forward_bound(m, torch.as_tensor(sim)), "ORT int8 vs simulated")
    assert (ort.argmax(1) == sim.argmax(1)).mean() >= 0.95
    for f in (path, p2):
        ops = optimized_op_counts(f)
        assert ops.get("QLinearConv", 0) + ops.get("ConvInteger", 0) >= 1, ops  # int8 kernels, not fp32 convs
    from thrifty.bench.export import cpu_has_vnni

    if cpu_has_vnni():  # (without VNNI, ONNX Runtime's u8s8 kernels may saturate 16-bit pair sums)
        # exact integer products of the same codes, then the same float requantization: bit-identical
        np.testing.assert_array_equal(OrtBackend(path, threads=1)((x.numpy(),)), ort)
    fp = OrtBackend(export_onnx(m, (x[:2],), tmp_path / "fp.onnx"), threads=1)((x.numpy(),))
    ref = TorchBackend(m)((x.numpy(),))  # the same network in another runtime: its roundings, bounded
    assert_within(torch.as_tensor(fp), torch.as_tensor(ref), forward_bound(m, torch.as_tensor(ref)), "ORT FP32")
    assert not any(k in optimized_op_counts(tmp_path / "fp.onnx") for k in ("QLinearConv", "QuantizeLinear"))


def test_stray_audit_config_is_ignored(tmp_path, monkeypatch):
    # LoadGen applies audit.config overrides from the path it is given (default: the CWD's audit.config)
    (tmp_path / "audit.config").write_text("*.*.min_query_count = 777\n*.*.min_duration = 12345\n")
    monkeypatch.chdir(tmp_path)
    data = Samples((np.random.rand(64, 4).astype(np.float32),))
    s = BenchConfig(scenario="SingleStream", min_duration_s=0.1)
    be = lambda xs: xs[0] * 2  # noqa: E731
    r = run_loadgen(be, data, s, tmp_path / "out", calibrate(be, data, s, budget_s=0.05))
    assert r["valid"] and r["params"]["min_query_count"] == 64 and r["params"]["min_duration (ms)"] == 100


def test_relative_outdir_works_in_the_subprocess(tmp_path, monkeypatch):
    # the worker runs with cwd set to the run folder, so a relative outdir must be resolved first
    monkeypatch.chdir(tmp_path)
    m = nn.Sequential(nn.Linear(16, 4))
    s = BenchConfig(min_duration_s=0.1)
    r = run(m, s, _tiny_data(64), scenarios="SingleStream", backend="torch", outdir="rel/bench",
            variant="v", accuracy=False)
    assert r["scenarios"]["SingleStream"]["valid"]
    assert (tmp_path / "rel" / "bench" / "v" / "result.json").is_file()


def test_load_workload_takes_a_dict_of_named_inputs_in_forward_order():
    # a tokenizer's output (keyword inputs) is reordered to the model's positional parameters and keeps its names
    import numpy as np
    import torch
    import torch.nn as nn

    from thrifty.bench.api import load_workload

    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, input_ids, attention_mask=None, token_type_ids=None):
            x = input_ids if attention_mask is None else input_ids * attention_mask
            return self.fc(x if token_type_ids is None else x + token_type_ids)

    m = Two()
    data = {"attention_mask": torch.ones(6, 4), "input_ids": torch.randn(6, 4)}
    wl = load_workload(m, data)
    assert wl.input_names == ["input_ids", "attention_mask"]
    np.testing.assert_array_equal(wl.samples.inputs[0], data["input_ids"].numpy())
    # a gap (attention_mask not given): the backends call the model by keyword through a KeywordCall
    gap = {"input_ids": torch.randn(2, 4), "token_type_ids": torch.zeros(2, 4)}
    wl = load_workload(m, gap)
    assert wl.input_names == ["input_ids", "token_type_ids"]
    assert torch.equal(wl.model(*gap.values()), m(**gap))  # the same call: bit-identical
    with pytest.raises(TypeError, match="pixel_values"):
        load_workload(m, {"pixel_values": torch.randn(2, 4)})


def test_cli_prints_runs_as_a_table_in_thrifty_number_format():
    """`thrifty bench` prints what `write_report` holds as the other commands print numbers (fmt_value): no raw
    float and no JSON."""
    from thrifty.cli.bench import run_table

    r = {"scenarios": {
        "SingleStream": {"valid": True, "metric": "p90_latency_ms", "value": 0.123456789, "reasons": []},
        "Server": {"valid": False, "metric": "p99_latency_ms", "value": 12.3456789, "max_qps": 345.678912,
                   "latency_bound_ms": 10.0, "reasons": ["latency bound exceeded"]}},
        "accuracy": {"metrics": {"top1": 0.9814471243042672, "agreement": 0.99609375, "n": 256}}}
    text = run_table(r)
    assert "0.1235" in text and "12.35" in text and "max QPS 345.7 at the 10 ms bound" in text
    assert "INVALID" in text and "<- latency bound exceeded" in text
    assert "accuracy: top1 98.14%, agreement 0.9961, n 256" in text
    assert "{" not in text and "0.98144" not in text and "0.123456" not in text
