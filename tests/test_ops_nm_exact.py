"""Exact transposable N:M is optimal per tile, whatever the other tiles hold (exact integer oracles).

Scores are integers ``a * 2^b`` (float32-exact, below 2^52), so kept sums are exact in int64 and the
optimum is compared without rounding: exhaustive search over all valid tiles where they are few, and an
independent assignment formulation (scipy's linear_sum_assignment) for 3:6 and 4:8.
"""
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import linear_sum_assignment

from thrifty.ops import nm
from thrifty.ops._nm_flow import cost_bits, integer_scores

ENUM_BITS = {m: 52 - (m * m).bit_length() for m in (2, 3, 4, 5)}


def _exact_int(v: np.ndarray) -> np.ndarray:
    assert (v == np.rint(v)).all() and (np.abs(v) < 2.0**52).all()
    return v.astype(np.int64)


def _kept(s: np.ndarray, mask: np.ndarray) -> np.ndarray:
    return (_exact_int(s) * mask).sum((1, 2))


def _enum_best(s: np.ndarray, n: int) -> np.ndarray:
    """Exhaustive: max over all valid tiles, exact (values split in 26-bit halves, summed in float64)."""
    m = s.shape[-1]
    pats = nm.valid_tiles(n, m).reshape(-1, m * m).double().numpy().T
    v = _exact_int(s.reshape(-1, m * m))
    hi, lo = (v >> 26).astype(np.float64), (v & ((1 << 26) - 1)).astype(np.float64)
    return ((hi @ pats).astype(np.int64) * (1 << 26) + (lo @ pats).astype(np.int64)).max(1)


def _lsa_best(s: np.ndarray, n: int) -> np.ndarray:
    """Max-weight N-regular subgraph of K_{m,m} as a perfect matching (edge gadget), one tile at a time.

    Left: N copies of each row, then one node f_ij per edge; right: one node e_ij per edge, then N copies
    of each column. Row copy of i - e_ij carries s_ij (edge used), e_ij - f_ij carries 0 (edge unused),
    f_ij - column copy of j carries 0. Every row and column then uses exactly N edges.
    """
    t, m, _ = s.shape
    size = m * n + m * m
    best = []
    for tile in s:
        c = np.full((size, size), np.inf)
        for i in range(m):
            for j in range(m):
                e = i * m + j
                c[i * n:(i + 1) * n, e] = -tile[i, j]
                c[m * n + e, e] = 0.0
                c[m * n + e, m * m + j * n:m * m + (j + 1) * n] = 0.0
        r, col = linear_sum_assignment(c)
        best.append(int(round(-c[r, col].sum())))  # integers below 2^47: every partial sum is exact
    return np.array(best, dtype=np.int64)


def _slack(s: np.ndarray, n: int, bits: int) -> np.ndarray:
    """Largest shortfall the per-tile integer scores allow: N M 2^(e - B), 0 where they are exact."""
    m = s.shape[-1]
    top = s.reshape(len(s), -1).max(1)
    _, e = np.frexp(top)
    exact = (integer_scores(torch.from_numpy(s), bits).numpy() * np.ldexp(1.0, e - bits)[:, None, None] == s).all((1, 2))
    return np.where(exact, 0, (n * m * np.ldexp(1.0, e - bits)).astype(np.int64))


KINDS = ["wide", "narrow", "ties", "zeros"]


def _tiles(specs, m, max_exp):
    """One tile per (kind, seed) of float32-exact integers a * 2^b, b <= max_exp: a wide or a narrow dynamic
    range, many ties, many zeros."""
    out = np.empty((len(specs), m, m))
    for k, (kind, seed) in enumerate(specs):
        rng = np.random.default_rng(seed)
        a = rng.integers(0, 1 << 24, (m, m)) if kind != "ties" else rng.integers(0, 3, (m, m))
        b = rng.integers(0, max_exp + 1, (m, m)) if kind == "wide" else np.full((m, m), rng.integers(0, max_exp + 1))
        if kind == "zeros":
            a[rng.random((m, m)) < 0.6] = 0
        out[k] = np.ldexp(a.astype(np.float64), b)
    assert (out.astype(np.float32) == out).all()
    return out


def _specs(size):
    return st.lists(st.tuples(st.sampled_from(KINDS), st.integers(0, 2**32 - 1)), min_size=size, max_size=size)


def _check(s: np.ndarray, n: int, best: np.ndarray, solver: str, bits: int) -> None:
    mask = nm.solve_tiles(torch.from_numpy(s), n, solver).numpy()
    assert (mask.sum(1) == n).all() and (mask.sum(2) == n).all()
    got = _kept(s, mask)
    assert (got <= best).all()
    short = best - got
    slack = _slack(s, n, bits)
    assert (short <= slack).all(), (solver, short[short > slack], slack[short > slack])


@settings(max_examples=20, deadline=None)
@given(st.sampled_from([(1, 2), (1, 3), (2, 3), (2, 4), (1, 4), (3, 4), (2, 5)]), _specs(6))
def test_exact_solvers_optimal_against_exhaustive_search(nmp, specs):
    n, m = nmp
    s = _tiles(specs, m, 28)
    best = _enum_best(s, n)
    _check(s, n, best, "enumerate", ENUM_BITS[m])
    _check(s, n, best, "flow", cost_bits(m))


@settings(max_examples=10, deadline=None)
@given(st.sampled_from([(4, 8), (3, 6), (2, 8)]), _specs(3))
def test_flow_optimal_against_assignment_formulation(nmp, specs):
    n, m = nmp
    s = _tiles(specs, m, 16)  # below 2^40: the assignment solver's float64 sums stay exact
    _check(s, n, _lsa_best(s, n), "flow", cost_bits(m))


def test_assignment_oracle_agrees_with_exhaustive_search():
    s = _tiles([(k, i) for i, k in enumerate(KINDS * 2)], 4, 16)
    assert (_lsa_best(s, 2) == _enum_best(s, 2)).all()
    assert (_lsa_best(s[:, :3, :3], 1) == _enum_best(s[:, :3, :3], 1)).all()


@pytest.mark.parametrize("solver", ["enumerate", "flow"])
def test_an_entry_one_ulp_above_its_ties_is_always_kept(solver):
    # a float32 sum of eight ~1.0 scores cannot see 2^-23 (its ulp is 2^-20): an argmax of float32 pattern
    # sums picks the first of the 'tied' patterns, which misses the larger entry at most positions
    s = torch.ones(16, 4, 4)
    s.view(16, 16)[torch.arange(16), torch.arange(16)] = 1.0 + 2.0**-23
    mask = nm.solve_tiles(s, 2, solver)
    assert mask.view(16, 16)[torch.arange(16), torch.arange(16)].all()


# ------------------------------------------------------------------ independence of the other tiles
@pytest.mark.parametrize("big", [1e6, 1e9, 1e12, 1e30])
def test_outlier_in_one_tile_leaves_other_tiles_optimal(big):
    # the reproduction: rows 8-15 solved alone vs together with rows 0-7 holding one huge weight
    w = torch.randn(16, 8, generator=torch.Generator().manual_seed(0))
    w[0, 0] = big
    alone = nm.transposable_mask(w[8:], 4, 8)
    together = nm.transposable_mask(w, 4, 8)
    assert torch.equal(together[8:], alone)
    a = w[8:].abs().double()
    assert float((a * together[8:]).sum()) == float((a * alone).sum())


@pytest.mark.parametrize("n,m", [(4, 8), (2, 4)])
def test_tiles_with_outliers_do_not_change_the_others(n, m):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(16 * m, 16 * m, generator=g)
    tiles, _ = nm._tiles(w.abs(), m)
    spoilt = tiles.clone()
    hit = torch.randperm(len(tiles), generator=g)[:5]
    spoilt[hit, 0, 0] = 1e30
    spoilt[hit[:2], 1, 1] = 1e-30
    solver = "flow" if m == 8 else "enumerate"
    clean = nm.solve_tiles(tiles, n, solver)
    dirty = nm.solve_tiles(spoilt, n, solver)
    other = torch.ones(len(tiles), dtype=torch.bool)
    other[hit] = False
    assert torch.equal(clean[other], dirty[other])  # randn scores: no ties, one optimum per tile


def test_power_of_two_scaling_of_a_tile_changes_nothing():
    # per-tile scale invariance: tiles of float64 weights near 1e300 and 1e-300 get the float32 masks
    w = torch.randn(24, 16, generator=torch.Generator().manual_seed(2))
    w64 = w.double()
    w64[:8] *= 2.0**990  # beyond float32's range
    w64[8:16] *= 2.0**-1000  # below float32's smallest subnormal
    for n, m, method in [(4, 8, "exact"), (2, 4, "exact"), (4, 8, "approx")]:
        assert torch.equal(nm.transposable_mask(w64, n, m, method), nm.transposable_mask(w, n, m, method))


def test_padding_never_beats_a_real_zero_next_to_a_huge_weight():
    w = torch.zeros(3, 8)
    w[0, 0] = 1e30  # a partial tile: rows 3-7 are padding
    mask = nm.transposable_mask(w, 4, 8)
    assert (mask.sum(1) == 4).all() and (mask.sum(0) <= 4).all()


# --------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("method", ["exact", "approx"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_weights_are_refused_with_position(method, value):
    w = torch.randn(8, 8)
    w[2, 5] = value
    with pytest.raises(ValueError, match=r"weight of shape \(8, 8\): contains NaN or Inf \(1 entries, first at index \(2, 5\)\)"):
        nm.transposable_mask(w, 4, 8, method)
    with pytest.raises(ValueError, match=r"first at index \(2, 5\)"):
        nm.nm_mask(w, 2, 4)


@pytest.mark.parametrize("solver", ["enumerate", "flow", "greedy"])
def test_solve_tiles_refuses_nonfinite_and_integer_scores(solver):
    s = torch.rand(3, 4, 4)
    s[1, 2, 3] = float("nan")
    with pytest.raises(ValueError, match=r"scores contain NaN or Inf \(1 entries, first at index \(1, 2, 3\)\)"):
        nm.solve_tiles(s, 2, solver)
    with pytest.raises(TypeError, match="floating point"):
        nm.solve_tiles(torch.ones(3, 4, 4, dtype=torch.int64), 2, solver)
