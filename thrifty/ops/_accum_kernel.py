"""Compiled CPU kernels (numba) for :mod:`thrifty.ops.accum`: the same chunked low-bit accumulation, bit for bit.

Why a kernel: the vectorised torch path makes ~20 passes over an ``(n_chunks, N, O)`` buffer per product
(every rounding is ~8 elementwise tensor ops), so it is memory bound at hundreds of times a float32 GEMM.
Here every output row ``n`` keeps its partial sums ``S[o]`` (one chunk) and totals ``T[o]`` in two length-O
rows; for each term ``k`` one pass over ``o`` does ``p = R_prod(x[n,k] * wT[k,o])``, ``S[o] = R_acc(S[o] + p)``.
That inner loop has no dependence across ``o`` and reads contiguous rows of ``w.T``, so LLVM turns it into a
SIMD loop; the rounding is inlined integer/float IR (:func:`_rnd`), so each step stays in registers.

Rounding (same method as the torch path, see :mod:`thrifty.ops.accum`): with ``E`` the exponent field of ``v``
clamped to ``[lo, hi]`` and ``s = copysign(2^(E + 23 - m), v)`` built from integer bits, ``(v + s) - s`` is
``v`` rounded to the format's grid with float32's round-to-nearest-even. Then overflow: saturation clamps to
``[-max, max]``; IEEE overflow turns ``|t| > max`` into ``copysign(inf, t)``; flush-to-zero turns
``|t| < min_normal`` into +0. NaN fails every comparison and propagates. A format is passed as a tuple
(see ``accum._kernel_params``): ``(lo, hi, shift, max)`` when every format of the call saturates and keeps
subnormals (the common case: 8 vector ops per rounding), else ``(lo, hi, shift, max, lim, ov, mn)`` with the
overflow/flush choices as runtime values. So each kernel has two compiled specialisations in all.
The kernels use ``fastmath=False`` (no reassociation, no fused multiply-add), so every float32 operation is
the one the reference performs.

Rows ``n`` are independent: :func:`run_split` runs row ranges on ``torch.get_num_threads()`` threads (the
kernels release the GIL).
"""
from __future__ import annotations

import numpy as np
import os
from concurrent.futures import ThreadPoolExecutor

from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

__all__ = ["accum_rows", "accum_rows_trace", "masked_grads", "run_split"]


@intrinsic
def _rnd(typingctx, v, fmt):
    """Round float32 ``v`` to the format described by the tuple ``fmt`` (see module docstring)."""
    generic = len(fmt.types) == 7

    def codegen(context, builder, signature, args):
        v, f = args
        lo, hi, shift, mx = (builder.extract_value(f, i) for i in range(4))
        i32, f32 = ir.IntType(32), ir.FloatType()
        # saturation first: R(clamp(v)) == clamp(R(v)) (R is monotone and max is on the grid), and after the
        # clamp the exponent is <= emax, so no upper exponent clamp. Written so that NaN passes through.
        lim = builder.extract_value(f, 4) if generic else mx  # generic: max, or inf (no clamp) for IEEE overflow
        nlim = builder.fneg(lim)
        v = builder.select(builder.fcmp_ordered(">", v, lim), lim, v)
        v = builder.select(builder.fcmp_ordered("<", v, nlim), nlim, v)
        bits = builder.bitcast(v, i32)
        e = builder.and_(bits, ir.Constant(i32, 0x7F800000))
        e = builder.select(builder.icmp_signed("<", e, lo), lo, e)
        if generic:
            e = builder.select(builder.icmp_signed(">", e, hi), hi, e)
        e = builder.add(e, shift)
        s = builder.bitcast(builder.or_(e, builder.and_(bits, ir.Constant(i32, -0x80000000))), f32)
        t = builder.fsub(builder.fadd(v, s), s)
        if generic:
            fabs = builder.module.declare_intrinsic("llvm.fabs", [f32])
            copysign = builder.module.declare_intrinsic("llvm.copysign", [f32], ir.FunctionType(f32, [f32, f32]))
            a = builder.call(fabs, [t])
            ov = builder.call(copysign, [builder.extract_value(f, 5), t])
            t = builder.select(builder.fcmp_ordered(">", a, mx), ov, t)  # IEEE overflow: ov = inf
            # flush to zero (mn = 0 when the format keeps subnormals: never true)
            t = builder.select(builder.fcmp_ordered("<", a, builder.extract_value(f, 6)), ir.Constant(f32, 0.0), t)
        return t

    return types.float32(types.float32, fmt), codegen


@njit(fastmath=False)
def _row(n, x, wt, chunk, pa, pp, po, has_prod, has_outer, y):  # pragma: no cover - compiled
    K = x.shape[1]
    O = wt.shape[1]
    S = np.empty(O, np.float32)
    T = np.zeros(O, np.float32)
    for k0 in range(0, max(K, 1), chunk):
        S[:] = 0
        for k in range(k0, min(k0 + chunk, K)):
            xv = x[n, k]
            if has_prod:
                for o in range(O):
                    S[o] = _rnd(S[o] + _rnd(xv * wt[k, o], pp), pa)
            else:
                for o in range(O):
                    S[o] = _rnd(S[o] + xv * wt[k, o], pa)
        if has_outer:
            for o in range(O):
                T[o] = _rnd(T[o] + S[o], po)
        else:
            for o in range(O):
                T[o] = T[o] + S[o]
    for o in range(O):
        y[n, o] = T[o]


@njit(fastmath=False)
def _row_trace(n, x, wt, chunk, pa, pp, po, has_prod, has_outer, y, keep):  # pragma: no cover - compiled
    K = x.shape[1]
    O = wt.shape[1]
    nc = keep.shape[1]
    S = np.empty(O, np.float32)
    T = np.zeros(O, np.float32)
    gone = np.zeros((nc, O), np.bool_)  # chunk i's sum was swamped in output o (or o saturated, see below)
    n_gone = 0
    for i in range(nc):
        S[:] = 0
        for j in range(chunk):
            k = i * chunk + j
            kr = keep[j, i, n]
            if k >= K:  # padding of the last chunk: a zero product, never lost by itself
                kr[:] = True
                continue
            xv = x[n, k]
            # a zero product (x = 0 after ReLU) is not "lost": its gradient w.r.t. x is still w * dy
            if has_prod:
                for o in range(O):
                    raw = xv * wt[k, o]
                    p = _rnd(raw, pp)
                    old = S[o]
                    s = _rnd(old + p, pa)
                    S[o] = s
                    kr[o] = not ((raw != 0) & ((p == 0) | (s == old)))
            else:
                for o in range(O):
                    raw = xv * wt[k, o]
                    old = S[o]
                    s = _rnd(old + raw, pa)
                    S[o] = s
                    kr[o] = not ((raw != 0) & (s == old))
        g = gone[i]
        for o in range(O):
            old_t = T[o]
            t = _rnd(old_t + S[o], po) if has_outer else old_t + S[o]
            T[o] = t
            g[o] = (t == old_t) & (S[o] != 0)
            n_gone += g[o]
    for o in range(O):
        y[n, o] = T[o]
    if has_outer:  # saturated or infinite outputs pass no gradient
        for o in range(O):
            if abs(T[o]) >= po[3]:
                gone[:, o] = True
                n_gone += 1
    if n_gone:
        for i in range(nc):
            g = gone[i]
            for j in range(chunk):
                kr = keep[j, i, n]
                for o in range(O):
                    kr[o] = kr[o] & ~g[o]


@njit(cache=True, fastmath=False, nogil=True)
def accum_rows(x, wt, chunk, pa, pp, po, has_prod, has_outer, y, n0, n1):  # pragma: no cover - compiled
    """``y[n, o]`` for rows ``n0 <= n < n1``: chunked low-bit accumulation of ``x[n, :] * wt[:, o]``."""
    for n in range(n0, n1):
        _row(n, x, wt, chunk, pa, pp, po, has_prod, has_outer, y)


@njit(cache=True, fastmath=False, nogil=True)
def accum_rows_trace(x, wt, chunk, pa, pp, po, has_prod, has_outer, y, keep, n0, n1):  # pragma: no cover
    """:func:`accum_rows` that also fills ``keep[j, i, n, o]`` (term ``k = i*chunk + j``) as AccumTrace does."""
    for n in range(n0, n1):
        _row_trace(n, x, wt, chunk, pa, pp, po, has_prod, has_outer, y, keep)


@njit(cache=True, fastmath={"reassoc", "nsz", "arcp", "contract"}, nogil=True)
def masked_grads(keep, x, wt, dyx, dyw, need_dx, need_dw, dx, dwt, k0, k1):  # pragma: no cover - compiled
    """For ``k0 <= k < k1``: ``dx[n,k] = sum_o keep*dyx[n,o]*w[o,k]``, ``dwt[k,o] = sum_n keep*dyw[n,o]*x[n,k]``."""
    c, nc, N, O = keep.shape
    for k in range(k0, k1):
        i, j = k // c, k % c
        if need_dx:
            for n in range(N):
                kr = keep[j, i, n]
                acc = np.float32(0)
                for o in range(O):
                    acc += dyx[n, o] * wt[k, o] if kr[o] else np.float32(0)
                dx[n, k] = acc
        if need_dw:
            dr = dwt[k]
            dr[:] = 0
            for n in range(N):
                kr = keep[j, i, n]
                xv = x[n, k]
                for o in range(O):
                    dr[o] += dyw[n, o] * xv if kr[o] else np.float32(0)


_POOLS: dict[tuple[int, int], ThreadPoolExecutor] = {}


def run_split(fn, total: int, threads: int, *args) -> None:
    """Call ``fn(*args, a, b)`` on ranges ``[a, b)`` splitting ``range(total)`` over ``threads`` threads.

    The kernels release the GIL (``nogil``), so a plain thread pool runs them in parallel; unlike numba's
    ``parallel=True`` this does not touch the process-wide OpenMP settings torch uses, and compiles faster.
    """
    threads = max(1, min(threads, total))
    if threads == 1:
        fn(*args, 0, total)
        return
    key = (os.getpid(), threads)  # a forked child has the pool object but not its threads: make a new one
    pool = _POOLS.get(key)
    if pool is None:
        pool = _POOLS[key] = ThreadPoolExecutor(threads - 1, thread_name_prefix="thrifty-accum")
    bounds = [total * i // threads for i in range(threads + 1)]
    futures = [pool.submit(fn, *args, bounds[i], bounds[i + 1]) for i in range(1, threads)]
    fn(*args, bounds[0], bounds[1])  # the calling thread takes the first part
    for f in futures:
        f.result()
