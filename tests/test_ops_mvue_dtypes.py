"""MVUE in every floating dtype: float64 keeps float64 precision; float16/bfloat16 outputs stay unbiased
(stochastic rounding of the kept values, thrifty.ops._sround) on the kernel and the torch paths, on CPU and CUDA."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import thrifty.ops.mvue as mv
from thrifty.ops import _qkernels as Q
from thrifty.ops._sround import ROUNDED, sround

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
PATHS = ["kernel", "torch"]


def _gen(seed, device="cpu"):
    return torch.Generator(device=device).manual_seed(seed)


def _keys(seed, device="cpu"):
    g = _gen(seed, device)
    return Q.draw_key(g, device), Q.draw_key(g, device)


# ------------------------------------------------------------------------------------------- float64
@pytest.mark.parametrize("path", PATHS)
def test_float64_runs_and_keeps_float64_precision(path, monkeypatch):
    monkeypatch.setattr(mv, "_KERNEL", path == "kernel")
    y = mv.mvue_nm(torch.tensor([[1.0, 2.0, 3.0, 4.0]], dtype=torch.float64), 2, 4, generator=_gen(0))
    assert y.dtype == torch.float64 and int((y != 0).sum()) <= 2
    # S = 2 + 2^-40 is a float64 number but not a float32 one (float32 would keep 2.0)
    x = torch.tensor([[1.0, 1.0 + 2.0**-40]] * 64, dtype=torch.float64)
    y = mv.mvue_nm(x, 1, 2, generator=_gen(1))
    assert set(y[y != 0].tolist()) == {2.0 + 2.0**-40}
    # top-1 of two float64 values that are equal in float32: the larger one, not the earlier one
    assert mv.mse_nm(x[:1], 1, 2).tolist() == [[0.0, 1.0 + 2.0**-40]]
    assert mv.mse_mask(x[:1], 1, 2).tolist() == [[0.0, 1.0]]


# blocks whose probabilities and 1/c (the kept value) are dyadic: every value and probability the MVUE
# forms is then exact in float32 and in float64
DYADIC = {
    (1, 2): [[3, 13], [8, 8], [1, 15], [16, 0], [0, 0]],
    (1, 4): [[1, 2, 5, 8], [4, 4, 4, 4], [0, 0, 16, 0], [3, 3, 1, 9]],
    (2, 4): [[4, 4, 4, 4], [1, 7, 5, 3], [8, 2, 2, 4], [12, 2, 1, 1], [0, 6, 2, 8], [0, 0, 3, 0]],
    (3, 4): [[8, 8, 1, 1], [6, 6, 3, 3], [12, 1, 1, 2], [0, 4, 4, 4]],
    (2, 8): [[16, 4, 4, 4, 4, 0, 0, 0], [4] * 8, [2, 6, 8, 1, 3, 4, 4, 4]],
}


@pytest.mark.parametrize("n,m", list(DYADIC))
def test_float64_equals_float32_where_float32_is_exact(n, m):
    """Same uniforms (same generator), exact arithmetic in both dtypes: the float64 path returns the float32
    path's values (fast paths for 1:m and 2:4, the general path for 3:4 and 2:8)."""
    g = _gen(n * 10 + m)
    base = torch.tensor(DYADIC[(n, m)], dtype=torch.float64)
    rows = []
    for _ in range(64):  # random signs and orders of the blocks
        perm = torch.stack([torch.randperm(m, generator=g) for _ in range(len(base))])
        signs = torch.randint(0, 2, base.shape, generator=g) * 2 - 1
        rows.append((base.gather(1, perm) * signs).reshape(-1))
    x = torch.stack(rows)
    y64 = mv.mvue_nm(x, n, m, generator=_gen(3))
    y32 = mv.mvue_nm(x.float(), n, m, generator=_gen(3))
    assert y64.dtype == torch.float64 and torch.equal(y64, y32.double())


# ---------------------------------------------------------------------------- stochastic rounding
def _reference(v: float, u: float, dtype) -> float:
    """The rounding rule in float64 (independent of the float32 code): the two neighbours in ``dtype``."""
    emin, bits = ROUNDED[dtype]
    a = abs(v)
    q = 2.0 ** (max(math.frexp(a)[1] - 1, emin) - bits)
    lo = math.floor(a / q)
    frac = a / q - lo
    return math.copysign((lo + (u < frac)) * q, v)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@settings(max_examples=30, deadline=None)
@given(st.lists(st.floats(width=32, allow_nan=False, allow_infinity=False)
                | st.floats(-2.0**-10, 2.0**-10, width=32), min_size=1, max_size=40),
       st.integers(0, 2**32 - 1))
def test_sround_follows_the_rule_exactly_and_is_exactly_unbiased(dtype, vals, key):
    fin = torch.finfo(dtype).max  # (callers saturate first)
    v = torch.tensor(vals, dtype=torch.float32).clamp(-fin, fin)
    vals = v.tolist()
    y = sround(v, dtype, key)
    assert y.dtype == dtype and torch.equal(y, sround(v, dtype, key, kernel=False))
    u = Q.hash_uniform(len(vals), key).tolist()
    emin, bits = ROUNDED[dtype]
    for i, x in enumerate(vals):
        assert float(y[i]) == _reference(x, u[i], dtype), (x, u[i])
        # P(u < frac) = frac exactly when frac is a multiple of 2^-24 (u's grid): true outside float16's
        # subnormal range, so E[round(x)] = x there
        q = 2.0 ** (max(math.frexp(abs(x))[1] - 1, emin) - bits)
        frac = abs(x) / q - math.floor(abs(x) / q)
        if abs(x) >= 2.0**emin:
            assert (frac * 2**24).is_integer()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_sround_edges_and_devices(device, dtype):
    fin = torch.finfo(dtype).max
    v = torch.tensor([0.0, -0.0, fin, -fin, float("inf"), -float("inf"), float("nan"), 2.0**-24, 3 * 2.0**-26,
                      1e-45, fin * 1.001, -fin * 1.001, 1.0, -1.5], device=device)
    y = sround(v, dtype, 11, kernel=False)
    assert torch.equal(y.cpu().float().nan_to_num(5.0), sround(v.cpu(), dtype, 11).float().nan_to_num(5.0))
    yf = y.float().cpu()
    assert yf[:7].nan_to_num(5.0).tolist() == v[:7].cpu().nan_to_num(5.0).tolist()  # representable: unchanged
    assert math.copysign(1.0, float(yf[1])) == -1.0 and bool(yf[6].isnan())
    assert yf[-4:].tolist() == [fin, -fin, 1.0, -1.5]  # beyond the finite range: saturated
    with pytest.raises(ValueError, match="rounds to"):
        sround(v, torch.float32, 1)
    with pytest.raises(TypeError, match="float32"):
        sround(v.double(), dtype, 1)


# ------------------------------------------------------------------------- unbiased 16-bit MVUE
BLOCKS_12 = [[5.0, -0.001], [0.3, -1.2], [1.0, 2.0**-11], [-3.0, 7.0], [0.0, 4.0], [1e-3, 1e-3]]
BLOCKS_24 = [[0.3, -1.2, 0.7, 2.1], [10.0, 1.0, -2.0, 0.5], [5.0, -0.001, 0.002, 0.0], [1.0, 1.0, 1.0, 1.0]]
Z = 5.0  # Bonferroni: <= 96 entries x 2 dtypes x 2 paths; P(|N(0,1)| > 5) = 5.7e-7, family-wise < 1.2e-4
R = 1 << 17  # draws: see the power check in the test


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16bit_mvue_adds_no_bias_at_1e4_of_the_block_l1(dtype, path, monkeypatch):
    """y16 - y32 on the same draws (same generator: the same keep decisions) isolates the rounding to 16 bits.

    Its mean must be 0 within Z standard errors. Power: |y16 - y32| <= one 16-bit ulp of the kept value
    <= 2^-bits of the block's L1, so SE <= 2^-bits L1 / (2 sqrt(R)) (checked on the sample below); with
    (Z + 3) SE <= 1e-4 L1 a bias of 1e-4 of L1 is found with probability >= Phi(3) = 0.9987. R = 2^17
    gives (5 + 3) 2^-8 / (2 * 362) = 4.3e-5 for bfloat16 (2^-7 ulp), 3.4e-6 for float16.
    """
    monkeypatch.setattr(mv, "_KERNEL", path == "kernel")
    for n, m, blocks in ((1, 2, BLOCKS_12), (2, 4, BLOCKS_24)):
        x = torch.tensor(blocks, dtype=dtype).reshape(1, -1).repeat(R, 1)
        y16 = mv.mvue_nm(x, n, m, generator=_gen(17 + m))
        y32 = mv.mvue_nm(x.float(), n, m, generator=_gen(17 + m))
        assert y16.dtype == dtype and torch.equal(y16 != 0, y32 != 0)
        d = y16.double() - y32.double()
        mean, se = d.mean(0), d.std(0) / R**0.5
        l1 = x[0].double().abs().view(-1, m).sum(1, keepdim=True).expand(-1, m).reshape(-1)
        assert ((Z + 3) * se <= 1e-4 * l1).all(), "the test lost its power"
        det = se == 0
        assert (mean[det] == 0).all()
        bad = (mean.abs() > Z * se) & ~det
        assert not bad.any(), (dtype, (mean / l1)[bad], x[0][bad])
        # and the 16-bit output itself is unbiased for the dominant blocks, where the MC error is small
        direct = (y16.double().mean(0) - x[0].double()).abs()
        sd = y16.double().std(0) / R**0.5
        assert (direct <= Z * sd + 1e-12 * l1).all()


@pytest.mark.parametrize("device", DEVICES)
def test_16bit_mvue_on_device_matches_the_cpu_distribution(device):
    """The torch path on ``device``: 16-bit outputs are among the two neighbours of the float32 values, the
    pattern is N:M, and the rounding of a value halfway between two float16 numbers is up half of the time."""
    x = torch.tensor([[3.0, 0.0, 0.0, 0.0] * 2], dtype=torch.float16, device=device)
    x[0, 4:] = torch.tensor([1.0, 2.0**-11, 0.0, 0.0])  # 1:2 on (1, 2^-11): kept value 1 + 2^-11 (a tie)
    xs = x.repeat(1 << 14, 1)
    y = mv.mvue_nm(xs, 1, 2, generator=_gen(5, device)).float().cpu()
    kept = y[:, 4:6].sum(1)
    vals = set(kept.unique().tolist())
    assert vals <= {1.0, 1.0 + 2.0**-10, 0.0} and (y[:, :2] == torch.tensor([3.0, 0.0])).all()
    share = float((kept == 1.0 + 2.0**-10).double().mean() / (kept != 0).double().mean())
    assert abs(share - 0.5) <= Z * 0.5 / (1 << 7)  # binomial SE of a share over ~2^14 kept draws
