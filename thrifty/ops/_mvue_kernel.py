"""Compiled single-pass CPU kernels for the common N:M masks (numba): MVUE 1:m (m <= 4), MVUE 2:4, MSE top-n of m <= 4.

The torch code in :mod:`thrifty.ops.mvue` is the reference and the fallback; these kernels compute
the *same float32 operations in the same order*, one block at a time, so for the same uniform ``u``
per block they return bit-identical values (the tests check it). What they save is memory traffic:
the torch fast paths run about thirty elementwise passes over block-sized buffers, a kernel reads
``x`` once and writes the output once, and needs no padded or permuted copy for odd sizes or for a
grouping dimension that is not the last one.

Layout: ``x`` is a contiguous float32 tensor viewed as ``(pre, length, post)``; block ``(p, g, q)``
holds the elements ``(p, g*m + k, q)``, ``k < m``. Blocks are numbered like the torch path's uniforms
``u`` of shape ``(pre, G, 1, post)`` (``G = ceil(length/m)`` with ``tail="pad"``, ``length // m``
with ``tail="dense"``).

Randomness: ``u`` for block ``b`` is ``thrifty.ops._qkernels.uniform(b, key)``, the counter-based
32-bit hash (Wellons' lowbias32, 24 random bits like torch's float32 ``rand``) that stochastic rounding
uses too, and ``_qkernels.hash_uniform(blocks, key)`` is its torch twin: the torch path of ``mvue_nm``
draws its uniforms from the twin with the same ``key`` (one 32-bit draw from the caller's generator)
and the same block numbering, so both paths return the same tensor. The result depends only on
``key`` and the block's position, not on threads or call order. Block counters are taken mod 2^32, so
``mvue_nm`` refuses tensors of more than 2^32 blocks (the uniforms would repeat). Passing an explicit
``u`` array instead is how the tests feed the kernel the torch path's uniforms.

Loops: rows of ``post >= 16`` full blocks run as slices with a nonnegative index (LLVM vectorises
them across ``q``, the contiguous direction), ``post == 1`` (blocks along the last dim) as one
strided sequence; explicit ``u``, 1:3, small ``post`` and the tail block take a scalar loop.

Semantics per block, as in the torch path: a block whose float32 sum of magnitudes is not finite
(NaN, inf or overflow) is passed through unchanged (MVUE) or fully kept (MSE); a ``"pad"`` tail
block is treated as zero-padded to ``m``; a ``"dense"`` tail is copied (MSE mask: ones).

Example:
    >>> import numpy as np
    >>> x = np.array([1.0, -3.0, 0.5, 2.0], dtype=np.float32)
    >>> out = np.empty_like(x)
    >>> nm_kernel(x, out, 1, 4, 1, 2, 4, False, MSE_VALUES, np.empty(0, np.float32), 0)
    >>> out.tolist()
    [0.0, -3.0, 0.0, 2.0]
"""
from __future__ import annotations

import os

import numpy as np
from numba import njit

# the one hash of the library (numba inlines it here). numba's cache does not track this import: after
# changing uniform(), run once with THRIFTY_NUMBA_NOCACHE=1 or delete the __pycache__ *.nbi/*.nbc files
from thrifty.ops._qkernels import uniform

__all__ = ["nm_kernel", "MVUE", "MSE_VALUES", "MSE_MASK"]

MVUE, MSE_VALUES, MSE_MASK = 0, 1, 2  # kernel modes

_F0 = np.float32(0.0)
_F1 = np.float32(1.0)
_HALF = np.float32(0.5)
_ROW_MIN = 16  # shortest row of blocks worth a vectorised slice loop

# error_model="numpy": x / 0 gives inf / NaN as in torch instead of raising; no fastmath (bit exactness).
# THRIFTY_NUMBA_NOCACHE=1 compiles afresh (e.g. to inspect the generated code).
_JIT = dict(cache=not os.environ.get("THRIFTY_NUMBA_NOCACHE"), nogil=True, error_model="numpy")
# The MVUE block is inlined by numba itself (LLVM alone leaves it a call, and the loops then do not
# vectorise); everything else is left to LLVM's inliner: numba-level inlining of every helper made the
# first compile take ~20 s of CPU instead of ~5 s.
_INLINE = dict(_JIT, inline="always")


@njit(**_INLINE)
def _keep_value(ak, mk, d, cum, qprev, n, u):
    """One step of systematic sampling (see ``mvue._systematic``): returns (value, cum, q).

    Written without data-dependent branches (selects only): the keep decision is random, so a
    branch would be mispredicted half of the time, and selects let LLVM vectorise the loop.
    """
    p = mk / d
    p = _F0 if p != p else min(p, _F1)  # 0/0 (zero block, or nothing left beside a sure keep): 0
    cum = cum + p  # cum starts at 0: 0 + p == p, as the torch path's copy
    q = min(np.float32(np.ceil(cum - u)), n)  # points u, u + 1, ... below cum, capped at n
    v = np.float32(np.copysign(max(mk, d), ak))  # x / p without dividing: |x| if sure, else d
    return (v if q > qprev else _F0), cum, q


@njit(**_INLINE)
def _mvue_block(a0, a1, a2, a3, n, u):
    """MVUE of one block of up to four values (absent ones are 0): 1:m when n == 1, else 2:4."""
    m0, m1, m2, m3 = abs(a0), abs(a1), abs(a2), abs(a3)
    tot = ((m0 + m1) + m2) + m3  # 1:m: the same order as the torch path (adding absent zeros is exact)
    hi01, lo01 = max(m0, m1), min(m0, m1)
    hi23, lo23 = max(m2, m3), min(m2, m3)
    rest = min(hi01, hi23) + (lo01 + lo23)  # 2:4: the three smaller ones, summed directly
    mx = max(hi01, hi23)
    half = (mx + rest) * _HALF
    d24 = rest if mx > rest else half  # one element above S/2: keep it, 1:3 MVUE on the rest
    d = tot if n == 1 else d24
    # tot, not half: NaN propagates through + but not through max/min (the torch path's check is
    # per block on the sum of magnitudes)
    ok = np.isfinite(tot)
    nf = np.float32(n)
    o0, cum, q = _keep_value(a0, m0, d, _F0, _F0, nf, u)  # the first is kept when its q (0 or 1) is > 0
    o1, cum, q = _keep_value(a1, m1, d, cum, q, nf, u)
    o2, cum, q = _keep_value(a2, m2, d, cum, q, nf, u)
    o3, cum, q = _keep_value(a3, m3, d, cum, q, nf, u)
    # NaN / inf / overflowing blocks pass through unchanged
    return (o0 if ok else a0), (o1 if ok else a1), (o2 if ok else a2), (o3 if ok else a3)


@njit(**_JIT)
def _mse_out(a, rank, n, ok, values):
    keep = rank < n or not ok  # NaN / inf / overflow: keep the whole block
    if values:
        return a + _F0 if keep else _F0  # + 0 turns a kept -0.0 into 0.0, as x * mask + 0 does
    return _F1 if keep else _F0


@njit(**_JIT)
def _mse_block(a0, a1, a2, a3, n, values):
    """Top-n of up to four values by pairwise comparison; ties go to the lower index.

    j ranks before k (j < k) when |x_j| >= |x_k|. Absent slots (index >= cnt) hold 0 at the highest
    indices, so every present element ranks before them and they never change a present rank.
    """
    m0, m1, m2, m3 = abs(a0), abs(a1), abs(a2), abs(a3)
    ok = np.isfinite(((m0 + m1) + m2) + m3)
    c01, c02, c03 = np.int64(m0 >= m1), np.int64(m0 >= m2), np.int64(m0 >= m3)
    c12, c13, c23 = np.int64(m1 >= m2), np.int64(m1 >= m3), np.int64(m2 >= m3)
    r0 = 3 - c01 - c02 - c03
    r1 = c01 + 2 - c12 - c13
    r2 = c02 + c12 + 1 - c23
    r3 = c03 + c13 + c23
    return (_mse_out(a0, r0, n, ok, values), _mse_out(a1, r1, n, ok, values),
            _mse_out(a2, r2, n, ok, values), _mse_out(a3, r3, n, ok, values))


@njit(**_JIT)
def _block(mode, a0, a1, a2, a3, n, u):
    if mode == MVUE:
        return _mvue_block(a0, a1, a2, a3, n, u)
    return _mse_block(a0, a1, a2, a3, n, mode == MSE_VALUES)


@njit(**_JIT)
def _row4(x0, x1, x2, x3, o0, o1, o2, o3, mode, n, key, b0):
    """Full 4-blocks of one (p, g) row, one per q (slices: LLVM vectorises along q)."""
    if mode == MVUE:
        for q in range(x0.shape[0]):
            uu = uniform(b0 + q, key)
            o0[q], o1[q], o2[q], o3[q] = _mvue_block(x0[q], x1[q], x2[q], x3[q], n, uu)
    else:
        for q in range(x0.shape[0]):
            o0[q], o1[q], o2[q], o3[q] = _mse_block(x0[q], x1[q], x2[q], x3[q], n, mode == MSE_VALUES)


@njit(**_JIT)
def _row2(x0, x1, o0, o1, mode, n, key, b0):
    """Full 2-blocks of one (p, g) row, one per q."""
    if mode == MVUE:
        for q in range(x0.shape[0]):
            uu = uniform(b0 + q, key)
            o0[q], o1[q], _, _ = _mvue_block(x0[q], x1[q], _F0, _F0, 1, uu)
    else:
        for q in range(x0.shape[0]):
            o0[q], o1[q], _, _ = _mse_block(x0[q], x1[q], _F0, _F0, n, mode == MSE_VALUES)


@njit(**_JIT)
def _seq(xs, os_, m, mode, n, key, b0):
    """Consecutive full blocks along the last dim (post == 1): block b is xs[m*b : m*b + m]."""
    nb = xs.shape[0] // m
    if m == 4 and mode == MVUE:
        for b in range(nb):
            uu = uniform(b0 + b, key)
            os_[4 * b], os_[4 * b + 1], os_[4 * b + 2], os_[4 * b + 3] = _mvue_block(
                xs[4 * b], xs[4 * b + 1], xs[4 * b + 2], xs[4 * b + 3], n, uu)
    elif m == 4:
        for b in range(nb):
            os_[4 * b], os_[4 * b + 1], os_[4 * b + 2], os_[4 * b + 3] = _mse_block(
                xs[4 * b], xs[4 * b + 1], xs[4 * b + 2], xs[4 * b + 3], n, mode == MSE_VALUES)
    elif mode == MVUE:
        for b in range(nb):
            uu = uniform(b0 + b, key)
            os_[2 * b], os_[2 * b + 1], _, _ = _mvue_block(xs[2 * b], xs[2 * b + 1], _F0, _F0, 1, uu)
    else:
        for b in range(nb):
            os_[2 * b], os_[2 * b + 1], _, _ = _mse_block(xs[2 * b], xs[2 * b + 1], _F0, _F0, n, mode == MSE_VALUES)


@njit(**_JIT)
def nm_kernel(x, out, pre, length, post, n, m, dense_tail, mode, u, key):
    """N:M of ``x`` (1-D contiguous float32 view of (pre, length, post)) into ``out``.

    ``mode``: MVUE, MSE_VALUES or MSE_MASK. ``u``: float32 uniforms, one per block in the torch
    path's order, or an empty array to draw them from ``uniform(block, key)`` (MVUE only; ``key``
    a 32-bit integer, block numbers below 2^32).
    """
    full = length // m
    r = length - full * m
    nblk = full + 1 if (r > 0 and not dense_tail) else full
    use_u = u.shape[0] > 0
    ukey = np.uint64(key)  # uint64: numba would turn uint64 + int64 into a float
    fast = not use_u and (m == 2 or m == 4)
    if fast and post == 1 and r == 0:  # every block is consecutive: one sequence over the whole tensor
        _seq(x, out, m, mode, n, ukey, 0)
        return
    for p in range(pre):
        row = p * length * post
        g0 = 0
        if fast and post == 1 and full > 0:  # the row's full blocks as one sequence
            _seq(x[row:row + full * m], out[row:row + full * m], m, mode, n, ukey, p * nblk)
            g0 = full
        for g in range(g0, nblk):
            cnt = m if g < full else r
            base = row + g * m * post
            bidx = (p * nblk + g) * post
            if fast and cnt == 4 and post >= _ROW_MIN:
                e1, e2, e3, e4 = base + post, base + 2 * post, base + 3 * post, base + 4 * post
                _row4(x[base:e1], x[e1:e2], x[e2:e3], x[e3:e4], out[base:e1], out[e1:e2], out[e2:e3],
                      out[e3:e4], mode, n, ukey, bidx)
                continue
            if fast and cnt == 2 and m == 2 and post >= _ROW_MIN:  # (not a 2-element tail of a 4-block)
                e1, e2 = base + post, base + 2 * post
                _row2(x[base:e1], x[e1:e2], out[base:e1], out[e1:e2], mode, n, ukey, bidx)
                continue
            for q in range(post):  # scalar: explicit uniforms, 1:3, short rows, the padded tail block
                i = base + q
                a0 = x[i]
                a1 = x[i + post] if cnt > 1 else _F0
                a2 = x[i + 2 * post] if cnt > 2 else _F0
                a3 = x[i + 3 * post] if cnt > 3 else _F0
                uu = _F0
                if mode == MVUE:
                    uu = u[bidx + q] if use_u else uniform(bidx + q, ukey)
                o0, o1, o2, o3 = _block(mode, a0, a1, a2, a3, n, uu)
                out[i] = o0
                if cnt > 1:
                    out[i + post] = o1
                if cnt > 2:
                    out[i + 2 * post] = o2
                if cnt > 3:
                    out[i + 3 * post] = o3
        if dense_tail and r > 0:
            for j in range(row + full * m * post, row + length * post):
                out[j] = x[j] if mode != MSE_MASK else _F1
