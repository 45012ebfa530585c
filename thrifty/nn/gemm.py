"""The one wrapped GEMM layer: Linear and Conv2d with four operand slots.

Almost every method in thrifty acts on one operand of a GEMM:

=============  ==========  ==================================================
slot           pass        what fills it
=============  ==========  ==================================================
weight         forward     quantizers, N:M masks, AdaQuant perturbations
input          forward     activation quantizers, activation N:M
grad_output    backward    8-bit gradients, MVUE N:M gradient masks
accumulator    both        low-bit floating-point accumulation
=============  ==========  ==================================================

``weight`` and ``input`` are ordinary differentiable modules, so each defines
its own backward rule (straight-through is ``w + (q(w) - w).detach()``) and any
learnable parameter inside them receives gradients. ``grad_output`` and
``accumulator`` live inside one :class:`torch.autograd.Function`, the only
place where dY can be intercepted before dX and dW are computed.

Example:
    >>> import torch, torch.nn as nn
    >>> from thrifty.nn import wrap
    >>> layer = wrap(nn.Linear(8, 4))
    >>> layer(torch.randn(2, 8)).shape
    torch.Size([2, 4])
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.nn.utils import parametrize

__all__ = [
    "GemmOp",
    "GradTransform",
    "Accumulator",
    "Chain",
    "Slots",
    "GemmLinear",
    "GemmConv2d",
    "GemmLayer",
    "wrap",
    "why_not_wrappable",
    "gemm_like",
    "is_gemm",
    "gemm_layers",
    "SLOT_NAMES",
]

SLOT_NAMES = ("weight", "input", "grad_output", "accumulator")


@dataclass(frozen=True)
class GemmOp:
    """What GEMM a layer computes: a linear map or a 2-D convolution."""

    kind: str  # "linear" | "conv2d"
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] | str = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1

    def __call__(self, x: Tensor, w: Tensor, bias: Optional[Tensor]) -> Tensor:
        """The exact float32 GEMM (the default accumulator)."""
        if self.kind == "linear":
            return F.linear(x, w, bias)
        return F.conv2d(x, w, bias, self.stride, self.padding, self.dilation, self.groups)


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


class _GemmFunction(torch.autograd.Function):
    """One autograd Function for the GEMM: grad_output and accumulator slots act here."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, bias: Optional[Tensor], op: GemmOp, grad_t, acc):  # type: ignore[override]
        ctx.save_for_backward(x, w)
        ctx.op, ctx.grad_t, ctx.acc, ctx.has_bias = op, grad_t, acc, bias is not None
        if acc is None:
            return op(x, w, bias)
        return acc(op, x, w, bias)

    @staticmethod
    def backward(ctx, dy: Tensor):  # type: ignore[override]
        x, w = ctx.saved_tensors
        op: GemmOp = ctx.op
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        dy_x = dy_w = dy
        if ctx.grad_t is not None:
            with torch.no_grad():
                dy_x, dy_w = ctx.grad_t(dy)
        dx = dw = db = None
        custom = None
        if ctx.acc is not None and (need_x or need_w):
            custom = ctx.acc.backward(op, x, w, dy_x, dy_w, (need_x, need_w))
        need_b = need_b and ctx.has_bias
        if op.kind == "linear":
            if custom is not None:
                dx, dw = custom
            else:
                if need_x:
                    dx = dy_x.matmul(w)
                if need_w:
                    dw = dy_w.reshape(-1, dy_w.shape[-1]).t().mm(x.reshape(-1, x.shape[-1]))
            if need_b:
                db = dy_w.reshape(-1, dy_w.shape[-1]).sum(0)
        else:
            # aten's own convolution backward, as nn.Conv2d's autograd calls it: bit-identical.
            args = (op.stride, _pad(op, w), op.dilation, False, (0, 0), op.groups)
            bias_sizes = [w.shape[0]] if ctx.has_bias else None
            if custom is not None:
                dx, dw = custom
                if need_b:
                    db = dy_w.sum(dim=(0, 2, 3))
            elif dy_x is dy_w:
                dx, dw, db = torch.ops.aten.convolution_backward(dy_x, x, w, bias_sizes, *args, (need_x, need_w, need_b))
            else:
                if need_x:
                    dx = torch.ops.aten.convolution_backward(dy_x, x, w, None, *args, (True, False, False))[0]
                if need_w or need_b:
                    _, dw, db = torch.ops.aten.convolution_backward(dy_w, x, w, bias_sizes, *args, (False, need_w, need_b))
        return dx, dw, db, None, None, None


def _pad(op: GemmOp, w: Tensor) -> tuple[int, int]:
    if isinstance(op.padding, str):  # "same" / "valid" as nn.Conv2d accepts them
        if op.padding == "valid":
            return (0, 0)
        # "same" with odd effective kernels is symmetric (even ones are refused in wrap()).
        return tuple(d * (k - 1) // 2 for d, k in zip(op.dilation, w.shape[-2:]))  # type: ignore[return-value]
    return tuple(op.padding)  # type: ignore[return-value]


def _conv_problem(m: nn.Conv2d) -> Optional[str]:
    if m.padding_mode != "zeros":
        return f"Conv2d with padding_mode={m.padding_mode!r} (only 'zeros' is a plain GEMM)"
    if m.padding == "same" and any((d * (k - 1)) % 2 for d, k in zip(m.dilation, m.kernel_size)):
        return "Conv2d with padding='same' and an even effective kernel (asymmetric padding)"
    return None


def _check_conv(m: nn.Conv2d, where: str) -> None:
    why = _conv_problem(m)
    if why:
        raise TypeError(f"cannot wrap Conv2d{where}: {why}")


def _gemm_forward(layer: "GemmLayer", x: Tensor, op: GemmOp) -> Tensor:
    slots = layer.slots
    w = layer.weight
    if slots.weight is not None:
        w = slots.weight(w)
    if slots.input is not None:
        x = slots.input(x)
    if slots.grad_output is None and slots.accumulator is None:
        # Nothing to do inside backward: let autograd differentiate the plain op.
        return op(x, w, layer.bias)
    return _GemmFunction.apply(x, w, layer.bias, op, slots.grad_output, slots.accumulator)


def _add(layer: "GemmLayer", slot: str, module: nn.Module) -> "GemmLayer":
    if slot not in SLOT_NAMES:
        raise ValueError(f"unknown slot {slot!r}; slots are {SLOT_NAMES}")
    if slot == "grad_output" and not isinstance(module, GradTransform):
        raise TypeError(f"grad_output slot takes a GradTransform, got {type(module).__name__}")
    if slot == "accumulator":
        if not isinstance(module, Accumulator):
            raise TypeError(f"accumulator slot takes an Accumulator, got {type(module).__name__}")
        setattr(layer.slots, slot, module)  # one accumulator per GEMM: replace
        return layer
    cur = getattr(layer.slots, slot)
    if cur is None:
        setattr(layer.slots, slot, module)
    elif isinstance(cur, Chain):
        cur.append(module)
    else:
        setattr(layer.slots, slot, Chain(cur, module))
    return layer


class GemmLinear(nn.Linear):
    """nn.Linear with operand slots; exact nn.Linear when all slots are empty."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None) -> None:
        super().__init__(in_features, out_features, bias, device, dtype)
        self.slots = Slots()

    @property
    def op(self) -> GemmOp:
        return GemmOp("linear")

    def forward(self, x: Tensor) -> Tensor:
        return _gemm_forward(self, x, self.op)

    def add(self, slot: str, module: nn.Module) -> "GemmLinear":
        """Put ``module`` in ``slot``, after whatever is already there."""
        return _add(self, slot, module)

    def effective_weight(self) -> Tensor:
        """The weight as the forward GEMM sees it (weight slot applied), detached."""
        with torch.no_grad():
            return self.slots.weight(self.weight) if self.slots.weight is not None else self.weight.detach().clone()


class GemmConv2d(nn.Conv2d):
    """nn.Conv2d with operand slots; exact nn.Conv2d when all slots are empty."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        _check_conv(self, "")
        self.slots = Slots()

    @property
    def op(self) -> GemmOp:
        return GemmOp("conv2d", tuple(self.stride), self.padding, tuple(self.dilation), self.groups)  # type: ignore[arg-type]

    def forward(self, x: Tensor) -> Tensor:
        return _gemm_forward(self, x, self.op)

    def add(self, slot: str, module: nn.Module) -> "GemmConv2d":
        """Put ``module`` in ``slot``, after whatever is already there."""
        return _add(self, slot, module)

    def effective_weight(self) -> Tensor:
        """The weight as the forward GEMM sees it (weight slot applied), detached."""
        with torch.no_grad():
            return self.slots.weight(self.weight) if self.slots.weight is not None else self.weight.detach().clone()


GemmLayer = (GemmLinear, GemmConv2d)


def is_gemm(m: nn.Module) -> bool:
    return isinstance(m, GemmLayer)


def why_not_wrappable(m: nn.Module) -> Optional[str]:
    """Why :func:`wrap` cannot turn ``m`` into a Gemm layer, or None when it can.

    The one rule every entry point (apply, quantize, sparsify, adaprune, wrap) uses: nn.Linear and
    nn.Conv2d, including subclasses that keep their GEMM (they do not override ``forward`` or
    ``_conv_forward``), with initialised, unparametrized weights and, for Conv2d, zero padding. It looks at the
    module alone; :func:`thrifty.core.layer_status` adds what depends on the parent (a Linear inside
    nn.MultiheadAttention is never called).

    Example:
        >>> why_not_wrappable(nn.Linear(2, 2)) is None
        True
        >>> why_not_wrappable(nn.Conv1d(2, 2, 3))
        'Conv1d is not supported: GEMM slots support nn.Linear and nn.Conv2d'
    """
    if is_gemm(m):
        return None
    if isinstance(m, nn.Linear):
        base: type[nn.Module] = nn.Linear
        own = ("forward",)
    elif isinstance(m, nn.Conv2d):
        base, own = nn.Conv2d, ("forward", "_conv_forward")
    else:
        return f"{type(m).__name__} is not supported: GEMM slots support nn.Linear and nn.Conv2d"
    changed = [f for f in own if getattr(type(m), f) is not getattr(base, f)]
    if changed:
        return (f"{type(m).__name__} overrides {'/'.join(changed)}() of nn.{base.__name__}, so which GEMM it computes "
                "is unknown")
    if parametrize.is_parametrized(m):
        # its weight is a property of a generated subclass; a Gemm layer would lose it
        return f"{type(m).__name__} has parametrizations (torch.nn.utils.parametrize); remove them before wrapping"
    if isinstance(m, nn.modules.lazy.LazyModuleMixin) and m.has_uninitialized_params():
        return f"{type(m).__name__} is not initialised yet: run one forward pass before wrapping it"
    if base is nn.Conv2d:
        return _conv_problem(m)  # type: ignore[arg-type]
    return None


# Class names of GEMM layers from other libraries that thrifty recognises without importing them.
_FOREIGN_GEMMS = ("Conv1D",)  # transformers' GPT-2 Conv1D (a Linear with a transposed weight)


def gemm_like(m: nn.Module) -> bool:
    """Whether ``m`` computes a GEMM (a matrix product with its own weight), wrappable or not.

    Used to name the layers a method cannot reach instead of skipping them silently.
    """
    return isinstance(m, (nn.Linear, nn.Bilinear, nn.modules.conv._ConvNd, nn.MultiheadAttention)) or (
        type(m).__name__ in _FOREIGN_GEMMS and isinstance(getattr(m, "weight", None), torch.Tensor))


def wrap(m: nn.Module, name: str = "") -> nn.Module:
    """Return a Gemm layer that shares ``m``'s Parameters (``m`` itself if already wrapped).

    Raises TypeError naming the layer and the reason for anything :func:`why_not_wrappable` refuses.
    A subclass of nn.Linear / nn.Conv2d becomes a GemmLinear / GemmConv2d (``strip`` returns the plain
    torch class).
    """
    if is_gemm(m):
        return m
    where = f" (layer {name!r})" if name else ""
    why = why_not_wrappable(m)
    if why is not None:
        raise TypeError(f"cannot wrap {type(m).__name__}{where}: {why}")
    cls = GemmLinear if isinstance(m, nn.Linear) else GemmConv2d
    new = cls.__new__(cls)
    # Share parameters, buffers, hooks and attributes: a wrap is a change of class, not a copy.
    new.__dict__.update(m.__dict__)
    for d in ("_parameters", "_buffers", "_modules", "_non_persistent_buffers_set"):
        setattr(new, d, type(getattr(m, d))(getattr(m, d)))
    new.slots = Slots()
    return new


def gemm_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Yield ``(qualified_name, layer)`` for every Gemm layer in ``model``."""
    for name, m in model.named_modules():
        if is_gemm(m):
            yield name, m
