"""Per-group weight quantization (``group_size``): the ops against brute force, the quantizer, PTQ, AdaQuant, strip."""
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

from thrifty.core import strip
from thrifty.nn import wrap
from thrifty.ops import quant as Q
from thrifty.quant import PTQ, QuantConfig, UniformQuantizer, quantize
from thrifty.quant.adaquant import adaquant_layer

SETTINGS = settings(max_examples=40, deadline=None)
U = 2.0**-24  # float32 unit roundoff


def _shapes():
    return st.lists(st.integers(1, 7), min_size=1, max_size=3)


def _tensor(shape, seed, ties):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 3
    if ties:  # many exact midpoints and repeated values: rounding ties and equal min/max
        x = torch.round(x * 2) / 2
    return x


def _brute(x, axis, gs, bits, symmetric, estimator="minmax"):
    """Each channel's flattened rest cut into groups; each group quantized alone (per tensor)."""
    rows = x.movedim(axis, 0).reshape(x.shape[axis], -1)
    out = torch.empty_like(rows)
    for c in range(rows.shape[0]):
        for j in range(0, rows.shape[1], gs):
            seg = rows[c, j:j + gs]
            lo, hi = Q.estimate_range(seg, estimator, bits=bits, symmetric=symmetric,
                                      **({"grid": 20} if estimator == "mse" else {}))
            s, zp = Q.qparams_from_range(lo, hi, bits, symmetric)
            out[c, j:j + gs] = Q.fake_quantize(seg, s, zp, bits, symmetric=symmetric)
    moved = x.movedim(axis, 0).shape
    return out.reshape(moved).movedim(0, axis)


@SETTINGS
@given(_shapes(), st.integers(1, 9), st.integers(2, 8), st.booleans(), st.booleans(), st.integers(0, 2**16))
def test_grouped_minmax_equals_each_group_alone(shape, gs, bits, symmetric, ties, seed):
    x = _tensor([2] + shape, seed, ties)
    for axis in range(x.dim()):
        lo, hi = Q.estimate_range(x, "minmax", axis=axis, group_size=gs)
        k = x.numel() // x.shape[axis]
        assert lo.shape == hi.shape == (x.shape[axis], math.ceil(k / gs))
        s, zp = Q.qparams_from_range(lo, hi, bits, symmetric)
        got = Q.fake_quantize(x, s, zp, bits, symmetric=symmetric, axis=axis, group_size=gs)
        # the same elementwise float operations as the brute force (a short last group's zero padding changes
        # neither min/max range, which contains 0 anyway): bit for bit
        assert torch.equal(got, _brute(x, axis, gs, bits, symmetric))


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 5), st.integers(1, 30), st.integers(1, 12), st.integers(2, 6), st.booleans(),
       st.integers(0, 2**16))
def test_grouped_mse_minimises_each_group_like_alone(c, k, gs, bits, symmetric, seed):
    x = _tensor((c, k), seed, False)
    lo, hi = Q.estimate_range(x, "mse", bits=bits, symmetric=symmetric, axis=0, group_size=gs, grid=20)
    s, zp = Q.qparams_from_range(lo, hi, bits, symmetric)
    got = Q.fake_quantize(x, s, zp, bits, symmetric=symmetric, axis=0, group_size=gs)
    ref = _brute(x, 0, gs, bits, symmetric, "mse")
    # Both minimise the same error over the same shrink grid; the padded group's extra zeros add exact zeros
    # (0 is on every grid) but may change the summation order: errors agree up to the sum's rounding.
    for j in range(0, k, gs):
        e_got = (x[:, j:j + gs] - got[:, j:j + gs]).double().pow(2).sum(1)
        e_ref = (x[:, j:j + gs] - ref[:, j:j + gs]).double().pow(2).sum(1)
        tol = 4 * gs * U * e_ref + 1e-30
        assert torch.all((e_got - e_ref).abs() <= tol)


@SETTINGS
@given(_shapes(), st.integers(1, 9), st.integers(0, 2**16))
def test_group_view_round_trip_and_padding(shape, gs, seed):
    x = _tensor([3] + shape, seed, False)
    for axis in range(-x.dim(), x.dim()):
        g = Q.group_view(x, axis, gs)
        k = x.numel() // x.shape[axis]
        assert g.shape == (x.shape[axis], math.ceil(k / gs), gs)
        assert torch.equal(Q.ungroup(g, x.shape, axis), x)
        assert torch.all(g.reshape(g.shape[0], -1)[:, k:] == 0)


def test_group_covering_the_channel_is_per_channel_and_group_of_one_is_exact():
    x = _tensor((4, 10), 1, False)
    lo, hi = Q.estimate_range(x, axis=0)
    s, zp = Q.qparams_from_range(lo, hi, 4)
    per_ch = Q.fake_quantize(x, s, zp, 4, axis=0)
    for gs in (10, 16):
        s2, zp2 = Q.qparams_from_range(*Q.estimate_range(x, axis=0, group_size=gs), 4)
        assert torch.equal(Q.fake_quantize(x, s2, zp2, 4, axis=0, group_size=gs), per_ch)
    # one element per group: x is an end of its own range, so it is a grid point (up to x / s rounding)
    s1, zp1 = Q.qparams_from_range(*Q.estimate_range(x, axis=0, group_size=1), 3)
    q1 = Q.fake_quantize(x, s1, zp1, 3, axis=0, group_size=1)
    assert torch.allclose(q1, x, rtol=4 * U, atol=0)


def test_zeros_nan_and_bad_arguments():
    z = torch.zeros(3, 5)
    s, zp = Q.qparams_from_range(*Q.estimate_range(z, axis=0, group_size=2), 4)
    assert torch.all(s == Q.EPS) and torch.equal(Q.fake_quantize(z, s, zp, 4, axis=0, group_size=2), z)
    x = torch.randn(3, 5)
    with pytest.raises(ValueError, match="NaN"):
        Q.estimate_range(torch.tensor([[1.0, float("nan")]]), axis=0, group_size=1)
    with pytest.raises(ValueError, match="channel axis"):
        Q.fake_quantize(x, 1.0, 0.0, 4, group_size=2)
    with pytest.raises(ValueError, match="minmax and mse"):
        Q.estimate_range(x, "percentile", axis=0, group_size=2)
    with pytest.raises(ValueError, match="3 channels x 3 groups"):
        Q.fake_quantize(x, torch.ones(3), torch.zeros(3), 4, axis=0, group_size=2)
    for bad, err in ((0, ValueError), (-2, ValueError), (1.5, TypeError), (True, TypeError)):
        with pytest.raises(err, match="group_size"):
            Q.estimate_range(x, axis=0, group_size=bad)
    with pytest.raises(ValueError, match="per_channel"):
        UniformQuantizer(4, group_size=8)
    with pytest.raises(ValueError, match="per_channel"):
        QuantConfig(w_bits=4, per_channel=False, group_size=8)
    with pytest.raises(ValueError, match="w_estimator"):
        PTQ(w_bits=4, w_estimator="percentile", group_size=8)


def test_quantizer_state_gradients_and_steps():
    torch.manual_seed(0)
    w = torch.randn(6, 20)
    q = UniformQuantizer(4, per_channel=True, axis=0, estimator="minmax", learnable=True, group_size=8).init_from(w)
    assert q.scale.shape == (6, 3) and "group_size=8" in repr(q)
    s, zp = Q.qparams_from_range(*Q.estimate_range(w, axis=0, group_size=8), 4)
    assert torch.equal(q(w), Q.fake_quantize(w, s, zp, 4, axis=0, group_size=8))
    q(w).pow(2).sum().backward()
    assert q.scale.grad.shape == (6, 3) and bool(q.scale.grad.abs().sum() > 0)
    steps = q.step_like(w)
    assert steps.shape == w.shape
    assert torch.equal(steps[:, 16:], q.scale.detach()[:, 2:3].expand(6, 4))
    # a saved spec + state dict rebuilds the same quantizer (parameters adopt the per-group shape)
    q2 = UniformQuantizer.from_spec(q.spec())
    q2.load_state_dict(q.state_dict())
    assert torch.equal(q2(w), q(w))
    # GPT-2 Conv1D layout ([in, out], output channels on axis 1): groups run down each column
    wt = w.t().contiguous()
    qt = UniformQuantizer(4, per_channel=True, axis=1, estimator="minmax", group_size=8).init_from(wt)
    assert torch.equal(qt(wt), q(w).t())


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(24, 40), nn.GELU(), nn.Linear(40, 36), nn.GELU(), nn.Linear(36, 8))


def test_ptq_w4a16_per_group_rtn_strip_and_adaquant_bound():
    model, x = _mlp(), torch.randn(128, 24)
    res = quantize(model, PTQ(w_bits=4, a_bits=None, group_size=16, first_last_bits=4, pipeline="rtn",
                              w_estimator="minmax"), x, progress=False)
    layer = res.model[2]
    assert layer.slots.weight.group_size == 16 and layer.slots.input is None
    ref = _brute(model[2].weight.detach(), 0, 16, 4, False)
    assert torch.equal(layer.effective_weight(), ref)
    assert res.bits["2"] == (4, None)
    plain = strip(res.model)
    assert type(plain[2]) is nn.Linear and torch.equal(plain[2].weight, ref)
    assert torch.equal(plain(x), res.model(x))
    # each group of the stripped weight holds at most 2^4 distinct values
    g = Q.group_view(plain[2].weight.detach(), 0, 16)
    assert max(len(torch.unique(row)) for row in g.reshape(-1, 16)) <= 16

    # AdaQuant learns per-group steps and keeps every latent weight within max_shift steps of its group
    lin = wrap(nn.Linear(40, 36))
    lin.load_state_dict(model[2].state_dict())
    w0 = lin.weight.detach().clone()
    wq = UniformQuantizer(4, per_channel=True, estimator="minmax", learnable=True, group_size=16).init_from(w0)
    lin.add("weight", wq)
    steps = wq.step_like(w0).clone()
    xs = [torch.nn.functional.gelu(model[0](x)).detach()]
    ys = [model[2](xs[0]).detach()]
    before, after = adaquant_layer(lin, xs, ys, iters=60, max_shift=0.5)
    assert after < before
    assert torch.all((lin.weight.detach() - w0).abs() <= 0.5 * steps * (1 + 4 * U) + 4 * U * w0.abs())


def test_ptq_adaquant_and_bn_tuning_with_groups():
    torch.manual_seed(1)
    conv = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8),
                         nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 5))
    conv.train()
    conv(torch.randn(64, 3, 8, 8))  # non-trivial BN statistics
    conv.eval()
    x = torch.randn(64, 3, 8, 8)
    res = quantize(conv, PTQ(w_bits=3, a_bits=8, group_size=8, pipeline="advanced", adaquant_iters=20,
                             bias_iters=5), x, progress=False)
    mid = res.model[3]  # conv 8 -> 8: its reduction is 8 * 3 * 3 = 72 = 9 groups of 8
    wq = mid.slots.weight
    assert wq.scale.shape == (8, 9)
    w = mid.effective_weight().detach()
    # after AdaQuant and BN tuning (which rescales each channel's steps) the weight is still on its groups' grids
    codes = Q.group_view(w, 0, 8) / wq.scale.detach()[..., None] + wq.zero_point.detach().round()[..., None]
    assert torch.allclose(codes, codes.round(), atol=1e-3)
    assert res.final_loss <= res.losses["rtn"]


def test_int8_export_refuses_groups_clearly():
    from thrifty.bench.export import quant_layers

    res = quantize(_mlp(), PTQ(w_bits=4, a_bits=8, group_size=8, pipeline="rtn"), torch.randn(32, 24),
                   progress=False)
    with pytest.raises(ValueError, match="per-group"):
        quant_layers(res.model)


def test_save_load_quantized_round_trip(tmp_path):
    from thrifty.quant.io import load_quantized, save_quantized

    model, x = _mlp(), torch.randn(32, 24)
    res = quantize(model, PTQ(w_bits=4, a_bits=None, group_size=8, pipeline="rtn"), x, progress=False)
    save_quantized(res, tmp_path / "q")
    back, _ = load_quantized(tmp_path / "q", model)
    assert torch.equal(back(x), res.model(x))
    assert np.all([back[i].slots.weight.group_size == 8 for i in (0, 2, 4)])
