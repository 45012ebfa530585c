"""Integer residual graphs: every quantized Conv of a ResNet becomes QLinearConv and every residual Add
QLinearAdd, with the new output quantizers calibrated like thrifty's PTQ calibrates activations."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from thrifty.bench import OrtBackend, TorchBackend, export_onnx, optimized_op_counts
from thrifty.bench.int8_graph import residual_points
from thrifty.core import apply
from thrifty.models import create
from thrifty.quant import QuantConfig, UniformQuantizer, calibrate_inputs
from tolerance import gamma, unit_roundoff


@pytest.fixture(scope="module")
def tiny_resnet():
    torch.manual_seed(0)
    m = create("resnet20", in_chans=1, num_classes=10, width=4).eval()
    with torch.no_grad():  # non-trivial BN statistics (random init has mean 0, var 1)
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.3, 0.3)
                mod.running_var.uniform_(0.5, 2.0)
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.uniform_(-0.2, 0.2)
    calib = torch.rand(32, 1, 8, 8)
    q = apply(__import__("copy").deepcopy(m), QuantConfig(w_bits=8, a_bits=8, w_estimator="minmax",
                                                          a_estimator="minmax"))
    calibrate_inputs(q, calib)
    return m, q, calib


def _ort(path, x, level: str = "all") -> np.ndarray:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if level == "all"
                                   else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    so.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"]).run(None, {"input_0": x})[0]


def test_resnet_becomes_integer_end_to_end(tmp_path, tiny_resnet):
    m, q, calib = tiny_resnet
    x = torch.rand(16, 1, 8, 8)
    plain = export_onnx(q, (x[:2],), tmp_path / "plain.onnx")
    path = export_onnx(q, (x[:2],), tmp_path / "int8.onnx", calib=calib)
    ops = optimized_op_counts(path)
    # 19 convs, 9 residual Adds: all integer; no float Conv left (only the tiny Gemm head and the mean pool)
    assert ops.get("QLinearConv") == 19 and ops.get("QLinearAdd") == 9, ops
    assert not ops.get("Conv") and not ops.get("FusedConv"), ops
    plain_ops = optimized_op_counts(plain)
    assert plain_ops.get("QLinearConv", 0) < 19 and not plain_ops.get("QLinearAdd"), plain_ops
    meta = json.loads({p.key: p.value for p in onnx.load(str(path)).metadata_props}["thrifty.int8"])
    assert meta["residual_adds"] == 9 and meta["shared"] == 9 and len(meta["new_quantizers"]) == 10
    # integer kernels compute what the QDQ graph says (the same graph without any ORT fusion)
    xn = x.numpy()
    fused, ref = _ort(path, xn), _ort(path, xn, level="none")
    # tolerances in steps of the head's input quantizer: one step on every head input moves logit o by
    # step * sum_j |W_head[o, j]| (the head is the only float layer after the last rounding)
    unit = float(q.head.slots.input.scale) * q.head.slots.weight(q.head.weight.detach()).double().abs().sum(1).numpy()
    # rare 1-LSB tie flips of the requantizations; the 2x2 mean pool averages a cascade's flips: two steps at most,
    # and far less on average (most outputs have none)
    err = np.abs(fused - ref) / unit
    assert err.max() <= 2 and err.mean() <= 0.25, (err.max(), err.mean())
    # and stays close to the simulated PTQ model: the 9 new residual quantizers each add a rounding of up to half a
    # step of their scale, on top of the flips above: four steps of the head's input
    sim = TorchBackend(q)((xn,))
    assert (np.abs(fused - sim) / unit).max() <= 4
    # the plain QDQ graph runs the simulated model's quantization grid: tie flips only, as above
    assert (np.abs(OrtBackend(plain, threads=1)((xn,)) - sim) / unit).max() <= 2


def test_new_quantizers_are_calibrated_like_ptq(tmp_path, tiny_resnet):
    _, q, calib = tiny_resnet
    path = export_onnx(q, (calib[:2],), tmp_path / "int8.onnx", calib=calib)
    newq = json.loads(onnx.load(str(path)).metadata_props[0].value)["new_quantizers"]
    # the Conv+BN outputs feeding residual Adds: observe the same tensors in the simulated model
    names = {k: k.split("/")[2] + "." + k.split("/")[3] for k in newq if "/bn2/" in k}
    assert len(names) == 9, list(newq)
    mods = dict(q.named_modules())
    got = {}
    hooks = [mods[f"{mod}"].register_forward_hook(
        lambda _m, _a, o, k=k: got.setdefault(k, UniformQuantizer(8, estimator="minmax").calibrate()).observe(o))
        for k, mod in ((k, v.replace(".bn2", "") + ".bn2") for k, v in names.items())]
    # each observed value is a conv (fan-in K) + BN of the same quantized input in another arrangement (BN folded
    # or not): two evaluations within 2 gamma(K + 8) of |a| (|W| |x| + s_x) + |shift|; min and max move by at
    # most that, so the scale (max - min) / 255 by its double over the range, plus the division's rounding
    mag = {}

    def magnitude(conv, bn, x):
        a = (bn.weight / (bn.running_var + bn.eps).sqrt()).double()
        shift = (bn.bias.double() - a * bn.running_mean.double()).abs()
        w = conv.effective_weight().detach().double().abs()
        xa = x.detach().double().abs() + float(conv.slots.input.scale)
        out = torch.nn.functional.conv2d(xa, w, None, conv.stride, conv.padding) * a.abs().view(1, -1, 1, 1)
        return 2 * gamma(w[0].numel() + 8) * float((out + shift.view(1, -1, 1, 1)).max())

    hooks += [mods[mod.replace(".bn2", ".conv2")].register_forward_pre_hook(
        lambda c, a, k=k, bn=mods[mod]: mag.__setitem__(k, max(mag.get(k, 0.0), magnitude(c, bn, a[0]))))
        for k, mod in ((k, v.replace(".bn2", "") + ".bn2") for k, v in names.items())]
    with torch.no_grad():
        for i in range(0, len(calib), 32):  # the PTQ's calibration batches (as_batches: 32)
            q(calib[i:i + 32])
    for h in hooks:
        h.remove()
    for k, uq in got.items():
        uq.freeze()
        rng = float(uq.max_val - uq.min_val)
        assert newq[k]["scale"] == pytest.approx(float(uq.scale), rel=2 * mag[k] / rng + 2 * unit_roundoff(), abs=0)
        assert newq[k]["zero_point"] == int(uq.zero_point)


def test_fp_model_and_mlp_are_untouched(tmp_path, tiny_resnet):
    m, _, calib = tiny_resnet
    p = export_onnx(m, (calib[:2],), tmp_path / "fp.onnx", calib=calib)  # nothing quantized: no residual pass
    g = onnx.load(str(p)).graph
    assert not any(n.op_type == "QuantizeLinear" for n in g.node)
    adds, points = residual_points(g)
    assert adds == [] and points == []
