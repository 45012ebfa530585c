"""thrifty.ops.accum: rounding vs brute force, vectorised accumulation vs the sequential reference, edge cases."""
from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from thrifty.ops.accum import (FloatFormat, accumulate, accumulate_reference, bias_for_chunk, representable_values,
                               round_scalar, round_to_format)
from tolerance import assert_within, gamma

TINY = [FloatFormat(2, 1), FloatFormat(3, 2), FloatFormat(3, 2, subnormals=False), FloatFormat(2, 3, bias=0),
        FloatFormat(3, 1, bias=5, overflow="inf"), FloatFormat(4, 2, subnormals=False, overflow="inf")]


def brute_round(v: float, fmt: FloatFormat) -> float:
    """Nearest representable value by enumeration; ties to the even mantissa code; IEEE overflow rule."""
    if v == 0:
        return 0.0
    vals = representable_values(fmt.replace(subnormals=True))  # documented: round on the subnormal grid, then flush
    vals.append((2.0 ** (fmt.emax + 1), 0))  # the value just past max (even code): rounding to it = overflow
    a = abs(v)
    best = min(vals, key=lambda t: (abs(t[0] - a), t[1] % 2))
    r = best[0]
    if r > fmt.max:
        r = fmt.max if fmt.overflow == "saturate" else math.inf
    elif not fmt.subnormals and r < fmt.min_normal:
        r = 0.0
    return math.copysign(r, v) if r else 0.0


def probe_values(fmt: FloatFormat) -> list[float]:
    """Every representable value, every midpoint, and points just around them, both signs."""
    vals = sorted({v for v, _ in representable_values(fmt)} | {2.0 ** (fmt.emax + 1)})
    pts = set(vals)
    for a, b in zip(vals, vals[1:]):
        mid = (a + b) / 2
        pts |= {mid, float(np.nextafter(np.float32(mid), np.float32(0))), float(np.nextafter(np.float32(mid),
                                                                                              np.float32(np.inf)))}
    pts |= {v * 3.7 for v in vals[:5]} | {fmt.max * 8}
    pts = {float(np.float32(p)) for p in pts}
    return sorted(pts | {-p for p in pts})


@pytest.mark.parametrize("fmt", TINY, ids=str)
def test_rounding_matches_brute_force_enumeration(fmt):
    pts = probe_values(fmt)
    got = round_to_format(torch.tensor(pts, dtype=torch.float32), fmt).tolist()
    want = [brute_round(p, fmt) for p in pts]
    assert got == want
    assert [round_scalar(p, fmt) for p in pts] == want


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 7), st.integers(1, 12), st.booleans(), st.booleans(), st.sampled_from(["saturate", "inf"]),
       st.integers(0, 2**31))
def test_rounding_matches_exact_scalar_reference(e, m, sub, underflow, overflow, seed):
    fmt = FloatFormat(e, m, subnormals=sub, overflow=overflow, underflow=underflow)
    g = torch.Generator().manual_seed(seed)
    scale = torch.pow(2.0, torch.randint(-40, 40, (300,), generator=g).float())
    x = torch.randn(300, generator=g) * scale
    x = torch.cat([x, torch.tensor([0.0, -0.0, 1e-45, -3e-39, 3e38, fmt.max, -fmt.min_normal])])
    got = round_to_format(x, fmt).tolist()
    want = [round_scalar(v, fmt) for v in x.tolist()]
    assert got == want


def test_rounding_properties():
    f = FloatFormat(4, 3)
    x = torch.randn(10000) * 10
    r = round_to_format(x, f)
    assert torch.equal(round_to_format(r, f), r)  # idempotent
    assert torch.equal(round_to_format(-x, f), -r)  # symmetric
    assert torch.all(r[1:][x[1:] > x[:-1]] >= r[:-1][x[1:] > x[:-1]])  # monotone
    assert (r.abs() <= f.max).all()
    inside = x.abs() < f.max
    assert ((r - x).abs()[inside] <= torch.maximum(x.abs()[inside] * 2.0**-4, torch.tensor(2.0 ** (f.emin - 4)))).all()
    assert round_to_format(x, None).equal(x)


def test_non_finite_inputs_documented_behaviour():
    x = torch.tensor([math.nan, math.inf, -math.inf, 1e30, -1e30])
    sat = round_to_format(x, FloatFormat(4, 3))
    assert math.isnan(sat[0]) and sat[1:].tolist() == [480.0, -480.0, 480.0, -480.0]
    inf = round_to_format(x, FloatFormat(4, 3, overflow="inf"))
    assert math.isnan(inf[0]) and inf[1:].tolist() == [math.inf, -math.inf, math.inf, -math.inf]
    # inf * 0 is NaN in the product, as in float32; NaN propagates through the accumulation
    y = accumulate(torch.tensor([[math.inf, 1.0]]), torch.tensor([[0.0, 1.0]]), FloatFormat(4, 3), chunk=1)
    assert math.isnan(float(y))
    # saturating accumulator clamps an infinite product to max
    y = accumulate(torch.tensor([[math.inf, 1.0]]), torch.tensor([[1.0, 1.0]]), FloatFormat(4, 3), chunk=2)
    assert float(y) == 480.0


def test_bad_formats_are_clear_errors():
    with pytest.raises(ValueError, match="mantissa"):
        FloatFormat(4, 0)
    with pytest.raises(ValueError, match="exp_bits"):
        FloatFormat(9, 3)
    with pytest.raises(ValueError, match="float32"):
        FloatFormat(8, 7)  # bias 127 and no reserved codes: up to 2^128
    with pytest.raises(ValueError, match="float32"):
        FloatFormat(5, 3, bias=-90)
    with pytest.raises(ValueError, match="22"):
        FloatFormat(5, 23)
    with pytest.raises(TypeError):
        FloatFormat(4.0, 3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="overflow"):
        FloatFormat(4, 3, overflow="wrap")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="chunk"):
        accumulate(torch.ones(2, 3), torch.ones(2, 3), FloatFormat(4, 3), chunk=0)
    with pytest.raises(ValueError, match="same K"):
        accumulate(torch.ones(2, 3), torch.ones(2, 4), FloatFormat(4, 3))
    with pytest.raises(TypeError):
        round_to_format(torch.ones(3, dtype=torch.int32), FloatFormat(4, 3))


def test_format_properties_and_bias_for_chunk():
    f = FloatFormat(4, 7)
    assert (f.bits, f.emax, f.emin, f.max, f.min_normal) == (12, 8, -6, 510.0, 2.0**-6)
    assert bias_for_chunk(4, 16) == 3 and bias_for_chunk(5, 1) == 15 and bias_for_chunk(5, 17) == 10
    assert FloatFormat(4, 7, bias=bias_for_chunk(4, 16)).max == 16 * 510.0  # range shifted up by log2(16)
    assert len(representable_values(FloatFormat(2, 2))) == 1 + 3 + 3 * 4


CASES = [
    (FloatFormat(4, 3), None, 16, "same"),
    (FloatFormat(4, 7), FloatFormat(4, 7), 5, "same"),  # chunk does not divide K
    (FloatFormat(5, 10), FloatFormat(5, 10), None, "same"),  # one chunk
    (FloatFormat(3, 2, subnormals=False, overflow="inf"), FloatFormat(3, 2), 4, None),  # fp32 outer sum
    (FloatFormat(4, 5, bias=3, underflow=False), FloatFormat(4, 5, underflow=False), 8, "same"),
    (FloatFormat(2, 4, bias=1), FloatFormat(3, 3), 64, FloatFormat(6, 8)),  # chunk > K
]


@pytest.mark.parametrize("backend", ["torch", "numba"])
@pytest.mark.parametrize("acc,prod,chunk,outer", CASES, ids=lambda v: str(v))
def test_vectorised_equals_sequential_reference_bit_for_bit(acc, prod, chunk, outer, backend):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 37, generator=g) * 3
    w = torch.randn(5, 37, generator=g) * 0.5
    x[0, 3] = 0.0
    y = accumulate(x, w, acc, prod, chunk, outer, backend=backend)
    r = accumulate_reference(x, w, acc, prod, chunk, outer)
    assert torch.equal(y.isnan(), r.isnan())
    assert torch.equal(torch.nan_to_num(y), torch.nan_to_num(r))


@settings(max_examples=15, deadline=None)
@given(st.integers(1, 3), st.integers(1, 3), st.integers(1, 40), st.one_of(st.none(), st.integers(1, 12)),
       st.integers(2, 6), st.integers(1, 8), st.booleans(), st.integers(0, 2**31))
def test_vectorised_equals_reference_property(n, o, k, chunk, e, m, sub, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, k, generator=g) * 2.0 ** float(torch.randint(-6, 6, (1,), generator=g))
    w = torch.randn(o, k, generator=g)
    acc = FloatFormat(e, m, subnormals=sub)
    y, tr = accumulate(x, w, acc, FloatFormat(e, max(1, m - 1)), chunk, trace=True)
    assert torch.equal(y, accumulate_reference(x, w, acc, FloatFormat(e, max(1, m - 1)), chunk))
    assert tr.keep.shape[0] * tr.keep.shape[1] >= k


def _exact_round(v: Fraction, fmt: FloatFormat) -> Fraction:
    if v == 0:
        return Fraction(0)
    e = math.floor(math.log2(abs(v)))
    while Fraction(2) ** e > abs(v):
        e -= 1
    while Fraction(2) ** (e + 1) <= abs(v):
        e += 1
    q = Fraction(2) ** (max(e, fmt.emin_eff) - fmt.man_bits)
    r = round(v / q) * q
    return max(min(r, Fraction(fmt.max)), -Fraction(fmt.max))


@pytest.mark.parametrize("acc,prod", [(FloatFormat(5, 10), FloatFormat(5, 8)), (FloatFormat(4, 7), FloatFormat(4, 7)),
                                      (FloatFormat(3, 4), FloatFormat(5, 14))])
def test_float32_simulation_equals_exact_arithmetic_when_m_acc_plus_m_prod_le_18(acc, prod):
    """The documented exactness condition: no double rounding from the float32 add."""
    g = torch.Generator().manual_seed(3)
    # operands with 11 significant bits so every float32 product is exact
    x = round_to_format(torch.randn(3, 50, generator=g) * 4, FloatFormat(7, 10))
    w = round_to_format(torch.randn(4, 50, generator=g) * 2.0 ** torch.randint(-12, 2, (4, 50), generator=g),
                        FloatFormat(7, 10))
    y = accumulate(x, w, acc, prod, chunk=8)
    for n in range(3):
        for o in range(4):
            t = Fraction(0)
            for c0 in range(0, 50, 8):
                s = Fraction(0)
                for k in range(c0, min(c0 + 8, 50)):
                    s = _exact_round(s + _exact_round(Fraction(float(x[n, k])) * Fraction(float(w[o, k])), prod), acc)
                t = _exact_round(t + s, acc)
            assert float(t) == float(y[n, o])


def test_partial_last_chunk_is_a_shorter_chunk():
    """K = 10, chunk 4: chunks (4, 4, 2); equals summing the pieces explicitly."""
    f = FloatFormat(4, 3)
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(2, 10, generator=g), torch.randn(3, 10, generator=g)
    parts = [accumulate(x[:, a:b], w[:, a:b], f, f, chunk=None) for a, b in ((0, 4), (4, 8), (8, 10))]
    t = torch.zeros(2, 3)
    for p in parts:
        t = round_to_format(t + p, f)
    assert torch.equal(accumulate(x, w, f, f, chunk=4), t)


def test_swamping_and_trace():
    f = FloatFormat(4, 3)  # 1 + 2^-5 rounds back to 1: the small term is swamped
    x = torch.tensor([[1.0, 2.0**-5, 0.0, 0.5]])
    w = torch.ones(1, 4)
    y, tr = accumulate(x, w, f, None, chunk=None, trace=True)
    assert float(y) == 1.5
    assert tr.keep[:, 0, 0, 0].tolist() == [True, False, True, True]  # the zero product is not "lost"
    big = FloatFormat(7, 22, bias=63)
    y = accumulate(x, w, big, None, chunk=2)
    assert float(y) == float(x.sum())


def test_high_precision_accumulator_is_close_to_matmul():
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(8, 300, generator=g), torch.randn(6, 300, generator=g)
    y = accumulate(x, w, FloatFormat(7, 22, bias=63), None, chunk=16)
    # each sum of 300 products is within gamma(300 + 1) of the sum of magnitudes in its own precision: 22
    # mantissa bits (u = 2^-23, far from the format's range limits) for the accumulator, float32 for matmul
    mag = x.double().abs() @ w.double().abs().T
    u22 = 2.0**-23 * 301
    assert_within(y, x @ w.T, (u22 / (1 - u22) + gamma(301)) * mag, "22-bit accumulator vs matmul")
    y12 = accumulate(x, w, FloatFormat(4, 7), FloatFormat(4, 7), chunk=16)
    err = (y12 - x @ w.T).abs().mean() / (x @ w.T).abs().mean()
    assert 1e-4 < float(err) < 0.05


def test_row_blocking_gives_identical_results(monkeypatch):
    import thrifty.ops.accum as A

    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(7, 20, generator=g), torch.randn(3, 20, generator=g)
    f = FloatFormat(4, 3)
    y, tr = accumulate(x, w, f, f, 6, trace=True, backend="torch")
    y_fp32_prod = accumulate(x, w, f, None, 6, backend="torch")
    monkeypatch.setattr(A, "_BLOCK", 9)  # 3 rows per block (the torch path's working-set bound)
    y2, tr2 = accumulate(x, w, f, f, 6, trace=True, backend="torch")
    assert torch.equal(y, y2) and torch.equal(tr.keep, tr2.keep)
    assert torch.equal(accumulate(x, w, f, None, 6, backend="torch"), y_fp32_prod)
