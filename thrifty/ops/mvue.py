"""N:M pruning of activations and neural gradients: MSE (top-N) and MVUE masks.

Blocks are ``m`` consecutive elements along one dimension ``dim``; at most
``n`` elements of each block stay nonzero.

* :func:`mse_nm` keeps the ``n`` largest magnitudes unchanged. It minimises
  the squared error, so it is the right choice for activations, but it is
  *biased* (E[out] != x), which is why it fails on neural gradients.
* :func:`mvue_nm` keeps element ``i`` with probability ``p_i`` and scales it to
  ``x_i / p_i``, so ``E[out] = x`` exactly. Among such estimators with at most
  ``n`` nonzeros per block the total variance ``sum x_i^2 (1/p_i - 1)`` is
  minimal for ``p_i = min(1, c |x_i|)`` with ``sum p_i = n`` (the classical
  "probability proportional to size, capped at one" solution). For the cases
  of the paper (Chmiel et al., METHODS.md section 6), with ``S = sum |x_i|``:

  - 1:2 on (a, b): ``(sign(a) S, 0)`` with probability ``|a|/S``, else
    ``(0, sign(b) S)``. Per-element variance ``|a||b|``.
  - 2:4 with ``max |x_i| <= S/2``: ``p_i = 2|x_i|/S``, kept value
    ``sign(x_i) S/2``.
  - 2:4 with one ``|x_j| > S/2``: ``c |x_j|`` would exceed 1, so ``p_j = 1``
    (kept exactly) and the other three share the remaining budget of one
    element, ``p_i = |x_i| / (S - |x_j|)``: this is 1:3 MVUE on the rest.
    Derivation: minimise ``sum x_i^2 / p_i`` subject to ``sum p_i = 2`` and
    ``p_i <= 1``; the Lagrange condition gives ``p_i = |x_i| / sqrt(lambda)``
    on the free entries, and the bound binds exactly for the one entry with
    ``2 |x_j| / S > 1`` (two such entries cannot exist). The tests check the
    KKT conditions and compare against random feasible ``p``.

  Per-element variance is ``x_i^2 (1/p_i - 1)`` in every case.

  The same capping loop handles any n:m. The ``n``-subset is drawn by
  systematic sampling: one uniform ``u`` per block, element ``i`` is kept when
  some ``u + k`` (``k = 0..n-1``) falls in ``[C_{i-1}, C_i)`` of the cumulative
  probabilities ``C``. Because every ``p_i <= 1`` no element is hit twice and
  ``P(keep i) = p_i`` exactly (the joint law of the kept pair depends on the
  order within the block; unbiasedness and per-element variance only need the
  marginals). 1:m and 2:4 run on a fast path written for CPU memory traffic
  (float 0/1 arithmetic, in-place buffers); other n:m use the general path.

Compiled kernels: on CPU, MVUE 1:2, 1:3, 1:4, 2:4 and MSE top-n of m <= 4 run
as single-pass numba kernels (:mod:`thrifty.ops._mvue_kernel`, about 10x
faster than the torch paths on 1M values: one read and one write, no padded or
permuted copies). They perform the torch fast path's float32 operations in the
same order (the MSE kernel is always bit-identical). Both MVUE paths draw the
same uniforms: one 32-bit ``key`` from ``generator`` per call (as stochastic
rounding in :func:`thrifty.ops.quant.fake_quantize_minmax` does), and block
``b`` (numbered in the order of the ``(pre, blocks, 1, post)`` layout: the
dimensions before ``dim``, the blocks, the dimensions after it) gets the
counter-based hash ``u_b`` of :mod:`thrifty.ops._qkernels` (24-bit uniforms
like ``torch.rand``; the kernel hashes in numba, the torch path with its torch
twin ``hash_uniform``, on any device). So for the same generator state the
kernel and the torch fast path return identical tensors; the general path
(other n:m, or blocks with NaN/inf) uses the same uniforms but other float
operations, so it agrees in distribution, not always to the last bit. For
float16/bfloat16 outputs both paths apply the same stochastic rounding (numba
kernel or its torch twin, identical results). The
counter has 32 bits: a tensor of more than 2^32 blocks raises ValueError
rather than reuse uniforms. Other devices and cases use the torch paths
(``_KERNEL = False`` forces them, e.g. for tests).

Defined behaviour at the edges (shared by both masks):

* size along ``dim`` not a multiple of ``m`` (``tail``): ``"pad"`` (default)
  treats the last partial block as if zero-padded to ``m`` (so it too has at
  most ``n`` nonzeros and the MVUE stays unbiased); ``"dense"`` leaves the tail
  untouched; ``"error"`` raises ValueError.
* all-zero blocks stay zero (no division by zero, no NaN); blocks with at
  most ``n`` nonzeros are returned exactly.
* a block containing NaN or +-inf is returned unchanged, so overflow checks
  downstream (e.g. a loss scaler looking for inf/NaN gradients) still see it.
* probabilities are resolved by float32 uniforms: an element holding less than
  about 2^-24 of its block's mass can be dropped for good (bias below 1e-7 of
  the block's largest magnitude).
* float64 inputs are computed in float64 (torch path; the kernels are float32).
  float16 / bfloat16 inputs are computed in float32 and returned in the input
  dtype. Rounding a kept value ``x_i / p_i`` to nearest would bias it by up to
  half an ulp (fp16 block [5, -0.001] at 1:2: 2e-4 of the block's L1 norm), so
  MVUE rounds it *stochastically* (:mod:`thrifty.ops._sround`, hash uniforms of
  a second 32-bit key drawn from ``generator``, independent of the keep
  decisions): exactly unbiased, except for values beyond the dtype's range,
  which saturate to its largest finite value, and float16's subnormal range
  (below 2^-14), where the rounding's bias is below 2^-48 in absolute value.
* what remains in any dtype is the rounding of the computed ``x_i / p_i``
  itself (a few ulp of the block's L1 norm in the compute dtype: 2^-22 of it in
  float32) and the 2^-24 resolution of the uniforms (above).

Example:
    >>> import torch
    >>> g = torch.Generator().manual_seed(0)
    >>> x = torch.tensor([[1.0, -3.0, 0.5, 2.0]])
    >>> mse_nm(x, 2, 4)
    tensor([[ 0., -3.,  0.,  2.]])
    >>> y = mvue_nm(x, 2, 4, generator=g)
    >>> int((y != 0).sum()) <= 2
    True
"""
from __future__ import annotations

import math
from typing import Literal, Optional

import numpy as np
import torch
from torch import Tensor

__all__ = ["mse_mask", "mse_nm", "mvue_nm", "nm_prune", "mvue_probs", "Method", "Tail", "METHODS"]

Method = Literal["mse", "mvue"]
Tail = Literal["pad", "dense", "error"]
METHODS = ("mse", "mvue")
_TAILS = ("pad", "dense", "error")
_NO_U = np.empty(0, dtype=np.float32)
_FAST_PATHS = True  # tests switch this off to check the general path on the same cases
# Compiled single-pass kernels (numba, thrifty.ops._mvue_kernel) for CPU tensors and the cases below;
# tests switch this off to run the torch reference paths (same hashed uniforms, same results).
_KERNEL = True
_KERNEL_MVUE = ((1, 2), (1, 3), (1, 4), (2, 4))
_KERNEL_MAX_M = 4
_KERNEL_MODES = {"mvue": 0, "mse": 1, "mask": 2}  # _mvue_kernel.MVUE, MSE_VALUES, MSE_MASK
_MAX_BLOCKS = 2**32  # the hash's counter is 32 bits: more blocks would reuse uniforms
_kmod = None


def _kernels():
    """The numba kernel module, imported (and compiled or loaded from numba's cache) on first use."""
    global _kmod, _KERNEL
    if _kmod is None:
        try:
            from thrifty.ops import _mvue_kernel
        except ImportError:  # pragma: no cover - numba is a dependency; fall back to torch without it
            _KERNEL = False
            return None
        _kmod = _mvue_kernel
    return _kmod


def _use_kernel(x: Tensor, n: int, m: int, method: str) -> bool:
    # float64 stays on the torch path in float64: the kernels compute in float32
    if not _KERNEL or x.device.type != "cpu" or x.dtype == torch.float64:
        return False
    ok = (n, m) in _KERNEL_MVUE if method == "mvue" else m <= _KERNEL_MAX_M
    return ok and _kernels() is not None


def _kernel_call(x: Tensor, n: int, m: int, dim: int, tail: str, kind: str,
                 u: Optional[Tensor] = None, key: int = 0) -> Tensor:
    """Run a compiled kernel on ``x`` grouped along ``dim`` (already normalised).

    ``kind``: "mvue" (values), "mse" (kept values), "mask" (0/1); all float32 (``x``: float32/16, bfloat16).
    ``u`` (one float32 uniform per block, the torch path's layout) replaces the hashed uniforms of ``key``.
    """
    shape = x.shape
    length = shape[dim]
    if length % m and tail == "error":
        raise ValueError(f"size {length} along dim {dim} is not a multiple of m={m} (tail='error')")
    pre = math.prod(shape[:dim])
    post = math.prod(shape[dim + 1:])
    xf = x.detach()
    if xf.dtype != torch.float32 or not xf.is_contiguous():  # (kernels on tiny tensors: skip no-op calls)
        xf = xf.float().contiguous()
    out = torch.empty_like(xf)
    k = _kernels()
    uv = _NO_U if u is None else u.detach().float().contiguous().view(-1).numpy()
    k.nm_kernel(xf.view(-1).numpy(), out.view(-1).numpy(), pre, length, post, n, m, tail == "dense",
                _KERNEL_MODES[kind], uv, key)
    return out


def _uniform_shape(shape: torch.Size, m: int, dim: int, tail: str) -> tuple[int, int, int, int]:
    """(pre, G, 1, post): one uniform per block; block b (flat index in this shape) gets the hash's b-th."""
    if shape[dim] % m and tail == "error":
        raise ValueError(f"size {shape[dim]} along dim {dim} is not a multiple of m={m} (tail='error')")
    pre, post = math.prod(shape[:dim]), math.prod(shape[dim + 1:])
    g = -(-shape[dim] // m) if tail == "pad" else shape[dim] // m
    if pre * g * post > _MAX_BLOCKS:
        raise ValueError(f"mvue_nm: {pre * g * post} blocks of {m} along dim {dim} of a tensor of shape "
                         f"{tuple(shape)}; the hashed uniforms number at most 2^32 blocks per call (split it)")
    return pre, g, 1, post


def _check(x: Tensor, n: int, m: int, dim: int, tail: str) -> int:
    if not isinstance(x, Tensor):
        raise TypeError(f"expected a Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"N:M pruning needs a floating-point tensor, got dtype {x.dtype}")
    for nm, v in (("n", n), ("m", m)):
        if not isinstance(v, int) or isinstance(v, bool):
            raise TypeError(f"{nm} must be an int, got {v!r}")
    if not 1 <= n <= m:
        raise ValueError(f"need 1 <= n <= m, got n={n}, m={m}")
    if tail not in _TAILS:
        raise ValueError(f"tail must be one of {_TAILS}, got {tail!r}")
    if x.dim() == 0:
        raise ValueError("cannot prune a 0-d tensor: there is no dimension to group along")
    if not -x.dim() <= dim < x.dim():
        raise ValueError(f"dim={dim} out of range for a tensor of shape {tuple(x.shape)}")
    return dim % x.dim()


def _blocks(x: Tensor, m: int, dim: int, tail: str) -> tuple[Tensor, int]:
    """View ``x`` as (pre, G, m, post) blocks (float32; float64 stays float64); return it and the padded
    length's excess."""
    shape = x.shape
    length = shape[dim]
    pre = 1
    for s in shape[:dim]:
        pre *= s
    post = x.numel() // max(pre * length, 1) if length else 0
    x3 = x.reshape(pre, length, post).to(_compute_dtype(x.dtype))
    r = length % m
    if r and tail == "error":
        raise ValueError(f"size {length} along dim {dim} is not a multiple of m={m} (tail='error')")
    if r and tail == "dense":
        return x3[:, : length - r].reshape(pre, (length - r) // m, m, post), r
    if r:  # "pad": zero-pad the last partial block
        x3 = torch.cat([x3, x3.new_zeros(pre, m - r, post)], dim=1)
    return x3.reshape(pre, x3.shape[1] // m, m, post), r


def _unblock(out: Tensor, x: Tensor, dim: int, r: int, tail: str, m: int) -> Tensor:
    shape = x.shape
    pre, g, _, post = out.shape
    out = out.reshape(pre, g * m, post)
    if r and tail == "pad":
        out = out[:, : shape[dim]]
    elif r and tail == "dense":
        rest = x.reshape(pre, shape[dim], post)[:, shape[dim] - r:].to(out.dtype)
        out = torch.cat([out, rest], dim=1)
    return out.reshape(shape)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _to_dtype(out: Tensor, dtype: torch.dtype, key: int) -> Tensor:
    """The float32 MVUE values in the input's ``dtype``: saturated to its finite range, then (16-bit
    dtypes) stochastically rounded with the hash uniforms of ``key``, so the rounding adds no bias."""
    if out.dtype == dtype:
        return out
    from thrifty.ops._sround import sround

    # saturates instead of overflowing to inf; NaN/inf passed-through blocks keep their values
    return sround(out, dtype, key, kernel=_KERNEL, inplace=True)


def mse_mask(x: Tensor, n: int, m: int, dim: int = -1, tail: Tail = "pad") -> Tensor:
    """0/1 mask (dtype of ``x``) of the ``n`` largest magnitudes in every block of ``m`` along ``dim``.

    Ties go to the lower index (as a stable sort), so the mask is deterministic. Blocks holding
    NaN/inf, and a ``tail="dense"`` tail, are all ones. ``x * mse_mask(x, ...)`` is :func:`mse_nm`
    and, as an autograd expression, masks the gradient the same way (used by activation N:M).

    Example:
        >>> mse_mask(torch.tensor([3.0, -1.0, 0.5, -4.0]), 1, 2)
        tensor([1., 0., 0., 1.])
    """
    d = _check(x, n, m, dim, tail)
    if x.numel() == 0:
        return torch.ones_like(x)
    x = x.detach()
    if _use_kernel(x, n, m, "mse"):
        return _kernel_call(x, n, m, d, tail, "mask").to(x.dtype)
    b, r = _blocks(x, m, d, tail)
    keep = _mse_small(b, n) if _FAST_PATHS and m <= 8 else None
    if keep is None:
        mag = b.abs()
        # rank by magnitude; a stable descending sort puts equal magnitudes in index order
        order = torch.sort(mag, dim=2, descending=True, stable=True).indices
        keep = torch.zeros_like(mag).scatter_(2, order[:, :, :n], 1.0)
        keep = torch.where(mag.sum(2, keepdim=True).isfinite(), keep, torch.ones_like(keep))
    src = torch.ones_like(x) if r and tail == "dense" else x
    return _unblock(keep, src, d, r, tail, m).to(x.dtype)


def mse_nm(x: Tensor, n: int, m: int, dim: int = -1, tail: Tail = "pad") -> Tensor:
    """Keep the ``n`` largest-magnitude elements of every block of ``m`` along ``dim``.

    Ties are broken towards the lower index (a stable sort), so the result is
    deterministic. Biased for gradients: use :func:`mvue_nm` there.

    Example:
        >>> mse_nm(torch.tensor([3.0, -1.0, 0.5, -4.0]), 1, 2)
        tensor([ 3.,  0.,  0., -4.])
    """
    d = _check(x, n, m, dim, tail)
    if x.dtype == torch.float32 and x.numel() and _use_kernel(x, n, m, "mse"):
        return _kernel_call(x, n, m, d, tail, "mse")  # one pass, no mask tensor
    mask = mse_mask(x, n, m, dim, tail)
    return (x.detach() * mask).add_(0.0)  # + 0 turns the -0.0 of dropped negatives into 0.0


def mvue_probs(mag: Tensor, n: int, dim: int = -1) -> Tensor:
    """Minimum-variance keep probabilities ``p_i = min(1, c |x_i|)``, ``sum_i p_i = min(n, #nonzeros)``.

    ``mag`` holds nonnegative magnitudes, blocks along ``dim``. The scale ``c``
    is found by capping: any element whose share would exceed one is kept
    surely and the remaining budget is spread over the rest; at most ``n``
    rounds (the capped set only grows).

    Example:
        >>> mvue_probs(torch.tensor([6.0, 1.0, 1.0, 0.0]), 2)
        tensor([1.0000, 0.5000, 0.5000, 0.0000])
    """
    # p_i = rem * |x_i| / rest (not c * |x_i|: c = rem / rest overflows when rest is subnormal)
    rest = mag.sum(dim, keepdim=True)
    rem = torch.full_like(rest, float(n))
    capped = torch.zeros_like(mag, dtype=torch.bool)
    for _ in range(n - 1 if n > 1 else 0):
        capped = capped | (rem * (mag / rest) >= 1)
        rem = (n - capped.sum(dim, keepdim=True).to(mag.dtype)).clamp_min(0)
        # the remainder summed directly, not total - capped: the subtraction cancels
        rest = torch.where(capped, torch.zeros_like(mag), mag).sum(dim, keepdim=True)
    p = torch.where(capped, torch.ones_like(mag), (rem * (mag / rest)).clamp(max=1.0))
    # blocks with at most n nonzeros are kept exactly (c * mag may round to 1 - eps there)
    few = (mag > 0).sum(dim, keepdim=True) <= n
    p = torch.where(few, torch.ones_like(p), p)
    # all-zero remainder: c is inf or nan (0/0); nothing more to keep there
    return torch.where(mag > 0, p, torch.zeros_like(p)).nan_to_num(0.0)


def mvue_nm(
    x: Tensor,
    n: int,
    m: int,
    dim: int = -1,
    generator: Optional[torch.Generator] = None,
    tail: Tail = "pad",
) -> Tensor:
    """Unbiased, minimum-variance N:M pruning: ``E[mvue_nm(x)] == x``, at most ``n`` nonzeros per block.

    ``generator`` (on ``x``'s device) makes the draw reproducible. See the
    module docstring for the derivation and the edge cases.

    Example:
        >>> g = torch.Generator().manual_seed(1)
        >>> mvue_nm(torch.tensor([1.0, 3.0]), 1, 2, generator=g).abs().sum().item()
        4.0
    """
    d = _check(x, n, m, dim, tail)
    if x.numel() == 0:
        return x.clone()
    ushape = _uniform_shape(x.shape, m, d, tail)  # (raises before the generator is drawn from)
    from thrifty.ops._qkernels import draw_key, hash_uniform  # (imports numba; the same hash as the kernel's)

    key = draw_key(generator, x.device)
    # 16-bit outputs: a second key for the stochastic rounding of the kept values (independent of the keeps)
    rkey = draw_key(generator, x.device) if x.dtype in (torch.float16, torch.bfloat16) else 0
    if _use_kernel(x, n, m, "mvue"):
        return _to_dtype(_kernel_call(x, n, m, d, tail, "mvue", key=key), x.dtype, rkey)

    b, r = _blocks(x, m, d, tail)
    u = hash_uniform(math.prod(ushape), key, b.device).view(ushape)
    if _FAST_PATHS and (n == 1 or (n, m) == (2, 4)):
        fast = (_mvue_1m if n == 1 else _mvue_24)(b, u[:, :, 0])
        if fast is not None:
            return _to_dtype(_unblock(fast, x, d, r, tail, m), x.dtype, rkey)
    mag = b.abs()
    p = mvue_probs(mag, n, dim=2)
    hi = torch.cumsum(p, dim=2)
    lo = hi - p
    # number of points u, u+1, ..., u+n-1 in [lo, hi): ceil(hi-u) - ceil(lo-u), both clamped to [0, n]
    # so rounding in the cumulative sum can never select more than n elements.
    hits = (hi - u).ceil_().clamp_(0, n) - (lo - u).ceil_().clamp_(0, n)
    keep = (hits > 0) & (p > 0)
    out = torch.where(keep, b / torch.where(keep, p, torch.ones_like(p)), torch.zeros_like(b))
    out = torch.where(mag.sum(2, keepdim=True).isfinite(), out, b)
    return _to_dtype(_unblock(out, x, d, r, tail, m), x.dtype, rkey)


# Fast paths for the cases that matter in training (1:m and 2:4 MVUE, top-n of m <= 8 for MSE).
# They work on the m slices b[:, :, k] of the block view, whose inner dim is contiguous, and use only
# float arithmetic: on CPU, torch.where / masked_fill / bool tensors cost 10-30x an add, so masks are
# 0/1 floats from heaviside() and selections are products. Same distribution as the general path;
# they return None when a block holds NaN/inf (the general path passes such blocks through).
def _hs(t: Tensor, at_zero: float) -> Tensor:
    """Heaviside step as a float 0/1 via sign() (torch.heaviside is not vectorised on CPU)."""
    if at_zero == 0.0:
        return torch.sign(t).clamp_(min=0.0)  # 1 where t > 0
    return torch.sign(t).add_(1.0).clamp_(max=1.0)  # 1 where t >= 0


def _finite(t: Tensor) -> bool:
    # one reduction instead of isfinite().all(): NaN/inf propagate into the sum; a sum that overflows
    # merely sends the call to the (correct, slower) general path
    return math.isfinite(float(t.sum()))


def _systematic(a: list[Tensor], mags: list[Tensor], d: Tensor, n: float, u: Tensor,
                spare: Optional[list[Tensor]] = None) -> Tensor:
    """Keep element k with probability p_k = min(1, |x_k| / d) (sum_k p_k = n) at value x_k / p_k.

    ``d`` is the block's 1/c; systematic sampling with the block's ``u``. Inside a backward pass
    the cost is dominated by first-touch page faults of fresh allocations, not by arithmetic, so
    everything runs in place in a few block-sized buffers (``spare`` ones are reused) and writes
    into one preallocated output.
    """
    bufs = list(spare or [])
    while len(bufs) < 4:
        bufs.append(torch.empty_like(d))
    p, cum, q, q_prev = bufs[:4]
    out = torch.empty(a[0].shape[:2] + (len(a),) + a[0].shape[2:], dtype=a[0].dtype, device=a[0].device)
    for k, (ak, mk) in enumerate(zip(a, mags)):
        # 0/0 (zero block, or nothing left beside a kept element) -> p = 0
        torch.div(mk, d, out=p).clamp_(max=1.0).nan_to_num_(0.0)
        cum.copy_(p) if k == 0 else cum.add_(p)
        # points u, u + 1, ... below the cumulative C_k, capped at n against rounding in C_k
        torch.sub(cum, u, out=q).ceil_().clamp_(max=n)
        keep = q if k == 0 else torch.sub(q, q_prev, out=q_prev).clamp_(max=1.0)
        # x_k / p_k without dividing: |x_k| when kept surely (|x_k| >= d), else d (signed like x_k)
        torch.maximum(mk, d, out=out.select(2, k)).copysign_(ak).mul_(keep)
        q, q_prev = q_prev, q
    return out


def _mvue_1m(b: Tensor, u: Tensor) -> Optional[Tensor]:
    """1:m: keep element k with probability |x_k|/S at value sign(x_k) S."""
    a = list(b.unbind(2))
    mags = list(b.abs().unbind(2))
    total = mags[0].clone()
    for t in mags[1:]:
        total.add_(t)
    if not _finite(total):
        return None
    return _systematic(a, mags, total, 1.0, u)


def _mvue_24(b: Tensor, u: Tensor) -> Optional[Tensor]:
    """2:4: p_k = 2|x_k|/S, or, when one element holds more than half of S, p = 1 for it and
    |x_k| / (sum of the other three) for the rest (1:3 MVUE on the rest)."""
    a = list(b.unbind(2))
    mags = list(b.abs().unbind(2))
    hi01, lo01 = torch.maximum(mags[0], mags[1]), torch.minimum(mags[0], mags[1])
    hi23, lo23 = torch.maximum(mags[2], mags[3]), torch.minimum(mags[2], mags[3])
    # rest = the three smaller ones summed directly (S - max cancels: few-nonzero blocks must come
    # back exactly); buffers are recycled in place (see _systematic)
    lo01.add_(lo23)
    rest = torch.minimum(hi01, hi23, out=lo23).add_(lo01)
    mx = torch.maximum(hi01, hi23, out=hi01)
    half = torch.add(mx, rest, out=hi23).mul_(0.5)
    if not _finite(half):
        return None
    dom = torch.sub(mx, rest, out=lo01).sign_().clamp_(min=0.0)  # 1 where max > S/2 (at most one such)
    d = torch.lerp(half, rest, dom, out=half)  # lerp is exact at weights 0 and 1
    return _systematic(a, mags, d, 2.0, u, spare=[dom, mx, rest])


def _mse_small(b: Tensor, n: int) -> Optional[Tensor]:
    """0/1 keep mask of the top-n of m <= 8 by pairwise comparison; ties go to the lower index."""
    mags = list(b.abs().unbind(2))
    if not _finite(sum(mags)):  # type: ignore[arg-type]
        return None
    m = len(mags)
    rank: list = [None] * m  # number of elements ranked before k
    for j in range(m):
        for k in range(j + 1, m):
            j_first = _hs(mags[j] - mags[k], 1.0)  # |x_j| >= |x_k| and j < k: j ranks first
            rank[k] = j_first if rank[k] is None else rank[k].add_(j_first)
            rank[j] = (1.0 - j_first) if rank[j] is None else rank[j].add_(1.0).sub_(j_first)
    return torch.stack([_hs(n - 0.5 - rk, 0.0) for rk in rank], 2)


def nm_prune(
    x: Tensor,
    n: int,
    m: int,
    method: Method = "mse",
    dim: int = -1,
    generator: Optional[torch.Generator] = None,
    tail: Tail = "pad",
) -> Tensor:
    """Dispatch to :func:`mse_nm` or :func:`mvue_nm` by name.

    Example:
        >>> nm_prune(torch.tensor([1.0, -2.0]), 1, 2, method="mse")
        tensor([ 0., -2.])
    """
    if method == "mse":
        return mse_nm(x, n, m, dim, tail)
    if method == "mvue":
        return mvue_nm(x, n, m, dim, generator, tail)
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")
