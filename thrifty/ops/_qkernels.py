"""One-pass min/max fake quantization kernels (numba) and their pure-torch reference.

Used by :func:`thrifty.ops.quant.fake_quantize_minmax`. Input: a float32 matrix ``x`` of shape (rows, n) (one row
per tensor or per channel/sample) and the row ranges ``lo``/``hi``. Each kernel validates the ranges, computes the
asymmetric parameters exactly as :func:`thrifty.ops.quant.qparams_from_range` does (same float32 operations in the
same order) and writes ``(clamp(round(x / s) + zp, 0, qmax) - zp) * s`` in one pass over ``x``. Every step is a
correctly rounded IEEE float32 operation (no fast-math, no contraction to FMA), so the values are bit-identical to
the torch ops; tests check it.

Stochastic rounding draws ``u`` from a counter-based hash instead of a stored random tensor:
``u_i = (h(i * 0x9E3779B9 + key) >> 8) * 2^-24`` with ``h`` Wellons' "lowbias32" 32-bit integer hash and ``i`` the
element's flat index, so ``u`` takes the same 2^24 values as ``torch.rand`` does for float32. ``key`` is one 32-bit
draw from the torch generator per call, which keeps results reproducible under ``torch.manual_seed``.
:func:`hash_uniform` is the torch reference of the draws.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from numba import njit
from torch import Tensor

_M32 = 0xFFFFFFFF
_WEYL, _H1, _H2 = 0x9E3779B9, 0x21F0AAAD, 0x735A2D97
EPS32 = np.float32(1e-8)  # thrifty.ops.quant.EPS as float32 (torch.clamp casts the scalar the same way)


# ------------------------------------------------------------------------------------------ torch reference
# Why int64 and these forms: torch has no unsigned 32-bit arithmetic (uint32 lacks add and shifts), and signed
# overflow inside torch's C++ kernels is undefined behaviour (it wraps in practice, but nothing documents it), so
# every step here stays exact in int64: values are kept in [0, 2^32) and multiplied only by constants below
# 2^31 (products < 2^63). _H1 and _H2 are below 2^31 already; i * _WEYL = -(i * _NWEYL) mod 2^32, so the
# Weyl sequence is an arange with step -_NWEYL. Work is done in place on chunks that stay in cache.
_NWEYL = (1 << 32) - _WEYL  # 0x61C88647 < 2^31
_CHUNK_CPU, _CHUNK_OTHER = 1 << 17, 1 << 22  # int64 temporaries: 2 MiB / 64 MiB per chunk


def hash_uniform(n: int, key: int, device=None, start: int = 0) -> Tensor:
    """The ``n`` uniform draws in [0, 1) (float32, multiples of 2^-24) the stochastic kernels use for ``key``.

    Draw ``j`` is the numba ``uniform(start + j, key)`` bit for bit, on any device; the counter is taken mod
    2^32 like the kernels' (so ``start`` lets one check the wraparound without 2^32 draws).

    Example:
        >>> u = hash_uniform(1000, key=7)
        >>> bool((u >= 0).all() and (u < 1).all()), round(float(u.mean()), 1)
        (True, 0.5)
    """
    out = torch.empty(n, dtype=torch.float32, device=device)
    chunk = min(n, _CHUNK_CPU if out.device.type == "cpu" else _CHUNK_OTHER)
    h = torch.empty(chunk, dtype=torch.int64, device=out.device)
    tmp = torch.empty_like(h)
    for s in range(0, n, max(chunk, 1)):
        k = min(chunk, n - s)
        hk, tk = h[:k], tmp[:k]
        a = (key - (start + s) * _NWEYL) & _M32  # (i * _WEYL + key) mod 2^32 at i = start + s
        # |values| < 2^49 here: exact in the double arithmetic arange uses for its length
        torch.arange(a, a - k * _NWEYL, -_NWEYL, out=hk).bitwise_and_(_M32)
        hk.bitwise_xor_(torch.bitwise_right_shift(hk, 16, out=tk)).mul_(_H1).bitwise_and_(_M32)
        hk.bitwise_xor_(torch.bitwise_right_shift(hk, 15, out=tk)).mul_(_H2).bitwise_and_(_M32)
        hk.bitwise_xor_(torch.bitwise_right_shift(hk, 15, out=tk)).bitwise_right_shift_(8)
        torch.mul(hk, 2.0**-24, out=out[s:s + k])  # < 2^24: exact in float32
    return out


def draw_key(generator: Optional[torch.Generator], device) -> int:
    """The hash's 32-bit ``key`` for one call: one draw from ``generator`` (on its own device), or from torch's
    global RNG of ``device`` when None, so ``torch.manual_seed`` makes every hashed draw reproducible."""
    dev = generator.device if generator is not None else device
    return int(torch.randint(0, 2**32, (1,), generator=generator, device=dev))


# -------------------------------------------------------------------------------------------- numba kernels
@njit(cache=True, inline="always")
def qparams(lo, hi, qmax):
    # qparams_from_range: lo <= 0 <= hi, scale = max((hi - lo) / qmax, EPS), zp = clamp(rint(0 - lo / s))
    if lo > 0:
        lo = np.float32(0.0)
    if hi < 0:
        hi = np.float32(0.0)
    s = (hi - lo) / qmax
    if s < EPS32:
        s = EPS32
    z = np.rint(np.float32(0.0) - lo / s)
    if z < 0:
        z = np.float32(0.0)
    if z > qmax:
        z = qmax
    return s, z


@njit(cache=True)
def ranges_ok(lo, hi):
    for r in range(lo.shape[0]):
        if not (np.isfinite(lo[r]) and np.isfinite(hi[r])):
            return False
    return True


@njit(cache=True, inline="always")
def dequant(t, z, s, qmax):
    # t = unclamped code (already shifted by the zero point z): clamp to [0, qmax], back to the float grid
    if t < 0:
        t = np.float32(0.0)
    if t > qmax:
        t = qmax
    return (t - z) * s


@njit(cache=True)
def nearest(x, lo, hi, qmax, out, qmax2, out2):
    # out: nearest rounding to [0, qmax]; out2 (if it has rows): the same to [0, qmax2] on the same range,
    # written in the same loop so that x is read once
    if not ranges_ok(lo, hi):
        return False
    rows, n = x.shape
    two = out2.shape[0] == rows
    for r in range(rows):
        s, z = qparams(lo[r], hi[r], qmax)
        if two:
            s2, z2 = qparams(lo[r], hi[r], qmax2)
            for i in range(n):
                v = x[r, i]
                out[r, i] = dequant(np.rint(v / s) + z, z, s, qmax)
                out2[r, i] = dequant(np.rint(v / s2) + z2, z2, s2, qmax2)
        else:
            for i in range(n):
                out[r, i] = dequant(np.rint(x[r, i] / s) + z, z, s, qmax)
    return True


@njit(cache=True, inline="always")
def uniform(i, key):
    h = (np.uint64(i) * np.uint64(_WEYL) + key) & np.uint64(_M32)
    h ^= h >> np.uint64(16)
    h = (h * np.uint64(_H1)) & np.uint64(_M32)
    h ^= h >> np.uint64(15)
    h = (h * np.uint64(_H2)) & np.uint64(_M32)
    h ^= h >> np.uint64(15)
    return np.float32(h >> np.uint64(8)) * np.float32(2.0**-24)


@njit(cache=True)
def stochastic(x, lo, hi, qmax, key, out, qmax2, out2):
    # out: stochastic rounding to [0, qmax]; out2 (if it has rows): nearest rounding to [0, qmax2] on the
    # grid of the same range (bifurcation: the 8-bit and the 16-bit gradient from one read of dY)
    if not ranges_ok(lo, hi):
        return False
    rows, n = x.shape
    two = out2.shape[0] == rows
    k = np.uint64(key)
    for r in range(rows):
        s, z = qparams(lo[r], hi[r], qmax)
        base = r * n
        if two:
            s2, z2 = qparams(lo[r], hi[r], qmax2)
            for i in range(n):
                v = x[r, i]
                out[r, i] = dequant(np.floor(v / s + uniform(base + i, k)) + z, z, s, qmax)
                out2[r, i] = dequant(np.rint(v / s2) + z2, z2, s2, qmax2)
        else:
            for i in range(n):
                out[r, i] = dequant(np.floor(x[r, i] / s + uniform(base + i, k)) + z, z, s, qmax)
    return True


def kernels():
    """``(nearest, stochastic)``: the compiled kernels (numba compiles, or loads its cache, on first call)."""
    return nearest, stochastic
