"""Activation-activation GEMMs (attention's Q K^T and P V) as a module with the four operand slots.

``GemmMatmul()(a, b)`` computes ``a @ b^T`` where ``b`` is given in the *weight layout* ``[..., out, reduction]``
(for Q K^T: ``b = K``; for P V: ``b = V^T``), so every slot means what it means for a Linear layer:

=============  ==================================================================================
slot           operand
=============  ==================================================================================
input          ``a`` ``[..., M, K]``: the queries (scaled), or the attention probabilities P
weight         ``b`` ``[..., N, K]``: the keys, or V^T (an activation: quantizers here are dynamic,
               per tensor; N:M blocks run along the reduction, the last dim, as for a weight)
grad_output    dY ``[..., M, N]``: the GradTransform's first tensor feeds dA = dY B, its second
               dB = dY^T A (whose reduction is ``M``, dim -2: :attr:`GemmOp.weight_grad_dim`)
accumulator    the sum over ``K`` of each output, one batch entry at a time as a Linear's
=============  ==================================================================================

Configs that need a stored weight (``NM`` weight masks, PTQ's weight quantizers) do not apply to it; use
:class:`~thrifty.sparse.actgrad.ActNM` / ``Train8`` / ``GradNM`` / ``AccumConfig`` /
``QuantConfig`` (dynamic quantizers on both operands). Matmuls are opt-in: a filter selects one only by
a pattern that names it (ends in ``qk`` or ``pv``: ``"*.qk"``, ``"*attn*.pv"``); see
:func:`thrifty.core.layer_status`.

With empty slots the output and the gradients are those of the op the original model calls
(``torch.bmm``/``torch.baddbmm`` in nn.MultiheadAttention, ``torch.matmul`` in transformers), bit for bit.

Example:
    >>> import torch
    >>> mm = GemmMatmul()
    >>> q, k = torch.randn(2, 5, 4), torch.randn(2, 6, 4)
    >>> torch.equal(mm(q, k), torch.matmul(q, k.transpose(-2, -1)))
    True
"""
from __future__ import annotations

from typing import Optional

import torch.nn as nn
from torch import Tensor

from thrifty.nn.gemm import _add, _check_slots, gemm_call
from thrifty.nn.gemm_op import GemmOp, Slots

__all__ = ["GemmMatmul", "is_matmul"]


class GemmMatmul(nn.Module):
    """``a @ b^T (+ mask)`` with operand slots; exact ``torch.matmul`` / ``torch.bmm`` when the slots are empty."""

    NO_SLOTS: dict[str, str] = {}
    weight = None  # no stored operand: handlers and strip look for one
    bias = None

    def __init__(self) -> None:
        super().__init__()
        self.slots = Slots()

    @property
    def op(self) -> GemmOp:
        return GemmOp("matmul")

    def forward(self, a: Tensor, b: Tensor, mask: Optional[Tensor] = None, op: str = "matmul") -> Tensor:
        """``a @ b.transpose(-2, -1)``, plus ``mask`` (fused as ``torch.baddbmm`` when ``op="bmm"``)."""
        _check_slots(self)
        if self.slots.weight is not None:
            b = self.slots.weight(b)
        return gemm_call(self, a, b, mask, GemmOp(op))

    add = _add


def is_matmul(m: nn.Module) -> bool:
    return isinstance(m, GemmMatmul)
