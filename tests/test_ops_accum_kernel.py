"""The compiled accumulation kernel (thrifty.ops._accum_kernel) equals the torch path and the exact sequential
reference bit for bit, trace included, for every format option; threads and masked gradients."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from thrifty.ops.accum import FloatFormat, accumulate, accumulate_reference, trace_grads
from tolerance import assert_within, gamma

# dyadic values: products and sums land exactly on rounding ties of small formats; plus the special values
SPECIAL = [0.0, -0.0, math.nan, math.inf, -math.inf, 1e30, -3e38, 1e-40, -2.0**-140, 2.0**-20, 3.0 * 2.0**-12]
DYADIC = [k / 8 for k in range(-24, 25)] + [1.5 * 2.0**e for e in range(-8, 9)]


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equal, except that any NaN equals any NaN (NaN payloads are not specified)."""
    if a.shape != b.shape or not torch.equal(a.isnan(), b.isnan()):
        return False
    ok = ~a.isnan()
    return torch.equal(a[ok].view(torch.int32), b[ok].view(torch.int32))


def _operands(data, n, o, k, special):
    """Random operands: a mix of dyadic values (exact ties), gaussian values and (optionally) special values."""
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31)))
    pool = torch.tensor(DYADIC + (SPECIAL if special else []), dtype=torch.float32)

    def draw(rows):
        gauss = torch.randn(rows, k, generator=g) * 2.0 ** torch.randint(-8, 8, (rows, k), generator=g).float()
        pick = pool[torch.randint(len(pool), (rows, k), generator=g)]
        return torch.where(torch.rand(rows, k, generator=g) < 0.5, pick, gauss)

    return draw(n), draw(o)


def _format(data, e_max=6):
    e = data.draw(st.integers(2, e_max))
    m = data.draw(st.integers(1, 9))
    bias = data.draw(st.one_of(st.none(), st.integers(-2, 2 ** (e - 1) + 3)))
    return FloatFormat(e, m, bias, data.draw(st.booleans()), data.draw(st.sampled_from(["saturate", "inf"])),
                       data.draw(st.booleans()))


@settings(max_examples=80, deadline=None)
@given(st.data())
def test_kernel_equals_torch_path_bit_for_bit_with_trace(data):
    """Odd shapes (SIMD remainders), K not divisible by the chunk, all overflow/subnormal/underflow options."""
    n, o, k = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 37)), data.draw(st.integers(0, 40))
    x, w = _operands(data, n, o, k, special=data.draw(st.booleans()))
    acc = _format(data)
    kind = data.draw(st.sampled_from(["fp32", "like acc", "other"]))
    prod = None if kind == "fp32" else acc.replace(bias=None) if kind == "like acc" else _format(data)
    outer = data.draw(st.sampled_from(["same", None, FloatFormat(6, 8)]))
    chunk = data.draw(st.one_of(st.none(), st.integers(1, 12)))
    y, tr = accumulate(x, w, acc, prod, chunk, outer, trace=True, backend="numba")
    y_t, tr_t = accumulate(x, w, acc, prod, chunk, outer, trace=True, backend="torch")
    assert _same(y, y_t)
    assert torch.equal(tr.keep, tr_t.keep) and (tr.chunk, tr.K) == (tr_t.chunk, tr_t.K)
    assert _same(accumulate(x, w, acc, prod, chunk, outer, backend="numba"), y)


@settings(max_examples=25, deadline=None)
@given(st.data())
def test_kernel_equals_exact_sequential_reference(data):
    n, o, k = data.draw(st.integers(1, 2)), data.draw(st.integers(1, 18)), data.draw(st.integers(1, 24))
    x, w = _operands(data, n, o, k, special=data.draw(st.booleans()))
    acc = _format(data, e_max=5)
    prod = data.draw(st.one_of(st.none(), st.just(acc)))
    chunk = data.draw(st.one_of(st.none(), st.integers(1, 7)))
    outer = data.draw(st.sampled_from(["same", None]))
    y = accumulate(x, w, acc, prod, chunk, outer, backend="numba")
    assert _same(y, accumulate_reference(x, w, acc, prod, chunk, outer))


def test_kernel_edge_cases():
    f = FloatFormat(4, 3)
    # empty K: zeros; partial last chunk; +0 for zero sums; NaN propagation; saturating an infinite product
    assert accumulate(torch.ones(2, 0), torch.ones(3, 0), f, backend="numba").tolist() == [[0.0] * 3] * 2
    z = accumulate(torch.tensor([[1.0, -1.0]]), torch.ones(1, 2), f, backend="numba")
    assert z.view(torch.int32).item() == 0  # +0, not -0
    y = accumulate(torch.tensor([[math.inf, 1.0]]), torch.tensor([[0.0, 1.0]]), f, chunk=1, backend="numba")
    assert math.isnan(float(y))
    y = accumulate(torch.tensor([[math.inf, 1.0]]), torch.tensor([[1.0, 1.0]]), f, chunk=2, backend="numba")
    assert float(y) == 480.0
    yi = accumulate(torch.tensor([[300.0, 300.0]]), torch.ones(1, 2), f.replace(overflow="inf"), backend="numba")
    assert float(yi) == math.inf
    # ties to even: 1 + 1/16 -> 1 and 1 + 3/16 -> 1.25 in e4m3 (the chunk sum is rounded after each addition)
    x = torch.tensor([[1.0, 2.0**-4], [1.0, 3 * 2.0**-4]])
    assert accumulate(x, torch.ones(1, 2), f, chunk=None, backend="numba").flatten().tolist() == [1.0, 1.25]
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(3, 50, generator=g), torch.randn(70, 50, generator=g)
    for chunk in (None, 1, 7, 16, 64):  # chunk > K, K % chunk != 0, ...
        assert _same(accumulate(x, w, f, f, chunk, backend="numba"), accumulate(x, w, f, f, chunk, backend="torch"))
    with pytest.raises(ValueError, match="backend"):
        accumulate(x, w, f, backend="cuda")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="CPU"):
        accumulate(x.to("meta"), w.to("meta"), f, backend="numba")


def test_threads_give_identical_bits_and_torch_thread_count_is_kept():
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(9, 40, generator=g), torch.randn(33, 40, generator=g)
    f = FloatFormat(4, 7)
    old = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2):
            torch.set_num_threads(n)
            outs.append(accumulate(x, w, f, f, 16, trace=True, backend="numba"))
            assert torch.get_num_threads() == n  # the kernel threads do not touch torch's OpenMP settings
        assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1].keep, outs[1][1].keep)
    finally:
        torch.set_num_threads(old)


def test_trace_grads_kernel_matches_batched_matmul_path():
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(6, 29, generator=g) * 4, torch.randn(11, 29, generator=g)
    _, tr = accumulate(x, w, FloatFormat(3, 2), None, 8, trace=True)
    assert 0 < tr.keep.float().mean() < 1
    dyx, dyw = torch.randn(6, 11, generator=g), torch.randn(6, 11, generator=g)
    dx, dw = trace_grads(tr, x, w, dyx, dyw)
    keep = tr.keep.permute(2, 3, 1, 0).reshape(6, 11, -1)[:, :, :29].float()  # (N, O, K), k = i * chunk + j
    # dx sums 11 products per element, dw 6: two float sums of the same terms are within 2 gamma(n + 1) of
    # the sum of their magnitudes (one more rounding for the product)
    kd = keep.double()
    bx = 2 * gamma(11 + 1) * torch.einsum("no,nok,ok->nk", dyx.double().abs(), kd, w.double().abs())
    bw = 2 * gamma(6 + 1) * torch.einsum("no,nok,nk->ok", dyw.double().abs(), kd, x.double().abs())
    assert_within(dx, torch.einsum("no,nok,ok->nk", dyx, keep, w), bx, "dx vs einsum")
    assert_within(dw, torch.einsum("no,nok,nk->ok", dyw, keep, x), bw, "dw vs einsum")
    dx_t, dw_t = trace_grads(tr, x, w, dyx, dyw, backend="torch")
    assert_within(dx, dx_t, bx, "dx: numba vs torch")
    assert_within(dw, dw_t, bw, "dw: numba vs torch")
    assert trace_grads(tr, x, w, dyx, dyw, (False, True))[0] is None
    with pytest.raises(ValueError, match="trace"):
        trace_grads(tr, x[:, :5], w, dyx, dyw)


def test_kernel_threads_work_in_a_forked_child():
    import multiprocessing as mp

    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        x, w = torch.randn(8, 20), torch.randn(6, 20)
        f = FloatFormat(4, 7)
        want = accumulate(x, w, f, f, 4, backend="numba")  # starts the parent's thread pool
        with mp.get_context("fork").Pool(1) as pool:  # the child must not wait on the parent's (absent) threads
            got = pool.apply_async(accumulate, (x, w, f, f, 4), {"backend": "numba"}).get(timeout=120)
        assert torch.equal(got, want)
    finally:
        torch.set_num_threads(old)
