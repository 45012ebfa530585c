"""thrifty.ops.nm: N:M and transposable masks against brute force, closed forms and exhaustive search."""
import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from thrifty.ops import nm
from tolerance import assert_within, gamma

NM_PAIRS = [(1, 2), (2, 4), (1, 4), (3, 4), (4, 8), (2, 8), (2, 5)]


def _rand(shape, seed, ties=False, zeros=False):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(*shape, generator=g)
    if ties:
        w = torch.round(w * 2) / 2  # many exact ties
    if zeros:
        w[w.abs() < 0.5] = 0
    return w


def _blocks(mask, m):
    mat = nm.as_matrix(mask)
    r, k = mat.shape
    kp = -(-k // m) * m
    pad = torch.zeros(r, kp, dtype=mat.dtype)
    pad[:, :k] = mat
    return pad.view(r, kp // m, m), k


# ---------------------------------------------------------------------------------- layout
def test_matrix_view_roundtrip_and_conv_is_channels_last():
    w = torch.randn(6, 3, 2, 5)
    mat = nm.as_matrix(w)
    assert mat.shape == (6, 30)
    assert torch.equal(mat[:, :3], w[:, :, 0, 0])  # first block runs over input channels at kernel (0, 0)
    assert torch.equal(nm.from_matrix(mat, w.shape), w)


# ------------------------------------------------------------------------------ plain N:M
@settings(max_examples=40, deadline=None)
@given(st.integers(1, 9), st.integers(1, 21), st.sampled_from(NM_PAIRS), st.booleans(), st.booleans(),
       st.integers(0, 10**6), st.booleans())
def test_nm_mask_exact_pattern_and_optimal(rows, k, nmp, ties, zeros, seed, conv):
    n, m = nmp
    w = _rand((rows, k, 1, 1) if conv else (rows, k), seed, ties, zeros)
    mask = nm.nm_mask(w, n, m)
    assert mask.shape == w.shape and mask.dtype == torch.bool
    assert nm.is_nm(mask, n, m)
    blocks, _ = _blocks(mask, m)
    counts = blocks.sum(-1)
    full = k // m
    assert (counts[:, :full] == n).all()  # full blocks keep exactly n
    if k % m:
        assert (counts[:, full] == min(n, k % m)).all()  # tail rule: pad with zeros, keep min(n, t)
    # optimal: the kept magnitude of each block equals the sum of its n largest
    a, _ = _blocks(w.abs(), m)
    best = a.sort(-1, descending=True).values[..., :n].sum(-1)
    assert torch.allclose((a * blocks).sum(-1), best)


def test_nm_mask_ties_prefer_earlier_and_all_zero():
    w = torch.ones(2, 8)
    mask = nm.nm_mask(w, 2, 4)
    assert mask[0].tolist() == [True, True, False, False] * 2
    assert int(nm.nm_mask(torch.zeros(3, 8), 1, 4).sum()) == 6


def test_nm_mask_conv_tail_short_reduction_is_dense():
    w = torch.randn(4, 1, 1, 3)  # K = 3 < M = 8 and 3 <= N = 4: the only (tail) block stays dense
    assert bool(nm.nm_mask(w, 4, 8).all())


# ---------------------------------------------------------------------------- transposable
@pytest.mark.parametrize("n,m", [(1, 2), (2, 4), (1, 4), (3, 4), (4, 8), (2, 8), (2, 5), (3, 6)])
@pytest.mark.parametrize("method", ["exact", "approx"])
def test_transposable_valid_for_w_and_wt(n, m, method):
    w = _rand((2 * m + 3, 3 * m + 1), n * 7 + m)
    mask = nm.transposable_mask(w, n, m, method)
    assert nm.is_transposable(mask, n, m)
    assert nm.is_nm(mask, n, m)  # forward GEMM: blocks along the reduction
    assert nm.is_nm(mask.t(), n, m)  # input-gradient GEMM: blocks along the output dim
    if method == "exact":  # full tiles keep exactly n per row and column
        full = mask[: 2 * m, : 3 * m].reshape(2, m, 3, m).float()
        assert (full.sum(3) == n).all() and (full.sum(1) == n).all()


def test_transposable_conv_backward_blocks():
    w = torch.randn(16, 4, 3, 3)
    mask = nm.transposable_mask(w, 2, 4)
    assert mask.shape == w.shape and nm.is_transposable(mask, 2, 4)
    # dX of a conv reduces over (out, kh, kw) for each input channel: blocks along out at fixed (c, kh, kw)
    assert (mask.float().view(4, 4, 4, 3, 3).sum(1) <= 2).all()


def _brute(s, n):
    m = s.shape[-1]
    pats = nm.valid_tiles(n, m).float()
    return (s.reshape(-1, 1, m * m) * pats.reshape(1, -1, m * m)).sum(-1).max(1).values


@settings(max_examples=25, deadline=None)
@given(st.sampled_from([(1, 2), (1, 3), (2, 3), (2, 4), (1, 4), (3, 4), (2, 5)]), st.integers(0, 10**6),
       st.booleans())
def test_exact_solvers_match_brute_force(nmp, seed, ties):
    n, m = nmp
    s = _rand((12, m, m), seed, ties=ties).abs()
    best = _brute(s, n)
    for solver in ("enumerate", "flow"):
        x = nm.solve_tiles(s, n, solver)
        assert (x.sum(1) == n).all() and (x.sum(2) == n).all()
        # float sums of m * m nonnegative terms with the same exact optimum: each within gamma of it
        assert_within((s * x).sum((1, 2)), best, 2 * gamma(m * m + 1) * best, solver)
    g = nm.solve_tiles(s, n, "greedy")
    assert (g.sum(1) <= n).all() and (g.sum(2) <= n).all()
    assert ((s * g).sum((1, 2)) >= 0.5 * best * (1 - 2 * gamma(m * m + 1))).all()  # the 2-approximation bound


def test_flow_matches_enumeration_for_4x4_many_tiles():
    s = _rand((500, 4, 4), 3).abs()
    a = (s * nm.solve_tiles(s, 2, "flow")).sum((1, 2))
    b = (s * nm.solve_tiles(s, 2, "enumerate")).sum((1, 2))
    assert_within(a, b, 2 * gamma(16 + 1) * b, "flow vs enumeration")  # sums of 16 nonnegative terms


@settings(max_examples=15, deadline=None)
@given(st.integers(0, 10**6))
def test_greedy_half_of_optimum_on_8x8(seed):
    s = _rand((64, 8, 8), seed).abs()
    opt = (s * nm.solve_tiles(s, 4, "flow")).sum((1, 2))
    g = nm.solve_tiles(s, 4, "greedy")
    kept = (s * g).sum((1, 2))
    assert (kept >= 0.5 * opt).all()
    assert (g.sum(1) <= 4).all() and (g.sum(2) <= 4).all()
    # greedy may leave a row short (<= N kept), which can beat every exactly-N tile, but never by much
    assert (kept <= opt * 1.05).all()


def test_greedy_adversarial_half_bound_is_tight_ish():
    # classic greedy trap for 1:2: taking the big diagonal entry blocks two almost-as-big entries
    s = torch.tensor([[[1.0 + 1e-3, 1.0], [1.0, 0.0]]])
    g = nm.solve_tiles(s, 1, "greedy")
    opt = nm.solve_tiles(s, 1, "enumerate")
    assert float((s * g).sum()) == pytest.approx(1.001)
    assert float((s * opt).sum()) == pytest.approx(2.0)


def test_greedy_packed_matches_indexed_reference():
    for n, m in [(4, 8), (2, 4), (8, 16), (1, 8)]:
        s = _rand((300, m, m), m + n, ties=True).abs()
        assert torch.equal(nm._solve_greedy(s, n), nm._solve_greedy_indexed(s, n, 128))


@pytest.mark.parametrize("length", [2, 4, 16, 64])
def test_fast_orders_match_stable_sort(length):
    f = _rand((500, length), length, ties=True).abs()
    f[:7] = 0
    f[7:9, : length // 2] = nm._PAD  # padded slots rank last
    ref = torch.sort(f, dim=1, descending=True, stable=True).indices
    assert torch.equal(nm._order(f), ref) and torch.equal(nm._desc_order(f), ref)
    assert torch.equal(nm._desc_rank(f), torch.empty_like(ref).scatter_(1, ref, torch.arange(length).expand(500, -1)))


def test_valid_tiles_are_exactly_the_brute_force_set():
    for n, m in [(1, 3), (2, 4), (2, 3)]:
        allm = np.array(list(itertools.product([0, 1], repeat=m * m))).reshape(-1, m, m)
        ok = allm[(allm.sum(1) == n).all(1) & (allm.sum(2) == n).all(1)]
        got = nm.valid_tiles(n, m).numpy().astype(int)
        assert {a.tobytes() for a in ok} == {a.tobytes() for a in got}
        assert len(got) == nm.count_transposable(m, n)


# --------------------------------------------------------------------------------- diversity
def test_count_transposable_known_values():
    assert nm.count_transposable(4, 2) == 90
    assert nm.count_transposable(8, 4) == 116963796250
    assert [nm.count_transposable(m, 1) for m in range(1, 7)] == [math.factorial(m) for m in range(1, 7)]
    assert nm.count_transposable(6, 3) == 297200  # OEIS A058527
    assert nm.count_transposable(5, 2) == 2040  # OEIS A001501


def test_mask_diversity_closed_forms():
    assert nm.mask_diversity(64, 4, 8, "nm") == math.comb(8, 4) ** 8
    assert nm.mask_diversity(64, 2, 4, "transposable") == 90**4
    assert nm.mask_diversity(64, 1, 2, "unstructured") == math.comb(64, 32)
    assert nm.mask_diversity(64, 1, 2, "transposable") == 2**16
    assert nm.log10_int(nm.mask_diversity(64, 4, 8, "transposable")) == pytest.approx(math.log10(116963796250))
    # on one 8x8 tile: transposable 2:4 (90^4) << transposable 4:8 (B(8,4)) < plain 2:4 (6^16)
    t48 = nm.mask_diversity(64, 4, 8, "transposable")
    assert nm.mask_diversity(64, 2, 4, "transposable") < t48 < nm.mask_diversity(64, 2, 4, "nm")
    with pytest.raises(ValueError):
        nm.mask_diversity(60, 4, 8, "transposable")
    with pytest.raises(ValueError):
        nm.mask_diversity(64, 4, 8, "bogus")


# ------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("fn", [nm.nm_mask, nm.transposable_mask])
def test_bad_inputs(fn):
    w = torch.randn(8, 8)
    with pytest.raises(ValueError, match="N < M"):
        fn(w, 4, 4)
    with pytest.raises(ValueError, match="N < M"):
        fn(w, 0, 4)
    with pytest.raises(TypeError):
        fn(w, 2.0, 4)
    with pytest.raises(ValueError, match="1-D|>= 2 dims"):
        fn(torch.randn(8), 2, 4)
    bad = w.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        fn(bad, 2, 4)
    bad[0, 0] = float("inf")
    with pytest.raises(ValueError, match="NaN or Inf"):
        fn(bad, 2, 4)
    with pytest.raises(TypeError, match="floating"):
        fn(torch.ones(8, 8, dtype=torch.int64), 2, 4)
    with pytest.raises(TypeError):
        fn(np.ones((8, 8)), 2, 4)


def test_transposable_bad_method_and_solver():
    with pytest.raises(ValueError, match="method"):
        nm.transposable_mask(torch.randn(8, 8), 2, 4, "greedy")
    with pytest.raises(ValueError, match="solver"):
        nm.solve_tiles(torch.rand(2, 4, 4), 2, "nope")
    with pytest.raises(ValueError, match=r"\[T, M, M\]"):
        nm.solve_tiles(torch.rand(2, 4, 3), 2)


def test_half_precision_and_dtype_preserved_shape():
    w = torch.randn(8, 16, dtype=torch.bfloat16)
    assert nm.is_transposable(nm.transposable_mask(w, 2, 4), 2, 4)
    assert nm.is_nm(nm.nm_mask(w, 2, 4), 2, 4)
