"""Simulated low-bit floating-point accumulation (pure tensor math, no modules).

A multiply-accumulate unit with a narrow floating-point accumulator computes ``y = sum_k x_k * w_k`` as

    p_k = R_prod(x_k (*) w_k)                        each product rounded to the product format
    S   = R_acc(S (+) p_k)   for k in a chunk        partial sum rounded after *every* addition
    T   = R_out(T (+) S_c)   for each chunk c        the chunk sums accumulated the same way

where ``(*)``/``(+)`` are float32 operations and ``R_f`` rounds to the format ``f``. ``K`` is split into
chunks of ``chunk`` consecutive terms (the last chunk is partial when ``chunk`` does not divide ``K``).

Formats (:class:`FloatFormat`): sign, ``exp_bits`` exponent bits, ``man_bits`` mantissa bits and an exponent
``bias``. No exponent code is reserved: codes ``1 .. 2^e - 1`` are normal numbers, code 0 holds subnormals (or
only zero with ``subnormals=False``). So ``emax = 2^e - 1 - bias``, ``emin = 1 - bias``, the largest value is
``(2 - 2^-m) 2^emax`` and the subnormal step is ``2^(emin - m)``. Rounding is round-to-nearest, ties to even.

* overflow: ``"saturate"`` clamps every result beyond the largest value (including +-inf) to +-max;
  ``"inf"`` turns it into +-inf (IEEE rule: overflow when the value rounded with unbounded exponent exceeds max).
* ``subnormals=False`` (flush to zero): a result that, rounded on the subnormal grid, is below ``2^emin``
  becomes 0.
* ``underflow=False``: the exponent is unbounded below (float32's own limit), so small values keep ``m`` bits;
  stage 1 of the accumulator fine-tuning recipe uses it.
* NaN inputs propagate as NaN; zeros are returned as +0.
* The default ``bias`` is ``2^(e-1) - 1``. :func:`bias_for_chunk` shifts it by ``ceil(log2(chunk))`` so that a
  chunk of maximal products cannot overflow the accumulator (our reading of "the bias depends on the chunk
  size").

How rounding is computed (:func:`round_to_format`): for float32 ``x`` with exponent ``E`` (clamped to
``[emin, emax]``), ``s = copysign(2^(E + 23 - m), x)``; then ``(x + s) - s`` is exactly ``x`` rounded to a
multiple of ``2^(E - m)`` with float32's own round-to-nearest-even (the sum lies in the binade of ``s``, whose ulp
is ``2^(E - m)``; the subtraction is exact). ``s`` is built from the bits of ``x`` with integer operations.
That needs ``1 <= m <= 22`` and a range inside float32 (``emax <= 100``, ``emin - m >= -126``); other formats
are refused with ValueError.

Exactness: the simulation uses float32 adds/multiplies before each rounding. When the accumulator and
product formats satisfy ``m_acc + m_prod <= 18`` every float32 sum of two in-format operands is close enough
to the exact sum that the rounded result equals the rounding of the exact sum (a gap large enough for float32
to round means the smaller operand is below a quarter of the accumulator's ulp); ``tests/test_ops_accum.py``
checks this against exact rational arithmetic. :func:`accumulate` equals the sequential
:func:`accumulate_reference` bit for bit for every format, with either backend: a compiled numba kernel for CPU
tensors (:mod:`thrifty.ops._accum_kernel`, ~18 SIMD ops per product, a few times a float32 GEMM) or the
vectorised torch path (any device; ~20 memory-bound tensor passes per product, hundreds of times a GEMM).

Example:
    >>> import torch
    >>> f = FloatFormat(4, 3)                       # 8-bit e4m3, bias 7
    >>> round_to_format(torch.tensor([1.0625, 1.1875, 1e6]), f).tolist()
    [1.0, 1.25, 480.0]
    >>> x, w = torch.ones(1, 64), torch.full((1, 64), 0.1)
    >>> float(accumulate(x, w, FloatFormat(4, 3), chunk=16))  # 64 * 0.1 = 6.4, far off with 3 mantissa bits
    7.5
"""
from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass, replace
from fractions import Fraction
from typing import Literal, NamedTuple, Optional, Union

import numpy as np
import torch
from torch import Tensor

__all__ = ["FloatFormat", "bias_for_chunk", "round_to_format", "round_scalar", "accumulate", "accumulate_reference",
           "AccumTrace", "trace_grads", "representable_values", "FP32"]

Overflow = Literal["saturate", "inf"]
_EXP_MASK = 0x7F800000


@dataclass(frozen=True)
class FloatFormat:
    """A simulated floating-point format: ``exp_bits`` exponent bits, ``man_bits`` mantissa bits (+ sign).

    ``bias=None`` means the IEEE-style ``2^(exp_bits-1) - 1``. See the module docstring for the semantics.
    Example:
        >>> FloatFormat(4, 7).bits, FloatFormat(4, 7).max
        (12, 510.0)
    """

    exp_bits: int
    man_bits: int
    bias: Optional[int] = None
    subnormals: bool = True
    overflow: Overflow = "saturate"
    underflow: bool = True

    def __post_init__(self) -> None:
        for name in ("exp_bits", "man_bits"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"FloatFormat.{name} must be an int, got {v!r}")
        if self.bias is not None and (isinstance(self.bias, bool) or not isinstance(self.bias, int)):
            raise TypeError(f"FloatFormat.bias must be an int or None, got {self.bias!r}")
        if self.man_bits < 1:
            raise ValueError(f"FloatFormat: man_bits={self.man_bits}; at least 1 mantissa bit is required "
                             "(a 0-bit mantissa has no round-to-nearest-even tie rule)")
        if self.man_bits > 22:
            raise ValueError(f"FloatFormat: man_bits={self.man_bits} > 22 cannot be simulated on float32")
        if not 1 <= self.exp_bits <= 8:
            raise ValueError(f"FloatFormat: exp_bits={self.exp_bits} must be in 1..8")
        if self.overflow not in ("saturate", "inf"):
            raise ValueError(f"FloatFormat: overflow must be 'saturate' or 'inf', got {self.overflow!r}")
        if self.emax > 100 or self.emin - self.man_bits < -126:
            raise ValueError(
                f"FloatFormat(e={self.exp_bits}, m={self.man_bits}, bias={self.bias_value}): exponents "
                f"[{self.emin}, {self.emax}] do not fit a float32 simulation (need emax <= 100 and "
                f"emin - m >= -126); use fewer exponent bits or another bias")

    @property
    def bias_value(self) -> int:
        return 2 ** (self.exp_bits - 1) - 1 if self.bias is None else self.bias

    @property
    def emax(self) -> int:
        return 2**self.exp_bits - 1 - self.bias_value

    @property
    def emin(self) -> int:
        """Exponent of the smallest normal number."""
        return 1 - self.bias_value

    @property
    def emin_eff(self) -> int:
        """The lowest exponent used for rounding: ``emin``, or float32's -126 with ``underflow=False``."""
        return self.emin if self.underflow else -126

    @property
    def bits(self) -> int:
        return 1 + self.exp_bits + self.man_bits

    @property
    def max(self) -> float:
        return (2.0 - 2.0 ** -self.man_bits) * 2.0**self.emax

    @property
    def min_normal(self) -> float:
        return 2.0**self.emin

    def replace(self, **kw) -> "FloatFormat":
        return replace(self, **kw)

    def __str__(self) -> str:
        extra = "" if self.bias is None else f" bias={self.bias}"
        return f"e{self.exp_bits}m{self.man_bits}{extra}"


FP32 = None  # "no rounding": products or outer sums kept in float32


def bias_for_chunk(exp_bits: int, chunk: int, prod_bias: Optional[int] = None) -> int:
    """Accumulator bias so that ``chunk`` products of the product format's range cannot overflow a chunk.

    ``bias = prod_bias - ceil(log2(chunk))`` (``prod_bias`` defaults to ``2^(e-1) - 1``). Example:
        >>> bias_for_chunk(4, 16)
        3
    """
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    b = 2 ** (exp_bits - 1) - 1 if prod_bias is None else prod_bias
    return b - math.ceil(math.log2(chunk))


# -------------------------------------------------------------------------------------------- rounding
def _consts(fmt: FloatFormat) -> tuple[int, int, int]:
    lo = (fmt.emin_eff + 127) << 23
    hi = (fmt.emax + 127) << 23
    return lo, hi, (23 - fmt.man_bits) << 23


def _round_(t: Tensor, fmt: FloatFormat, tmp: Tensor) -> Tensor:
    """Round float32 ``t`` to ``fmt`` in place; ``tmp`` is an int32 scratch tensor of the same shape."""
    lo, hi, shift = _consts(fmt)
    torch.bitwise_and(t.view(torch.int32), _EXP_MASK, out=tmp)
    tmp.clamp_(lo, hi).add_(shift)
    s = tmp.view(torch.float32)
    torch.copysign(s, t, out=s)
    t.add_(s).sub_(s)
    if fmt.overflow == "saturate":
        t.clamp_(-fmt.max, fmt.max)
    else:
        big = t.abs() > fmt.max
        t.masked_fill_(big & (t > 0), math.inf).masked_fill_(big & (t < 0), -math.inf)
    if not fmt.subnormals and fmt.underflow:
        t.masked_fill_(t.abs() < fmt.min_normal, 0.0)
    return t


def round_to_format(x: Tensor, fmt: Optional[FloatFormat]) -> Tensor:
    """Round every element of ``x`` to ``fmt`` (nearest, ties to even); float32 out, ``x`` is not modified.

    ``fmt=None`` returns ``x`` as float32. Example:
        >>> round_to_format(torch.tensor([0.3]), FloatFormat(3, 2)).tolist()
        [0.3125]
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"round_to_format expects a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"round_to_format expects a floating-point tensor, got {x.dtype}")
    t = x.detach().to(torch.float32, copy=True).contiguous()
    if fmt is None:
        return t
    return _round_(t, fmt, torch.empty(t.shape, dtype=torch.int32, device=t.device))


def round_scalar(v: float, fmt: Optional[FloatFormat]) -> float:
    """Reference rounding of one number with exact rational arithmetic (independent of :func:`round_to_format`).

    Example:
        >>> round_scalar(1.0625, FloatFormat(4, 3)), round_scalar(1.1875, FloatFormat(4, 3))
        (1.0, 1.25)
    """
    v = float(v)
    if fmt is None:
        return float(np.float32(v))
    if math.isnan(v):
        return math.nan
    if math.isinf(v):
        return math.copysign(fmt.max if fmt.overflow == "saturate" else math.inf, v)
    if v == 0.0:
        return 0.0
    e = math.frexp(abs(v))[1] - 1  # |v| in [2^e, 2^(e+1))
    q = Fraction(2) ** (max(e, fmt.emin_eff) - fmt.man_bits)
    r = round(Fraction(v) / q) * q  # Python's round() on a Fraction: half to even
    if abs(r) > Fraction(fmt.max):
        return math.copysign(fmt.max if fmt.overflow == "saturate" else math.inf, v)
    if not fmt.subnormals and fmt.underflow and abs(r) < Fraction(fmt.min_normal):
        return 0.0
    return float(r) if r != 0 else 0.0


def representable_values(fmt: FloatFormat) -> list[tuple[float, int]]:
    """All finite non-negative values of ``fmt`` with their mantissa code (for brute-force tests; small formats).

    Example:
        >>> [v for v, _ in representable_values(FloatFormat(1, 1))]  # bias 0: subnormal 1, normal 2 and 3
        [0.0, 1.0, 2.0, 3.0]
    """
    if fmt.exp_bits > 5 or fmt.man_bits > 6:
        raise ValueError("representable_values enumerates small formats only (exp_bits <= 5, man_bits <= 6)")
    out = [(0.0, 0)]
    if fmt.subnormals or not fmt.underflow:
        out += [(k * 2.0 ** (fmt.emin - fmt.man_bits), k) for k in range(1, 2**fmt.man_bits)]
    for code in range(1, 2**fmt.exp_bits):
        for k in range(2**fmt.man_bits):
            out.append(((1 + k / 2**fmt.man_bits) * 2.0 ** (code - fmt.bias_value), k))
    return out


# ---------------------------------------------------------------------------------------- accumulation
class AccumTrace(NamedTuple):
    """Which products were lost in :func:`accumulate` (``keep=False``), for fine-grained gradients.

    ``keep`` has shape ``(chunk, n_chunks, N, O)``: term ``k = i * chunk + j`` of output ``(n, o)`` is
    ``keep[j, i, n, o]``. Lost means: its product underflowed to 0, or adding it left the partial sum unchanged
    (swamping), or its chunk sum was swamped in the outer accumulation, or the output saturated/overflowed.
    """

    keep: Tensor
    chunk: int
    K: int


# numba is a dependency (imported lazily: it is slow to import); without it "auto" falls back to the torch path
_HAS_NUMBA = importlib.util.find_spec("numba") is not None

Outer = Union[FloatFormat, None, Literal["same"]]
Backend = Literal["auto", "numba", "torch"]


def _use_kernel(backend: str, what: str, *tensors: Tensor) -> bool:
    """Whether ``backend`` picks the compiled kernel for ``tensors`` ("auto": numba for CPU tensors)."""
    if backend not in ("auto", "numba", "torch"):
        raise ValueError(f"{what}: backend must be 'auto', 'numba' or 'torch', got {backend!r}")
    on_cpu = all(t.device.type == "cpu" for t in tensors)
    if backend == "numba" and not on_cpu:
        raise ValueError(f"{what}: backend='numba' needs CPU tensors")
    return backend == "numba" or (backend == "auto" and on_cpu and _HAS_NUMBA)
_BLOCK = 1 << 22  # elements per working buffer before accumulate() splits the rows


def _check_operands(x: Tensor, w: Tensor, chunk: Optional[int]) -> tuple[int, int, int, int]:
    if not isinstance(x, Tensor) or not isinstance(w, Tensor):
        raise TypeError("accumulate expects torch tensors x (N, K) and w (O, K)")
    if x.dim() != 2 or w.dim() != 2 or x.shape[1] != w.shape[1]:
        raise ValueError(f"accumulate expects x (N, K) and w (O, K) with the same K; got {tuple(x.shape)} and "
                         f"{tuple(w.shape)}")
    K = x.shape[1]
    if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
        raise ValueError(f"chunk must be a positive int or None (one chunk of K terms), got {chunk!r}")
    c = K if chunk is None else min(chunk, max(K, 1))
    return x.shape[0], w.shape[0], K, max(c, 1)


def accumulate(x: Tensor, w: Tensor, acc: FloatFormat, prod: Optional[FloatFormat] = None,
               chunk: Optional[int] = 16, outer: Outer = "same", trace: bool = False, backend: Backend = "auto"
               ) -> Union[Tensor, tuple[Tensor, AccumTrace]]:
    """``x @ w.T`` (shapes (N, K), (O, K) -> (N, O)) with simulated low-bit accumulation.

    Args:
        acc: accumulator format (partial sums rounded after every addition).
        prod: product format (None: products are the float32 products).
        chunk: terms per chunk (None: one chunk of all K terms); the last chunk may be partial.
        outer: format of the accumulation across chunks: ``"same"`` as ``acc``, None for float32, or a format.
        trace: also return an :class:`AccumTrace` marking the lost products.
        backend: ``"numba"`` (compiled CPU kernel, :mod:`thrifty.ops._accum_kernel`), ``"torch"`` (vectorised
            tensor ops; any device) or ``"auto"`` (numba for CPU tensors). Both give identical bits.
    Equals :func:`accumulate_reference` bit for bit. Example:
        >>> accumulate(torch.ones(2, 3), torch.ones(4, 3), FloatFormat(4, 3)).shape
        torch.Size([2, 4])
    """
    N, O, K, c = _check_operands(x, w, chunk)
    if _use_kernel(backend, "accumulate", x, w):
        return _accumulate_numba(x, w, acc, prod, c, acc if outer == "same" else outer, trace)
    nc = max(1, -(-K // c))
    rows = max(1, _BLOCK // max(1, O * nc))
    if N > rows:  # bound the working set (~_BLOCK floats per buffer): rows are independent
        parts = [accumulate(x[i:i + rows], w, acc, prod, chunk, outer, trace, "torch") for i in range(0, N, rows)]
        if not trace:
            return torch.cat(parts)  # type: ignore[arg-type]
        return (torch.cat([p[0] for p in parts]),
                AccumTrace(torch.cat([p[1].keep for p in parts], 2), c, K))  # type: ignore[index]
    out_fmt = acc if outer == "same" else outer
    x = x.detach().to(torch.float32)
    w = w.detach().to(torch.float32)
    pad = nc * c - K
    if pad:
        x = torch.nn.functional.pad(x, (0, pad))
        w = torch.nn.functional.pad(w, (0, pad))
    xt = x.reshape(N, nc, c).permute(2, 1, 0).contiguous()  # (c, nc, N): term j of every chunk
    wt = w.reshape(O, nc, c).permute(2, 1, 0).contiguous()  # (c, nc, O)
    S = torch.zeros(nc, N, O, dtype=torch.float32, device=x.device)
    p = torch.empty_like(S)
    tmp = torch.empty(S.shape, dtype=torch.int32, device=x.device)
    keep = torch.ones(c, nc, N, O, dtype=torch.bool, device=x.device) if trace else None
    first_pad = c - pad  # in the last chunk, terms j >= first_pad are padding (forced to 0, never inf*0)
    for j in range(c):
        torch.mul(xt[j][:, :, None], wt[j][:, None, :], out=p)
        if j >= first_pad:
            p[-1].zero_()
        if trace:
            nonzero = p != 0
        if prod is not None:
            _round_(p, prod, tmp)
        if trace:
            old = S.clone()
        S.add_(p)
        _round_(S, acc, tmp)
        if trace:
            assert keep is not None
            # a zero product (x = 0 after ReLU) is not "lost": its gradient w.r.t. x is still w * dy
            keep[j] = ~(nonzero & ((p == 0) | (S == old)))
    T = torch.zeros(N, O, dtype=torch.float32, device=x.device)
    tmp2 = torch.empty(T.shape, dtype=torch.int32, device=x.device)
    for i in range(nc):
        old_t = T.clone() if trace else None
        T.add_(S[i])
        if out_fmt is not None:
            _round_(T, out_fmt, tmp2)
        if trace:
            assert keep is not None
            keep[:, i] &= ~((T == old_t) & (S[i] != 0))
    if not trace:
        return T
    assert keep is not None
    if out_fmt is not None:
        keep &= ~(T.abs() >= out_fmt.max)  # saturated or infinite outputs pass no gradient (like a clamp)
    return T, AccumTrace(keep, c, K)


def _kernel_params(fmt: FloatFormat, generic: bool) -> tuple:
    """The kernel's format tuple: ``(lo, hi, shift, max)`` or, ``generic``, ``+ (lim, ov, mn)``."""
    lo, hi, shift = _consts(fmt)
    head = (np.int32(lo), np.int32(hi), np.int32(shift), np.float32(fmt.max))
    if not generic:
        return head
    sat = fmt.overflow == "saturate"
    mn = fmt.min_normal if (not fmt.subnormals and fmt.underflow) else 0.0
    return head + (np.float32(fmt.max if sat else np.inf), np.float32(fmt.max if sat else np.inf), np.float32(mn))


def _accumulate_numba(x: Tensor, w: Tensor, acc: FloatFormat, prod: Optional[FloatFormat], c: int,
                      out_fmt: Optional[FloatFormat], trace: bool) -> Union[Tensor, tuple[Tensor, AccumTrace]]:
    from thrifty.ops import _accum_kernel as kern

    xs = x.detach().to(torch.float32).contiguous().numpy()
    wt = w.detach().to(torch.float32).t().contiguous().numpy()  # (K, O): the kernel's inner loop runs over O
    N, K = xs.shape
    O = wt.shape[1]
    y = np.empty((N, O), dtype=np.float32)
    fmts = [f for f in (acc, prod, out_fmt) if f is not None]
    generic = any(f.overflow != "saturate" or (not f.subnormals and f.underflow) for f in fmts)
    pa = _kernel_params(acc, generic)
    # an absent product/outer format reuses acc's tuple (unused), so it adds no compiled specialisation
    args = (xs, wt, c, pa, pa if prod is None else _kernel_params(prod, generic),
            pa if out_fmt is None else _kernel_params(out_fmt, generic), prod is not None, out_fmt is not None, y)
    threads = torch.get_num_threads()
    if not trace:
        kern.run_split(kern.accum_rows, N, threads, *args)
        return torch.from_numpy(y)
    keep = np.empty((c, max(1, -(-K // c)), N, O), dtype=np.bool_)
    kern.run_split(kern.accum_rows_trace, N, threads, *args, keep)
    return torch.from_numpy(y), AccumTrace(torch.from_numpy(keep), c, K)


def trace_grads(tr: AccumTrace, x: Tensor, w: Tensor, dy_x: Tensor, dy_w: Tensor,
                needs: tuple[bool, bool] = (True, True), backend: Backend = "auto"
                ) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """Masked gradients of ``y = x @ w.T`` through a trace: lost terms pass no gradient.

    ``dx[n,k] = sum_o keep[n,o,k] dy_x[n,o] w[o,k]`` and ``dw[o,k] = sum_n keep[n,o,k] dy_w[n,o] x[n,k]`` (float32;
    the summation order is unspecified). ``backend`` as in :func:`accumulate` (``"torch"``: batched matmuls).
    Example:
        >>> x, w = torch.ones(2, 3), torch.ones(4, 3)
        >>> y, tr = accumulate(x, w, FloatFormat(4, 3), trace=True)
        >>> trace_grads(tr, x, w, torch.ones(2, 4), torch.ones(2, 4))[0].tolist()
        [[4.0, 4.0, 4.0], [4.0, 4.0, 4.0]]
    """
    c, K = tr.chunk, tr.K
    _, nc, N, O = tr.keep.shape
    if x.shape != (N, K) or w.shape != (O, K) or dy_x.shape != (N, O) or dy_w.shape != (N, O):
        raise ValueError(f"trace_grads: shapes x {tuple(x.shape)}, w {tuple(w.shape)}, dy {tuple(dy_x.shape)} do not "
                         f"match the trace (N={N}, O={O}, K={K})")
    x, w, dy_x, dy_w = (t.detach().to(torch.float32) for t in (x, w, dy_x, dy_w))
    if _use_kernel(backend, "trace_grads", tr.keep, x, w, dy_x, dy_w):
        from thrifty.ops import _accum_kernel as kern

        dx = np.zeros((N, K), np.float32)
        dwt = np.zeros((K, O), np.float32)
        kern.run_split(kern.masked_grads, K, torch.get_num_threads(), tr.keep.contiguous().numpy(),
                       x.contiguous().numpy(), w.t().contiguous().numpy(), dy_x.contiguous().numpy(),
                       dy_w.contiguous().numpy(), bool(needs[0]), bool(needs[1]), dx, dwt)
        return (torch.from_numpy(dx) if needs[0] else None), (torch.from_numpy(dwt).t().contiguous() if needs[1] else None)
    pad = nc * c - K
    gx = gw = None
    if needs[0]:
        wt = torch.nn.functional.pad(w, (0, pad)).reshape(O, nc, c).permute(2, 1, 0).reshape(c * nc, O, 1)
        a = (tr.keep * dy_x).reshape(c * nc, N, O)
        gx = torch.bmm(a, wt).reshape(c, nc, N).permute(2, 1, 0).reshape(N, nc * c)[:, :K]
    if needs[1]:
        xt = torch.nn.functional.pad(x, (0, pad)).reshape(N, nc, c).permute(2, 1, 0).reshape(c * nc, N, 1)
        a = (tr.keep * dy_w).reshape(c * nc, N, O).transpose(1, 2)
        gw = torch.bmm(a, xt).reshape(c, nc, O).permute(2, 1, 0).reshape(O, nc * c)[:, :K]
    return gx, gw


def accumulate_reference(x: Tensor, w: Tensor, acc: FloatFormat, prod: Optional[FloatFormat] = None,
                         chunk: Optional[int] = 16, outer: Outer = "same") -> Tensor:
    """The same computation as :func:`accumulate`, one scalar at a time (slow; for tests).

    Uses numpy float32 for the products and sums and :func:`round_scalar` (exact rationals) for rounding.
    Example:
        >>> accumulate_reference(torch.ones(1, 3), torch.ones(1, 3), FloatFormat(4, 3)).tolist()
        [[3.0]]
    """
    N, O, K, c = _check_operands(x, w, chunk)
    out_fmt = acc if outer == "same" else outer
    xs = x.detach().to(torch.float32).cpu().numpy()
    ws = w.detach().to(torch.float32).cpu().numpy()
    y = np.zeros((N, O), dtype=np.float32)
    f32 = np.float32
    with np.errstate(all="ignore"):
        for n in range(N):
            for o in range(O):
                total = f32(0.0)
                for c0 in range(0, max(K, 1), c):
                    s = f32(0.0)
                    for k in range(c0, min(c0 + c, K)):
                        p = f32(round_scalar(float(xs[n, k] * ws[o, k]), prod))
                        s = f32(round_scalar(float(s + p), acc))
                    total = f32(round_scalar(float(total + s), out_fmt))
                y[n, o] = total
    return torch.from_numpy(y)
