"""thrifty.ops.quant.fake_quantize_minmax: the one-pass numba kernels vs the torch ops, bit for bit."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from thrifty.ops import _qkernels as K
from thrifty.ops import quant as Q


def _reference(x: torch.Tensor, bits: int, axis) -> torch.Tensor:
    """What UniformQuantizer's dynamic min/max path computes: estimate_range -> qparams -> fake_quantize."""
    lo, hi = Q.minmax_range(x, axis)
    s, zp = Q.qparams_from_range(lo, hi, bits)
    return Q.fake_quantize(x, s, zp, bits, axis=axis)


def _key(seed: int) -> int:
    return int(torch.randint(0, 2**32, (1,), generator=torch.Generator().manual_seed(seed)))


SHAPES = [((64, 16, 8, 8), None), ((64, 16, 8, 8), 0), ((7, 5), 0), ((1,), None), ((33, 17, 3), 0), ((5, 6, 7), 1),
          ((4, 9), -1)]


@pytest.mark.parametrize("shape,axis", SHAPES)
@pytest.mark.parametrize("scale", [1.0, 1e-6, 3e4])
@pytest.mark.parametrize("bits", [2, 8, 16])
def test_nearest_is_bit_identical_to_fake_quantize(shape, axis, scale, bits):
    torch.manual_seed(0)
    x = torch.randn(shape) * scale + 0.3 * scale
    torch.testing.assert_close(Q.fake_quantize_minmax(x, bits, axis=axis), _reference(x, bits, axis), rtol=0, atol=0)


@pytest.mark.parametrize("x", [torch.zeros(3, 4), torch.full((3, 4), 2.5), torch.full((3, 4), -7.0),
                               torch.tensor([[0.0, -0.0, 1e-30, -1e-30]]), torch.tensor([[-1.0, 0.5, 0.5, 2.0]]),
                               torch.arange(-8.0, 8.0).reshape(2, 8) / 4])
def test_edge_cases_match(x):  # zero range (scale = EPS), one-signed ranges, exact ties on the grid
    for axis in (None, 0):
        for bits in (2, 8):
            torch.testing.assert_close(Q.fake_quantize_minmax(x, bits, axis=axis), _reference(x, bits, axis),
                                       rtol=0, atol=0)


@settings(max_examples=60, deadline=None)
@given(arrays("float32", st.tuples(st.integers(1, 5), st.integers(1, 40)),
              elements=st.floats(-1e6, 1e6, width=32)), st.integers(2, 16), st.sampled_from([None, 0]))
def test_property_kernel_equals_torch_ops(a, bits, axis):
    x = torch.from_numpy(a.copy())
    torch.testing.assert_close(Q.fake_quantize_minmax(x, bits, axis=axis), _reference(x, bits, axis), rtol=0, atol=0)


@settings(max_examples=40, deadline=None)
@given(arrays("float32", st.tuples(st.integers(1, 5), st.integers(1, 40)),
              elements=st.floats(-1e6, 1e6, width=32)), st.integers(2, 16), st.integers(2, 16),
       st.sampled_from([None, 0]))
def test_property_nearest_also_bits_equals_two_quantizations(a, bits, also, axis):
    # the kernel writes both streams in one loop; each must equal its own single-width quantization
    x = torch.from_numpy(a.copy())
    got, got2 = Q.fake_quantize_minmax(x, bits, axis=axis, also_bits=also)
    torch.testing.assert_close(got, _reference(x, bits, axis), rtol=0, atol=0)
    torch.testing.assert_close(got2, _reference(x, also, axis), rtol=0, atol=0)


@pytest.mark.parametrize("shape,axis", SHAPES)
@pytest.mark.parametrize("also", [None, 16])
def test_stochastic_kernel_equals_torch_reference(shape, axis, also):
    torch.manual_seed(1)
    x = torch.randn(shape) * 0.01
    got = Q.fake_quantize_minmax(x, 8, axis=axis, rounding="stochastic", generator=torch.Generator().manual_seed(5),
                                 also_bits=also)
    ax = None if axis is None else axis % x.dim()
    rows = x.reshape(1, -1) if ax is None else x.movedim(ax, 0).reshape(x.shape[ax], -1)
    ref, ref2 = Q._fake_quantize_minmax_torch(rows.contiguous(), rows.amin(1), rows.amax(1), 8, "stochastic", _key(5),
                                              also)

    def back(t):
        return t.reshape(x.shape) if ax is None else t.reshape(x.movedim(ax, 0).shape).movedim(0, ax)
    if also is None:
        torch.testing.assert_close(got, back(ref), rtol=0, atol=0)
    else:
        torch.testing.assert_close(got[0], back(ref), rtol=0, atol=0)
        torch.testing.assert_close(got[1], back(ref2), rtol=0, atol=0)
        torch.testing.assert_close(got[1], _reference(x, 16, axis), rtol=0, atol=0)  # the 16-bit stream is nearest


def test_non_float32_and_other_devices_use_the_torch_path_with_the_same_values():
    torch.manual_seed(0)
    x = torch.randn(6, 10, dtype=torch.float64)
    q = Q.fake_quantize_minmax(x, 8, axis=0)
    assert q.dtype == torch.float64
    torch.testing.assert_close(q, Q.fake_quantize_minmax(x.float(), 8, axis=0).double(), rtol=0, atol=1e-6)
    g = Q.fake_quantize_minmax(x, 4, rounding="stochastic", generator=torch.Generator().manual_seed(0))
    assert g.dtype == torch.float64 and g.unique().numel() <= 16


def test_stochastic_rounding_is_unbiased_reproducible_and_on_the_grid():
    torch.manual_seed(0)
    x = torch.randn(4, 200) * torch.tensor([[1.0], [1e-3], [10.0], [0.1]])
    a = Q.fake_quantize_minmax(x, 4, axis=0, rounding="stochastic", generator=torch.Generator().manual_seed(3))
    b = Q.fake_quantize_minmax(x, 4, axis=0, rounding="stochastic", generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    s, zp = Q.qparams_from_range(x.amin(1), x.amax(1), 4)
    codes = a / s[:, None] + zp[:, None]
    assert torch.allclose(codes, codes.round(), atol=1e-3) and codes.min() >= -1e-3 and codes.max() <= 15 + 1e-3
    draws = 2000
    acc = torch.zeros_like(x)
    for _ in range(draws):  # a fresh key per call from the global RNG
        acc += Q.fake_quantize_minmax(x, 4, axis=0, rounding="stochastic")
    step = s[:, None]
    inside = (x >= -zp[:, None] * step) & (x <= (15 - zp[:, None]) * step)
    # |mean - x| within 5 standard errors of one draw (variance <= step^2 / 4)
    assert ((acc / draws - x).abs() <= 5 * step / 2 / draws**0.5 + 1e-7)[inside].all()
    # and each value rounds up with probability frac(x / step): not nearest rounding
    near = Q.fake_quantize_minmax(x, 4, axis=0)
    assert not torch.equal(a, near)


def test_hash_uniform_is_uniform_and_uncorrelated():
    u = K.hash_uniform(1 << 18, key=12345)
    assert float(u.min()) >= 0 and float(u.max()) < 1
    assert torch.equal(u * 2**24, (u * 2**24).round())  # 24-bit grid like torch.rand(float32)
    counts = torch.histc(u, bins=64, min=0, max=1)
    expected = u.numel() / 64
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 120  # 63 degrees of freedom: p ~ 1e-5
    for lag in (1, 2, 1024):
        c = torch.corrcoef(torch.stack([u[:-lag], u[lag:]]))[0, 1]
        assert abs(float(c)) < 0.01
    other = K.hash_uniform(1 << 18, key=54321)
    assert abs(float(torch.corrcoef(torch.stack([u, other]))[0, 1])) < 0.01
    assert not torch.equal(u, other)


def test_bad_input():
    with pytest.raises(ValueError, match="NaN or Inf"):
        Q.fake_quantize_minmax(torch.tensor([1.0, float("nan")]), 8)
    with pytest.raises(ValueError, match="NaN or Inf"):
        Q.fake_quantize_minmax(torch.tensor([[1.0, 2.0], [float("inf"), 0.0]]), 8, axis=0, rounding="stochastic")
    with pytest.raises(ValueError, match="NaN or Inf"):
        Q.fake_quantize_minmax(torch.tensor([[1.0, float("nan")]], dtype=torch.float64), 8, axis=0)
    with pytest.raises(ValueError, match="empty"):
        Q.fake_quantize_minmax(torch.zeros(0), 8)
    with pytest.raises(TypeError):
        Q.fake_quantize_minmax(torch.ones(3, dtype=torch.int32), 8)
    with pytest.raises(ValueError):
        Q.fake_quantize_minmax(torch.ones(3), 1)
    with pytest.raises(ValueError):
        Q.fake_quantize_minmax(torch.ones(3), 8, also_bits=17)
    with pytest.raises(ValueError, match="rounding"):
        Q.fake_quantize_minmax(torch.ones(3), 8, rounding="up")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="axis"):
        Q.fake_quantize_minmax(torch.ones(3), 8, axis=2)


def test_input_is_not_modified_and_output_is_detached():
    x = torch.randn(3, 5, requires_grad=True)
    before = x.detach().clone()
    q = Q.fake_quantize_minmax(x, 8, axis=0, rounding="stochastic", also_bits=16)
    assert torch.equal(x.detach(), before)
    assert not q[0].requires_grad and not q[1].requires_grad
