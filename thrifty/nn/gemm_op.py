"""What GEMM a wrapped layer computes, its slot interfaces, and the autograd Function where dY is transformed.

How each kind's weight maps to the GEMM's ``[out, reduction]`` matrix:

One :class:`GemmOp` per layer kind. Slot transforms see the weight in the layer's own layout; the methods
here say where the output channels and the reduction are in that layout, so that a per-channel quantizer,
an N:M mask or a low-bit accumulator means the same thing for every kind:

====================  ====================  ===============  ==========================================
kind                  stored weight         out axis         reduction (what N:M blocks run along)
====================  ====================  ===============  ==========================================
linear                ``[out, in]``         0                ``in``
linear_t              ``[in, out]``         1                ``in`` (transformers' GPT-2 ``Conv1D``)
conv1d / conv2d       ``[out, in/g, *k]``   0                ``in/g`` at each kernel position
conv_transpose1d/2d   ``[in, out/g, *k]``   1 (groups = 1)   ``in`` (dim 0, per group) at each position
embedding             ``[num, dim]``        rows (per row)   none: a lookup (weight slot only)
====================  ====================  ===============  ==========================================

A transposed convolution is the input-gradient GEMM of a convolution whose weight it stores: each output
sums ``x[ci] * w[ci, co, k]`` over the input channels ``ci`` (the stored dim 0) and the kernel taps, so its
reduction is dim 0 of the stored weight, not dim 1.

Example:
    >>> import torch
    >>> op = GemmOp("conv_transpose2d", (2, 2), (0, 0), (1, 1), 1)
    >>> tuple(op.gemm_weight(torch.zeros(8, 3, 2, 2)).shape)  # [out, reduction channels, kh, kw]
    (3, 8, 2, 2)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

__all__ = ["GemmOp", "KINDS", "MATMULS", "SlotRefused", "GradTransform", "Accumulator", "Chain", "Slots", "GemmFunction",
           "SLOT_NAMES", "conv_padding"]

SLOT_NAMES = ("weight", "input", "grad_output", "accumulator")

KINDS = ("linear", "linear_t", "conv1d", "conv2d", "conv_transpose1d", "conv_transpose2d", "embedding", "matmul", "bmm")
MATMULS = ("matmul", "bmm")  # activation-activation GEMMs: y = a @ b^T, b in the weight layout [..., out, reduction]
_SPATIAL = {"conv1d": 1, "conv2d": 2, "conv_transpose1d": 1, "conv_transpose2d": 2}
_FUNCS = {"conv1d": F.conv1d, "conv2d": F.conv2d}
_TFUNCS = {"conv_transpose1d": F.conv_transpose1d, "conv_transpose2d": F.conv_transpose2d}


class SlotRefused(TypeError):
    """A layer kind has no meaningful transform for one slot (e.g. an embedding's input: integer ids)."""


@dataclass(frozen=True)
class GemmOp:
    """What GEMM a layer computes (see the module docstring for the kinds).

    ``options`` holds nn.Embedding's lookup arguments (padding_idx, max_norm, norm_type,
    scale_grad_by_freq, sparse).
    """

    kind: str  # one of KINDS
    stride: tuple[int, ...] = (1, 1)
    padding: tuple[int, ...] | str = (0, 0)
    dilation: tuple[int, ...] = (1, 1)
    groups: int = 1
    output_padding: tuple[int, ...] = (0, 0)
    options: tuple[Any, ...] = ()

    def __call__(self, x: Tensor, w: Tensor, bias: Optional[Tensor]) -> Tensor:
        """The layer's own float GEMM, the same torch ops its original forward runs (so bit-identical)."""
        k = self.kind
        if k == "linear":
            return F.linear(x, w, bias)
        if k == "linear_t":  # transformers.pytorch_utils.Conv1D.forward, op for op
            size_out = x.size()[:-1] + (w.shape[1],)
            x2 = x.view(-1, x.size(-1))
            return (torch.addmm(bias, x2, w) if bias is not None else torch.mm(x2, w)).view(size_out)
        if k in _FUNCS:
            return _FUNCS[k](x, w, bias, self.stride, self.padding, self.dilation, self.groups)
        if k in _TFUNCS:
            return _TFUNCS[k](x, w, bias, self.stride, self.padding, self.output_padding, self.groups, self.dilation)
        if k == "bmm":  # F.multi_head_attention_forward's ops
            return torch.bmm(x, w.transpose(-2, -1)) if bias is None else torch.baddbmm(bias, x, w.transpose(-2, -1))
        if k == "matmul":  # transformers' eager attention
            y = torch.matmul(x, w.transpose(-2, -1))
            return y if bias is None else y + bias
        return F.embedding(x, w, *self.options)

    # ------------------------------------------------------------------------------- layout facts
    @property
    def spatial(self) -> int:
        """Number of spatial dims (0 for linear kinds and embeddings)."""
        return _SPATIAL.get(self.kind, 0)

    @property
    def transposed(self) -> bool:
        return self.kind.startswith("conv_transpose")

    @property
    def channel_dim(self) -> int:
        """The channel dim of the layer's input and output tensors (reduction of X, output features of Y)."""
        return 1 if self.spatial else -1

    @property
    def out_axis(self) -> Optional[int]:
        """The stored weight's output-channel axis (per-channel quantization), None where there is none.

        A grouped transposed conv has none: its output channel ``g * (out/g) + j`` is spread over dim 0
        (group) and dim 1 (``j``). An embedding's per-row axis is 0 (one scale per table row).
        """
        if self.kind == "linear_t":
            return 1
        if self.kind in MATMULS:  # an activation: one range per tensor
            return None
        if self.transposed:
            return 1 if self.groups == 1 else None
        return 0

    @property
    def weight_grad_dim(self) -> int:
        """The dim of dY summed over in the weight-gradient GEMM (the batch; for a matmul its rows ``M``)."""
        return -2 if self.kind in MATMULS else 0

    def gemm_weight(self, w: Tensor) -> Tensor:
        """``w`` (stored layout) as the GEMM weight ``[out, in]`` / ``[out, in/g, *k]`` (a view or copy).

        Raises :class:`SlotRefused` for an embedding: a lookup has no reduction to group along.
        """
        if self.kind == "linear_t":
            return w.t()
        if self.kind == "embedding":
            raise SlotRefused("nn.Embedding is a table lookup: it has no GEMM reduction for N:M blocks")
        if self.transposed:
            g = self.groups
            ci, og = w.shape[0], w.shape[1]
            return w.reshape(g, ci // g, og, *w.shape[2:]).transpose(1, 2).reshape(g * og, ci // g, *w.shape[2:])
        return w

    def from_gemm_weight(self, t: Tensor, shape: torch.Size | tuple[int, ...]) -> Tensor:
        """Inverse of :meth:`gemm_weight` for a stored weight of ``shape``."""
        if self.kind == "linear_t":
            return t.t()
        if self.transposed:
            g = self.groups
            ci, og = shape[0], shape[1]
            return t.reshape(g, og, ci // g, *shape[2:]).transpose(1, 2).reshape(tuple(shape))
        return t

    # ----------------------------------------------------------------- canonical form (accumulators)
    def canonical(self) -> "GemmOp":
        """The linear / conv2d op an :class:`~thrifty.nn.Accumulator` computes this GEMM as.

        linear_t is linear on ``w.t()``; conv1d is conv2d on a height-1 image. Transposed convs and
        embeddings have no canonical form (their accumulation order is not a plain GEMM's): SlotRefused.
        """
        if self.kind in ("linear", "conv2d"):
            return self
        if self.kind in MATMULS:  # one linear GEMM per batch entry (GemmFunction loops)
            return GemmOp("linear")
        if self.kind == "linear_t":
            return GemmOp("linear")
        if self.kind == "conv1d":
            pad = self.padding
            pad2 = pad if pad == "same" else (0, 0) if pad == "valid" else (0, *pad)  # type: ignore[misc]
            return GemmOp("conv2d", (1, *self.stride), pad2, (1, *self.dilation), self.groups)
        raise SlotRefused(f"a {self.kind} layer has no plain-GEMM accumulation order; the accumulator slot "
                          "supports linear, GPT-2 Conv1D, Conv1d and Conv2d layers")



def _batched(op: GemmOp, t: Tensor) -> Tensor:
    # nn.Conv*d accepts an unbatched (C, *spatial) input; aten's backward and the accumulators want a batch dim
    return t.unsqueeze(0) if op.spatial and t.dim() == op.spatial + 1 else t


def _lift(op: GemmOp, t: Tensor) -> Tensor:
    """An activation (X, Y or dY) in the canonical op's layout."""
    t = _batched(op, t)
    return t.unsqueeze(-2) if op.kind == "conv1d" else t


def _lift_w(op: GemmOp, w: Tensor) -> Tensor:
    return w.t() if op.kind == "linear_t" else w.unsqueeze(-2) if op.kind == "conv1d" else w


def _drop_w(op: GemmOp, dw: Optional[Tensor], w: Tensor) -> Optional[Tensor]:
    if dw is None:
        return None
    return dw.t() if op.kind == "linear_t" else dw.reshape(w.shape)


def conv_padding(op: GemmOp, w: Tensor) -> tuple[int, ...]:
    """Explicit padding numbers (``"same"`` with an odd effective kernel is symmetric; ``"valid"`` is 0)."""
    if isinstance(op.padding, str):
        if op.padding == "valid":
            return (0,) * op.spatial
        return tuple(d * (k - 1) // 2 for d, k in zip(op.dilation, w.shape[2:]))
    return tuple(op.padding)


class GradTransform(nn.Module):
    """Transforms the neural gradient dY inside backward.

    ``forward(dy)`` returns ``(dy_for_input_grad, dy_for_weight_grad)``: the
    tensor used in dX = dY W and the one used in dW = dY^T X. Returning two
    different tensors expresses bifurcation (8-bit for dX, 16-bit for dW) or
    pruning only one of the two GEMMs. It runs under ``torch.no_grad``.
    """

    def forward(self, dy: Tensor) -> tuple[Tensor, Tensor]:  # pragma: no cover - interface
        raise NotImplementedError

    def pair(self, dy_x: Tensor, dy_w: Tensor) -> tuple[Tensor, Tensor]:
        """Transform two streams that an earlier transform already split (used by :class:`Chain`).

        The default runs ``forward`` on each stream and keeps its own side; override it to skip the
        half that is thrown away.
        """
        if dy_x is dy_w:
            return self(dy_x)
        return self(dy_x)[0], self(dy_w)[1]


class Accumulator(nn.Module):
    """How products are summed inside the GEMM.

    ``forward(op, x, w, bias)`` computes the forward GEMM; ``backward(op, x, w,
    dy_x, dy_w, needs)`` returns ``(dx, dw)`` or ``None`` for the exact float32
    backward (a straight-through estimator through the accumulation). The bias
    gradient is always the exact sum of ``dy_w``.
    """

    def forward(self, op: GemmOp, x: Tensor, w: Tensor, bias: Optional[Tensor]) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def backward(
        self, op: GemmOp, x: Tensor, w: Tensor, dy_x: Tensor, dy_w: Tensor, needs: tuple[bool, bool]
    ) -> Optional[tuple[Optional[Tensor], Optional[Tensor]]]:
        """Return ``(dx, dw)`` computed from ``dy_x`` and ``dy_w``, or None for the exact backward."""
        return None


class Chain(nn.Sequential):
    """Transforms applied one after the other in one slot (e.g. quantize, then mask).

    For the grad_output slot each member is a :class:`GradTransform`; the two
    streams (for dX and for dW) are threaded through every member.
    """

    def forward(self, t: Tensor):  # type: ignore[override]
        if len(self) and isinstance(self[0], GradTransform):
            gx = gw = t
            for m in self:
                gx, gw = m.pair(gx, gw)
            return gx, gw
        for m in self:
            t = m(t)
        return t


class Slots(nn.Module):
    """The four optional operand slots of a Gemm layer."""

    def __init__(self) -> None:
        super().__init__()
        self.weight: Optional[nn.Module] = None
        self.input: Optional[nn.Module] = None
        self.grad_output: Optional[GradTransform] = None
        self.accumulator: Optional[Accumulator] = None

    def empty(self) -> bool:
        return all(getattr(self, s) is None for s in SLOT_NAMES)

    def extra_repr(self) -> str:
        return ", ".join(f"{s}=None" for s in SLOT_NAMES if getattr(self, s) is None)


class GemmFunction(torch.autograd.Function):
    """One autograd Function for the GEMM: grad_output and accumulator slots act here."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, bias: Optional[Tensor], op: GemmOp, grad_t, acc):  # type: ignore[override]
        ctx.save_for_backward(x, w)
        ctx.op, ctx.grad_t, ctx.acc, ctx.has_bias = op, grad_t, acc, bias is not None
        ctx.bias_shape = None if bias is None else bias.shape
        if acc is None:
            return op(x, w, bias)
        if op.kind in MATMULS:
            x, w = _same_batch(x, w)
            lin = op.canonical()
            y = torch.stack([acc(lin, a, b, None) for a, b in zip(x.reshape(-1, *x.shape[-2:]),
                                                                 w.reshape(-1, *w.shape[-2:]))])
            y = y.reshape(*x.shape[:-1], w.shape[-2])
            return y if bias is None else y + bias
        y = acc(op.canonical(), _lift(op, x), _lift_w(op, w), bias)
        if op.kind == "conv1d":
            y = y.squeeze(-2)
        return y.squeeze(0) if op.spatial and x.dim() == op.spatial + 1 else y

    @staticmethod
    def backward(ctx, dy: Tensor):  # type: ignore[override]
        x, w = ctx.saved_tensors
        op: GemmOp = ctx.op
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        need_b = need_b and ctx.has_bias
        dy_x = dy_w = dy
        if ctx.grad_t is not None:
            with torch.no_grad():
                dy_x, dy_w = ctx.grad_t(dy)
        dx = dw = db = None
        custom = None
        if op.kind in MATMULS:
            return _matmul_backward(ctx, x, w, dy_x, dy_w, (need_x, need_w, need_b))
        if ctx.acc is not None and (need_x or need_w):
            custom = ctx.acc.backward(op.canonical(), _lift(op, x), _lift_w(op, w), _lift(op, dy_x), _lift(op, dy_w),
                                      (need_x, need_w))
        if custom is not None:
            dx = custom[0].reshape(x.shape) if custom[0] is not None else None
            dw = _drop_w(op, custom[1], w)
        if not op.spatial:
            if custom is None:
                wt = w.t() if op.kind == "linear_t" else w  # as [out, in]
                if need_x and op.kind == "linear_t":  # as addmm's backward: on the 2-D view
                    dx = dy_x.reshape(-1, wt.shape[0]).mm(wt).view(x.shape)
                elif need_x:
                    dx = dy_x.matmul(wt)
                if need_w:
                    dy2, x2 = dy_w.reshape(-1, dy_w.shape[-1]), x.reshape(-1, x.shape[-1])
                    dw = x2.t().mm(dy2) if op.kind == "linear_t" else dy2.t().mm(x2)
            if need_b:
                db = dy_w.reshape(-1, dy_w.shape[-1]).sum(0)
            return dx, dw, db, None, None, None
        xb, gx, gw = _batched(op, x), _batched(op, dy_x), _batched(op, dy_w)
        if custom is not None:
            if need_b:
                db = gw.sum(dim=[d for d in range(gw.dim()) if d != 1])
            return dx, dw, db, None, None, None
        # aten's own convolution backward, as nn.Conv*d's autograd calls it: bit-identical.
        out_pad = op.output_padding if op.transposed else (0,) * op.spatial
        args = (op.stride, conv_padding(op, w), op.dilation, op.transposed, out_pad, op.groups)
        bias_sizes = [w.shape[1] * op.groups if op.transposed else w.shape[0]] if ctx.has_bias else None
        if dy_x is dy_w:
            dx, dw, db = torch.ops.aten.convolution_backward(gx, xb, w, bias_sizes, *args, (need_x, need_w, need_b))
        else:
            if need_x:
                dx = torch.ops.aten.convolution_backward(gx, xb, w, None, *args, (True, False, False))[0]
            if need_w or need_b:
                _, dw, db = torch.ops.aten.convolution_backward(gw, xb, w, bias_sizes, *args, (False, need_w, need_b))
        if dx is not None:
            dx = dx.reshape(x.shape)
        return dx, dw, db, None, None, None


def _same_batch(x: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
    batch = torch.broadcast_shapes(x.shape[:-2], w.shape[:-2])
    return x.expand(*batch, *x.shape[-2:]), w.expand(*batch, *w.shape[-2:])


def _matmul_backward(ctx, x: Tensor, w: Tensor, dy_x: Tensor, dy_w: Tensor, needs: tuple[bool, bool, bool]):
    """dA = dY_x B and dB = dY_w^T A for ``y = a @ b^T`` (b in the weight layout), per batch entry."""
    need_x, need_w, need_b = needs
    dx = dw = db = None
    custom = None
    if ctx.acc is not None and (need_x or need_w):
        xb, wb = _same_batch(x, w)
        gx, gw = dy_x.expand(*xb.shape[:-1], wb.shape[-2]), dy_w.expand(*xb.shape[:-1], wb.shape[-2])
        flat = lambda t: t.reshape(-1, *t.shape[-2:])  # noqa: E731
        parts = [ctx.acc.backward(ctx.op.canonical(), a, b, ga, gb, (need_x, need_w))
                 for a, b, ga, gb in zip(flat(xb), flat(wb), flat(gx), flat(gw))]
        if all(p is not None for p in parts):
            if need_x:
                dx = torch.stack([p[0] for p in parts]).reshape(xb.shape).sum_to_size(x.shape)
            if need_w:
                dw = torch.stack([p[1] for p in parts]).reshape(wb.shape).sum_to_size(w.shape)
            custom = True
    if custom is None:
        if need_x:
            dx = torch.matmul(dy_x, w).sum_to_size(x.shape)
        if need_w:
            dw = torch.matmul(dy_w.transpose(-2, -1), x).sum_to_size(w.shape)
    if need_b:
        db = dy_w.sum_to_size(ctx.bias_shape)
    return dx, dw, db, None, None, None
