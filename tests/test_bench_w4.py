"""Weight-only 4-bit export to ONNX Runtime's MatMulNBits: thrifty's own codes packed, not re-quantized."""
from __future__ import annotations

import copy
import json

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import numpy_helper

from thrifty.bench import OrtBackend, optimized_op_counts
from thrifty.bench.w4 import dequantize_blocks, export_w4, pack_nbits, rtn_blocks, unpack_nbits, w4_params
from thrifty.core import apply
from thrifty.quant import QuantConfig
from tolerance import matmul_bound, unit_roundoff

BLOCK = 32


def _meta(path) -> dict:
    return json.loads({p.key: p.value for p in onnx.load(str(path)).metadata_props}["thrifty.w4"])


def _inits(path) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer}


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 5), k=st.integers(1, 200), block=st.sampled_from([16, 32, 64]), seed=st.integers(0, 99))
def test_pack_unpack_roundtrip(n, k, block, seed):
    rng = np.random.default_rng(seed)
    nb = -(-k // block)
    codes, zp = rng.integers(0, 16, (n, k)), rng.integers(0, 16, (n, nb))
    b, zpp = pack_nbits(codes, zp, block)
    assert b.shape == (n, nb, block // 2) and b.dtype == np.uint8 and zpp.shape == (n, -(-nb // 2))
    np.testing.assert_array_equal(unpack_nbits(b, k), codes)
    np.testing.assert_array_equal(unpack_nbits(zpp, nb), zp)
    # element 2i in the low nibble, 2i + 1 in the high one (MatMulNBits' layout)
    assert b[0, 0, 0] == (codes[0, 0] | ((codes[0, 1] if k > 1 else zp[0, 0]) << 4))


def test_pack_refuses_codes_outside_4_bits():
    with pytest.raises(ValueError, match="0..15"):
        pack_nbits(np.full((1, 16), 16), np.zeros((1, 1), np.int64), 16)


def _reference(layer: nn.Linear, w: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``x @ w.T + b`` in float64 and the bound on any float32 evaluation of it (K products, then the bias)."""
    wt, xt = torch.from_numpy(w.astype(np.float64)), torch.from_numpy(x.astype(np.float64))
    b = layer.bias.detach().double()
    y = xt @ wt.T + b
    bound = matmul_bound(xt.float(), wt.float().T, extra=2) + 2 * unit_roundoff() * b.abs()  # float32 roundings
    return y.numpy(), bound.numpy()


@pytest.mark.parametrize("symmetric", [False, True])
def test_thrifty_4bit_codes_exported_exactly(tmp_path, symmetric):
    torch.manual_seed(0)
    fp = nn.Sequential(nn.Linear(80, 24))  # K = 80: a short last block (padded)
    q = apply(copy.deepcopy(fp), QuantConfig(w_bits=4, a_bits=None, w_symmetric=symmetric, w_estimator="minmax"))
    path = export_w4(q, (torch.randn(2, 80),), tmp_path / "w4.onnx", block_size=BLOCK, accuracy_level=0)
    assert _meta(path)["layers"] == {"0": "quantizer"}
    assert optimized_op_counts(path) == {"MatMulNBits": 1}
    w_eff = q[0].effective_weight().numpy()
    inits = _inits(path)
    codes, scales, zp = unpack_nbits(inits["0.w4"], 80), inits["0.w4_scale"], unpack_nbits(inits["0.w4_zp"], 3)
    # the quantizer's scale in every block of a channel, its codes: dequantizing gives W_eff back
    np.testing.assert_array_equal(scales, np.repeat(q[0].slots.weight.scale.detach().numpy()[:, None], 3, 1))
    assert (zp == 8).all() if symmetric else True
    np.testing.assert_allclose(dequantize_blocks(codes, scales, zp, BLOCK), w_eff, rtol=0, atol=0)
    x = np.random.default_rng(0).normal(size=(16, 80)).astype(np.float32)
    y, bound = _reference(q[0], w_eff, x)
    err = np.abs(OrtBackend(path, threads=1)((x,)) - y)
    assert (err <= bound).all(), (err / bound).max()


def test_unquantized_linear_gets_blockwise_rtn(tmp_path):
    torch.manual_seed(1)
    m = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8)).eval()
    path = export_w4(m, (torch.randn(2, 64),), tmp_path / "w4.onnx", block_size=16, accuracy_level=0)
    assert _meta(path)["layers"] == {"0": "rtn", "2": "rtn"}
    codes, s, zp = rtn_blocks(m[0].weight, 16)
    deq = dequantize_blocks(codes, s, zp, 16)
    # round to nearest on each block's grid: half a step of that block at most (plus the product's rounding)
    step = np.repeat(s, 16, axis=1).astype(np.float64)
    assert (np.abs(deq - m[0].weight.detach().numpy()) <= step / 2 * (1 + 4 * unit_roundoff())).all()
    blocks = m[0].weight.detach().reshape(32, 4, 16)
    assert np.allclose(s, ((blocks.amax(2).clamp(min=0) - blocks.amin(2).clamp(max=0)) / 15).numpy(), rtol=1e-6)


def test_multilayer_and_sequence_inputs_match_dequantized_model(tmp_path):
    torch.manual_seed(2)
    m = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 16)).eval()
    x = torch.randn(3, 7, 64)  # [batch, seq, K]: torch exports MatMul + Add
    path = export_w4(m, (x[:2],), tmp_path / "w4.onnx", block_size=16, accuracy_level=0)
    ref = copy.deepcopy(m)
    for name in ("0", "2"):
        mod = dict(ref.named_modules())[name]
        c, s, z, _ = w4_params(mod, name, 16)
        mod.weight.data = torch.from_numpy(dequantize_blocks(c, s, z, 16))
    with torch.no_grad():
        h = torch.relu(ref[0](x))
        y = ref(x)
    got = OrtBackend(path, threads=1)((x.numpy(),))
    # two float32 layers: each layer's rounding bound (bias magnitude included), the first one propagated through
    # |W2| (ReLU is 1-Lipschitz)
    w1, w2 = ref[0].weight.detach(), ref[2].weight.detach()
    b1 = matmul_bound(x, w1.T, extra=2) + 2 * unit_roundoff() * ref[0].bias.detach().double().abs()
    b2 = (matmul_bound(h.abs() + b1.float(), w2.T, extra=2) + b1 @ w2.double().abs().T
          + 2 * unit_roundoff() * ref[2].bias.detach().double().abs())
    assert (np.abs(got - y.numpy()) <= b2.numpy()).all()


def test_int8_activation_blocks_error_is_bounded(tmp_path):
    # accuracy_level=4: ONNX Runtime rounds each activation block of K to int8 (scale max|a| / 127): each product
    # term moves by at most half that step times |w|
    torch.manual_seed(3)
    m = nn.Sequential(nn.Linear(64, 16)).eval()
    x = torch.randn(8, 64)
    path = export_w4(m, (x[:2],), tmp_path / "w4.onnx", block_size=32, accuracy_level=4)
    c, s, z, _ = w4_params(m[0], "0", 32)
    w = dequantize_blocks(c, s, z, 32).astype(np.float64)
    y, fbound = _reference(m[0], w, x.numpy())
    xa = x.double().abs().reshape(8, 2, 32)
    half_step = (xa.amax(2) / 127 / 2).numpy()  # [batch, blocks]
    wsum = np.abs(w).reshape(16, 2, 32).sum(2)  # [N, blocks]
    bound = half_step @ wsum.T * (1 + 1e-3) + 2 * fbound
    err = np.abs(OrtBackend(path, threads=1)((x.numpy(),)) - y)
    assert (err <= bound).all(), (err / bound).max()


class _GroupQuantizer(nn.Module):
    """A frozen per-group weight quantizer in the layout of thrifty's (scale/zero point ``[out, K / group]``)."""

    def __init__(self, w: torch.Tensor, group: int) -> None:
        super().__init__()
        self.bits, self.symmetric, self.per_channel, self.axis, self.group_size = 4, False, True, 0, group
        c, s, z = rtn_blocks(w, group)
        self.register_buffer("scale", torch.from_numpy(s))
        self.register_buffer("zero_point", torch.from_numpy(z).float())

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        s = self.scale.repeat_interleave(self.group_size, 1)[:, :w.shape[1]]
        z = self.zero_point.repeat_interleave(self.group_size, 1)[:, :w.shape[1]]
        return (torch.clamp(torch.round(w / s) + z, 0, 15) - z) * s


def test_group_quantizer_parameters_are_used(tmp_path):
    from thrifty.nn import wrap

    torch.manual_seed(4)
    layer = wrap(nn.Linear(96, 8))
    layer.slots.weight = _GroupQuantizer(layer.weight.detach() * 3, 32)  # a range RTN would not pick
    path = export_w4(nn.Sequential(layer), (torch.randn(2, 96),), tmp_path / "w4.onnx", block_size=32)
    assert _meta(path)["layers"] == {"0": "group quantizer"}
    np.testing.assert_array_equal(_inits(path)["0.w4_scale"], layer.slots.weight.scale.numpy())
    with pytest.raises(ValueError, match="group_size=32 must be the block size"):
        export_w4(nn.Sequential(layer), (torch.randn(2, 96),), tmp_path / "w4b.onnx", block_size=64)


def test_8bit_layers_stay_float_and_bad_arguments_are_refused(tmp_path):
    q = apply(nn.Sequential(nn.Linear(32, 8)), QuantConfig(w_bits=8, a_bits=None))
    path = export_w4(q, (torch.randn(2, 32),), tmp_path / "w4.onnx")
    assert _meta(path)["layers"] == {} and "8-bit" in _meta(path)["skipped"]["0"]
    assert "MatMulNBits" not in optimized_op_counts(path)
    with pytest.raises(ValueError, match="power of two"):
        export_w4(q, (torch.randn(2, 32),), tmp_path / "x.onnx", block_size=24)
    with pytest.raises(ValueError, match="accuracy_level"):
        export_w4(q, (torch.randn(2, 32),), tmp_path / "x.onnx", accuracy_level=7)
    with pytest.raises(TypeError, match="nn.Module"):
        export_w4("model", (torch.randn(2, 32),), tmp_path / "x.onnx")
    assert not (tmp_path / "x.onnx").exists()


def test_ptq_per_group_model_runs_exactly_in_matmulnbits(tmp_path):
    # thrifty's own per-group quantizer (PTQ group_size) -> MatMulNBits: with float activations in the kernel
    # (accuracy_level 0) ONNX Runtime computes the simulated model's function up to float32 summation order
    import onnxruntime as ort

    from thrifty.core import strip
    from thrifty.quant import PTQ, quantize

    torch.manual_seed(5)
    m = nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 32))
    x = torch.randn(8, 64)
    q = quantize(m, PTQ(w_bits=4, a_bits=None, pipeline="rtn", first_last_bits=4, group_size=32), x,
                 progress=False).model
    path = export_w4(q, (x,), tmp_path / "w4.onnx", block_size=32, accuracy_level=0)
    assert set(_meta(path)["layers"].values()) == {"group quantizer"}
    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    y = torch.from_numpy(s.run(None, {s.get_inputs()[0].name: x.numpy()})[0]).double()
    plain = strip(copy.deepcopy(q))
    w1, w2 = plain[0].weight.detach(), plain[2].weight.detach()
    with torch.no_grad():
        ref, h = q(x).double(), torch.relu(plain[0](x))
    b1 = matmul_bound(x, w1.t(), extra=1)  # layer 1, bias add included; ReLU does not grow an error
    bound = matmul_bound(h, w2.t(), extra=1) + b1 @ w2.t().abs().double()
    assert ((y - ref).abs() <= bound).all(), float(((y - ref).abs() - bound).max())


class _TiedLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(16, 32)
        self.head = nn.Linear(32, 16, bias=False)
        self.head.weight = self.emb.weight  # tied, as GPT-2's and many decoders' LM heads are

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.emb(ids))


def test_tied_head_keeps_the_embedding_dense(tmp_path):
    # the simulated model's embedding reads the dense shared weight, its head the 4-bit one; the export must too
    torch.manual_seed(3)
    q = apply(_TiedLM().eval(), QuantConfig(w_bits=4, a_bits=None, w_estimator="minmax"),
              filter=lambda m, n: n == "head")
    ids = torch.randint(0, 16, (2, 5))
    path = export_w4(q, (ids,), tmp_path / "w4.onnx", block_size=16, accuracy_level=0)
    assert _meta(path)["layers"] == {"head": "quantizer"}
    assert isinstance(q.head.weight, nn.Parameter) and q.head.weight is q.emb.weight  # the user's model untouched
    h = q.emb.weight.detach()[ids].double()  # dense rows
    w_eff = q.head.effective_weight().detach().double()
    assert not torch.equal(w_eff, q.emb.weight.detach().double())  # the two reads differ: the test can fail
    y = h @ w_eff.T
    bound = matmul_bound(h.float(), w_eff.float().T, extra=2)
    got = OrtBackend(path, threads=1)((ids.numpy(),))
    assert (np.abs(got - y.numpy()) <= bound.numpy()).all()
