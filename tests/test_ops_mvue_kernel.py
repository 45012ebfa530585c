"""The compiled N:M kernels (thrifty.ops._mvue_kernel) against the torch reference paths of thrifty.ops.mvue.

Given the same uniform per block the kernel must return the torch fast path's values bit for bit; both
paths draw the same hashed uniforms (thrifty.ops._qkernels' lowbias32 hash and its torch twin), so
mvue_nm returns the same tensor with and without the kernel for the same generator; the vectorised loops
must equal the kernel's scalar loop fed the hashed uniforms; the MSE kernel must equal the torch top-n
exactly; and the kernel's pattern frequencies must match the torch path's.
"""
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import thrifty.ops.mvue as mv
from thrifty.ops import _mvue_kernel as K
from thrifty.ops import _qkernels as Q

SPECIAL = [10.0, 1.0, -2.0, 0.5, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, -2.0, 2.0, 1.0, -1.0,
           0.0, 3.0, 0.0, -1.0, 1e-44, 3e-44, 0.0, 2e-44, 1.0, 1e-44, 0.0, 3e-44, 0.1, -50.0, 0.2, 0.3,
           2.0, 1.0, -1.0, 0.0, -0.0, -0.0, 5.0, -0.0]
SHAPES = [(8, 16), (5, 7, 3), (64, 16, 4, 4), (3, 10, 6), (2, 1, 5), (4, 8, 33), (2, 6, 20)]
CASES = [(1, 2), (2, 4), (1, 4), (1, 3)]


def _tensor(shape, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g)
    x[x.abs() < 0.3] = 0.0  # zero blocks and blocks with few nonzeros
    flat = x.view(-1)
    k = min(len(SPECIAL), flat.numel())
    flat[:k] = torch.tensor(SPECIAL[:k])  # dominant element, ties, subnormals, signed zeros
    return x


def _geometry(x, dim, m, tail):
    d = dim % x.dim()
    length = x.shape[d]
    blocks = -(-length // m) if tail == "pad" else length // m
    return math.prod(x.shape[:d]) * blocks * math.prod(x.shape[d + 1:]), (
        math.prod(x.shape[:d]), blocks, 1, math.prod(x.shape[d + 1:]))


def _torch_uniforms(x, dim, m, tail, seed):
    """The uniforms mvue_nm draws for Generator().manual_seed(seed): the hash of one 32-bit key per block."""
    count, ushape = _geometry(x, dim, m, tail)
    key = int(torch.randint(0, 2**32, (1,), generator=torch.Generator().manual_seed(seed)))
    return Q.hash_uniform(count, key).view(ushape)


def _torch_mvue(x, n, m, dim, tail, seed, monkeypatch):
    with monkeypatch.context() as mp:
        mp.setattr(mv, "_KERNEL", False)
        return mv.mvue_nm(x, n, m, dim, torch.Generator().manual_seed(seed), tail)


@pytest.mark.parametrize("n,m", CASES)
@pytest.mark.parametrize("tail", ["pad", "dense"])
def test_kernel_equals_torch_path_given_the_same_uniforms(n, m, tail, monkeypatch):
    for i, shape in enumerate(SHAPES):
        x = _tensor(shape, i)
        for dim in range(x.dim()):
            ref = _torch_mvue(x, n, m, dim, tail, 7, monkeypatch)
            u = _torch_uniforms(x, dim, m, tail, 7)  # the torch path's own draw, fed to the scalar loop
            got = mv._kernel_call(x, n, m, dim % x.dim(), tail, "mvue", u=u)
            assert torch.equal(got, ref), (shape, dim)
            # any uniforms, not only hashed ones: the torch fast path fed the same u gives the same values
            b, r = mv._blocks(x, m, dim % x.dim(), tail)
            u = torch.rand(u.shape, generator=torch.Generator().manual_seed(i))
            fast = (mv._mvue_1m if n == 1 else mv._mvue_24)(b, u[:, :, 0])
            if fast is not None:  # (None: NaN/inf blocks, which the general path handles)
                want = mv._unblock(fast, x, dim % x.dim(), r, tail, m)
                assert torch.equal(mv._kernel_call(x, n, m, dim % x.dim(), tail, "mvue", u=u), want)


@pytest.mark.parametrize("n,m", CASES)
def test_kernel_and_torch_path_return_the_same_tensor_for_the_same_generator(n, m, monkeypatch):
    """mvue_nm end to end, hashed uniforms on both sides: every grouping dim, both tails, odd sizes,
    float16 and non-contiguous inputs, the global RNG; the generators end in the same state."""
    shapes = SHAPES + [(3, 64), (4, 12, 1), (2, 8, 17), (1, 4, 40, 3)]
    for i, shape in enumerate(shapes):
        x = _tensor(shape, 30 + i)
        x[~x.isfinite()] = 1.0
        xs = [x, x.half(), x.transpose(0, -1)] if i % 3 == 0 else [x]
        for xx in xs:
            for dim in range(xx.dim()):
                for tail in ("pad", "dense"):
                    g_kernel, g_torch = torch.Generator().manual_seed(i), torch.Generator().manual_seed(i)
                    got = mv.mvue_nm(xx, n, m, dim, g_kernel, tail)
                    with monkeypatch.context() as mp:
                        mp.setattr(mv, "_KERNEL", False)
                        ref = mv.mvue_nm(xx, n, m, dim, g_torch, tail)
                    assert got.dtype == ref.dtype and torch.equal(got, ref), (shape, xx.dtype, dim, tail)
                    assert torch.equal(torch.rand(3, generator=g_kernel), torch.rand(3, generator=g_torch))
    x = torch.randn(16, 24, 8)
    torch.manual_seed(5)
    got = mv.mvue_nm(x, n, m, 1)
    torch.manual_seed(5)
    with monkeypatch.context() as mp:
        mp.setattr(mv, "_KERNEL", False)
        assert torch.equal(mv.mvue_nm(x, n, m, 1), got)


@pytest.mark.parametrize("n,m", CASES)
@pytest.mark.parametrize("tail", ["pad", "dense"])
def test_vectorised_loops_equal_the_scalar_loop(n, m, tail):
    """Rows (post >= 16), sequences (post == 1), short rows and tail blocks: hashed uniforms fed back as u."""
    for i, shape in enumerate(SHAPES + [(3, 64), (4, 12, 1), (2, 8, 17)]):
        x = _tensor(shape, 10 + i)
        for dim in range(x.dim()):
            count, _ = _geometry(x, dim, m, tail)
            fast = mv._kernel_call(x, n, m, dim % x.dim(), tail, "mvue", key=99)
            slow = mv._kernel_call(x, n, m, dim % x.dim(), tail, "mvue", u=Q.hash_uniform(count, 99))
            assert torch.equal(fast, slow), (shape, dim)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(1, 9), min_size=1, max_size=3), st.integers(0, 2), st.sampled_from(CASES),
       st.sampled_from(["pad", "dense"]), st.integers(0, 2**31))
def test_kernel_equals_torch_property(shape, dim, nm, tail, seed):
    n, m = nm
    dim = dim % len(shape)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    x[x.abs() < 0.5] = 0.0
    old = mv._KERNEL
    try:
        mv._KERNEL = False
        ref = mv.mvue_nm(x, n, m, dim, torch.Generator().manual_seed(seed), tail)
        ref_mse, ref_mask = mv.mse_nm(x, n, m, dim, tail), mv.mse_mask(x, n, m, dim, tail)
    finally:
        mv._KERNEL = old
    u = _torch_uniforms(x, dim, m, tail, seed)
    assert torch.equal(mv._kernel_call(x, n, m, dim, tail, "mvue", u=u), ref)
    assert torch.equal(mv.mvue_nm(x, n, m, dim, torch.Generator().manual_seed(seed), tail), ref)
    assert torch.equal(mv.mse_nm(x, n, m, dim, tail), ref_mse)
    assert torch.equal(mv.mse_mask(x, n, m, dim, tail), ref_mask)


@pytest.mark.parametrize("n,m", [(1, 2), (2, 4), (1, 4), (3, 4), (1, 1), (2, 3), (4, 4)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
def test_mse_kernel_equals_torch_exactly(n, m, dtype, monkeypatch):
    for i, shape in enumerate(SHAPES):
        x = _tensor(shape, 20 + i).to(dtype)
        x.view(-1)[-1] = float("nan")
        if x.numel() > 9:
            x.view(-1)[-9] = float("inf")
        for dim in range(x.dim()):
            for tail in ("pad", "dense"):
                got = mv.mse_nm(x, n, m, dim, tail), mv.mse_mask(x, n, m, dim, tail)
                with monkeypatch.context() as mp:
                    mp.setattr(mv, "_KERNEL", False)
                    ref = mv.mse_nm(x, n, m, dim, tail), mv.mse_mask(x, n, m, dim, tail)
                for a, b in zip(got, ref):
                    assert a.dtype == b.dtype and torch.equal(a.isnan(), b.isnan())
                    assert torch.equal(a.nan_to_num(), b.nan_to_num()), (shape, dim, tail)


def test_nonfinite_and_overflowing_blocks_pass_through():
    x = torch.tensor([[1.0, float("nan"), 2.0, 3.0, 3e38, 3e38, 1.0, 0.0, -1.0, 2.0, 0.5, 4.0]])
    for n, m in ((2, 4), (1, 4)):
        y = mv.mvue_nm(x, n, m, generator=torch.Generator().manual_seed(0))
        assert torch.equal(y[:, :8].nan_to_num(), x[:, :8].nan_to_num())  # NaN block and sum overflow
        assert int((y[:, 8:] != 0).sum()) <= n


def test_kernel_hash_is_the_quant_hash_and_its_counter_wraps_at_2_32():
    """The numba uniform() the kernel inlines equals its torch twin (uniformity is tested in
    test_ops_quant_minmax); counters are taken mod 2^32, which is why mvue_nm caps the blocks per call."""
    key = np.uint64(0xDEADBEEF)
    ref = Q.hash_uniform(5000, int(key))
    assert [Q.uniform(i, key) for i in range(0, 5000, 7)] == ref[::7].tolist()
    assert [Q.uniform(2**32 + i, key) for i in range(5)] == ref[:5].tolist()


def test_more_than_2_32_blocks_raise_before_drawing(monkeypatch):
    monkeypatch.setattr(mv, "_MAX_BLOCKS", 12)  # (2^32 real blocks would take 32 GiB)
    x = torch.randn(3, 16)
    for kernel in (True, False):
        monkeypatch.setattr(mv, "_KERNEL", kernel)
        assert mv.mvue_nm(x, 2, 4).shape == x.shape  # 12 blocks: fine
        assert mv.mvue_nm(torch.randn(3, 7), 2, 4, tail="dense").shape == (3, 7)  # 3 blocks
        g = torch.Generator().manual_seed(0)
        with pytest.raises(ValueError, match="at most 2\\^32 blocks"):
            mv.mvue_nm(x, 1, 2, generator=g)  # 24 blocks
        with pytest.raises(ValueError, match="at most 2\\^32 blocks"):
            mv.mvue_nm(torch.randn(3, 17), 2, 4, generator=g)  # 15 with the padded tail
        assert torch.equal(g.get_state(), torch.Generator().manual_seed(0).get_state())


def test_pattern_frequencies_match_the_torch_path(monkeypatch):
    """Same law of the kept 2-subset: chi-square of kernel vs torch pattern counts over 20000 draws."""
    block = torch.tensor([0.3, -1.2, 0.7, 2.1, 10.0, 1.0, -2.0, 0.5])
    x = block.repeat(20_000, 1)

    def counts(y):
        code = ((y.view(-1, 2, 4) != 0).long() * torch.tensor([1, 2, 4, 8])).sum(-1)
        return [torch.bincount(code[:, j], minlength=16).double() for j in range(2)]

    got = counts(mv.mvue_nm(x, 2, 4, generator=torch.Generator().manual_seed(1)))
    with monkeypatch.context() as mp:
        mp.setattr(mv, "_KERNEL", False)
        ref = counts(mv.mvue_nm(x, 2, 4, generator=torch.Generator().manual_seed(2)))
    for a, b in zip(got, ref):
        seen = (a + b) > 0
        chi2 = float((((a - b) ** 2) / (a + b))[seen].sum())  # two-sample chi-square, <= 5 dof here
        assert chi2 < 25, (a, b)


def test_kernel_is_reproducible_and_advances_the_generator():
    x = torch.randn(32, 16, 8)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    a, b = mv.mvue_nm(x, 2, 4, 1, g1), mv.mvue_nm(x, 2, 4, 1, g2)
    assert torch.equal(a, b)
    assert not torch.equal(mv.mvue_nm(x, 2, 4, 1, g1), a)  # the next call draws a new seed
    nc = torch.randn(16, 8, 32).transpose(0, 2)  # non-contiguous input
    assert torch.equal(mv.mvue_nm(nc, 1, 2, 1, torch.Generator().manual_seed(4)),
                       mv.mvue_nm(nc.contiguous(), 1, 2, 1, torch.Generator().manual_seed(4)))


def test_tail_error_and_empty_with_the_kernel():
    with pytest.raises(ValueError, match="not a multiple of m=4"):
        mv.mvue_nm(torch.randn(3, 7), 2, 4, tail="error")
    with pytest.raises(ValueError, match="not a multiple of m=4"):
        mv.mse_nm(torch.randn(3, 7), 2, 4, tail="error")
    assert mv.mvue_nm(torch.randn(0, 4), 2, 4).shape == (0, 4)


def test_kernel_mode_table_matches_the_kernel_module():
    assert mv._KERNEL_MODES == {"mvue": K.MVUE, "mse": K.MSE_VALUES, "mask": K.MSE_MASK}

