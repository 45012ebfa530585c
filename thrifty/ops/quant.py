"""Uniform quantization math: the project's only quantizer arithmetic (pure tensor functions).

Conventions (hardware-compliant, as GEMMLOWP / ONNX ``QuantizeLinear``):

* asymmetric: integer levels ``[0, 2^b - 1]``, ``scale = (max - min) / (2^b - 1)``, integer zero point
  ``zp = round(-min / scale)``; the range is first widened to contain 0 so that 0 is exact.
* symmetric: integer levels ``[-(2^(b-1) - 1), 2^(b-1) - 1]`` (narrow range, so ``q(-x) = -q(x)``), zero point 0,
  ``scale = max|x| / (2^(b-1) - 1)``.  Codes fit in a signed b-bit integer.
* ``q(x) = (clamp(round(x / scale) + zp, qmin, qmax) - zp) * scale``.  Round-to-nearest is ``torch.round``
  (ties to even, like ONNX Runtime); stochastic rounding is ``floor(t + u)``, ``u ~ U[0, 1)``, unbiased.
* per-tensor: ``scale`` is a scalar; per-channel: a vector over dimension ``axis`` (any axis, negative ok);
  per-group (``group_size=g``, weight-only LLM quantization): each channel's other dimensions, flattened in order
  (the GEMM reduction), are cut into groups of ``g`` consecutive elements with one scale/zero point each, shaped
  ``(channels, ceil(K / g))``. A last group shorter than ``g`` (``K % g != 0``) is a group of its own: it is
  zero-padded, which changes neither its min/max range (ranges always contain 0) nor its MSE (0 is on every grid).
* A zero (or constant-zero-range) tensor gets ``scale = EPS`` so nothing divides by zero; NaN is an error.

Gradients: :func:`fake_quantize` rounds with a straight-through estimator, so it is differentiable in ``x``
(1 inside the clipping range, 0 outside: the "clipped STE") and in ``scale`` / ``zero_point`` (LSQ-style), which
is what AdaQuant and learnable quantizers need.  :func:`fake_quantize_ste` passes the gradient of ``x`` through
unchanged everywhere.

Example:
    >>> import torch
    >>> x = torch.tensor([-1.0, 0.0, 0.3, 2.0])
    >>> s, zp = qparams_from_range(x.min(), x.max(), bits=2)
    >>> fake_quantize(x, s, zp, bits=2).tolist()
    [-1.0, 0.0, 0.0, 2.0]
"""
from __future__ import annotations

import math
from typing import Literal, NamedTuple, Optional

import numpy as np
import torch
from torch import Tensor

from thrifty.ops import ste

__all__ = [
    "EPS", "Rounding", "check_bits", "qrange", "check_group_size", "group_view", "ungroup", "round_ste", "stochastic_round", "qparams_from_range",
    "fake_quantize", "fake_quantize_ste", "fake_quantize_tensor", "fake_quantize_minmax", "QuantizedTensor",
    "quantize_int", "dequantize",
    "minmax_range", "sample_minmax_range", "ema_range", "percentile_range", "mse_range", "estimate_range",
    "quant_error",
]

EPS = 1e-8
_MAX_HASHED = 2**32  # stochastic rounding hashes the flat element index mod 2^32: more would reuse draws
Rounding = Literal["nearest", "stochastic"]
Estimator = Literal["minmax", "sample_minmax", "percentile", "mse"]


# ----------------------------------------------------------------------------------------------- basics
def check_bits(bits: int, name: str = "bits") -> int:
    """Validate a bit-width (an int in 2..16) and return it; ValueError/TypeError otherwise."""
    if isinstance(bits, bool) or not isinstance(bits, int):
        raise TypeError(f"{name} must be an int in 2..16, got {bits!r}")
    if not 2 <= bits <= 16:
        raise ValueError(f"{name} must be in 2..16, got {bits}")
    return bits


def qrange(bits: int, symmetric: bool = False) -> tuple[int, int]:
    """Integer levels ``(qmin, qmax)``: ``(0, 2^b-1)`` asymmetric, ``(-(2^(b-1)-1), 2^(b-1)-1)`` symmetric."""
    check_bits(bits)
    if symmetric:
        m = 2 ** (bits - 1) - 1
        return -m, m
    return 0, 2**bits - 1


def _check_rounding(rounding: str) -> None:
    if rounding not in ("nearest", "stochastic"):
        raise ValueError(f"rounding must be 'nearest' or 'stochastic', got {rounding!r}")


def _recording() -> bool:
    return torch.jit.is_tracing() or torch.compiler.is_exporting() or torch.compiler.is_compiling()


def _check_nan(x: Tensor, what: str = "input") -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(x).__name__}")
    # not while torch.export / jit.trace record the graph: the check is a branch on the data
    if x.is_floating_point() and not _recording() and bool(torch.isnan(x).any()):
        raise ValueError(f"cannot quantize: {what} contains NaN")


def _norm_axis(axis: int, ndim: int) -> int:
    if not -ndim <= axis < ndim:
        raise ValueError(f"axis {axis} out of range for a tensor with {ndim} dims")
    return axis % ndim


def _bcast(p: Tensor | float, x: Tensor, axis: Optional[int]) -> Tensor:
    """Shape a per-tensor scalar or per-channel vector ``p`` so it broadcasts against ``x``."""
    p = torch.as_tensor(p, dtype=x.dtype if x.is_floating_point() else torch.float32, device=x.device)
    if axis is None or p.dim() == 0 or p.dim() == x.dim():
        return p
    ax = _norm_axis(axis, x.dim())
    if p.numel() != x.shape[ax]:
        raise ValueError(f"per-channel parameter has {p.numel()} entries but axis {axis} of the input has "
                         f"{x.shape[ax]}")
    shape = [1] * x.dim()
    shape[ax] = -1
    return p.reshape(shape)


def check_group_size(group_size: Optional[int], name: str = "group_size") -> Optional[int]:
    """Validate a per-group size (None = no groups, else an int >= 1) and return it."""
    if group_size is None:
        return None
    if isinstance(group_size, bool) or not isinstance(group_size, int):
        raise TypeError(f"{name} must be None or a positive int, got {group_size!r}")
    if group_size < 1:
        raise ValueError(f"{name} must be >= 1, got {group_size}")
    return group_size


def group_view(x: Tensor, axis: int, group_size: int) -> Tensor:
    """``x`` as ``(channels, groups, group_size)``: channel ``axis`` first, the other dims flattened in order and
    cut into groups of ``group_size`` (the last one zero-padded when it is short). Example:
        >>> group_view(torch.arange(6.0).reshape(2, 3), axis=0, group_size=2).tolist()
        [[[0.0, 1.0], [2.0, 0.0]], [[3.0, 4.0], [5.0, 0.0]]]
    """
    check_group_size(group_size)
    ax = _norm_axis(axis, x.dim())
    rows = x.movedim(ax, 0).reshape(x.shape[ax], -1)
    k = rows.shape[1]
    n = -(-k // group_size)
    if n * group_size != k:
        rows = torch.nn.functional.pad(rows, (0, n * group_size - k))
    return rows.reshape(rows.shape[0], n, group_size)


def ungroup(g: Tensor, shape: tuple[int, ...] | torch.Size, axis: int) -> Tensor:
    """Inverse of :func:`group_view` for a tensor of ``shape`` (drops the padding)."""
    ax = _norm_axis(axis, len(shape))
    moved = [shape[ax]] + [d for i, d in enumerate(shape) if i != ax]
    k = math.prod(moved[1:])
    return g.reshape(g.shape[0], -1)[:, :k].reshape(moved).movedim(0, ax)


def _group_param(p: Tensor | float, g: Tensor) -> Tensor:
    """A per-group parameter (C*G entries, e.g. shaped (C, G)) shaped (C, G, 1) against a group view ``g``."""
    p = torch.as_tensor(p, dtype=g.dtype if g.is_floating_point() else torch.float32, device=g.device)
    if p.dim() == 0:
        return p
    if p.numel() != g.shape[0] * g.shape[1]:
        raise ValueError(f"per-group parameter has {p.numel()} entries but the input has {g.shape[0]} channels x "
                         f"{g.shape[1]} groups")
    return p.reshape(g.shape[0], g.shape[1], 1)


def _need_axis(axis: Optional[int], group_size: Optional[int]) -> None:
    if group_size is not None and axis is None:
        raise ValueError("per-group quantization (group_size) needs a channel axis (per-channel), got axis=None")


def round_ste(t: Tensor) -> Tensor:
    """Round to nearest (ties to even) with an identity gradient."""
    return ste(t, torch.round(t))


def stochastic_round(t: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
    """``floor(t) + [u < frac(t)]``, ``u ~ U[0,1)``: rounds up with probability ``frac(t)``, so ``E[result] = t``.

    Not ``floor(t + u)``: the sum rounds to ``t``'s precision, and for float16/bfloat16 ``t`` (and ``u``
    drawn in that dtype) that biased the result by up to 0.06 of a step. ``floor`` and ``frac`` are exact
    and ``u`` is drawn in float32 (float64 for float64 ``t``), so the probability is ``frac`` up to ``u``'s
    resolution (2^-24 / 2^-53). Example:
        >>> stochastic_round(torch.full((4,), 2.0)).tolist()
        [2.0, 2.0, 2.0, 2.0]
    """
    lo = torch.floor(t)
    udt = torch.float64 if t.dtype == torch.float64 else torch.float32
    u = torch.rand(t.shape, generator=generator, device=t.device, dtype=udt)
    return lo + (u < t - lo).to(t.dtype)


# ------------------------------------------------------------------------------------------- parameters
def qparams_from_range(min_val: Tensor | float, max_val: Tensor | float, bits: int,
                       symmetric: bool = False) -> tuple[Tensor, Tensor]:
    """Scale and (integer-valued, float dtype) zero point for a range; elementwise over per-channel ranges.

    The range is widened to include 0 (so 0 is exactly representable). Example:
        >>> s, zp = qparams_from_range(torch.tensor(-1.0), torch.tensor(3.0), bits=2)
        >>> round(float(s), 4), float(zp)
        (1.3333, 1.0)
    """
    qmin, qmax = qrange(bits, symmetric)
    lo = torch.as_tensor(min_val, dtype=torch.float32)
    hi = torch.as_tensor(max_val, dtype=torch.float32)
    if bool(torch.isnan(lo).any() | torch.isnan(hi).any()):
        raise ValueError("cannot compute quantization parameters: range contains NaN")
    if bool((lo > hi).any()):
        raise ValueError("cannot compute quantization parameters: min_val > max_val")
    lo = torch.clamp(lo, max=0.0)
    hi = torch.clamp(hi, min=0.0)
    if symmetric:
        scale = torch.clamp(torch.maximum(-lo, hi) / qmax, min=EPS)
        return scale, torch.zeros_like(scale)
    scale = torch.clamp((hi - lo) / (qmax - qmin), min=EPS)
    zp = torch.clamp(torch.round(qmin - lo / scale), qmin, qmax)
    return scale, zp


# ------------------------------------------------------------------------------------------ quantizers
def fake_quantize(x: Tensor, scale: Tensor | float, zero_point: Tensor | float | None, bits: int, *,
                  symmetric: bool = False, axis: Optional[int] = None, rounding: Rounding = "nearest",
                  generator: Optional[torch.Generator] = None, group_size: Optional[int] = None) -> Tensor:
    """Quantize-dequantize ``x`` on the grid given by ``scale``/``zero_point`` (differentiable, STE rounding).

    ``scale``/``zero_point`` are scalars (per-tensor), vectors over dimension ``axis`` (per-channel) or
    ``(channels, groups)`` with ``group_size`` (per-group, see the module docstring); a learnable (non-integer)
    zero point is rounded with an STE. Example:
        >>> fake_quantize(torch.tensor([0.26, 0.9]), 0.5, 0, bits=4).tolist()
        [0.5, 1.0]
    """
    _check_nan(x)
    _check_rounding(rounding)
    _need_axis(axis, check_group_size(group_size))
    qmin, qmax = qrange(bits, symmetric)
    if group_size is not None:
        g = group_view(x, axis, group_size)  # type: ignore[arg-type]
        s, z = _group_param(scale, g), None if (symmetric or zero_point is None) else _group_param(zero_point, g)
    else:
        g = x
        s = _bcast(scale, x, axis)
        z = None if (symmetric or zero_point is None) else _bcast(zero_point, x, axis)
    if isinstance(scale, Tensor) and scale.requires_grad:
        s = torch.clamp(s, min=EPS)  # learnable scales must stay positive
    t = g / s
    if rounding == "nearest":
        t = round_ste(t)
    else:
        t = ste(t, stochastic_round(t.detach(), generator))
    if z is None:
        out = torch.clamp(t, qmin, qmax) * s
    else:
        z = round_ste(z)
        out = (torch.clamp(t + z, qmin, qmax) - z) * s
    return out if group_size is None else ungroup(out, x.shape, axis)  # type: ignore[arg-type]


def fake_quantize_ste(x: Tensor, scale: Tensor | float, zero_point: Tensor | float | None, bits: int, *,
                      symmetric: bool = False, axis: Optional[int] = None, rounding: Rounding = "nearest",
                      generator: Optional[torch.Generator] = None, group_size: Optional[int] = None) -> Tensor:
    """Like :func:`fake_quantize` but the gradient w.r.t. ``x`` is the identity everywhere (plain STE)."""
    q = fake_quantize(x.detach(), _detach(scale), _detach(zero_point), bits, symmetric=symmetric, axis=axis,
                      rounding=rounding, generator=generator, group_size=group_size)
    return ste(x, q)


def _detach(p):
    return p.detach() if isinstance(p, Tensor) else p


def fake_quantize_tensor(x: Tensor, bits: int, *, symmetric: bool = False, axis: Optional[int] = None,
                         rounding: Rounding = "nearest", generator: Optional[torch.Generator] = None,
                         estimator: Estimator = "minmax", straight_through: bool = True,
                         group_size: Optional[int] = None, **est_kw) -> Tensor:
    """One call: estimate the range of ``x`` (per tensor, per channel or per group), then fake-quantize it.

    The range is computed without gradient; with ``straight_through`` the gradient w.r.t. ``x`` is the identity.
    Example (8-bit stochastic rounding of a gradient):
        >>> g = torch.Generator().manual_seed(0)
        >>> fake_quantize_tensor(torch.randn(4, 3), 8, rounding="stochastic", generator=g).shape
        torch.Size([4, 3])
    """
    with torch.no_grad():
        lo, hi = estimate_range(x.detach(), estimator, bits=bits, symmetric=symmetric, axis=axis,
                                group_size=group_size, **est_kw)
        s, zp = qparams_from_range(lo, hi, bits, symmetric)
        s, zp = s.to(x.device), zp.to(x.device)
    f = fake_quantize_ste if straight_through else fake_quantize
    return f(x, s, zp, bits, symmetric=symmetric, axis=axis, rounding=rounding, generator=generator,
             group_size=group_size)


def fake_quantize_minmax(x: Tensor, bits: int, *, axis: Optional[int] = None, rounding: Rounding = "nearest",
                         generator: Optional[torch.Generator] = None,
                         also_bits: Optional[int] = None) -> Tensor | tuple[Tensor, Tensor]:
    """Asymmetric min/max fake quantization in one pass (no gradient): the fast path of dynamic quantization.

    Per tensor, or per index of ``axis`` (e.g. per sample of a gradient). ``rounding="nearest"`` gives exactly
    ``fake_quantize(x, *qparams_from_range(min, max, bits), bits, axis=axis)``. ``rounding="stochastic"``
    draws its uniforms from a counter-based hash keyed by one draw of ``generator`` (or torch's global RNG),
    not from ``torch.rand``: unbiased and reproducible, but not the same draws as :func:`fake_quantize`.
    ``also_bits`` also returns the nearest-rounded ``also_bits`` quantization on the same range, computed from
    the same read of ``x`` (8-bit training's bifurcation). On CPU float32 with ``axis`` None or 0 this runs
    numba kernels (single-threaded); elsewhere the equivalent torch ops (:mod:`thrifty.ops._qkernels`).
    NaN/Inf inputs raise ValueError, and so does stochastic rounding of more than 2^32 elements (the hash's
    counter is the element index, 32 bits: split larger tensors). Example:
        >>> fake_quantize_minmax(torch.tensor([0.0, 0.3, 1.0]), 2).tolist()
        [0.0, 0.3333333432674408, 1.0]
    """
    from thrifty.ops import _qkernels as K

    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise TypeError(f"fake_quantize_minmax expects a floating-point torch.Tensor, got {type(x).__name__}")
    check_bits(bits)
    if also_bits is not None:
        check_bits(also_bits, "also_bits")
    _check_rounding(rounding)
    if x.numel() == 0:
        raise ValueError("cannot estimate a quantization range from an empty tensor")
    if rounding == "stochastic" and x.numel() > _MAX_HASHED:  # (before the generator is drawn from)
        raise ValueError(f"fake_quantize_minmax: stochastic rounding of a tensor of {x.numel()} elements (shape "
                         f"{tuple(x.shape)}); the hashed uniforms cover at most {_MAX_HASHED} elements per call "
                         f"(the counter is 32 bits), split the tensor")
    with torch.no_grad():
        x = x.detach()
        ax = None if axis is None else _norm_axis(axis, x.dim())
        rows = x.reshape(1, -1) if ax is None else x.movedim(ax, 0).reshape(x.shape[ax], -1)
        lo, hi = rows.amin(1), rows.amax(1)  # NaN propagates into the range: no separate isnan pass
        key = K.draw_key(generator, x.device) if rounding == "stochastic" else 0
        qmax, qmax2 = 2**bits - 1, (2**also_bits - 1 if also_bits is not None else 0)
        if x.device.type == "cpu" and x.dtype == torch.float32 and (ax is None or ax == 0):
            rows = rows.contiguous()
            out = torch.empty_like(rows)
            out2 = torch.empty_like(rows) if also_bits is not None else rows.new_empty((0, 0))
            nearest, stochastic = K.kernels()
            a, l, h, o = rows.numpy(), lo.numpy(), hi.numpy(), out.numpy()
            if rounding == "stochastic":
                ok = stochastic(a, l, h, np.float32(qmax), key, o, np.float32(qmax2), out2.numpy())
            else:
                ok = nearest(a, l, h, np.float32(qmax), o, np.float32(qmax2), out2.numpy())
            if not ok:
                raise ValueError("cannot quantize: input contains NaN or Inf")
        else:
            out, out2 = _fake_quantize_minmax_torch(rows, lo, hi, bits, rounding, key, also_bits)

        def back(t: Tensor) -> Tensor:
            t = t.reshape(x.shape if ax is None else x.movedim(ax, 0).shape)
            return t if ax is None else t.movedim(0, ax)

        return back(out) if also_bits is None else (back(out), back(out2))


def _fake_quantize_minmax_torch(rows: Tensor, lo: Tensor, hi: Tensor, bits: int, rounding: Rounding, key: int,
                                also_bits: Optional[int]) -> tuple[Tensor, Optional[Tensor]]:
    """Reference of the kernels on (rows, n) ``rows`` from torch ops (any device/dtype): the same values on CPU
    float32 (tested bit for bit) and the same uniforms everywhere; on CUDA the scale can differ in its last bit
    (seen on an H200 with the same key), so codes near a rounding boundary may differ by one step."""
    from thrifty.ops import _qkernels as K

    if not bool(torch.isfinite(lo).all() & torch.isfinite(hi).all()):
        raise ValueError("cannot quantize: input contains NaN or Inf")
    s, zp = qparams_from_range(lo, hi, bits)
    s, zp = s.to(rows.device, rows.dtype)[:, None], zp.to(rows.device, rows.dtype)[:, None]
    t = rows / s
    if rounding == "nearest":
        t = torch.round(t)
    else:
        t = torch.floor(t + K.hash_uniform(rows.numel(), key, rows.device).reshape(rows.shape).to(rows.dtype))
    out = (torch.clamp(t + zp, 0, 2**bits - 1) - zp) * s
    if also_bits is None:
        return out, None
    return out, _fake_quantize_minmax_torch(rows, lo, hi, also_bits, "nearest", 0, None)[0]


class QuantizedTensor(NamedTuple):
    """Integer codes with the parameters that map them back: ``x ~ (codes - zero_point) * scale``."""

    codes: Tensor
    scale: Tensor
    zero_point: Tensor
    bits: int
    symmetric: bool
    axis: Optional[int]

    def dequantize(self) -> Tensor:
        return dequantize(self.codes, self.scale, self.zero_point, self.axis)


def _code_dtype(bits: int, symmetric: bool) -> torch.dtype:
    if bits <= 8:
        return torch.int8 if symmetric else torch.uint8
    return torch.int16 if symmetric else torch.int32


def quantize_int(x: Tensor, bits: int, *, symmetric: bool = False, axis: Optional[int] = None,
                 scale: Optional[Tensor] = None, zero_point: Optional[Tensor] = None,
                 rounding: Rounding = "nearest", generator: Optional[torch.Generator] = None,
                 estimator: Estimator = "minmax", **est_kw) -> QuantizedTensor:
    """Real integer quantization (e.g. for int8 ONNX export): codes (uint8/int8 for <= 8 bits), scale, zp.

    Parameters are computed from ``x``'s range unless ``scale`` (and ``zero_point``) are given.
    Example:
        >>> q = quantize_int(torch.tensor([[-1.0, 0.5], [2.0, 4.0]]), 8, axis=0)
        >>> q.codes.dtype, tuple(q.scale.shape)
        (torch.uint8, (2,))
    """
    _check_nan(x)
    _check_rounding(rounding)
    qmin, qmax = qrange(bits, symmetric)
    if scale is None:
        lo, hi = estimate_range(x.detach(), estimator, bits=bits, symmetric=symmetric, axis=axis, **est_kw)
        scale, zero_point = qparams_from_range(lo, hi, bits, symmetric)
    scale = torch.as_tensor(scale, dtype=torch.float32).detach()
    zero_point = torch.zeros_like(scale) if (symmetric or zero_point is None) else \
        torch.round(torch.as_tensor(zero_point, dtype=torch.float32).detach())
    with torch.no_grad():
        t = x.detach().float() / _bcast(scale.to(x.device), x.float(), axis)
        t = torch.round(t) if rounding == "nearest" else stochastic_round(t, generator)
        codes = torch.clamp(t + _bcast(zero_point.to(x.device), x.float(), axis), qmin, qmax)
    return QuantizedTensor(codes.to(_code_dtype(bits, symmetric)), scale, zero_point.to(torch.int32), bits,
                           symmetric, axis)


def dequantize(codes: Tensor, scale: Tensor, zero_point: Tensor, axis: Optional[int] = None) -> Tensor:
    """``(codes - zero_point) * scale`` in float32, broadcasting per-channel parameters along ``axis``."""
    c = codes.to(torch.float32)
    return (c - _bcast(zero_point.float(), c, axis)) * _bcast(scale.float(), c, axis)


def quant_error(x: Tensor, scale: Tensor, zero_point: Tensor | None, bits: int, *, symmetric: bool = False,
                axis: Optional[int] = None, p: float = 2.0) -> Tensor:
    """Sum of ``|x - q(x)|^p`` per channel (a scalar when ``axis`` is None)."""
    with torch.no_grad():
        e = (x - fake_quantize(x, scale, zero_point, bits, symmetric=symmetric, axis=axis)).abs().pow(p)
        if axis is None:
            return e.sum()
        return e.transpose(0, _norm_axis(axis, x.dim())).reshape(x.shape[axis], -1).sum(1)


# ------------------------------------------------------------------------------------- range estimators
def _per_channel(x: Tensor, axis: Optional[int]) -> Tensor:
    """View as (channels, rest) (one row for per-tensor)."""
    if axis is None:
        return x.reshape(1, -1)
    ax = _norm_axis(axis, x.dim())
    return x.movedim(ax, 0).reshape(x.shape[ax], -1)


def _finite(x: Tensor) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"expected a torch.Tensor, got {type(x).__name__}")
    if x.numel() == 0:
        raise ValueError("cannot estimate a quantization range from an empty tensor")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("cannot estimate a quantization range: input contains NaN or Inf")
    return x.detach().float()


def _out(lo: Tensor, hi: Tensor, axis: Optional[int]) -> tuple[Tensor, Tensor]:
    return (lo[0], hi[0]) if axis is None else (lo, hi)


def minmax_range(x: Tensor, axis: Optional[int] = None) -> tuple[Tensor, Tensor]:
    """Min and max of ``x`` (per channel along ``axis``; scalars when ``axis`` is None)."""
    r = _per_channel(_finite(x), axis)
    return _out(r.min(1).values, r.max(1).values, axis)


def sample_minmax_range(x: Tensor, axis: Optional[int] = None, batch_axis: int = 0) -> tuple[Tensor, Tensor]:
    """Mean over samples of the per-sample min and max (robust to one outlier sample); per channel if ``axis``.

    Combine over batches with :func:`ema_range` for the running average of per-sample min/max.
    """
    x = _finite(x)
    b = _norm_axis(batch_axis, x.dim())
    if axis is not None and _norm_axis(axis, x.dim()) == b:
        raise ValueError("axis and batch_axis must differ")
    xs = x.movedim(b, 0)
    n = xs.shape[0]
    if axis is None:
        flat = xs.reshape(n, 1, -1)
    else:
        ax = _norm_axis(axis, x.dim())
        ax = ax + 1 if ax < b else ax  # position once the batch dim is in front
        flat = xs.movedim(ax, 1).reshape(n, xs.shape[ax], -1)
    lo, hi = flat.min(2).values.mean(0), flat.max(2).values.mean(0)
    return _out(lo, hi, axis)


def ema_range(old: Optional[tuple[Tensor, Tensor]], new: tuple[Tensor, Tensor],
              momentum: float = 0.1) -> tuple[Tensor, Tensor]:
    """Exponential running average of ranges: ``old * (1 - momentum) + new * momentum`` (``new`` if no old)."""
    if not 0.0 < momentum <= 1.0:
        raise ValueError(f"momentum must be in (0, 1], got {momentum}")
    if old is None:
        return new
    return (old[0] * (1 - momentum) + new[0] * momentum, old[1] * (1 - momentum) + new[1] * momentum)


def percentile_range(x: Tensor, q: float = 99.99, axis: Optional[int] = None) -> tuple[Tensor, Tensor]:
    """The ``100-q`` and ``q`` percentiles (linear interpolation like numpy's default), per channel if ``axis``."""
    if not 50.0 < q <= 100.0:
        raise ValueError(f"percentile q must be in (50, 100], got {q}")
    r = _per_channel(_finite(x), axis)
    s = r.sort(dim=1).values
    n = s.shape[1]

    def at(p: float) -> Tensor:
        pos = p / 100.0 * (n - 1)
        i0 = int(math.floor(pos))
        i1 = min(i0 + 1, n - 1)
        w = pos - i0
        return s[:, i0] * (1 - w) + s[:, i1] * w

    return _out(at(100.0 - q), at(q), axis)


def mse_range(x: Tensor, bits: int, symmetric: bool = False, axis: Optional[int] = None, grid: int = 100,
              p: float = 2.0, min_shrink: float = 0.05, max_samples: Optional[int] = None) -> tuple[Tensor, Tensor]:
    """Range minimising ``sum |x - q(x)|^p`` over shrunk min/max ranges ``alpha * [min, max]``, per channel.

    A grid search over ``alpha`` in ``[min_shrink, 1]`` (``grid`` points, includes 1 so it never loses to min/max).
    ``max_samples`` evaluates the error on about that many elements per channel (the min/max themselves always
    come from all elements), so a large activation tensor costs no more than that: the ``max_samples // 8``
    largest and smallest elements of each channel exactly, plus a fixed pseudo-random subset of the rest, weighted
    by how many elements each sampled one stands for. The tails must be exact: a shrunk range clips only the
    extreme elements, which a uniform subset of a few per cent rarely contains, so its error would be blind to
    clipping them (at 16 bits it chose to clip the largest 0.01 % of a ReLU6 activation by a third of the range).
    """
    check_bits(bits)
    if grid < 1:
        raise ValueError(f"grid must be >= 1, got {grid}")
    if max_samples is not None and (isinstance(max_samples, bool) or not isinstance(max_samples, int)
                                    or max_samples < 1):
        raise ValueError(f"max_samples must be a positive integer or None, got {max_samples!r}")
    r = _per_channel(_finite(x), axis)
    lo, hi = r.min(1).values, r.max(1).values
    wts: Optional[Tensor] = None  # per-element weights of the error (None: every element counts once)
    n = r.shape[1]
    if max_samples is not None and n > max_samples:
        k = max_samples // 8
        idx = torch.randperm(n, generator=torch.Generator().manual_seed(0))[:max_samples - 2 * k].to(r.device)
        bulk = r[:, idx]
        if k:
            tail = torch.cat([r.topk(k, 1).indices, r.topk(k, 1, largest=False).indices], 1)  # 2k < n: disjoint
            sampled = ~torch.zeros_like(r, dtype=torch.bool).scatter_(1, tail, True)[:, idx]  # bulk not in a tail
            per = (n - 2 * k) / sampled.sum(1, keepdim=True).clamp_min(1)
            wts = torch.cat([torch.ones_like(tail, dtype=r.dtype), sampled * per], 1)
            r = torch.cat([r.gather(1, tail), bulk], 1)
        else:
            r = bulk
    best_err = torch.full_like(lo, float("inf"))
    best_lo, best_hi = lo.clone(), hi.clone()
    for a in torch.linspace(1.0, min_shrink, grid).tolist():
        s, zp = qparams_from_range(lo * a, hi * a, bits, symmetric)
        qmin, qmax = qrange(bits, symmetric)
        q = (torch.clamp(torch.round(r / s[:, None]) + zp[:, None], qmin, qmax) - zp[:, None]) * s[:, None]
        e = (r - q).abs().pow(p)
        err = (e if wts is None else e * wts).sum(1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_lo = torch.where(better, lo * a, best_lo)
        best_hi = torch.where(better, hi * a, best_hi)
    return _out(best_lo, best_hi, axis)


def estimate_range(x: Tensor, estimator: Estimator = "minmax", *, bits: int = 8, symmetric: bool = False,
                   axis: Optional[int] = None, group_size: Optional[int] = None, **kw) -> tuple[Tensor, Tensor]:
    """Dispatch to a range estimator by name: ``minmax``, ``sample_minmax``, ``percentile`` (``q=``), ``mse``.

    With ``group_size`` the ranges are per group, shaped ``(channels, groups)`` (minmax and mse only: the zero
    padding of a short last group does not change the scale/zero point they lead to). Example:
        >>> lo, hi = estimate_range(torch.tensor([[1.0, -2.0, 3.0]]), axis=0, group_size=2)
        >>> lo.tolist(), hi.tolist()
        ([[-2.0, 0.0]], [[1.0, 3.0]])
    """
    if check_group_size(group_size) is not None:
        _need_axis(axis, group_size)
        if estimator not in ("minmax", "mse"):
            raise ValueError(f"per-group ranges (group_size={group_size}) support the minmax and mse estimators, "
                             f"got {estimator!r}")
        g = group_view(_finite(x), axis, group_size)  # type: ignore[arg-type]
        lo, hi = estimate_range(g.reshape(-1, group_size), estimator, bits=bits, symmetric=symmetric, axis=0, **kw)
        return lo.reshape(g.shape[:2]), hi.reshape(g.shape[:2])
    if estimator == "minmax":
        return minmax_range(x, axis)
    if estimator == "sample_minmax":
        if x.dim() < 2:
            return minmax_range(x, axis)
        return sample_minmax_range(x, axis, **kw)
    if estimator == "percentile":
        return percentile_range(x, axis=axis, **kw)
    if estimator == "mse":
        return mse_range(x, bits, symmetric, axis, **kw)
    raise ValueError(f"unknown range estimator {estimator!r}; use minmax, sample_minmax, percentile or mse")
