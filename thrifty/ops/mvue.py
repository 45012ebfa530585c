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

  The same capping loop handles any n:m. The ``n``-subset is drawn by
  systematic sampling: one uniform ``u`` per block, element ``i`` is kept when
  some ``u + k`` (``k = 0..n-1``) falls in ``[C_{i-1}, C_i)`` of the cumulative
  probabilities ``C``. Because every ``p_i <= 1`` no element is hit twice and
  ``P(keep i) = p_i`` exactly.

Defined behaviour at the edges (shared by both masks):

* size along ``dim`` not a multiple of ``m`` (``tail``): ``"pad"`` (default)
  treats the last partial block as if zero-padded to ``m`` (so it too has at
  most ``n`` nonzeros and the MVUE stays unbiased); ``"dense"`` leaves the tail
  untouched; ``"error"`` raises ValueError.
* all-zero blocks stay zero (no division by zero, no NaN); blocks with at
  most ``n`` nonzeros are returned exactly.
* a block containing NaN or +-inf is returned unchanged, so overflow checks
  downstream (e.g. a loss scaler looking for inf/NaN gradients) still see it.
* float16 / bfloat16 inputs are computed in float32 and returned in the input
  dtype; MVUE values beyond the dtype's range saturate to its largest finite
  value (the only place the estimator is not exactly unbiased).

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

from typing import Literal, Optional

import torch
from torch import Tensor

__all__ = ["mse_nm", "mvue_nm", "nm_prune", "mvue_probs", "Method", "Tail", "METHODS"]

Method = Literal["mse", "mvue"]
Tail = Literal["pad", "dense", "error"]
METHODS = ("mse", "mvue")
_TAILS = ("pad", "dense", "error")


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
    """View ``x`` (float32) as (pre, G, m, post) blocks; return it and the padded length's excess."""
    shape = x.shape
    length = shape[dim]
    pre = 1
    for s in shape[:dim]:
        pre *= s
    post = x.numel() // max(pre * length, 1) if length else 0
    x3 = x.reshape(pre, length, post).float()
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


def _to_dtype(out: Tensor, dtype: torch.dtype) -> Tensor:
    if out.dtype == dtype:
        return out
    fin = torch.finfo(dtype).max
    # saturate instead of overflowing to inf; NaN/inf passed-through blocks keep their values
    return torch.where(out.isfinite(), out.clamp(-fin, fin), out).to(dtype)


def mse_nm(x: Tensor, n: int, m: int, dim: int = -1, tail: Tail = "pad") -> Tensor:
    """Keep the ``n`` largest-magnitude elements of every block of ``m`` along ``dim``.

    Ties are broken towards the lower index (a stable sort), so the result is
    deterministic. Biased for gradients: use :func:`mvue_nm` there.

    Example:
        >>> mse_nm(torch.tensor([3.0, -1.0, 0.5, -4.0]), 1, 2)
        tensor([ 3.,  0.,  0., -4.])
    """
    d = _check(x, n, m, dim, tail)
    if x.numel() == 0:
        return x.clone()
    b, r = _blocks(x, m, d, tail)
    mag = b.abs()
    # rank by magnitude; a stable descending sort puts equal magnitudes in index order
    order = torch.sort(mag, dim=2, descending=True, stable=True).indices
    keep = torch.zeros_like(mag, dtype=torch.bool).scatter_(2, order[:, :, :n], True)
    out = torch.where(keep, b, torch.zeros_like(b))
    out = torch.where(mag.sum(2, keepdim=True).isfinite(), out, b)
    return _to_dtype(_unblock(out, x, d, r, tail, m), x.dtype)


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
    b, r = _blocks(x, m, d, tail)
    mag = b.abs()
    p = mvue_probs(mag, n, dim=2)
    u = torch.rand((b.shape[0], b.shape[1], 1, b.shape[3]), generator=generator, device=b.device)
    hi = torch.cumsum(p, dim=2)
    lo = hi - p
    # number of points u, u+1, ..., u+n-1 in [lo, hi): ceil(hi-u) - ceil(lo-u), both clamped to [0, n]
    # so rounding in the cumulative sum can never select more than n elements.
    hits = (hi - u).ceil_().clamp_(0, n) - (lo - u).ceil_().clamp_(0, n)
    keep = (hits > 0) & (p > 0)
    out = torch.where(keep, b / torch.where(keep, p, torch.ones_like(p)), torch.zeros_like(b))
    out = torch.where(mag.sum(2, keepdim=True).isfinite(), out, b)
    return _to_dtype(_unblock(out, x, d, r, tail, m), x.dtype)


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
