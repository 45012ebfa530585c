"""int8 export: the per-layer weight container (int8 -> u8s8 kernels, uint8 -> u8u8) and its exactness in ORT.

Without VNNI, ONNX Runtime's u8s8 kernels sum two u8 x s8 products into a saturating int16 (VPMADDUBSW): exact iff
every stored weight code has |code| <= 64 for all u8 activations (255 * 64 * 2 = 32640 <= 32767). The edge cases
below put every activation at code 255 and every weight at +-64 or +-65 with the same sign in each pair.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn as nn

from thrifty.bench import OrtBackend, TorchBackend, export_onnx
from thrifty.bench.export import U8S8_EXACT_MAX_CODE, cpu_has_vnni, exact_fast_w_bits, weight_container
from thrifty.bench.layout import fused_report
from tolerance import assert_within, matmul_bound

K, N = 64, 8


def test_container_rule_on_synthetic_codes():
    assert U8S8_EXACT_MAX_CODE == 64 and 255 * 64 * 2 <= 32767 < 255 * 65 * 2
    for codes, without_vnni in (([64, -3], "int8"), ([-64, 64], "int8"), ([65, 0], "uint8"), ([-65], "uint8"),
                                ([-127, 127], "uint8"), ([], "int8")):
        c = np.array(codes, dtype=np.int64)
        assert weight_container(c, vnni=False)[0] == without_vnni, codes
        assert weight_container(c, vnni=True)[0] == "int8", codes  # VNNI: u8s8 exact for every code
        assert weight_container(c, vnni=False, forced=False)[0] == "uint8"
        assert weight_container(c, vnni=False, forced=True)[0] == "int8"
    assert "NOT exact" in weight_container(np.array([65]), vnni=False, forced=True)[1]
    assert "NOT exact" not in weight_container(np.array([64]), vnni=False, forced=True)[1]
    assert (exact_fast_w_bits(vnni=True), exact_fast_w_bits(vnni=False)) == (8, 7)


def _edge_model(top: int, w_bits: int = 8) -> tuple[nn.Module, torch.Tensor]:
    """One quantized Linear: weight codes +-``top`` (sign alternating every 2 along K, so every pair has one
    sign), scale 1/64 per channel; inputs in [0, 1] with an asymmetric min/max quantizer, x = 1 is code 255."""
    from thrifty.nn import wrap
    from thrifty.quant import UniformQuantizer

    lin = nn.Linear(K, N)
    sign = torch.tensor([1.0, 1.0, -1.0, -1.0]).repeat(K // 4)
    codes = torch.stack([sign * (1 if o % 2 else -1) for o in range(N)]) * top
    with torch.no_grad():
        lin.weight.copy_(codes / 64)
        lin.bias.uniform_(-0.5, 0.5)
    m = wrap(lin)
    wq = UniformQuantizer(w_bits, symmetric=True, per_channel=True).init_from(m.weight)
    with torch.no_grad():
        wq.scale.fill_(1 / 64)
    m.add("weight", wq)
    m.add("input", UniformQuantizer(8).calibrate())
    x = torch.rand(32, K)
    x[:8] = 1.0  # all activations at code 255: the largest pair sums
    x[8:16, ::2] = 1.0
    x[0, 0] = 0.0  # calibration range exactly [0, 1]
    with torch.no_grad():
        m(x)
    m.slots.input.freeze()
    return nn.Sequential(m).eval(), x


def _ort_vs_sim(m: nn.Module, x: torch.Tensor, path, **kw) -> tuple[np.ndarray, np.ndarray, dict]:
    import onnx

    p = export_onnx(m, (x[:2],), path, input_names=["x"], **kw)
    meta = json.loads({m_.key: m_.value for m_ in onnx.load(str(p)).metadata_props}["thrifty.int8"])
    return OrtBackend(p, threads=1)((x.numpy(),)), TorchBackend(m)((x.numpy(),)), meta


def _bound(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Both sides compute the same integer dot products scaled by s_x * s_w, plus the bias: ORT in int32
    (exact when nothing saturates) then a float scale and add, thrifty in float on dequantized values."""
    layer = m[0]
    xq = layer.slots.input(x).detach()
    wq = layer.slots.weight(layer.weight).detach()
    return matmul_bound(xq, wq.T, extra=3) + 4 * torch.finfo(torch.float32).eps * layer.bias.detach().abs()


@pytest.mark.parametrize("top, forced, expect", [(64, None, "int8"), (127, None, None), (127, False, "uint8"),
                                                 (64, True, "int8"), (64, False, "uint8")])
def test_each_container_is_exact_in_ort(tmp_path, top, forced, expect):
    """Every container the export picks (or is told to use, where the rule says it is exact) matches the
    simulated model within float rounding, on any CPU."""
    m, x = _edge_model(top)
    ort, sim, meta = _ort_vs_sim(m, x, tmp_path / "q.onnx", signed_weights=forced)
    got = meta["weight_containers"]["0"]
    assert got["max_abs_code"] == top
    assert got["container"] == (expect or ("int8" if cpu_has_vnni() else "uint8")), got
    assert_within(torch.as_tensor(ort), torch.as_tensor(sim), _bound(m, x), f"ORT {got['container']} vs simulated")
    assert [r["fused"] for r in fused_report(tmp_path / "q.onnx")] == [True]


def test_seven_bit_weights_pick_int8_and_stay_exact(tmp_path):
    m, x = _edge_model(63, w_bits=7)  # the symmetric 7-bit grid's largest codes
    ort, sim, meta = _ort_vs_sim(m, x, tmp_path / "q.onnx")
    assert meta["weight_containers"]["0"]["container"] == "int8" and meta["signed_weights"] is True
    assert_within(torch.as_tensor(ort), torch.as_tensor(sim), _bound(m, x), "ORT 7-bit int8 vs simulated")


@pytest.mark.skipif(cpu_has_vnni(), reason="with VNNI, u8s8 does not saturate")
def test_edge_case_detects_saturation_without_vnni(tmp_path):
    """The edge model one code past the rule, forced into int8: ORT's u8s8 kernel saturates on this CPU and the
    comparison above fails; so the exactness tests can see saturation when it happens."""
    m, x = _edge_model(U8S8_EXACT_MAX_CODE + 1)
    ort, sim, meta = _ort_vs_sim(m, x, tmp_path / "q.onnx", signed_weights=True)
    assert "NOT exact" in meta["weight_containers"]["0"]["reason"]
    with pytest.raises(AssertionError):
        assert_within(torch.as_tensor(ort), torch.as_tensor(sim), _bound(m, x), "ORT forced int8 vs simulated")


def test_mixed_containers_all_fuse(tmp_path):
    """A network whose layers get different containers (one layer 7-bit, one 8-bit) still fuses every GEMM."""
    from thrifty.nn import gemm_layers, wrap
    from thrifty.quant import UniformQuantizer

    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    m[0], m[2] = wrap(m[0]), wrap(m[2])
    for (_, layer), bits in zip(gemm_layers(m), (7, 8)):
        layer.add("weight", UniformQuantizer(bits, symmetric=True, per_channel=True).init_from(layer.weight))
        layer.add("input", UniformQuantizer(8).calibrate())
    x = torch.randn(64, 16)
    with torch.no_grad():
        m(x)
    for _, layer in gemm_layers(m):
        layer.slots.input.freeze()
    ort, sim, meta = _ort_vs_sim(m, x, tmp_path / "q.onnx")
    c = {k: v["container"] for k, v in meta["weight_containers"].items()}
    assert c == ({"0": "int8", "2": "int8"} if cpu_has_vnni() else {"0": "int8", "2": "uint8"})
    assert meta["signed_weights"] == (True if cpu_has_vnni() else "mixed")
    assert all(r["fused"] for r in fused_report(tmp_path / "q.onnx")), fused_report(tmp_path / "q.onnx")
    assert (ort.argmax(1) == sim.argmax(1)).mean() >= 0.9


def test_bad_signed_weights_argument(tmp_path):
    m, x = _edge_model(64)
    with pytest.raises(ValueError, match="signed_weights"):
        export_onnx(m, (x[:2],), tmp_path / "q.onnx", signed_weights="yes")
