"""The torch twin of the counter-based hash (thrifty.ops._qkernels.hash_uniform) against the numba uniform()
the stochastic kernels inline, bit for bit (any key, any counter including the wrap at 2^32, across the
twin's internal chunks), and the 2^32-element limit of fake_quantize_minmax's stochastic rounding."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from thrifty.ops import _qkernels as K
from thrifty.ops import quant as Q

KEYS = [0, 1, 7, 0x9E3779B9, 0xDEADBEEF, 2**31 - 1, 2**31, 2**32 - 2, 2**32 - 1]


def _numba(start: int, n: int, key: int) -> list[float]:
    k = np.uint64(key)
    return [float(K.uniform(start + j, k)) for j in range(n)]


@settings(max_examples=200, deadline=None)
@given(n=st.integers(0, 300),
       key=st.one_of(st.sampled_from(KEYS), st.integers(2**32 - 1000, 2**32 - 1), st.integers(0, 2**32 - 1)),
       start=st.one_of(st.integers(0, 2**34), st.integers(2**32 - 310, 2**32 + 10), st.just(0)),
       chunk=st.sampled_from([1, 7, 64, 1 << 17]))
def test_hash_uniform_is_the_numba_uniform(n, key, start, chunk):
    default, K._CHUNK_CPU = K._CHUNK_CPU, chunk  # small chunks: chunk boundaries are crossed too
    try:
        u = K.hash_uniform(n, key, start=start)
    finally:
        K._CHUNK_CPU = default
    assert u.dtype == torch.float32 and u.shape == (n,)
    assert u.tolist() == _numba(start, n, key)


@pytest.mark.parametrize("key", [0, 0xDEADBEEF, 2**32 - 1])
def test_hash_uniform_exhaustive_few_thousand(monkeypatch, key):
    ref = _numba(0, 4096, key)
    assert K.hash_uniform(4096, key).tolist() == ref  # one chunk
    monkeypatch.setattr(K, "_CHUNK_CPU", 1000)
    assert K.hash_uniform(4096, key).tolist() == ref  # five chunks, the last one partial
    # the counter wraps at 2^32 exactly as the kernels' (uint64 product, low 32 bits)
    wrap = K.hash_uniform(4096, key, start=2**32 - 2048)
    assert wrap.tolist() == _numba(2**32 - 2048, 4096, key)
    assert wrap[2048:].tolist() == ref[:2048]


def test_hash_uniform_default_chunk_boundary_and_float64_default():
    n = K._CHUNK_CPU + 5
    u = K.hash_uniform(n, 12345)
    idx = list(range(0, n, 997)) + list(range(K._CHUNK_CPU - 3, n))
    assert u[idx].tolist() == [float(K.uniform(i, np.uint64(12345))) for i in idx]
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # the final scaling must not depend on the default dtype
    try:
        assert torch.equal(K.hash_uniform(n, 12345), u)
    finally:
        torch.set_default_dtype(old)


def test_stochastic_rounding_beyond_the_counter_raises_before_drawing(monkeypatch):
    monkeypatch.setattr(Q, "_MAX_HASHED", 12)  # (2^32 real elements would take 16 GiB)
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.float64):  # numba kernel path and torch path
        assert Q.fake_quantize_minmax(torch.randn(3, 4, dtype=dtype), 8, rounding="stochastic").shape == (3, 4)
        assert Q.fake_quantize_minmax(torch.randn(13, dtype=dtype), 8).shape == (13,)  # nearest: no counter
        for axis in (None, 0):
            with pytest.raises(ValueError, match="13 elements.*at most 12"):
                Q.fake_quantize_minmax(torch.randn(13, 1, dtype=dtype), 8, axis=axis, rounding="stochastic",
                                       generator=g)
    assert torch.equal(g.get_state(), torch.Generator().manual_seed(0).get_state())
    x = torch.randn(2, 7)
    state = torch.get_rng_state()
    with pytest.raises(ValueError, match="fake_quantize_minmax"):
        Q.fake_quantize_minmax(x, 8, rounding="stochastic", also_bits=16)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is not drawn from either
