"""N:M weights stored compressed inside the deployed ONNX file; loading rebuilds the dense model bit for bit."""
from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn
from onnx import numpy_helper

from thrifty.bench import OrtBackend, export_onnx, fused_report
from thrifty.bench.nm_onnx import load_nm_onnx, save_nm_onnx
from thrifty.core import apply
from thrifty.quant import QuantConfig, calibrate_inputs
from thrifty.sparse.weights import NM, sparsify


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1)
        self.fc1, self.fc2 = nn.Linear(8 * 4 * 4, 32), nn.Linear(32, 8)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(torch.relu(self.conv(x)).flatten(1))))


def _inits(model) -> dict[str, np.ndarray]:
    p = model if isinstance(model, onnx.ModelProto) else onnx.load_from_string(model) if isinstance(model, bytes) \
        else onnx.load(str(model))
    return {i.name: numpy_helper.to_array(i) for i in p.graph.initializer}


def _expected_bytes(shapes_itemsize, n: int, m: int) -> int:
    """values (n of every m along K, K padded to m) in the tensor's dtype + ceil(log2 m)-bit indices, bit-packed."""
    total = 0
    for shape, item in shapes_itemsize:
        rows, k = shape[0], int(np.prod(shape[1:]))
        kept = rows * (-(-k // m)) * n
        total += kept * item + -(-kept * max(1, (m - 1).bit_length()) // 8)
    return total


@pytest.mark.parametrize("int8", [False, True])
def test_roundtrip_is_bit_identical_and_smaller(tmp_path, int8):
    torch.manual_seed(0)
    m = sparsify(_Net().eval(), NM(2, 4))
    x = torch.rand(16, 4, 4, 4)
    if int8:  # symmetric weights: a masked weight is the code 0
        m = apply(copy.deepcopy(m), QuantConfig(w_symmetric=True, w_estimator="minmax", a_estimator="minmax"))
        calibrate_inputs(m, x)
    dense = export_onnx(m, (x[:2],), tmp_path / "dense.onnx")
    info = save_nm_onnx(dense, tmp_path / "m.nm.onnx")
    names = {"conv", "fc1", "fc2"}
    suffix = ".wq" if int8 else ".weight"
    assert set(info["layers"]) == {k + suffix for k in names} and set(info["layers"].values()) == {"2:4"}
    ref = _inits(dense)
    # fc weights are stored as [N, K] behind a Gemm with transB (Conv: [out, in, kh, kw]): the GEMM view
    shapes = [(ref[k + suffix].shape, ref[k + suffix].itemsize) for k in names]
    assert info["stored_bytes"] == _expected_bytes(shapes, 2, 4)
    assert info["dense_bytes"] == sum(ref[k + suffix].nbytes for k in names)
    assert info["file_bytes"] < info["onnx_bytes"]
    back = load_nm_onnx(tmp_path / "m.nm.onnx")
    got = _inits(back)
    assert set(got) == set(ref)
    for k in ref:
        assert got[k].dtype == ref[k].dtype
        np.testing.assert_array_equal(got[k], ref[k])
    xn = x.numpy()
    np.testing.assert_array_equal(OrtBackend(back, threads=1)((xn,)), OrtBackend(dense, threads=1)((xn,)))
    if int8:
        assert all(r["fused"] for r in fused_report(back))


def test_nm_masked_int8_layers_export_their_codes(tmp_path):
    # quantizer then N:M mask in the weight slot: the masked weight is still on the quantizer's grid
    torch.manual_seed(1)
    q = apply(sparsify(nn.Sequential(nn.Linear(32, 16)).eval(), NM(2, 4)), QuantConfig(w_symmetric=True))
    calibrate_inputs(q, torch.randn(32, 32))
    path = export_onnx(q, (torch.randn(2, 32),), tmp_path / "q.onnx")
    codes = _inits(path)["0.wq"]
    mask = (q[0].effective_weight() != 0).numpy()
    # the container this CPU's exact kernels need: int8 codes, or uint8 shifted by 128 (its zero code is 128)
    zero = 128 if codes.dtype == np.uint8 else 0
    assert codes.dtype in (np.int8, np.uint8) and ((codes.astype(np.int16) != zero) == mask).all()
    for signed in (True, False):  # both containers store the masked weight as the zero code and compress
        p = export_onnx(q, (torch.randn(2, 32),), tmp_path / f"q{signed}.onnx", signed_weights=signed)
        info = save_nm_onnx(p, tmp_path / f"q{signed}.nm.onnx")
        assert set(info["layers"]) == {"0.wq"} and info["stored_bytes"] == _expected_bytes([((16, 32), 1)], 2, 4)
        np.testing.assert_array_equal(_inits(load_nm_onnx(tmp_path / f"q{signed}.nm.onnx"))["0.wq"],
                                      _inits(p)["0.wq"])


def test_bad_inputs(tmp_path):
    dense = export_onnx(nn.Sequential(nn.Linear(8, 8)), (torch.randn(2, 8),), tmp_path / "d.onnx")
    with pytest.raises(ValueError, match="2:4 sparse"):
        save_nm_onnx(dense, tmp_path / "x.nm.onnx")
    assert not (tmp_path / "x.nm.onnx").exists()
    with pytest.raises(ValueError, match="not an N:M-compressed"):
        load_nm_onnx(dense)
    with pytest.raises(FileNotFoundError):
        save_nm_onnx(tmp_path / "missing.onnx", tmp_path / "y.nm.onnx")
