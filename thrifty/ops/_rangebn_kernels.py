"""Range BN's normalisation and backward as one-pass loops (numba), for :mod:`thrifty.nn.rangebn`.

Layout: ``x`` and ``g`` (= dY) are (N, C, P) C-contiguous (P = spatial elements, 1 for (N, C) inputs); sample ``s``
belongs to range chunk ``chunk[s]`` (-1: a leftover sample, counted by the mean but not by the range). ``mx``/``mn``
are the (C, chunks) chunk maxima/minima of the forward pass.

* :func:`reduce`: per channel ``sum(g)`` and ``sum(g * (x - mean))`` (float64 accumulators; ``fastmath`` lets the
  sums vectorise, which only reorders them) and, per (channel, chunk), how many elements tie with the max / min.
* :func:`affine`: the forward ``y = x * a[c] + b[c]`` (bit-identical to the two torch ops);
* :func:`grad_input`: ``dx = g * a[c] + b[c] + [x == mx] * dmx[c, j] + [x == mn] * dmn[c, j]`` in one pass.

Both are checked against autograd through the reference formulas (``tests/test_nn_rangebn.py``).
"""
from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True, fastmath=True)
def _sums(x, g, mean, sg, sgx):
    n, c_, p_ = x.shape
    for s in range(n):
        for c in range(c_):
            m = np.float64(mean[c])
            a = 0.0
            b = 0.0
            for p in range(p_):
                gv = np.float64(g[s, c, p])
                a += gv
                b += gv * (np.float64(x[s, c, p]) - m)
            sg[c] += a
            sgx[c] += b


@njit(cache=True)
def _ties(x, chunk, mx, mn, cmx, cmn):
    n, c_, p_ = x.shape
    for s in range(n):
        j = chunk[s]
        if j < 0:
            continue
        for c in range(c_):
            hi = mx[c, j]
            lo = mn[c, j]
            a = 0
            b = 0
            for p in range(p_):
                v = x[s, c, p]
                a += v == hi
                b += v == lo
            cmx[c, j] += a
            cmn[c, j] += b


def reduce(x: np.ndarray, g: np.ndarray, mean: np.ndarray, chunk: np.ndarray, mx: np.ndarray,
           mn: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(sum g, sum g (x - mean), ties with max, ties with min)``: (C,), (C,) float64, (C, chunks) int64."""
    c_ = x.shape[1]
    sg, sgx = np.zeros(c_), np.zeros(c_)
    cmx, cmn = np.zeros(mx.shape, np.int64), np.zeros(mx.shape, np.int64)
    _sums(x, g, mean, sg, sgx)
    _ties(x, chunk, mx, mn, cmx, cmn)
    return sg, sgx, cmx, cmn


@njit(cache=True)
def grad_input(x, g, chunk, a, b, mx, mn, dmx, dmn, out):
    """``out = g * a[c] + b[c]`` plus the range gradient at the chunk's max/min elements (see module docstring)."""
    n, c_, p_ = x.shape
    for s in range(n):
        j = chunk[s]
        for c in range(c_):
            ac = a[c]
            bc = b[c]
            if j < 0:
                for p in range(p_):
                    out[s, c, p] = g[s, c, p] * ac + bc
                continue
            hi, lo, dh, dl = mx[c, j], mn[c, j], dmx[c, j], dmn[c, j]
            for p in range(p_):
                v = x[s, c, p]
                t = g[s, c, p] * ac + bc
                if v == hi:
                    t += dh
                if v == lo:
                    t += dl
                out[s, c, p] = t


@njit(cache=True)
def affine(x, a, b, out):
    """``out = x * a[c] + b[c]`` in one pass: the same two roundings as the torch expression (no FMA)."""
    n, c_, p_ = x.shape
    for s in range(n):
        for c in range(c_):
            ac = a[c]
            bc = b[c]
            for p in range(p_):
                out[s, c, p] = x[s, c, p] * ac + bc
