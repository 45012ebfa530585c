"""Unbiased stochastic rounding of float32 values to float16 / bfloat16 (numba kernel and its torch twin).

Rounding a computed float32 value to a 16-bit output with round-to-nearest shifts its mean by up to half
a 16-bit ulp, which breaks any unbiased estimator returned in that dtype (MVUE: a kept value ``S/2`` of
a float16 block is rarely a float16 number). Stochastic rounding keeps the mean: with ``q`` the output
format's spacing at ``|v|``, ``t = |v| / q``,

    |v| -> (floor(t) + [u < t - floor(t)]) * q,   sign kept,

rounds up with probability ``P(u < frac)``. ``u`` is the counter-based hash uniform of
:mod:`thrifty.ops._qkernels` (multiples of 2^-24) for the element's flat index and a ``key`` drawn per call.
Every step is exact in float32: ``q`` is a power of two, ``floor`` and ``t - floor(t)`` are exact, and
``frac`` is a multiple of 2^-13 (float16 normal range) or 2^-16 (bfloat16, subnormals included), so
``P(u < frac) = frac`` exactly: the rounding is exactly unbiased. The one exception is float16's subnormal
range (``|v| < 2^-14``, spacing 2^-24) where ``frac`` can need more than 24 bits: the bias there is below
``2^-24 q = 2^-48`` in absolute value. Finite values beyond the output's range saturate
to its largest finite value (the one biased case); NaN and inf pass through. The kernel and
:func:`sround` perform the same float32 operations, so they return identical tensors.

Example:
    >>> x = torch.full((100000,), 1.0 + 2.0**-12)  # between the float16 numbers 1 and 1 + 2^-10
    >>> y = sround(x, torch.float16, key=3)
    >>> sorted(set(y.tolist())), abs(float(y.double().mean()) - (1 + 2.0**-12)) < 1e-5
    ([1.0, 1.0009765625], True)
"""
from __future__ import annotations

import os

import numpy as np
import torch
from numba import njit
from torch import Tensor

from thrifty.ops._qkernels import hash_uniform, uniform

__all__ = ["sround", "sround_kernel", "ROUNDED"]

# output dtype -> (smallest normal exponent, mantissa bits): the spacing at |v| in [2^e, 2^(e+1)) is
# 2^(max(e, emin) - bits)
ROUNDED = {torch.float16: (-14, 10), torch.bfloat16: (-126, 7)}
_JIT = dict(cache=not os.environ.get("THRIFTY_NUMBA_NOCACHE"), nogil=True, error_model="numpy")


def _spacings(dtype: torch.dtype) -> np.ndarray:
    """The output spacing q for each float32 exponent field E (0..255), as float32: exact powers of two.

    E = 0 (zeros, subnormals) and E = 1 share q, as both lie below every 16-bit format's normal range.
    """
    emin, bits = ROUNDED[dtype]
    e = np.maximum(np.arange(256) - 127, emin) - bits  # floor(log2 |v|) = E - 127 for normal float32
    return np.ldexp(np.float32(1.0), e).astype(np.float32)


_Q = {dt: _spacings(dt) for dt in ROUNDED}


@njit(**_JIT)
def sround_kernel(v, key, q_of_exp, fin):
    """Saturate the float32 array ``v`` (1-D, contiguous) to ``[-fin, fin]`` and round it in place;
    element i uses ``uniform(i, key)``; ``q_of_exp``: the spacing per exponent field (:func:`_spacings`)."""
    k64 = np.uint64(key)
    bits = v.view(np.int32)
    for i in range(v.shape[0]):
        x = v[i]
        a = abs(x)
        q = q_of_exp[(bits[i] >> 23) & 0xFF]
        t = a / q
        lo = np.floor(t)
        r = (lo + np.float32(1.0)) * q if uniform(i, k64) < t - lo else lo * q
        # inf: t - lo is NaN, the comparison is False and lo * q is inf again
        if fin < a < np.inf:  # finite values beyond the range saturate
            r = fin
        v[i] = np.float32(np.copysign(r, x)) if x == x else x  # NaN: unchanged


def sround(v: Tensor, dtype: torch.dtype, key: int, kernel: bool = True, inplace: bool = False) -> Tensor:
    """``v`` (float32) saturated to ``dtype``'s finite range and stochastically rounded to ``dtype`` (float16 /
    bfloat16); element i (flat index) is drawn with key ``key``. NaN and inf pass through.

    ``kernel``: the numba kernel for CPU tensors (the torch code, for any device, returns the same values).
    ``inplace``: ``v`` may be used as scratch space (saves a copy).
    """
    if dtype not in ROUNDED:
        raise ValueError(f"sround: rounds to {list(ROUNDED)}, got {dtype}")
    if v.dtype != torch.float32:
        raise TypeError(f"sround: expects float32 values, got {v.dtype}")
    fin = float(torch.finfo(dtype).max)
    if kernel and v.device.type == "cpu":
        out = v.detach().contiguous()
        if not inplace and out.data_ptr() == v.data_ptr():
            out = out.clone()
        sround_kernel(out.view(-1).numpy(), key, _Q[dtype], np.float32(fin))
        return out.to(dtype)
    v = v.detach()
    a = v.abs()
    q = torch.from_numpy(_Q[dtype]).to(v.device)[(v.view(torch.int32) >> 23) & 0xFF]
    t = a / q
    lo = t.floor()
    u = hash_uniform(v.numel(), key, v.device).view(v.shape)
    r = lo + (u < t - lo).float()
    r = torch.where((a > fin) & ~a.isinf(), fin, r.mul_(q)).copysign_(v)
    return torch.where(v.isnan(), v, r).to(dtype)
