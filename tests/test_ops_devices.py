"""Compiled kernels against their torch paths on the same adversarial inputs (odd shapes, zeros, ties,
NaN/inf), and every ops function that takes a device or a generator on each available device (CUDA cases
run where a GPU exists)."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import thrifty.ops.mvue as mv
from thrifty.ops import _qkernels as K
from thrifty.ops import nm
from thrifty.ops import quant as Q
from thrifty.ops.accum import FloatFormat, accumulate

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
Z = 5.0  # standard errors for the statistical checks (each test makes at most a few dozen comparisons)


def _gen(seed, device="cpu"):
    return torch.Generator(device=device).manual_seed(seed)


def _adversarial(shape, seed, nonfinite=False):
    """Gaussian values with exact zeros, ties (equal magnitudes, both signs) and optionally NaN/inf."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g)
    pick = torch.rand(*shape, generator=g)
    x = torch.where(pick < 0.2, torch.zeros_like(x), x)
    x = torch.where((pick >= 0.2) & (pick < 0.4), torch.sign(x) * 0.5, x)  # ties
    if nonfinite and x.numel() > 3:
        flat = x.view(-1)
        flat[0], flat[x.numel() // 2], flat[-1] = float("nan"), float("inf"), -float("inf")
    return x


# --------------------------------------------------------------------- MVUE kernel vs torch, NaN
@pytest.mark.parametrize("n,m", [(1, 2), (2, 4), (1, 4), (1, 3)])
@pytest.mark.parametrize("shape,dim", [((7, 13), -1), ((5, 9, 3), 1), ((3, 4, 17), 0), ((64, 8), -1)])
def test_mvue_kernel_and_torch_path_on_blocks_with_nan_inf_zeros_ties(n, m, shape, dim, monkeypatch):
    """Blocks holding NaN/inf pass through on both paths; there the torch path runs its general code for the
    whole tensor (other float operations on the same uniforms), so finite blocks agree in their pattern and
    to float32 rounding of the kept value S/n-type quotients (a few ulp of the block's L1)."""
    x = _adversarial(shape, 100 + n * 10 + m, nonfinite=True)
    got = mv.mvue_nm(x, n, m, dim, _gen(1))
    monkeypatch.setattr(mv, "_KERNEL", False)
    ref = mv.mvue_nm(x, n, m, dim, _gen(1))
    assert torch.equal(got.isnan(), ref.isnan()) and torch.equal(got.isinf(), ref.isinf())
    assert torch.equal(got != 0, ref != 0)
    xb = x.movedim(dim, -1)
    pad = (-xb.shape[-1]) % m
    l1 = torch.cat([xb.abs(), xb.new_zeros(*xb.shape[:-1], pad)], -1).unflatten(-1, (-1, m)).sum(-1, keepdim=True)
    l1 = l1.expand(*l1.shape[:-1], m).flatten(-2)[..., : xb.shape[-1]].movedim(-1, dim)
    tol = 8 * 2.0**-24 * l1  # sums of <= 4 magnitudes and one quotient, each correctly rounded
    finite = l1.isfinite()  # blocks without NaN/inf: sampled; the others: passed through unchanged
    assert ((got - ref).abs()[finite] <= tol[finite]).all()
    assert torch.equal(got[~finite].nan_to_num(), x[~finite].nan_to_num())


# ------------------------------------------------------------- quantization kernels vs torch twin
@settings(max_examples=40, deadline=None)
@given(arrays("float32", st.tuples(st.integers(1, 6), st.integers(1, 37)),
              elements=st.sampled_from([0.0, -0.0, 0.5, -0.5, 1.0, 3.0]) | st.floats(-1e4, 1e4, width=32)),
       st.integers(2, 16), st.sampled_from([None, 0]), st.integers(0, 2**32 - 1))
def test_stochastic_kernel_equals_torch_twin_on_odd_shapes_zeros_ties(a, bits, axis, seed):
    x = torch.from_numpy(a.copy())
    got = Q.fake_quantize_minmax(x, bits, axis=axis, rounding="stochastic", generator=_gen(seed % 2**31))
    rows = x.reshape(1, -1) if axis is None else x
    key = K.draw_key(_gen(seed % 2**31), "cpu")
    ref, _ = Q._fake_quantize_minmax_torch(rows.contiguous(), rows.amin(1), rows.amax(1), bits, "stochastic", key,
                                           None)
    assert torch.equal(got, ref.reshape(x.shape))


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_quantization_kernel_and_torch_twin_refuse_nonfinite_alike(rounding, value):
    x = _adversarial((5, 11), 3)
    x[2, 7] = value
    with pytest.raises(ValueError, match="NaN or Inf"):
        Q.fake_quantize_minmax(x, 8, axis=0, rounding=rounding, generator=_gen(0))  # kernel
    with pytest.raises(ValueError, match="NaN or Inf"):
        Q.fake_quantize_minmax(x.double(), 8, axis=0, rounding=rounding, generator=_gen(0))  # torch twin
    with pytest.raises(ValueError, match="NaN or Inf"):
        Q._fake_quantize_minmax_torch(x, x.amin(1), x.amax(1), 8, rounding, 0, None)


# --------------------------------------------------------------------------------- devices
@pytest.mark.parametrize("device", DEVICES)
def test_hash_uniform_and_draw_key_on_device(device):
    u = K.hash_uniform(70_001, 0xDEADBEEF, device, start=2**32 - 5)
    assert u.device.type == device and torch.equal(u.cpu(), K.hash_uniform(70_001, 0xDEADBEEF, start=2**32 - 5))
    assert K.draw_key(_gen(4, device), device) == K.draw_key(_gen(4, device), device)
    torch.manual_seed(9)
    a = K.draw_key(None, device)
    torch.manual_seed(9)
    assert K.draw_key(None, device) == a and 0 <= a < 2**32


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_fake_quantize_minmax_on_device_matches_cpu_within_one_step(device, rounding):
    """On CPU the values are the kernel's bit for bit; on CUDA the scale may differ in its last bit, so a
    code next to a rounding boundary may move by one step (the documented contract)."""
    x = _adversarial((6, 33), 5)
    bits = 4
    want = Q.fake_quantize_minmax(x, bits, axis=0, rounding=rounding, generator=_gen(2))
    got = Q.fake_quantize_minmax(x.to(device), bits, axis=0, rounding=rounding, generator=_gen(2, device))
    assert got.device.type == device
    s, zp = Q.qparams_from_range(x.amin(1), x.amax(1), bits)
    step = s[:, None].expand_as(x)
    diff = (got.cpu() - want).abs()
    if device == "cpu":
        assert torch.equal(got, want)
    assert (diff <= step * (1 + 2.0**-20)).all()
    codes = got.cpu() / step + zp[:, None]
    # codes of magnitude <= 2^bits - 1 + |zp|: a last-bit scale difference (2u), the product and the division
    # (u each) move them by at most 4u of that
    tol = 4 * 2.0**-24 * (2**bits - 1 + float(zp.abs().max()))
    assert (codes - codes.round()).abs().max() <= tol and codes.min() >= -tol and codes.max() <= 2**bits - 1 + tol


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("n,m", [(1, 2), (2, 4), (3, 4)])
def test_mvue_on_device_pattern_dtype_reproducible_unbiased(device, dtype, n, m):
    blocks = torch.tensor([[0.3, -1.2, 0.7, 2.1], [10.0, 1.0, -2.0, 0.5], [0.0, 0.0, -7.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    x = blocks.reshape(1, -1)[:, : 16 // m * m].to(dtype)
    draws = 1 << 14
    xs = x.repeat(draws, 1).to(device)
    y = mv.mvue_nm(xs, n, m, generator=_gen(7, device))
    assert y.device.type == device and y.dtype == dtype
    assert torch.equal(y, mv.mvue_nm(xs, n, m, generator=_gen(7, device)))
    yc = y.double().cpu()
    assert ((yc.view(draws, -1, m) != 0).sum(-1) <= n).all()
    mean, se = yc.mean(0), yc.std(0) / draws**0.5
    target = x[0].double()
    det = se == 0
    scale = target.abs().view(-1, m).sum(1, keepdim=True).expand(-1, m).reshape(-1)
    assert ((mean - target).abs()[det] <= 2.0**-20 * scale[det]).all()  # deterministic entries: exact-ish
    assert ((mean - target).abs()[~det] <= Z * se[~det]).all()


@pytest.mark.parametrize("device", DEVICES)
def test_mse_and_nm_masks_on_device_equal_cpu(device):
    """Comparisons only (no arithmetic on values): identical on every device."""
    x = _adversarial((6, 10, 7), 11)
    for n, m, dim in ((2, 4, 1), (1, 2, -1), (3, 8, 0)):
        assert torch.equal(mv.mse_nm(x.to(device), n, m, dim).cpu(), mv.mse_nm(x, n, m, dim))
        assert torch.equal(mv.mse_mask(x.to(device), n, m, dim).cpu(), mv.mse_mask(x, n, m, dim))
    w = _adversarial((24, 20), 12)
    for n, m, method in ((2, 4, "exact"), (4, 8, "exact"), (4, 8, "approx")):
        got = nm.transposable_mask(w.to(device), n, m, method)
        assert got.device.type == device and torch.equal(got.cpu(), nm.transposable_mask(w, n, m, method))
    assert torch.equal(nm.nm_mask(w.to(device), 2, 4).cpu(), nm.nm_mask(w, 2, 4))


@pytest.mark.parametrize("device", DEVICES)
def test_accumulate_torch_path_on_device_equals_the_cpu_kernel_bit_for_bit(device):
    x, w = _adversarial((3, 45), 13), _adversarial((17, 45), 14)
    x[0, 3], w[2, 9] = float("nan"), float("inf")
    for acc, prod, chunk in ((FloatFormat(4, 3), None, 16), (FloatFormat(5, 10), FloatFormat(5, 10), 7),
                             (FloatFormat(4, 3, overflow="inf", subnormals=False), FloatFormat(4, 3), None)):
        want = accumulate(x, w, acc, prod, chunk, backend="numba")
        got = accumulate(x.to(device), w.to(device), acc, prod, chunk, backend="torch").cpu()
        assert torch.equal(got.isnan(), want.isnan())
        ok = ~want.isnan()
        assert torch.equal(got[ok].view(torch.int32), want[ok].view(torch.int32))

