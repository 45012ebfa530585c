"""8-bit training (Banner et al., "Scalable methods for 8-bit training of neural networks").

Every selected GEMM gets

* ``weight`` and ``input`` slots: 8-bit GEMMLOWP-style quantizers (:class:`ActQuant`: per-tensor asymmetric
  min/max, dynamic range, straight-through gradient; the values of :class:`thrifty.quant.UniformQuantizer`);
* ``grad_output`` slot: :class:`GradQuant`, which quantizes the neural gradient dY with *stochastic rounding*
  (unbiased: ``E[q(dy)] = dy``) and returns two streams: the 8-bit dY for the input-gradient GEMM
  (dX = dY W) and, with *bifurcation*, a higher-precision (16-bit by default, or float32) dY for the
  weight-gradient GEMM (dW = dY^T X). Without bifurcation both GEMMs use the 8-bit dY.

Gradient ranges are per sample (the first dimension of dY), as in the authors' ``quantize_grad``.
:func:`prepare_train8` also swaps every BatchNorm for :class:`thrifty.nn.RangeBatchNorm2d` / 1d.
All quantizer arithmetic is :mod:`thrifty.ops.quant`.

Example:
    >>> import torch, torch.nn as nn
    >>> model = prepare_train8(nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 2)))
    >>> model(torch.randn(4, 8)).sum().backward()
    >>> type(model[1]).__name__
    'RangeBatchNorm1d'
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Optional

import torch
import torch.nn as nn
from torch import Tensor

from thrifty.core import Config, Filter, apply, register_config, register_handler, register_prepare
from thrifty.nn.gemm import GradTransform
from thrifty.nn.rangebn import _RangeBatchNorm, convert_to_range_bn
from thrifty.ops import quant as Q
from thrifty.ops.quant import fake_quantize_minmax

__all__ = ["Train8", "GradQuant", "ActQuant", "fake_quantize_minmax", "prepare_train8", "convert_to_batchnorm"]


@register_config
@dataclass(frozen=True)
class Train8(Config):
    """8-bit training of weights (``bits``), activations (``act_bits``) and neural gradients (``grad_bits``).

    ``bifurcation``: the weight-gradient GEMM gets dY at ``wgrad_bits`` (None: float32) instead of the 8-bit
    one. ``grad_rounding``: ``"stochastic"`` (default) or ``"nearest"``. ``grad_per_sample``: one gradient range
    per sample (else per tensor). ``range_bn``: ``apply`` (and :func:`prepare_train8`) swaps BatchNorm for Range BN
    (``range_bn_bits`` optionally quantizes Range BN too).

    Args:
        bits: weight bits.
        act_bits: activation bits (None: floating point).
        grad_bits: bits of dY for the input-gradient GEMM.
        bifurcation: give the weight-gradient GEMM dY at ``wgrad_bits`` instead.
        wgrad_bits: bits of dY for the weight-gradient GEMM with bifurcation (None: float32).
        grad_rounding: "stochastic" or "nearest" rounding of dY.
        grad_per_sample: one gradient range per sample (else per tensor).
        weight_per_channel: one weight range per output channel (else per tensor).
        range_bn: swap BatchNorm for Range BN.
        range_bn_bits: also quantize Range BN to this many bits (None: no).
    """

    bits: int = 8
    act_bits: Optional[int] = 8
    grad_bits: int = 8
    bifurcation: bool = True
    wgrad_bits: Optional[int] = 16
    grad_rounding: Literal["stochastic", "nearest"] = "stochastic"
    grad_per_sample: bool = True
    weight_per_channel: bool = False
    range_bn: bool = True
    range_bn_bits: Optional[int] = None

    def __post_init__(self) -> None:
        Q.check_bits(self.bits, "Train8.bits")
        Q.check_bits(self.grad_bits, "Train8.grad_bits")
        for name in ("act_bits", "wgrad_bits", "range_bn_bits"):
            if getattr(self, name) is not None:
                Q.check_bits(getattr(self, name), f"Train8.{name}")
        if self.grad_rounding not in ("stochastic", "nearest"):
            raise ValueError(f"Train8.grad_rounding must be 'stochastic' or 'nearest', got {self.grad_rounding!r}")


class GradQuant(GradTransform):
    """Quantize dY: ``(q_{grad_bits}(dy), q_{wgrad_bits}(dy) or dy)`` with bifurcation, else ``(q(dy), q(dy))``.

    Both streams come from one range computation and one read of dY (:func:`thrifty.ops.quant.fake_quantize_minmax`
    with ``also_bits``); the 16-bit stream rounds to nearest (stochastic rounding buys nothing measurable at
    2^-16 of the range). Example:
        >>> gx, gw = GradQuant(8, wgrad_bits=None)(torch.randn(4, 3))
        >>> (gx.shape, gw.shape)
        (torch.Size([4, 3]), torch.Size([4, 3]))
    """

    def __init__(self, grad_bits: int = 8, bifurcation: bool = True, wgrad_bits: Optional[int] = 16,
                 rounding: Q.Rounding = "stochastic", per_sample: bool = True) -> None:
        super().__init__()
        self.grad_bits = Q.check_bits(grad_bits, "grad_bits")
        if wgrad_bits is not None:
            Q.check_bits(wgrad_bits, "wgrad_bits")
        Q._check_rounding(rounding)
        self.bifurcation, self.wgrad_bits, self.rounding, self.per_sample = bifurcation, wgrad_bits, rounding, per_sample

    def spec(self) -> dict[str, Any]:
        """Constructor arguments (plain data) that rebuild this transform; see :meth:`from_spec`."""
        return dict(grad_bits=self.grad_bits, bifurcation=self.bifurcation, wgrad_bits=self.wgrad_bits,
                    rounding=self.rounding, per_sample=self.per_sample)

    @classmethod
    def from_spec(cls, spec: dict[str, Any], layer: Optional[nn.Module] = None) -> "GradQuant":
        return cls(**spec)

    def extra_repr(self) -> str:
        w = (self.wgrad_bits or "fp32") if self.bifurcation else self.grad_bits
        return f"dX gemm: {self.grad_bits}-bit, dW gemm: {w}-bit, {self.rounding}, per_sample={self.per_sample}"

    def forward(self, dy: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        axis = 0 if (self.per_sample and dy.dim() > 1) else None
        also = self.wgrad_bits if self.bifurcation else None
        try:
            q = fake_quantize_minmax(dy, self.grad_bits, axis=axis, rounding=self.rounding, also_bits=also)
        except ValueError as e:
            raise ValueError(f"8-bit training: the gradient to quantize contains NaN or Inf (training diverged?): "
                             f"{e}") from None
        if not self.bifurcation:
            return q, q  # type: ignore[return-value]
        if self.wgrad_bits is None:
            return q, dy  # type: ignore[return-value]
        return q  # type: ignore[return-value]


class ActQuant(nn.Module):
    """Per-tensor (or per-channel along ``axis``) min/max fake quantizer with a straight-through gradient.

    The same values as :class:`thrifty.quant.UniformQuantizer` in dynamic min/max mode (asymmetric, nearest)
    through the one-pass :func:`thrifty.ops.quant.fake_quantize_minmax`: 8-bit training quantizes every weight
    and activation at every step, so passes matter. Used for the weight and input slots.
    """

    def __init__(self, bits: int = 8, axis: Optional[int] = None) -> None:
        super().__init__()
        self.bits, self.axis = Q.check_bits(bits), axis

    def spec(self) -> dict[str, Any]:
        """Constructor arguments (plain data) that rebuild this quantizer; see :meth:`from_spec`."""
        return dict(bits=self.bits, axis=self.axis)

    @classmethod
    def from_spec(cls, spec: dict[str, Any], layer: Optional[nn.Module] = None) -> "ActQuant":
        return cls(**spec)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, axis={self.axis}"

    def forward(self, x: Tensor) -> Tensor:
        try:
            q = fake_quantize_minmax(x, self.bits, axis=self.axis)
        except ValueError as e:
            raise ValueError(f"8-bit training: a tensor to quantize contains NaN or Inf (training diverged?): "
                             f"{e}") from None
        return _StraightThrough.apply(x, q) if x.requires_grad else q  # type: ignore[return-value]


class _StraightThrough(torch.autograd.Function):
    """Value of ``q``, gradient of ``x`` (``x + (q - x).detach()`` without its two extra passes)."""

    @staticmethod
    def forward(ctx, x: Tensor, q: Tensor) -> Tensor:  # type: ignore[override]
        return q

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        return g, None


@register_handler(Train8)
def _handle(layer: nn.Module, name: str, cfg: Train8) -> None:
    layer.add("weight", ActQuant(cfg.bits, axis=layer.op.out_axis if cfg.weight_per_channel else None))
    if cfg.act_bits is not None:
        layer.add("input", ActQuant(cfg.act_bits))
    layer.add("grad_output", GradQuant(cfg.grad_bits, cfg.bifurcation, cfg.wgrad_bits, cfg.grad_rounding,
                                       cfg.grad_per_sample))


@register_prepare(Train8)
def _swap_batchnorm(model: nn.Module, cfg: Train8) -> nn.Module:
    # Range BN is part of the method, not of a GEMM slot: apply runs this before wrapping any layer.
    return convert_to_range_bn(model, bits=cfg.range_bn_bits) if cfg.range_bn else model


def prepare_train8(model: nn.Module, cfg: Train8 = Train8(), filter: Filter = None) -> nn.Module:
    """Swap BatchNorm for Range BN (if ``cfg.range_bn``) and fill the GEMM slots for 8-bit training (in place).

    The same as ``thrifty.apply(model, cfg, filter)``. Example: see the module docstring.
    """
    if not isinstance(cfg, Train8):
        raise TypeError(f"cfg must be a Train8 config, got {type(cfg).__name__}")
    return apply(model, cfg, filter)


def convert_to_batchnorm(model: nn.Module) -> nn.Module:
    """Replace every Range BN by an nn.BatchNorm with the same eval-mode output (for export / plain loading).

    ``running_var = (running_scale + eps)^2 - eps``; the affine Parameters are shared. Example:
        >>> from thrifty.nn import RangeBatchNorm2d
        >>> type(convert_to_batchnorm(nn.Sequential(RangeBatchNorm2d(3)))[0]).__name__
        'BatchNorm2d'
    """
    def convert(rb: _RangeBatchNorm) -> nn.Module:
        cls = nn.BatchNorm2d if rb._dims == (4,) else nn.BatchNorm1d
        like = next(iter(rb.parameters(recurse=False)), rb.running_mean)  # keep the model's dtype and device
        fk = {"device": like.device, "dtype": like.dtype} if like is not None else {}
        bn = cls(rb.num_features, rb.eps, rb.momentum, rb.affine, rb.track_running_stats, **fk)
        if rb.affine:
            bn.weight, bn.bias = rb.weight, rb.bias
        if rb.track_running_stats:
            with torch.no_grad():
                bn.running_mean.copy_(rb.running_mean)
                bn.running_var.copy_((rb.running_scale + rb.eps) ** 2 - rb.eps)
                bn.num_batches_tracked.copy_(rb.num_batches_tracked)
        bn.train(rb.training)
        return bn

    if isinstance(model, _RangeBatchNorm):
        return convert(model)
    for parent in list(model.modules()):
        for name, child in list(parent._modules.items()):
            if isinstance(child, _RangeBatchNorm):
                parent._modules[name] = convert(child)
    return model
