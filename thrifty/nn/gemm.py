"""The wrapped GEMM layers: Linear, Conv1d/2d, ConvTranspose1d/2d, GPT-2 Conv1D and Embedding, with four slots.

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

Every kind keeps the slots' meaning (:mod:`thrifty.nn.gemm_op` says where the output channels and the
reduction are in each weight layout). A kind refuses a slot that has no meaning for it with
:class:`SlotRefused` (``NO_SLOTS``): an embedding takes the weight slot only, a transposed conv has no
accumulator slot.

Example:
    >>> import torch, torch.nn as nn
    >>> from thrifty.nn import wrap
    >>> layer = wrap(nn.Linear(8, 4))
    >>> layer(torch.randn(2, 8)).shape
    torch.Size([2, 4])
"""
from __future__ import annotations

from typing import Iterator, Optional, Sequence

import torch
import torch.nn as nn
from torch import Tensor
from torch.nn.utils import parametrize

from thrifty.nn.gemm_op import (SLOT_NAMES, Accumulator, Chain, GemmFunction, GemmOp, GradTransform, SlotRefused, Slots,
                                conv_padding)

__all__ = [
    "GemmOp",
    "GradTransform",
    "Accumulator",
    "Chain",
    "Slots",
    "GemmLinear",
    "GemmConv1d",
    "GemmConv2d",
    "GemmConvTranspose1d",
    "GemmConvTranspose2d",
    "GemmEmbedding",
    "GemmLinearT",
    "GemmLayer",
    "SlotRefused",
    "gemm_class",
    "gemm_op",
    "wrap_in_place",
    "wrap",
    "why_not_wrappable",
    "gemm_like",
    "is_gemm",
    "gemm_layers",
    "SLOT_NAMES",
]

_pad = conv_padding  # explicit padding numbers of a conv op (used by the accumulators)


def _conv_problem(m: nn.Module) -> Optional[str]:
    kind = type(m).__name__
    if m.padding_mode != "zeros":  # type: ignore[union-attr]
        return f"{kind} with padding_mode={m.padding_mode!r} (only 'zeros' is a plain GEMM)"
    if m.padding == "same" and any((d * (k - 1)) % 2 for d, k in zip(m.dilation, m.kernel_size)):  # type: ignore
        return f"{kind} with padding='same' and an even effective kernel (asymmetric padding)"
    return None


def _gemm_forward(layer: nn.Module, x: Tensor, op: GemmOp) -> Tensor:
    w = layer.weight
    if layer.slots.weight is not None:
        w = layer.slots.weight(w)
    return gemm_call(layer, x, w, layer.bias, op)


def gemm_call(layer: nn.Module, x: Tensor, w: Tensor, bias: Optional[Tensor], op: GemmOp) -> Tensor:
    """``op(x, w, bias)`` through ``layer``'s input, grad_output and accumulator slots (``w`` already transformed)."""
    slots = layer.slots
    if slots.input is not None:
        x = slots.input(x)
    if slots.grad_output is None and slots.accumulator is None:
        # Nothing to do inside backward: let autograd differentiate the plain op.
        return op(x, w, bias)
    return GemmFunction.apply(x, w, bias, op, slots.grad_output, slots.accumulator)


def _refused(layer: nn.Module, slot: str) -> Optional[str]:
    return type(layer).NO_SLOTS.get(slot)


def _add(layer: nn.Module, slot: str, module: nn.Module) -> nn.Module:
    if slot not in SLOT_NAMES:
        raise ValueError(f"unknown slot {slot!r}; slots are {SLOT_NAMES}")
    why = _refused(layer, slot)
    if why:
        raise SlotRefused(f"{type(layer).__name__} has no {slot} slot: {why}")
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


def _check_slots(layer: nn.Module) -> None:
    # slots can also be set as attributes (layer.slots.input = q): refuse those at the forward
    for s in type(layer).NO_SLOTS:
        if getattr(layer.slots, s) is not None:
            raise SlotRefused(f"{type(layer).__name__} has no {s} slot: {type(layer).NO_SLOTS[s]}")


def _effective_weight(layer: nn.Module) -> Tensor:
    """The weight as the forward GEMM sees it (weight slot applied, own layout), detached."""
    with torch.no_grad():
        return layer.slots.weight(layer.weight) if layer.slots.weight is not None else layer.weight.detach().clone()


def _conv_args(m: nn.Module) -> dict:
    return dict(kernel_size=m.kernel_size, stride=m.stride, padding=m.padding, dilation=m.dilation,
                groups=m.groups, bias=m.bias is not None, padding_mode=m.padding_mode)


class GemmLinear(nn.Linear):
    """nn.Linear with operand slots; exact nn.Linear when all slots are empty."""

    NO_SLOTS: dict[str, str] = {}

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None) -> None:
        super().__init__(in_features, out_features, bias, device, dtype)
        self.slots = Slots()

    @property
    def op(self) -> GemmOp:
        return GemmOp("linear")

    def forward(self, x: Tensor) -> Tensor:
        return _gemm_forward(self, x, self.op)

    add = _add
    effective_weight = _effective_weight

    def plain_like(self) -> nn.Module:
        """A fresh plain layer of the same shape (its weight is overwritten by :func:`thrifty.strip`)."""
        return nn.Linear(self.in_features, self.out_features, self.bias is not None)


def _torch_base(cls: type) -> type:
    return next(b for b in cls.__mro__ if b in _PLAIN.values())


def _init(self: nn.Module, *args, **kwargs) -> None:
    _torch_base(type(self)).__init__(self, *args, **kwargs)
    why = _conv_problem(self) if isinstance(self, nn.modules.conv._ConvNd) else None
    if why:
        raise TypeError(f"cannot wrap {type(self).__name__}: {why}")
    self.slots = Slots()


class GemmConv1d(nn.Conv1d):
    """nn.Conv1d with operand slots; exact nn.Conv1d when all slots are empty."""

    NO_SLOTS: dict[str, str] = {}
    __init__ = _init

    @property
    def op(self) -> GemmOp:
        return GemmOp(f"conv{len(self.kernel_size)}d", tuple(self.stride), self.padding,  # type: ignore[arg-type]
                      tuple(self.dilation), self.groups)

    def forward(self, x: Tensor) -> Tensor:
        return _gemm_forward(self, x, self.op)

    add = _add
    effective_weight = _effective_weight

    def plain_like(self) -> nn.Module:
        """A fresh plain layer of the same shape (its weight is overwritten by :func:`thrifty.strip`)."""
        return _torch_base(type(self))(self.in_channels, self.out_channels, **_conv_args(self))


class GemmConv2d(nn.Conv2d):
    """nn.Conv2d with operand slots; exact nn.Conv2d when all slots are empty."""

    NO_SLOTS: dict[str, str] = {}
    __init__ = _init
    op = GemmConv1d.op
    forward = GemmConv1d.forward
    add = _add
    effective_weight = _effective_weight
    plain_like = GemmConv1d.plain_like


_NO_ACC = ("a transposed convolution scatters its products over overlapping outputs, so there is no single "
           "accumulation order to emulate (leave the layer out with filter=)")


def _transpose_op(m: nn.Module, output_padding: Sequence[int]) -> GemmOp:
    return GemmOp(f"conv_transpose{len(m.kernel_size)}d", tuple(m.stride), tuple(m.padding), tuple(m.dilation),
                  m.groups, tuple(output_padding))


class GemmConvTranspose1d(nn.ConvTranspose1d):
    """nn.ConvTranspose1d with operand slots (no accumulator slot); exact when all slots are empty."""

    NO_SLOTS = {"accumulator": _NO_ACC}
    __init__ = _init

    @property
    def op(self) -> GemmOp:
        return _transpose_op(self, self.output_padding)

    def forward(self, x: Tensor, output_size: Optional[list[int]] = None) -> Tensor:
        _check_slots(self)
        n = len(self.kernel_size)  # as nn.ConvTranspose*d.forward: output_size picks the output padding
        out_pad = self._output_padding(x, output_size, self.stride, self.padding, self.kernel_size, n, self.dilation)
        return _gemm_forward(self, x, _transpose_op(self, out_pad))

    add = _add
    effective_weight = _effective_weight

    def plain_like(self) -> nn.Module:
        """A fresh plain layer of the same shape (its weight is overwritten by :func:`thrifty.strip`)."""
        kw = _conv_args(self)
        return _torch_base(type(self))(self.in_channels, self.out_channels, output_padding=self.output_padding, **kw)


class GemmConvTranspose2d(nn.ConvTranspose2d):
    """nn.ConvTranspose2d with operand slots (no accumulator slot); exact when all slots are empty."""

    NO_SLOTS = {"accumulator": _NO_ACC}
    __init__ = _init
    op = GemmConvTranspose1d.op
    forward = GemmConvTranspose1d.forward  # type: ignore[assignment]
    add = _add
    effective_weight = _effective_weight
    plain_like = GemmConvTranspose1d.plain_like


_LOOKUP = "nn.Embedding is a table lookup: its other operand is a one-hot matrix of token ids"


class GemmEmbedding(nn.Embedding):
    """nn.Embedding with a weight slot only (e.g. a per-row quantized table); exact when it is empty."""

    NO_SLOTS = {"input": _LOOKUP + " (integer ids, nothing to transform)",
                "grad_output": _LOOKUP + " (its backward is a scatter-add, no GEMM to act in)",
                "accumulator": _LOOKUP + " (each output is one table entry: nothing is summed)"}
    __init__ = _init
    bias = None  # a lookup has none (strip and the slot code read layer.bias)

    @property
    def op(self) -> GemmOp:
        return GemmOp("embedding", options=(self.padding_idx, self.max_norm, self.norm_type, self.scale_grad_by_freq,
                                            self.sparse))

    def forward(self, x: Tensor) -> Tensor:
        _check_slots(self)
        w = self.slots.weight(self.weight) if self.slots.weight is not None else self.weight
        return self.op(x, w, None)

    add = _add
    effective_weight = _effective_weight

    def plain_like(self) -> nn.Module:
        """A fresh plain layer of the same shape (its weight is overwritten by :func:`thrifty.strip`)."""
        return nn.Embedding(self.num_embeddings, self.embedding_dim, self.padding_idx, self.max_norm, self.norm_type,
                            self.scale_grad_by_freq, self.sparse)


class GemmLinearT(nn.Module):
    """transformers' GPT-2 ``Conv1D`` (a Linear whose weight is stored ``[in, out]``) with operand slots.

    Wrapping keeps ``nf``, ``nx``, ``weight`` (in its own ``[in, out]`` layout) and ``bias``; ``strip``
    gives back an instance of the original class. Exact ``Conv1D`` when all slots are empty.
    """

    NO_SLOTS: dict[str, str] = {}

    @property
    def op(self) -> GemmOp:
        return GemmOp("linear_t")

    @property
    def in_features(self) -> int:
        return int(self.weight.shape[0])

    @property
    def out_features(self) -> int:
        return int(self.weight.shape[1])

    def forward(self, x: Tensor) -> Tensor:
        return _gemm_forward(self, x, self.op)

    add = _add
    effective_weight = _effective_weight

    def plain_like(self) -> nn.Module:
        """A fresh instance of the wrapped class (``weight`` and ``bias`` are set by :func:`thrifty.strip`)."""
        cls = self.__dict__["_thrifty_cls"]
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.nf, new.nx = self.out_features, self.in_features
        new.weight = nn.Parameter(torch.empty_like(self.weight))
        new.bias = None
        return new

    def extra_repr(self) -> str:
        return f"nf={self.out_features}, nx={self.in_features}"


_PLAIN: dict[type, type] = {GemmLinear: nn.Linear, GemmConv1d: nn.Conv1d, GemmConv2d: nn.Conv2d,
                            GemmConvTranspose1d: nn.ConvTranspose1d, GemmConvTranspose2d: nn.ConvTranspose2d,
                            GemmEmbedding: nn.Embedding}
# torch base class -> (Gemm class, methods a subclass must not override to keep the base's GEMM)
_KINDS: list[tuple[type, type, tuple[str, ...]]] = [
    (nn.Linear, GemmLinear, ("forward",)),
    (nn.Conv1d, GemmConv1d, ("forward", "_conv_forward")),
    (nn.Conv2d, GemmConv2d, ("forward", "_conv_forward")),
    (nn.ConvTranspose1d, GemmConvTranspose1d, ("forward",)),
    (nn.ConvTranspose2d, GemmConvTranspose2d, ("forward",)),
    (nn.Embedding, GemmEmbedding, ("forward",)),
]
GemmLayer = (GemmLinear, GemmConv1d, GemmConv2d, GemmConvTranspose1d, GemmConvTranspose2d, GemmEmbedding, GemmLinearT)
_SUPPORTED = ("GEMM slots support nn.Linear, nn.Conv1d/2d, nn.ConvTranspose1d/2d, nn.Embedding and transformers' "
              "GPT-2 Conv1D")


def is_gemm(m: nn.Module) -> bool:
    return isinstance(m, GemmLayer)


def _is_gpt2_conv1d(m: nn.Module) -> bool:
    # transformers' class, recognised without importing transformers: Conv1D(nf, nx), weight [nx, nf]
    w = m.__dict__.get("_parameters", {}).get("weight")
    return (type(m).__name__ == "Conv1D" and type(m).__module__.startswith("transformers.")
            and isinstance(w, torch.Tensor) and w.dim() == 2 and getattr(m, "nf", None) == w.shape[1])


def _kind(m: nn.Module) -> Optional[tuple[type, type, tuple[str, ...]]]:
    for base, cls, own in _KINDS:
        if isinstance(m, base):
            return base, cls, own
    return None


def why_not_wrappable(m: nn.Module) -> Optional[str]:
    """Why :func:`wrap` cannot turn ``m`` into a Gemm layer, or None when it can.

    The one rule every entry point (apply, quantize, sparsify, adaprune, wrap) uses: nn.Linear,
    nn.Conv1d/2d, nn.ConvTranspose1d/2d and nn.Embedding, including subclasses that keep their GEMM (they
    do not override ``forward`` or ``_conv_forward``), with initialised, unparametrized weights and, for
    convs, zero padding; and transformers' GPT-2 ``Conv1D``. It looks at the module alone;
    :func:`thrifty.core.layer_status` adds what depends on the parent (nn.MultiheadAttention never calls
    its projections: they are reached through :class:`thrifty.nn.GemmMultiheadAttention`) and that an
    embedding is wrapped only when named.

    Example:
        >>> why_not_wrappable(nn.Conv1d(2, 2, 3)) is None
        True
        >>> why_not_wrappable(nn.Conv3d(2, 2, 3))
        "Conv3d is not supported: GEMM slots support nn.Linear, nn.Conv1d/2d, nn.ConvTranspose1d/2d, nn.Embedding and transformers' GPT-2 Conv1D"
    """
    if is_gemm(m):
        return None
    if _is_gpt2_conv1d(m):
        return "GPT-2 Conv1D has parametrizations; remove them before wrapping" if parametrize.is_parametrized(m) \
            else None
    kind = _kind(m)
    if kind is None:
        return f"{type(m).__name__} is not supported: {_SUPPORTED}"
    base, _, own = kind
    changed = [f for f in own if getattr(type(m), f) is not getattr(base, f)]
    if changed:
        return (f"{type(m).__name__} overrides {'/'.join(changed)}() of nn.{base.__name__}, so which GEMM it computes "
                "is unknown")
    if parametrize.is_parametrized(m):
        # its weight is a property of a generated subclass; a Gemm layer would lose it
        return f"{type(m).__name__} has parametrizations (torch.nn.utils.parametrize); remove them before wrapping"
    if isinstance(m, nn.modules.lazy.LazyModuleMixin) and m.has_uninitialized_params():
        return f"{type(m).__name__} is not initialised yet: run one forward pass before wrapping it"
    if isinstance(m, nn.Embedding):
        if m.max_norm is not None:
            return "Embedding with max_norm renormalises its weight in place during the lookup"
        if m.sparse:
            return "Embedding with sparse=True (sparse gradients cannot pass through a weight transform)"
        return None
    if isinstance(m, nn.modules.conv._ConvNd):
        return _conv_problem(m)
    return None


# Class names of GEMM layers from other libraries that thrifty recognises without importing them.
_FOREIGN_GEMMS = ("Conv1D",)  # transformers' GPT-2 Conv1D (a Linear with a transposed weight)


def gemm_like(m: nn.Module) -> bool:
    """Whether ``m`` computes a GEMM (a matrix product with its own weight), wrappable or not.

    Used to name the layers a method cannot reach instead of skipping them silently. An embedding is a
    lookup, not counted here (it is wrapped only when a filter names it).
    """
    return isinstance(m, (nn.Linear, nn.Bilinear, nn.modules.conv._ConvNd, nn.MultiheadAttention)) or (
        type(m).__name__ in _FOREIGN_GEMMS and isinstance(getattr(m, "weight", None), torch.Tensor))


def gemm_class(m: nn.Module) -> type:
    """The Gemm layer class :func:`wrap` turns ``m`` into (``m`` must be wrappable)."""
    if is_gemm(m):
        return type(m)
    if _is_gpt2_conv1d(m):
        return GemmLinearT
    kind = _kind(m)
    assert kind is not None, type(m)
    return kind[1]


def gemm_op(m: nn.Module) -> GemmOp:
    """The :class:`GemmOp` of a wrappable layer, wrapped or not (e.g. to check a weight layout before wrapping)."""
    return gemm_class(m).op.fget(m)  # type: ignore[attr-defined]


def wrap(m: nn.Module, name: str = "") -> nn.Module:
    """Return a Gemm layer that shares ``m``'s Parameters (``m`` itself if already wrapped).

    Raises TypeError naming the layer and the reason for anything :func:`why_not_wrappable` refuses.
    A subclass of a torch layer becomes the Gemm layer of its torch base (``strip`` returns the plain
    torch class); GPT-2's Conv1D becomes a :class:`GemmLinearT` (``strip`` returns a Conv1D).
    """
    if is_gemm(m):
        return m
    where = f" (layer {name!r})" if name else ""
    why = why_not_wrappable(m)
    if why is not None:
        raise TypeError(f"cannot wrap {type(m).__name__}{where}: {why}")
    cls = gemm_class(m)
    new = cls.__new__(cls)
    # Share parameters, buffers, hooks and attributes: a wrap is a change of class, not a copy.
    new.__dict__.update(m.__dict__)
    for d in ("_parameters", "_buffers", "_modules", "_non_persistent_buffers_set"):
        setattr(new, d, type(getattr(m, d))(getattr(m, d)))
    if cls is GemmLinearT:
        new.__dict__["_thrifty_cls"] = type(m)
    new.slots = Slots()
    return new


def wrap_in_place(m: nn.Module) -> None:
    """Change the class of a bare wrappable layer to its Gemm layer (the caller holds ``m``)."""
    if is_gemm(m):
        return
    cls = gemm_class(m)
    if cls is GemmLinearT:
        m.__dict__["_thrifty_cls"] = type(m)
    m.__class__ = cls
    m.slots = Slots()


def gemm_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Yield ``(qualified_name, layer)`` for every Gemm layer in ``model``."""
    for name, m in model.named_modules():
        if is_gemm(m):
            yield name, m
