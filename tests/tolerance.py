"""Error bounds for tests that compare floating-point results, derived from the arithmetic (not from one CPU).

Two computations of the same real quantity can differ by the rounding of *each*: different CPUs, thread counts
and ``ATEN_CPU_CAPABILITY`` settings sum in different orders and with or without FMA. The classical bound
(Higham, "Accuracy and Stability of Numerical Algorithms", 3.1) holds for every summation order:
``|fl(sum x_i) - sum x_i| <= gamma(n - 1) * sum |x_i|`` with ``gamma(n) = n u / (1 - n u)`` and ``u`` the unit
roundoff, so two orders differ by at most twice that. Example:
    >>> import torch
    >>> a, b = torch.randn(3, 64), torch.randn(64, 2)
    >>> assert_within(a @ b, (a.double() @ b.double()).float(), matmul_bound(a, b))
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

__all__ = ["unit_roundoff", "gamma", "gamma_prob", "matmul_bound", "sum_bound", "bn_eval_bound", "forward_bound", "assert_within"]


def unit_roundoff(dtype: torch.dtype = torch.float32) -> float:
    """``u = eps / 2``: the largest relative error of one rounding to nearest in ``dtype``."""
    return torch.finfo(dtype).eps / 2


def gamma(n: int, dtype: torch.dtype = torch.float32) -> float:
    """``gamma(n) = n u / (1 - n u)``: the relative error bound of ``n`` successive roundings."""
    nu = n * unit_roundoff(dtype)
    if nu >= 1:
        raise ValueError(f"gamma({n}) is unbounded in {dtype}")
    return nu / (1 - nu)


def gamma_prob(n: int, dtype: torch.dtype = torch.float32, lam: float = 10.0) -> float:
    """Probabilistic bound on ``n`` successive roundings: ``lam sqrt(n) u`` (never above ``gamma(n)``).

    Higham and Mary ("A new approach to probabilistic rounding error analysis", 2019): modelling the rounding
    errors as independent and mean zero, it holds with probability at least ``1 - 2n exp(-lam^2 / 2)``
    (``lam = 10``: ``1 - n * 4e-22``). For long reductions it is far tighter than the worst case.
    """
    return min(gamma(n, dtype), lam * n ** 0.5 * unit_roundoff(dtype))


def matmul_bound(a: Tensor, b: Tensor, extra: int = 0) -> Tensor:
    """Elementwise bound on the difference of two float computations of ``a @ b`` (any order, FMA or not).

    Each result is within ``gamma(K) |a| |b|`` of the exact product (``K`` the reduction length), so two of them
    are within twice that; ``extra`` adds roundings done around the product (e.g. a bias add, a scale).
    """
    k = a.shape[-1]
    mag = a.detach().abs().double() @ b.detach().abs().double()
    return 2 * gamma(k + extra, a.dtype) * mag


def sum_bound(x: Tensor, dim=None, extra: int = 0) -> Tensor:
    """Bound on the difference of two float sums of ``x`` over ``dim`` (all elements when None), in any order."""
    mag = x.detach().abs().double()
    n = x.numel() if dim is None else mag.shape[dim]
    total = mag.sum() if dim is None else mag.sum(dim)
    return 2 * gamma(max(n - 1, 1) + extra, x.dtype) * total


def bn_eval_bound(x: Tensor, weight, bias, mean: Tensor, denom: Tensor, roundings: int = 16) -> Tensor:
    """Bound on the difference of two float evaluations of ``(x - mean) / denom * weight + bias`` (channels dim 1).

    Every arrangement (``x * a + (bias - mean * a)``, ``(x - mean) * a + bias``, ``denom`` from a variance and a
    square root) rounds a few times, each time by at most ``u`` of one of ``|x a|``, ``|mean a|``, ``|bias|``;
    ``roundings`` counts both sides together (16 covers two arrangements of 8 roundings each).
    """
    shape = (1, -1) + (1,) * (x.dim() - 2)
    a = (1.0 / denom.detach().double()).abs()
    if weight is not None:
        a = a * weight.detach().double().abs()
    mag = (x.detach().double().abs() + mean.detach().double().abs().view(shape)) * a.view(shape)
    if bias is not None:
        mag = mag + bias.detach().double().abs().view(shape)
    return roundings * unit_roundoff(x.dtype) * mag


def forward_bound(model: nn.Module, out: Tensor, prob: bool = False) -> Tensor:
    """Bound on the difference of two float evaluations of one network function (e.g. folded vs explicit form).

    Each GEMM layer rounds its outputs within ``gamma(K)`` of its magnitude (``K`` its fan-in), each other leaf
    module (norm, activation, softmax, pooling) within a few (8) roundings; along the chain the relative errors
    add up, relative to the output's scale, provided no stage amplifies relative errors: true of the small
    normalised test networks this is used on (weights ~ 1/sqrt(K), LayerNorm/BatchNorm, residual sums of like
    magnitude). Two evaluations: twice that. ``prob``: :func:`gamma_prob` instead of the worst case (deep
    networks, where the worst case is far too pessimistic).
    """
    gemms = (nn.Linear, nn.Conv1d, nn.Conv2d)
    leaves = [m for m in model.modules() if not list(m.children())]
    n = sum(m.weight[0].numel() if isinstance(m, gemms) else 8 for m in leaves)
    return 2 * (gamma_prob if prob else gamma)(n, out.dtype) * out.detach().abs().max().double()


def assert_within(actual: Tensor, expected: Tensor, bound, what: str = "values") -> None:
    """Assert ``|actual - expected| <= bound`` elementwise (bound: a tensor broadcastable to them, or a float)."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    diff = (actual.detach().double() - expected.detach().double()).abs()
    bound_t = torch.as_tensor(bound, dtype=torch.float64)
    bad = ~(diff <= bound_t)  # NaN differences fail too
    if bool(bad.any()):
        excess = (diff / bound_t.clamp_min(torch.finfo(torch.float64).tiny)).nan_to_num(float("inf"))
        i = int(excess.flatten().argmax()) if excess.numel() else 0
        raise AssertionError(f"{what}: {int(bad.sum())} of {diff.numel()} elements off by more than the bound; "
                             f"worst at flat index {i}: |diff| {float(diff.flatten()[i]):.3e} > bound "
                             f"{float(bound_t.expand_as(diff).flatten()[i]):.3e}")
