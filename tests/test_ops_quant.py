"""thrifty.ops.quant against brute force, plus the UniformQuantizer slot module."""
import numpy as np
import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

from thrifty.nn import wrap
from thrifty.ops import quant as Q
from thrifty.quant import UniformQuantizer

FLOATS = st.floats(-1e3, 1e3, allow_nan=False, width=32)
SETTINGS = settings(max_examples=60, deadline=None)


def _grid(scale: float, zp: float, bits: int, symmetric: bool) -> np.ndarray:
    qmin, qmax = Q.qrange(bits, symmetric)
    return (np.arange(qmin, qmax + 1, dtype=np.float64) - (0 if symmetric else zp)) * scale


@SETTINGS
@given(st.lists(FLOATS, min_size=1, max_size=40), st.integers(2, 8), st.booleans())
def test_fake_quantize_is_nearest_grid_point_brute_force(vals, bits, symmetric):
    x = torch.tensor(vals, dtype=torch.float32)
    s, zp = Q.qparams_from_range(x.min(), x.max(), bits, symmetric)
    q = Q.fake_quantize(x, s, zp, bits, symmetric=symmetric).double().numpy()
    grid = _grid(float(s), float(zp), bits, symmetric)
    dist = np.abs(x.double().numpy()[:, None] - grid[None, :])
    best = dist.min(1)
    got = np.abs(x.double().numpy() - q)
    # The chosen point is (one of) the nearest grid points: x / s rounds by u |x| (in value units), which may pick
    # the other neighbour of a midpoint (2 u |x| farther), and q = (code - zp) s rounds by u |q| (or 2^-150 when
    # subnormal).
    u, ax, aq = 2.0**-24, np.abs(x.double().numpy()), np.abs(q)
    assert np.all(got <= best + u * (2 * ax + aq) + 2.0**-149)
    # and it lies on the grid, up to that last rounding of q
    near = dist[np.arange(len(q)), np.abs(q[:, None] - grid[None, :]).argmin(1)]
    assert np.all(np.abs(near - got) <= u * aq + 2.0**-149)


@SETTINGS
@given(st.lists(FLOATS, min_size=1, max_size=40), st.integers(2, 16), st.booleans())
def test_on_grid_error_bound_and_idempotent(vals, bits, symmetric):
    x = torch.tensor(vals, dtype=torch.float32)
    s, zp = Q.qparams_from_range(x.min(), x.max(), bits, symmetric)
    qmin, qmax = Q.qrange(bits, symmetric)
    q = Q.fake_quantize(x, s, zp, bits, symmetric=symmetric)
    codes = q.double() / s.double() + (0 if symmetric else zp.double())
    # q is float32: its relative error 2^-24 becomes up to ~2^-24 * (qmax - qmin) codes (0.004 at 16 bits), or
    # 2^-150 / s codes where q is subnormal
    tol = 4 * 2.0 ** -24 * (qmax - qmin + abs(float(zp))) + 2.0**-149 / float(s)
    assert torch.allclose(codes, codes.round(), atol=tol)
    assert codes.round().min() >= qmin and codes.round().max() <= qmax
    # min/max ranges cover x, so every element is inside the range: error <= scale / 2, plus the roundings of
    # x / s (u |x|: may pick the farther neighbour of a midpoint) and of q (u |q|, or 2^-150 if subnormal)
    xd, qd = x.double(), q.double()
    assert torch.all((xd - qd).abs() <= float(s) / 2 + 2.0**-24 * (xd.abs() + qd.abs()) + 2.0**-149)
    assert torch.equal(Q.fake_quantize(q, s, zp, bits, symmetric=symmetric), q)
    assert float(zp) == round(float(zp)) and qmin <= float(zp) <= qmax


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 5), st.integers(1, 4), st.integers(1, 3), st.integers(0, 2), st.integers(2, 8),
       st.booleans(), st.sampled_from(["minmax", "percentile", "mse"]), st.integers(0, 10_000))
def test_per_channel_equals_per_tensor_per_channel(a, b, c, axis, bits, symmetric, est, seed):
    x = torch.randn(a, b, c, generator=torch.Generator().manual_seed(seed)) * 3
    kw = {"q": 99.0} if est == "percentile" else {}
    y = Q.fake_quantize_tensor(x, bits, symmetric=symmetric, axis=axis, estimator=est, **kw)
    for i in range(x.shape[axis]):
        yi = Q.fake_quantize_tensor(x.select(axis, i), bits, symmetric=symmetric, estimator=est, **kw)
        assert torch.allclose(y.select(axis, i), yi, atol=1e-6)
    # negative axis is the same axis
    y2 = Q.fake_quantize_tensor(x, bits, symmetric=symmetric, axis=axis - 3, estimator=est, **kw)
    assert torch.equal(y, y2)


def test_hardware_compliant_params():
    s, zp = Q.qparams_from_range(torch.tensor(-0.3), torch.tensor(2.2), 8)
    assert float(zp) == round(float(zp)) and 0 <= zp <= 255
    assert torch.isclose(s, torch.tensor(2.5 / 255))
    # range widened to contain 0; symmetric has zero point 0 and a narrow signed range
    s, zp = Q.qparams_from_range(torch.tensor(1.0), torch.tensor(2.0), 4)
    assert float(zp) == 0 and torch.isclose(s, torch.tensor(2.0 / 15))
    s, zp = Q.qparams_from_range(torch.tensor(-4.0), torch.tensor(1.0), 3, symmetric=True)
    assert Q.qrange(3, True) == (-3, 3) and float(zp) == 0 and torch.isclose(s, torch.tensor(4.0 / 3))
    x = torch.linspace(-4, 4, 101)
    y = Q.fake_quantize(x, s, zp, 3, symmetric=True)
    assert torch.equal(Q.fake_quantize(-x, s, zp, 3, symmetric=True), -y)


def test_ties_round_half_to_even_like_onnx():
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5])
    q = Q.fake_quantize(x, 1.0, 0, 8, symmetric=True)
    assert q.tolist() == [0.0, 2.0, 2.0, -0.0, -2.0]
    # round(x/s) then add the zero point (QuantizeLinear order)
    assert Q.quantize_int(torch.tensor([0.5]), 8, scale=torch.tensor(1.0), zero_point=torch.tensor(1.0)).codes.item() == 1


def test_bits_validation():
    for bad in (1, 17, 0, -3):
        with pytest.raises(ValueError, match="2..16"):
            Q.qrange(bad)
        with pytest.raises(ValueError, match="2..16"):
            Q.fake_quantize_tensor(torch.ones(3), bad)
    with pytest.raises(TypeError):
        Q.check_bits(4.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="rounding"):
        Q.fake_quantize(torch.ones(2), 1.0, 0, 8, rounding="up")  # type: ignore[arg-type]


def test_nan_and_empty_and_zero():
    x = torch.tensor([1.0, float("nan")])
    with pytest.raises(ValueError, match="NaN"):
        Q.fake_quantize(x, 1.0, 0, 8)
    with pytest.raises(ValueError, match="NaN"):
        Q.fake_quantize_tensor(x, 8)
    with pytest.raises(ValueError, match="NaN"):
        Q.quantize_int(x, 8)
    with pytest.raises(ValueError, match="empty"):
        Q.minmax_range(torch.empty(0))
    with pytest.raises(ValueError, match="Inf"):
        Q.minmax_range(torch.tensor([1.0, float("inf")]))
    for sym in (False, True):
        for est in ("minmax", "sample_minmax", "percentile", "mse"):
            z = Q.fake_quantize_tensor(torch.zeros(4, 5), 4, symmetric=sym, estimator=est, axis=1)
            assert torch.equal(z, torch.zeros(4, 5))
        qt = Q.quantize_int(torch.zeros(3), 8, symmetric=sym)
        assert torch.isfinite(qt.scale).all() and torch.equal(qt.dequantize(), torch.zeros(3))


def test_per_channel_shape_mismatch_is_clear():
    with pytest.raises(ValueError, match="per-channel"):
        Q.fake_quantize(torch.ones(3, 4), torch.ones(5), torch.zeros(5), 8, axis=0)
    with pytest.raises(ValueError, match="axis"):
        Q.minmax_range(torch.ones(3, 4), axis=2)


def test_stochastic_rounding_unbiased_and_seeded():
    x = torch.tensor([0.1, 0.37, -0.62, 0.5, 0.999, -0.25])
    s = torch.tensor(0.25)
    g = torch.Generator().manual_seed(0)
    draws = Q.fake_quantize(x.expand(20000, -1), s, None, 8, symmetric=True, rounding="stochastic", generator=g)
    # each draw is one of the two neighbouring grid points
    lo, hi = torch.floor(x / s) * s, torch.ceil(x / s) * s
    assert torch.all((draws == lo) | (draws == hi))
    se = 0.25 / 2 / np.sqrt(20000)  # worst-case standard error
    assert torch.all((draws.mean(0) - x).abs() < 5 * se)
    a = Q.fake_quantize(x, s, None, 8, symmetric=True, rounding="stochastic", generator=torch.Generator().manual_seed(3))
    b = Q.fake_quantize(x, s, None, 8, symmetric=True, rounding="stochastic", generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_gradients_clipped_ste_and_identity_ste_and_scale():
    x = torch.tensor([-5.0, 0.3, 0.7, 5.0], requires_grad=True)
    s = torch.tensor(0.5, requires_grad=True)
    y = Q.fake_quantize(x, s, torch.tensor(2.0), 3)  # representable range [-1, 2.5]
    y.sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 0.0]
    assert s.grad is not None and torch.isfinite(s.grad)
    x2 = x.detach().clone().requires_grad_()
    Q.fake_quantize_ste(x2, 0.5, 2.0, 3).sum().backward()
    assert x2.grad.tolist() == [1.0, 1.0, 1.0, 1.0]
    # STE rounding: d/ds of round(x/s)*s = round(x/s) - x/s inside the range (LSQ)
    s3 = torch.tensor(0.5, requires_grad=True)
    Q.fake_quantize(torch.tensor([0.3]), s3, None, 8, symmetric=True).sum().backward()
    assert torch.isclose(s3.grad, torch.tensor(1.0 - 0.6))


@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("bits", [4, 8, 12])
def test_quantize_int_matches_fake_quantize(sym, bits):
    x = torch.randn(6, 5, generator=torch.Generator().manual_seed(bits)) * 2
    qt = Q.quantize_int(x, bits, symmetric=sym, axis=0)
    qmin, qmax = Q.qrange(bits, sym)
    assert qt.codes.dtype == (torch.int8 if sym else torch.uint8) if bits <= 8 else qt.codes.dtype in (torch.int16, torch.int32)
    assert int(qt.codes.min()) >= qmin and int(qt.codes.max()) <= qmax
    assert qt.zero_point.dtype == torch.int32 and qt.scale.shape == (6,)
    ref = Q.fake_quantize_tensor(x, bits, symmetric=sym, axis=0)
    assert torch.allclose(qt.dequantize(), ref, atol=1e-6)


def test_range_estimators_vs_brute_force():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 3, 11, generator=g)
    xn = x.numpy()
    lo, hi = Q.percentile_range(x, 97.0, axis=1)
    for c in range(3):
        v = xn[:, c, :].ravel()
        assert np.isclose(float(lo[c]), np.percentile(v, 3.0), atol=1e-5)
        assert np.isclose(float(hi[c]), np.percentile(v, 97.0), atol=1e-5)
    lo, hi = Q.sample_minmax_range(x, axis=1)
    assert np.allclose(lo.numpy(), xn.min(2).mean(0), atol=1e-6) and np.allclose(hi.numpy(), xn.max(2).mean(0), atol=1e-6)
    lo, hi = Q.sample_minmax_range(x)
    assert np.isclose(float(lo), xn.reshape(7, -1).min(1).mean(), atol=1e-6)
    lo, hi = Q.minmax_range(x, axis=-1)
    assert np.allclose(lo.numpy(), xn.transpose(2, 0, 1).reshape(11, -1).min(1))
    old = (torch.tensor(0.0), torch.tensor(1.0))
    e = Q.ema_range(old, (torch.tensor(-1.0), torch.tensor(3.0)), 0.25)
    assert float(e[0]) == -0.25 and float(e[1]) == 1.5


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_mse_range_is_the_best_on_its_grid_and_beats_minmax(bits):
    x = torch.cat([torch.randn(500, generator=torch.Generator().manual_seed(bits)), torch.tensor([12.0])])
    lo, hi = Q.mse_range(x, bits, grid=50)
    err = lambda l, h: float(Q.quant_error(x, *Q.qparams_from_range(l, h, bits), bits))  # noqa: E731
    best = min(err(x.min() * a, x.max() * a) for a in torch.linspace(1.0, 0.05, 50).tolist())
    assert np.isclose(err(lo, hi), best, rtol=1e-5)
    assert err(lo, hi) < err(x.min(), x.max())


def test_mse_range_subsample_sees_rare_extremes():
    # A ReLU-like bulk in [0, 1] and 3 elements at 2.0 (0.007 %): a uniform 1024-element subset almost never holds
    # one, so its error saw no cost in clipping them and chose hi ~ 1.0. On all elements, clipping an outlier by
    # one grid step of alpha (1/99 of the range, 0.02) costs 4e-4 each, while at 16 bits the whole bulk's rounding
    # error is 4e4 * (2 / 65535)^2 / 12 = 3e-6: the optimum keeps hi = 2.0 exactly (alpha = 1, a grid point).
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.rand(2, 40000, generator=g), torch.tensor([[2.0] * 3, [1.0] * 3])], 1)
    full = Q.mse_range(x, 16, axis=0)
    sub = Q.mse_range(x, 16, axis=0, max_samples=1024)
    assert float(full[1][0]) == 2.0 and torch.equal(sub[1], full[1]) and torch.equal(sub[0], full[0])
    with pytest.raises(ValueError, match="max_samples must be a positive integer or None, got 0"):
        Q.mse_range(x, 8, max_samples=0)


@pytest.mark.parametrize("bits", [3, 8])
def test_mse_range_subsample_error_is_unbiased_for_the_bulk(bits):
    # The weighted subsample (exact tails + uniform rest scaled by how many elements each stands for) estimates the
    # full error; on a smooth Gaussian tensor both pick the same grid point or a neighbour (the estimate's noise
    # is ~1/sqrt(1000) of the error, the error curve's relative change between neighbouring points is larger).
    x = torch.randn(1, 200000, generator=torch.Generator().manual_seed(bits))
    grid = torch.linspace(1.0, 0.05, 100)
    a_full = float(Q.mse_range(x, bits, axis=0)[1][0] / x.max())
    a_sub = float(Q.mse_range(x, bits, axis=0, max_samples=8192)[1][0] / x.max())
    i_full, i_sub = int((grid - a_full).abs().argmin()), int((grid - a_sub).abs().argmin())
    assert abs(i_full - i_sub) <= 1, (a_full, a_sub)


def test_uniform_quantizer_calibrate_freeze_state_dict_and_slots():
    layer = wrap(nn.Linear(6, 4))
    wq = UniformQuantizer(4, per_channel=True, axis=0).init_from(layer.weight)
    assert wq.mode == "frozen" and wq.scale.shape == (4,)
    ref = Q.fake_quantize_tensor(layer.weight.detach(), 4, axis=0)
    assert torch.allclose(wq(layer.weight), ref)
    layer.add("weight", wq)
    aq = UniformQuantizer(8, estimator="sample_minmax").calibrate()
    layer.add("input", aq)
    xs = [torch.randn(5, 6) for _ in range(3)]
    fp = nn.functional.linear(xs[0], layer.weight.detach() * 0 + ref, layer.bias)
    assert torch.allclose(layer(xs[0]), fp, atol=1e-6)  # calibration passes activations through
    for x in xs[1:]:
        layer(x)
    aq.freeze()
    want = torch.stack([torch.stack([x.min(1).values.mean(), x.max(1).values.mean()]) for x in xs]).mean(0)
    assert torch.allclose(torch.stack([aq.min_val, aq.max_val]), want, atol=1e-6)
    # state_dict round trip into a fresh (scalar-shaped) quantizer adopts per-channel shapes
    wq2 = UniformQuantizer(4, per_channel=True, axis=0)
    wq2.load_state_dict(wq.state_dict())
    assert wq2.mode == "frozen" and torch.equal(wq2(layer.weight), wq(layer.weight))
    # learnable scales receive gradients through the layer
    lq = UniformQuantizer(4, per_channel=True, learnable=True).init_from(layer.weight)
    assert isinstance(lq.scale, nn.Parameter)
    lq(layer.weight).pow(2).sum().backward()
    assert lq.scale.grad is not None and lq.scale.grad.shape == (4,)
    with pytest.raises(RuntimeError, match="no data"):
        UniformQuantizer(8).calibrate().freeze()
    with pytest.raises(ValueError):
        UniformQuantizer(1)
    # set_bits re-derives parameters from the observed range
    wq.set_bits(8)
    assert torch.allclose(wq(layer.weight), Q.fake_quantize_tensor(layer.weight.detach(), 8, axis=0))


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_stochastic_round_is_unbiased_in_every_dtype(dtype, device):
    """floor(t + u) in float16/bfloat16 rounded the sum and biased the result (100.3125 in float16: +0.032,
    20.25 in bfloat16: +0.063). R = 2^16 draws: SE <= 0.5 / 256 = 0.002; five of them (Bonferroni over
    the 5 values x 8 cases: family-wise false alarm < 3e-5) stay far below such a bias."""
    draws = 1 << 16
    vals = torch.tensor([100.3125, 20.25, -3.75, 0.0003, 7.0], dtype=dtype)
    t = vals.to(device).expand(draws, -1)
    r = Q.stochastic_round(t, torch.Generator(device=device).manual_seed(1))
    assert r.dtype == dtype and r.device.type == device
    r, exact = r.double().cpu(), vals.double()
    assert ((r == exact.floor()) | (r == exact.ceil())).all()
    se = r.std(0) / draws**0.5
    det = se == 0
    assert (r.mean(0)[det] == exact[det]).all()
    assert ((r.mean(0) - exact).abs()[~det] <= 5 * se[~det]).all(), (r.mean(0) - exact)
