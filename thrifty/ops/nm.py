"""N:M weight masks: magnitude N:M, transposable N:M (exact and 2-approximation), mask diversity.

Pure tensor math, no modules. Every function takes any weight shape and works on its 2-D GEMM view.

Layout rule (:func:`as_matrix`). A weight ``[out, *rest]`` is viewed as the matrix ``[out, K]`` whose
columns are the GEMM reduction. Linear ``[out, in]`` is itself. Conv2d ``[out, in/g, kh, kw]`` is taken
channels-last, ``K = kh * kw * in/g`` ordered ``(kh, kw, c)``: each block is M consecutive *input
channels at one kernel position*, the order in which NHWC implicit-GEMM kernels (and sparse tensor cores)
read the reduction.

Tail rule. When K (or, for transposable masks, ``out``) is not a multiple of M, the matrix is padded with
zeros up to the next multiple, exactly as a sparse kernel pads the GEMM, and padded slots count as pruned
slots. So every block of M has at most N kept entries, full blocks exactly N, and a tail block of ``t < M``
real entries keeps its ``min(N, t)`` largest (it is dense when ``t <= N``).

Transposable masks live on true ``M x M`` tiles of that matrix: every row and every column of a tile keeps
N entries, so the mask is N:M for W (blocks along K) and for W^T (blocks along ``out``), i.e. for the
forward GEMM and for the input-gradient GEMM ``dX = dY W``. The exact solver maximises the kept magnitude
per tile (enumeration of all valid tiles when there are few, e.g. the 90 of 2:4, as one matmul; otherwise
min-cost flow, OR-tools' SimpleMinCostFlow on one graph holding a chunk of tiles);
the 2-approximation is greedy b-matching (keeps >= 1/2 of the optimum).

What "exact" guarantees. Both exact solvers maximise over the tile's scores rounded to integers of B bits
on a power-of-two scale of the tile's own maximum (:func:`thrifty.ops._nm_flow.integer_scores`; B = 47
for enumeration, 39 for 8 x 8 flow tiles), so a tile's mask never depends on what other tiles hold. When
a tile's nonzero scores lie within ``2^(B-24)`` of its maximum (float32 weights; ``2^(B-53)`` for float64)
the integer costs are exact and so is the optimum; otherwise the kept sum is at most ``N M 2^(1-B)`` of the
tile's maximum below the optimum (below half a float32 ulp of the kept sum for every M <= 32). Enumeration
first takes the float matmul's argmax where a rounding-error bound certifies it (then it is the exact
optimum), and solves only the remaining (tied or nearly tied) tiles on the integers; the result is the
same on every CPU.

Example:
    >>> import torch
    >>> w = torch.randn(16, 32)
    >>> m = nm_mask(w, 2, 4)
    >>> bool(is_nm(m, 2, 4)), int(m.sum())
    (True, 256)
    >>> t = transposable_mask(w, 2, 4)
    >>> bool(is_transposable(t, 2, 4)), int(t.sum())
    (True, 256)
    >>> count_transposable(4, 2), count_transposable(8, 4)
    (90, 116963796250)
"""
from __future__ import annotations

import functools
import math
from collections import defaultdict
from typing import Literal

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "as_matrix", "from_matrix", "nm_mask", "transposable_mask", "solve_tiles", "valid_tiles", "is_nm",
    "is_transposable", "kept_fraction", "count_transposable", "mask_diversity", "log10_int", "check_nm",
    "check_weight", "ENUMERATE_MAX",
]

Method = Literal["exact", "approx"]
TileSolver = Literal["enumerate", "flow", "greedy"]

ENUMERATE_MAX = 3000  # enumerate all valid tiles when B(M, N) is at most this (2:4 -> 90, 2:5 -> 2040)
_PAD = -1.0  # score of padded slots: below every |w|, so real entries (even zeros) are preferred


# ----------------------------------------------------------------------------------------- checks
def check_nm(n: int, m: int) -> None:
    """Raise ValueError unless ``1 <= n < m`` are ints."""
    for k, v in (("n", n), ("m", m)):
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool):
            raise TypeError(f"N:M: {k} must be an int, got {type(v).__name__}")
    if not 1 <= n < m:
        raise ValueError(f"N:M needs 1 <= N < M, got {n}:{m}")


def check_weight(w: Tensor, what: str = "weight") -> None:
    """Raise TypeError / ValueError for non-tensors, non-float, fewer than 2 dims, NaN or Inf."""
    if not isinstance(w, Tensor):
        raise TypeError(f"{what}: expected a torch.Tensor, got {type(w).__name__}")
    if not w.is_floating_point():
        raise TypeError(f"{what}: N:M masks need a floating-point tensor, got {w.dtype}")
    if w.dim() < 2:
        raise ValueError(f"{what}: N:M masks act on GEMM weights with >= 2 dims, got shape {tuple(w.shape)} "
                         "(1-D parameters such as biases and norms are not sparsified)")
    if w.numel() and not _all_finite(w):
        raise ValueError(f"{what} of shape {tuple(w.shape)}: contains {_nonfinite(w)}; cannot rank magnitudes")


def _all_finite(t: Tensor) -> bool:
    # one reduction: NaN and inf make the sum non-finite; a finite sum proves every entry finite, and only
    # a sum that overflowed needs the elementwise check
    t = t.detach()
    return math.isfinite(float(t.sum())) or bool(torch.isfinite(t).all())


def _nonfinite(t: Tensor) -> str:
    """'NaN or Inf (3 entries, first at index (0, 2))': what is wrong with ``t`` and where."""
    bad = ~torch.isfinite(t)
    first = tuple(int(i) for i in bad.nonzero()[0])
    return f"NaN or Inf ({int(bad.sum())} entries, first at index {first})"


# ------------------------------------------------------------------------------------------ views
def as_matrix(w: Tensor) -> Tensor:
    """The 2-D GEMM view ``[out, K]`` (conv: channels-last reduction ``(kh, kw, c)``)."""
    if w.dim() == 2:
        return w
    return w.permute(0, *range(2, w.dim()), 1).reshape(w.shape[0], -1)


def from_matrix(mat: Tensor, shape: torch.Size | tuple[int, ...]) -> Tensor:
    """Inverse of :func:`as_matrix` for a weight of ``shape``."""
    shape = tuple(shape)
    if len(shape) == 2:
        return mat.reshape(shape)
    cl = (shape[0], *shape[2:], shape[1])
    nd = len(shape)
    return mat.reshape(cl).permute(0, nd - 1, *range(1, nd - 1)).contiguous()


def _scores(w: Tensor) -> Tensor:
    # float64 weights keep float64 scores: float32 would turn |w| > 3.4e38 into inf and flush a tile of
    # tiny weights to ties at zero, making that tile's mask depend on nothing
    return as_matrix(w.detach()).abs().to(_score_dtype(w.dtype))


def _score_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _pad(mat: Tensor, rows: int, cols: int) -> Tensor:
    r, k = mat.shape
    if rows == r and cols == k:
        return mat
    out = mat.new_full((rows, cols), _PAD)
    out[:r, :k] = mat
    return out


def _up(x: int, m: int) -> int:
    return -(-x // m) * m


# ----------------------------------------------------------------------------------- N:M masks
def nm_mask(w: Tensor, n: int, m: int) -> Tensor:
    """Boolean mask keeping the ``n`` largest ``|w|`` in every block of ``m`` along the reduction.

    Ties are broken by position (the earlier entry wins), so full blocks keep exactly ``n``.

    Example:
        >>> nm_mask(torch.tensor([[1., -4., 3., 2.]]), 2, 4).tolist()
        [[False, True, True, False]]
    """
    check_nm(n, m)
    check_weight(w)
    s = _scores(w)
    r, k = s.shape
    kp = _up(k, m)
    blocks = _pad(s.cpu(), r, kp).view(r, kp // m, m)
    # keep rank < n, ranks descending with the earlier entry winning ties (topk makes no such promise)
    keep = _desc_rank(blocks.reshape(-1, m)).view(blocks.shape) < n
    keep &= blocks > _PAD  # a padded slot is never "kept"
    return from_matrix(keep.view(r, kp)[:, :k], w.shape).to(w.device)


def is_nm(mask: Tensor, n: int, m: int) -> bool:
    """True iff every block of ``m`` along the reduction (tail rule included) has at most ``n`` nonzeros."""
    check_nm(n, m)
    nz = as_matrix(mask) != 0
    r, k = nz.shape
    kp = _up(k, m)
    padded = torch.zeros(r, kp, dtype=torch.bool, device=nz.device)
    padded[:, :k] = nz
    return bool((padded.view(r, kp // m, m).sum(-1) <= n).all())


def _tiles(mat: Tensor, m: int) -> tuple[Tensor, tuple[int, int, int, int]]:
    r, k = mat.shape
    rp, kp = _up(r, m), _up(k, m)
    t = _pad(mat, rp, kp).view(rp // m, m, kp // m, m).permute(0, 2, 1, 3).reshape(-1, m, m)
    return t, (r, k, rp, kp)


def _untile(t: Tensor, m: int, dims: tuple[int, int, int, int]) -> Tensor:
    r, k, rp, kp = dims
    return t.view(rp // m, kp // m, m, m).permute(0, 2, 1, 3).reshape(rp, kp)[:r, :k]


def is_transposable(mask: Tensor, n: int, m: int) -> bool:
    """True iff every row and every column of every ``m x m`` tile of the GEMM view has at most ``n`` nonzeros."""
    check_nm(n, m)
    t, _ = _tiles((as_matrix(mask) != 0).float(), m)
    t = t.clamp_min(0)  # padding (-1) counts as empty
    return bool((t.sum(1) <= n).all() and (t.sum(2) <= n).all())


def kept_fraction(w: Tensor, mask: Tensor) -> float:
    """Fraction of the total ``|w|`` that ``mask`` keeps (1.0 for an all-zero ``w``)."""
    a = w.detach().abs().double()
    tot = float(a.sum())
    return float((a * mask.double()).sum()) / tot if tot > 0 else 1.0


# --------------------------------------------------------------------------- transposable masks
@functools.lru_cache(maxsize=None)
def _valid_tiles_np(m: int, n: int) -> np.ndarray:
    rows = [np.array(c) for c in _combos(m, n)]
    out: list[np.ndarray] = []

    def rec(prefix: list[np.ndarray], colsum: np.ndarray) -> None:
        left = m - len(prefix)
        if left == 0:
            out.append(np.stack(prefix))
            return
        for r in rows:
            cs = colsum + r
            # every column must still be able to reach n with the rows left
            if cs.max() <= n and (n - cs).max() <= left - 1:
                rec(prefix + [r], cs)

    rec([], np.zeros(m, dtype=np.int64))
    return np.stack(out).astype(bool)


def _combos(m: int, n: int) -> list[tuple[int, ...]]:
    import itertools

    return [tuple(int(i in c) for i in range(m)) for c in itertools.combinations(range(m), n)]


def valid_tiles(n: int, m: int) -> Tensor:
    """All ``m x m`` 0/1 tiles with every row and column sum ``n``, as a bool tensor ``[B(m,n), m, m]``.

    Example:
        >>> valid_tiles(2, 4).shape
        torch.Size([90, 4, 4])
    """
    check_nm(n, m)
    b = count_transposable(m, n)
    if b > 10**6:
        raise ValueError(f"refusing to enumerate B({m},{n}) = {b} tiles")
    return torch.from_numpy(_valid_tiles_np(m, n).copy())


_RANK_MAX = 8  # rows up to this long are ranked by counting (L passes), longer ones by one integer sort


def _desc_rank(flat: Tensor) -> Tensor:
    """Rank of every entry in its row, descending, ties to the earlier position (0 = largest), int64 ``[t, L]``.

    Short rows (2:4 and 4:8 blocks) are ranked by counting, per entry, the entries that beat it: L
    elementwise passes over ``[t, L]``, much faster than sorting millions of 4- or 16-element rows.
    """
    t, length = flat.shape
    if length > _RANK_MAX:
        order = _desc_order(flat)
        return torch.empty_like(order).scatter_(1, order, torch.arange(length).expand(t, length).contiguous())
    rank = torch.zeros(t, length, dtype=torch.uint8)
    for j in range(length):  # entry j beats i if larger, or equal and earlier (j < i)
        fj = flat[:, j:j + 1]
        beat = fj > flat
        beat[:, j + 1:] |= fj == flat[:, j + 1:]
        rank += beat
    return rank.long()


def _desc_order(flat: Tensor) -> Tensor:
    """Per-row argsort, descending, ties by position (earlier first), for float32 scores ``[t, L]``.

    Why not ``torch.sort``: for many short rows it is ~50x slower than numpy's SIMD sort of int64. The key
    packs the float's bit pattern (monotone for the nonnegative scores; the one negative pad value sorts
    below them all) above the reversed position, so keys are unique and one integer sort gives the order.
    float64 scores leave no spare bits in an int64 key and take the stable torch sort.
    """
    if flat.dtype != torch.float32:
        return torch.sort(flat, dim=1, descending=True, stable=True).indices
    length = flat.shape[1]
    sh = max(1, (length - 1).bit_length())
    pos = np.arange(length, dtype=np.int64)
    key = (flat.contiguous().numpy().view(np.int32).astype(np.int64) << sh) | ((length - 1) - pos)
    key.sort(axis=1)
    order = (length - 1) - (key[:, ::-1] & ((1 << sh) - 1))
    return torch.from_numpy(np.ascontiguousarray(order))


def _order(flat: Tensor) -> Tensor:
    """Descending order per row (ties: earlier first), by ranking for short rows, else by sorting."""
    t, length = flat.shape
    if length > _RANK_MAX:
        return _desc_order(flat)
    rank = _desc_rank(flat)
    return torch.empty_like(rank).scatter_(1, rank, torch.arange(length).expand(t, length).contiguous())


def _field_width(n: int) -> int:
    """Bits per counter so that a counter started at 2^(w-1) - n hits its top bit exactly at n."""
    return max(1, (n - 1).bit_length()) + 1


def _solve_greedy(s: Tensor, n: int, chunk: int = 1 << 15) -> Tensor:
    """Greedy b-matching on every tile at once: M^2 vectorised steps over the sorted positions.

    Row and column counters of a tile are packed as bit fields of one or two int64 words; each counter
    starts at ``2^(w-1) - n`` so "row full" is a single AND with the field's top bit: a step is ~5
    elementwise ops over all tiles, with no gather/scatter into per-tile count arrays.
    """
    t, m, _ = s.shape
    w = _field_width(n)
    if m * w > 64:
        return _solve_greedy_indexed(s, n, chunk)
    one_word = 2 * m * w <= 64
    pos = torch.arange(m * m)
    r_sh, c_sh = (pos // m) * w, (pos % m) * w + (m * w if one_word else 0)
    top = 1 << (w - 1)

    def field(sh: Tensor, v: int) -> Tensor:  # int64 with value v in the fields at shifts sh (wraps at bit 63)
        return torch.tensor([((v << int(x)) + 2**63) % 2**64 - 2**63 for x in sh], dtype=torch.long)

    init_r = sum(((top - n) << (i * w)) for i in range(m))
    init_c = sum(((top - n) << (i * w + (m * w if one_word else 0))) for i in range(m))
    init_r, init_c = (init_r + init_c, 0) if one_word else (init_r, init_c)
    lut_r = torch.stack([field(r_sh, top), field(r_sh, 1)])  # [2, M*M]: top-bit mask, increment
    lut_c = torch.stack([field(c_sh, top), field(c_sh, 1)])
    wrap = lambda v: (v + 2**63) % 2**64 - 2**63  # noqa: E731
    out = torch.empty(t, m * m, dtype=torch.bool)
    for i in range(0, t, chunk):  # chunks keep the working set in cache; each chunk is fully vectorised
        flat = s[i:i + chunk].reshape(-1, m * m)
        tc = flat.shape[0]
        order = _order(flat)
        ordt = order.t().contiguous()
        keep = torch.empty(m * m, tc, dtype=torch.bool)
        if one_word:
            st = torch.full((tc,), wrap(init_r), dtype=torch.long)
            tb = (lut_r[0] | lut_c[0])[ordt]
            inc = (lut_r[1] + lut_c[1])[ordt]
            for k in range(m * m):
                ok = (st & tb[k]) == 0
                keep[k] = ok
                st += inc[k] * ok
        else:
            sr = torch.full((tc,), wrap(init_r), dtype=torch.long)
            sc = torch.full((tc,), wrap(init_c), dtype=torch.long)
            tbr, incr, tbc, incc = lut_r[0][ordt], lut_r[1][ordt], lut_c[0][ordt], lut_c[1][ordt]
            for k in range(m * m):
                ok = ((sr & tbr[k]) | (sc & tbc[k])) == 0
                keep[k] = ok
                sr += incr[k] * ok
                sc += incc[k] * ok
        out[i:i + chunk] = torch.zeros(tc, m * m, dtype=torch.bool).scatter_(1, order, keep.t())
    return out.view(t, m, m)


def _solve_greedy_indexed(s: Tensor, n: int, chunk: int) -> Tensor:
    """Same greedy with explicit per-tile counters (for M too large to pack counters in two words)."""
    t, m, _ = s.shape
    out = torch.empty(t, m * m, dtype=torch.bool)
    for i in range(0, t, chunk):
        flat = s[i:i + chunk].reshape(-1, m * m)
        tc = flat.shape[0]
        order = _order(flat)
        base = (torch.arange(tc) * m)[None, :]
        rows, cols = ((order // m).t() + base).contiguous(), ((order % m).t() + base).contiguous()
        rc = torch.zeros(tc * m, dtype=torch.int32)
        cc = torch.zeros(tc * m, dtype=torch.int32)
        keep = torch.empty(m * m, tc, dtype=torch.bool)
        for k in range(m * m):
            ok = (rc[rows[k]] < n) & (cc[cols[k]] < n)
            keep[k] = ok
            rc.index_add_(0, rows[k], ok.int())
            cc.index_add_(0, cols[k], ok.int())
        out[i:i + chunk] = torch.zeros(tc, m * m, dtype=torch.bool).scatter_(1, order, keep.t())
    return out.view(t, m, m)


def solve_tiles(scores: Tensor, n: int, solver: TileSolver = "flow") -> Tensor:
    """Transposable N:M mask of a batch of tiles ``[T, M, M]`` of nonnegative scores.

    ``"enumerate"``: best of all valid tiles (one matmul against the pattern matrix; exact);
    ``"flow"``: exact max-weight N-regular bipartite subgraph (OR-tools min-cost flow, all tiles in one graph);
    ``"greedy"``: greedy b-matching, the 2-approximation (rows/columns keep <= N; almost always exactly N).
    Each tile is solved on its own (see the module doc for what "exact" guarantees); NaN/Inf scores raise
    ValueError. Negative scores mark padded slots: they rank below every nonnegative score.
    """
    if scores.dim() != 3 or scores.shape[1] != scores.shape[2]:
        raise ValueError(f"solve_tiles expects [T, M, M] scores, got shape {tuple(scores.shape)}")
    m = scores.shape[-1]
    check_nm(n, m)
    if not scores.is_floating_point():
        raise TypeError(f"solve_tiles: scores must be floating point, got {scores.dtype}")
    s = scores.detach().to(_score_dtype(scores.dtype)).cpu().contiguous()
    if s.numel() and not _all_finite(s):
        raise ValueError(f"solve_tiles: scores contain {_nonfinite(s)}; the masks rank finite magnitudes")
    return _solve(s, n, solver)


def _solve(s: Tensor, n: int, solver: str) -> Tensor:
    if s.shape[0] == 0:
        return torch.zeros(s.shape, dtype=torch.bool)
    if solver == "enumerate":
        from thrifty.ops._nm_flow import solve_enumerate

        return solve_enumerate(valid_tiles(n, s.shape[-1]), s, n)
    if solver == "greedy":
        return _solve_greedy(s, n)
    if solver == "flow":
        from thrifty.ops._nm_flow import solve_flow

        return solve_flow(s, n)
    raise ValueError(f"unknown tile solver {solver!r}; use 'enumerate', 'flow' or 'greedy'")


def transposable_mask(w: Tensor, n: int, m: int, method: Method = "exact") -> Tensor:
    """Mask that is N:M along the reduction of ``w`` and along its output dimension (see module doc).

    ``method="exact"`` maximises the kept ``|w|`` in every ``m x m`` tile over the masks that keep exactly
    ``n`` in every row and column of the tile (the full N:M pattern); ``"approx"`` is the greedy
    2-approximation, which may leave a row or column with fewer than ``n`` (at most ``n`` is still N:M), so in
    rare tiles (about 1 % of random 8 x 8 ones at 4:8) it keeps more ``|w|`` with fewer entries. Partial tiles
    (dimensions not divisible by ``m``) follow the padding tail rule.

    Example:
        >>> w = torch.randn(8, 8, generator=torch.Generator().manual_seed(0))
        >>> mask = transposable_mask(w, 4, 8)
        >>> mask.sum(0).tolist() == mask.sum(1).tolist() == [4] * 8
        True
    """
    check_nm(n, m)
    check_weight(w)
    if method not in ("exact", "approx"):
        raise ValueError(f"method must be 'exact' or 'approx', got {method!r}")
    tiles, dims = _tiles(_scores(w).cpu(), m)
    if method == "approx":
        solver: TileSolver = "greedy"
    else:
        solver = "enumerate" if count_transposable(m, n) <= ENUMERATE_MAX else "flow"
    keep = _solve(tiles.contiguous(), n, solver)  # (w is checked: its scores are finite)
    keep &= tiles > _PAD
    return from_matrix(_untile(keep, m, dims), w.shape).to(w.device)


# ------------------------------------------------------------------------------ mask diversity
@functools.lru_cache(maxsize=None)
def count_transposable(m: int, n: int) -> int:
    """B(M, N): number of ``M x M`` 0/1 matrices with every row and column sum N (exact integer).

    Dynamic programming over rows; the state is the histogram of column fills (how many columns already
    hold 0, 1, ..., N ones), which is all that matters by column symmetry.

    Example:
        >>> [count_transposable(4, k) for k in (1, 2, 3)]
        [24, 90, 24]
    """
    if not (isinstance(m, int) and isinstance(n, int)) or not 0 <= n <= m:
        raise ValueError(f"count_transposable needs ints 0 <= N <= M, got M={m!r}, N={n!r}")
    states: dict[tuple[int, ...], int] = {tuple([m] + [0] * n): 1}
    for _ in range(m):
        nxt: dict[tuple[int, ...], int] = defaultdict(int)
        for h, ways in states.items():
            for picks, mult in _picks(h, n):
                g = list(h)
                for lvl, p in enumerate(picks):
                    g[lvl] -= p
                    g[lvl + 1] += p
                nxt[tuple(g)] += ways * mult
        states = nxt
    return states.get(tuple([0] * n + [m]), 0)


def _picks(h: tuple[int, ...], n: int) -> list[tuple[tuple[int, ...], int]]:
    """Ways to choose n columns for the next row, grouped by how many come from each fill level < n."""
    out: list[tuple[tuple[int, ...], int]] = []

    def rec(lvl: int, left: int, acc: tuple[int, ...], mult: int) -> None:
        if lvl == n:  # level n columns are full
            if left == 0:
                out.append((acc, mult))
            return
        for p in range(min(left, h[lvl]) + 1):
            rec(lvl + 1, left - p, acc + (p,), mult * math.comb(h[lvl], p))

    rec(0, n, (), 1)
    return out


def mask_diversity(numel: int, n: int, m: int, kind: Literal["unstructured", "nm", "transposable"]) -> int:
    """Exact number of masks of ``numel`` weights at density ``n/m`` under a constraint.

    ``"unstructured"``: C(T, T n/m); ``"nm"``: C(M, N)^(T/M); ``"transposable"``: B(M, N)^(T/M^2).

    Example:
        >>> mask_diversity(16, 2, 4, "transposable")
        90
        >>> mask_diversity(16, 2, 4, "nm") == 6 ** 4
        True
    """
    check_nm(n, m)
    if not isinstance(numel, int) or numel <= 0:
        raise ValueError(f"numel must be a positive int, got {numel!r}")
    if kind == "unstructured":
        if (numel * n) % m:
            raise ValueError(f"unstructured at density {n}/{m} needs numel*{n} divisible by {m}, got {numel}")
        return math.comb(numel, numel * n // m)
    if kind == "nm":
        if numel % m:
            raise ValueError(f"N:M diversity needs numel divisible by M={m}, got {numel}")
        return math.comb(m, n) ** (numel // m)
    if kind == "transposable":
        if numel % (m * m):
            raise ValueError(f"transposable diversity needs numel divisible by M^2={m * m}, got {numel}")
        return count_transposable(m, n) ** (numel // (m * m))
    raise ValueError(f"kind must be 'unstructured', 'nm' or 'transposable', got {kind!r}")


def log10_int(x: int) -> float:
    """log10 of a (big) positive integer without overflow."""
    if x <= 0:
        raise ValueError(f"log10_int needs a positive int, got {x}")
    return math.log10(x)
