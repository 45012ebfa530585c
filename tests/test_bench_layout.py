"""The int8 layout ONNX Runtime fuses completely: int32 biases, quantizers hoisted over Flatten, activation
signedness, and the fused/unfused report."""
from __future__ import annotations

import copy
import json

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn
from onnx import TensorProto, helper, numpy_helper

from thrifty.bench import TorchBackend, export_onnx
from thrifty.bench.layout import fused_report, hoist_quantize, set_activation_dtype
from thrifty.core import apply
from thrifty.quant import QuantConfig, calibrate_inputs


class ConvLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.bn = nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc, self.head = nn.Linear(8 * 6 * 6, 16), nn.Linear(16, 10)

    def forward(self, x):
        x = torch.relu(self.bn(self.c1(x)))
        x = torch.relu(self.c2(x))  # then Flatten, then the fc's input quantizer
        return self.head(torch.relu(self.fc(x.flatten(1))))


def _quantized(a_symmetric: bool = False):
    torch.manual_seed(0)
    m = ConvLinear().eval()
    with torch.no_grad():
        m.bn.running_mean.uniform_(-0.3, 0.3)
        m.bn.running_var.uniform_(0.5, 2.0)
    q = apply(copy.deepcopy(m), QuantConfig(w_bits=8, a_bits=8, w_symmetric=True, a_symmetric=a_symmetric,
                                            w_estimator="minmax", a_estimator="minmax"))
    calib = torch.rand(64, 1, 6, 6)
    calibrate_inputs(q, calib)
    return q, calib


def _run(path_or_bytes, x: np.ndarray, optimize: bool = True) -> np.ndarray:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                   else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    so.intra_op_num_threads = 1
    src = path_or_bytes if isinstance(path_or_bytes, bytes) else str(path_or_bytes)
    sess = ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def test_every_gemm_fused_and_outputs_match_simulation(tmp_path):
    q, _ = _quantized()
    x = torch.rand(32, 1, 6, 6)
    path = export_onnx(q, (x[:2],), tmp_path / "int8.onnx", act_dtype="uint8")
    rep = fused_report(path)
    assert [r["op"] for r in rep] == ["Conv", "Conv", "Gemm", "Gemm"]
    assert all(r["fused"] for r in rep), rep  # c2 behind Flatten and the float-output head included
    assert [r["kernel"] for r in rep] == ["QLinearConv", "QLinearConv", "QGemm", "QGemm"]
    meta = json.loads({p.key: p.value for p in onnx.load(str(path)).metadata_props}["thrifty.int8"])
    assert meta["int32_biases"] == 4 and meta["float_biases"] == [] and meta["hoisted_quantizers"] == 1
    # The head is the only layer after the last rounding: a different rounding of head input j moves logit o by
    # s_x * |W[o, j]|. Integer kernels requantize with a float multiplier, so near-ties may round the other way:
    # one step of every head input at most (rare, so far less on average); the int32 bias adds at most half a
    # step of the accumulator, s_x * s_w / 2.
    sx = float(q.head.slots.input.scale)
    w = q.head.slots.weight(q.head.weight.detach()).double()
    sw = q.head.slots.weight.scale.detach().double().reshape(-1)
    unit = sx * w.abs().sum(1).numpy()
    bias_half_step = (sx * sw / 2).numpy()
    err = np.abs(_run(path, x.numpy()) - TorchBackend(q)((x.numpy(),))) - bias_half_step
    assert (err / unit).max() <= 1 and (err / unit).mean() <= 0.25, ((err / unit).max(), (err / unit).mean())


def test_int32_bias_is_the_float_bias_rounded_to_the_accumulator_grid(tmp_path):
    q, _ = _quantized()
    path = export_onnx(q, (torch.rand(2, 1, 6, 6),), tmp_path / "int8.onnx")
    g = onnx.load(str(path)).graph
    arr = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    head = next(n for n in g.node if n.op_type == "Gemm" and "head" in n.name)
    dq = next(n for n in g.node if n.output[0] == head.input[2])
    codes, scale = arr[dq.input[0]], arr[dq.input[1]]
    assert codes.dtype == np.int32 and not arr[dq.input[2]].any()
    sx, sw = float(q.head.slots.input.scale), q.head.slots.weight.scale.detach().numpy()
    np.testing.assert_allclose(scale, np.float32(sx) * sw, rtol=2 * np.finfo(np.float32).eps)
    b = q.head.bias.detach().double().numpy()
    assert np.all(np.abs(codes * scale.astype(np.float64) - b) <= scale / 2 * (1 + 1e-6))


def test_bias_too_large_for_int32_stays_float_and_is_explained(tmp_path):
    q, _ = _quantized()
    with torch.no_grad():
        q.head.bias[0] = 1e30  # far beyond 2^31 steps of s_x * s_w
    path = export_onnx(q, (torch.rand(2, 1, 6, 6),), tmp_path / "int8.onnx")
    meta = json.loads({p.key: p.value for p in onnx.load(str(path)).metadata_props}["thrifty.int8"])
    assert meta["int32_biases"] == 3 and meta["float_biases"] == ["/head/Gemm"]
    head = next(r for r in fused_report(path) if r["layer"] == "/head/Gemm")
    assert not head["fused"] and "float bias and float output" in head["reason"]
    off = export_onnx(q, (torch.rand(2, 1, 6, 6),), tmp_path / "float_bias.onnx", int_bias=False)
    assert not next(r for r in fused_report(off) if r["layer"] == "/head/Gemm")["fused"]


def test_report_explains_float_layers(tmp_path):
    q, _ = _quantized()
    q.c2.slots.input, q.c2.slots.weight = None, None  # leave c2 in float: its input and weight are float
    path = export_onnx(q, (torch.rand(2, 1, 6, 6),), tmp_path / "int8.onnx")
    rep = {r["layer"]: r for r in fused_report(path)}
    assert not rep["/c2/Conv"]["fused"] and rep["/c2/Conv"]["reason"] == "float weight (layer not quantized)"
    # c1's output now feeds the float c2: no QuantizeLinear after it, so no QLinearConv
    assert not rep["/c1/Conv"]["fused"] and rep["/c1/Conv"]["reason"].startswith("output not quantized")
    assert rep["/fc/Gemm"]["fused"] and rep["/head/Gemm"]["fused"]


def test_activation_dtype_changes_codes_not_values(tmp_path):
    q, _ = _quantized(a_symmetric=True)
    x = torch.rand(16, 1, 6, 6).numpy()
    u8 = export_onnx(q, (torch.from_numpy(x[:2]),), tmp_path / "u8.onnx", act_dtype="uint8")
    s8 = export_onnx(q, (torch.from_numpy(x[:2]),), tmp_path / "s8.onnx", act_dtype="int8")
    zps = lambda p: {numpy_helper.to_array(i).dtype for i in onnx.load(str(p)).graph.initializer  # noqa: E731
                     if i.name.endswith(".x_zp")}
    assert zps(u8) == {np.dtype(np.uint8)} and zps(s8) == {np.dtype(np.int8)}
    # QuantizeLinear is saturate(round(x / s) + zp): shifting zp and the container by 128 is exact
    np.testing.assert_array_equal(_run(u8, x, optimize=False), _run(s8, x, optimize=False))
    with pytest.raises(ValueError, match="activation dtype"):
        set_activation_dtype(onnx.load(str(u8)), "int4")


def _relu_flatten_q_graph() -> onnx.ModelProto:
    """Two branches: Relu -> Flatten -> Q -> DQ, and Relu -> Transpose -> Reshape -> Q -> DQ (attention-like)."""
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Flatten", ["r"], ["f"], axis=1),
             helper.make_node("QuantizeLinear", ["f", "s", "z"], ["q"]),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"]),
             helper.make_node("Relu", ["x"], ["r2"]), helper.make_node("Transpose", ["r2"], ["t2"], perm=[0, 2, 1]),
             helper.make_node("Reshape", ["t2", "shape"], ["f2"]),
             helper.make_node("QuantizeLinear", ["f2", "s", "z"], ["q2"]),
             helper.make_node("DequantizeLinear", ["q2", "s", "z"], ["y2"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 2, 3])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 6]),
                           helper.make_tensor_value_info("y2", TensorProto.FLOAT, [None, 6])],
                          [numpy_helper.from_array(np.array(0.05, np.float32), "s"),
                           numpy_helper.from_array(np.array(3, np.uint8), "z"),
                           numpy_helper.from_array(np.array([-1, 6], np.int64), "shape")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def _run_all(m: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, {"x": x})


def test_hoist_quantize_moves_q_before_layout_ops_exactly():
    m = _relu_flatten_q_graph()
    x = np.random.default_rng(0).normal(size=(5, 2, 3)).astype(np.float32) * 4
    ref = _run_all(m, x)
    assert hoist_quantize(m) == 2
    onnx.checker.check_model(m)
    prod = {o: n for n in m.graph.node for o in n.output}
    qs = [n for n in m.graph.node if n.op_type == "QuantizeLinear"]
    assert len(qs) == 2 and all(prod[q.input[0]].op_type == "Relu" for q in qs)  # layout ops now move codes
    for a, b in zip(_run_all(m, x), ref):
        np.testing.assert_array_equal(a, b)
    assert hoist_quantize(m) == 0  # nothing left to move
