"""Frozen configs: ``QuantConfig`` (round-to-nearest slots, usable with ``thrifty.apply``) and ``PTQ`` (pipeline).

Example:
    >>> import torch.nn as nn
    >>> from thrifty.core import apply
    >>> m = apply(nn.Sequential(nn.Linear(4, 4)), QuantConfig(w_bits=4, a_bits=8))
    >>> type(m[0].slots.weight).__name__, m[0].slots.weight.mode
    ('UniformQuantizer', 'frozen')
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal, Optional

import torch.nn as nn

from thrifty.core import Config, register_config, register_handler, register_pipeline
from thrifty.nn import Chain, SlotRefused, gemm_op
from thrifty.ops.quant import check_bits, check_group_size
from thrifty.quant.quantizer import UniformQuantizer

__all__ = ["QuantConfig", "PTQ", "weight_quantizer", "input_quantizer", "PIPELINES"]

PIPELINES = ("rtn", "adaquant", "light", "advanced")
_EST = ("minmax", "sample_minmax", "percentile", "mse")


@dataclass(frozen=True, kw_only=True)
class Quantizers(Config):
    """The quantizer fields QuantConfig (one layer) and PTQ (the pipeline) share: weight and activation bits
    and grids, checked once. Their grid fields are keyword-only, so each config's positional fields stay first.

    Args:
        w_bits: weight bits (2..16).
        a_bits: input (activation) bits (None: floating point).
        per_channel: one weight range per output channel (else per tensor).
        group_size: weights per scale along each output channel's reduction (None: one scale per channel).
        w_symmetric: symmetric weight grid (else asymmetric, with a zero point).
        a_symmetric: symmetric input grid.
        w_estimator: weight range estimator: "minmax", "sample_minmax", "percentile" or "mse".
        a_estimator: input range estimator (the same choices).
    """

    w_bits: int = 8
    a_bits: Optional[int] = 8
    per_channel: bool = True
    group_size: Optional[int] = None
    w_symmetric: bool = False
    a_symmetric: bool = False
    w_estimator: str = "mse"
    a_estimator: str = "mse"

    def __post_init__(self) -> None:
        check_bits(self.w_bits, "w_bits")
        if self.a_bits is not None:
            check_bits(self.a_bits, "a_bits")
        for f in ("w_estimator", "a_estimator"):
            if getattr(self, f) not in _EST:
                raise ValueError(f"{f} must be one of {_EST}, got {getattr(self, f)!r}")
        check_group_size(self.group_size)
        if self.group_size is not None and not self.per_channel:
            raise ValueError(f"group_size={self.group_size} needs per_channel=True (groups split each output channel)")
        if self.group_size is not None and self.w_estimator not in ("minmax", "mse"):
            raise ValueError(f"group_size={self.group_size}: per-group weight ranges support w_estimator 'minmax' or "
                             f"'mse', got {self.w_estimator!r}")


@register_config
@dataclass(frozen=True)
class QuantConfig(Quantizers):
    """Round-to-nearest fake quantization of one layer's weight (per output channel by default) and input.

    ``a_bits=None`` leaves activations in floating point. Input quantizers start in ``dynamic`` mode (range of
    each batch); :func:`thrifty.quant.calibrate_inputs` fixes them from calibration data. ``group_size``: one
    weight scale per that many consecutive reduction elements of each output channel (per-group, e.g. W4A16
    with ``QuantConfig(w_bits=4, a_bits=None, group_size=128)``). The fields are :class:`Quantizers`'.
    """

    w_bits: int = dataclasses.field(default=8, kw_only=False)
    a_bits: Optional[int] = dataclasses.field(default=8, kw_only=False)


def weight_quantizer(bits: int, cfg: Quantizers, learnable: bool = False,
                     layer: Optional[nn.Module] = None) -> UniformQuantizer:
    """The weight quantizer of ``cfg``; per channel along ``layer``'s output-channel axis (its own layout), per
    group of ``cfg.group_size`` along the rest when set."""
    axis = 0 if layer is None else gemm_op(layer).out_axis
    if cfg.per_channel and axis is None:
        raise SlotRefused(f"{type(layer).__name__} (groups={getattr(layer, 'groups', 1)}) has no single output-channel "
                          "axis for per-channel weight quantization; use per_channel=False or leave it out with filter=")
    return UniformQuantizer(bits, symmetric=cfg.w_symmetric, per_channel=cfg.per_channel, axis=axis or 0,
                            estimator=cfg.w_estimator, learnable=learnable, group_size=cfg.group_size)


def input_quantizer(bits: int, cfg: Quantizers, learnable: bool = False) -> UniformQuantizer:
    # Activation tensors are large: the MSE range search evaluates its error on a 2^15-element subset.
    kw = {"max_samples": 2**15} if cfg.a_estimator == "mse" else None
    return UniformQuantizer(bits, symmetric=cfg.a_symmetric, per_channel=False, estimator=cfg.a_estimator,
                            learnable=learnable, estimator_kw=kw)


@register_handler(QuantConfig)
def _quant_handler(layer: nn.Module, name: str, cfg: QuantConfig) -> None:
    # Quantize first, then whatever else the slot holds (an N:M mask keeps its zeros: 0 is on every grid);
    # an existing quantizer is replaced, not stacked.
    if getattr(layer, "weight", None) is None:  # an attention matmul: two activations, ranges per tensor
        layer.slots.weight = input_quantizer(cfg.w_bits, cfg)  # type: ignore[union-attr]
        layer.slots.input = None if cfg.a_bits is None else input_quantizer(cfg.a_bits, cfg)  # type: ignore
        return
    wq = weight_quantizer(cfg.w_bits, cfg, layer=layer).init_from(layer.effective_weight())  # type: ignore[union-attr,operator]
    cur = layer.slots.weight  # type: ignore[union-attr]
    rest = [t for t in (cur if isinstance(cur, Chain) else [cur] if cur is not None else [])
            if not isinstance(t, UniformQuantizer)]
    layer.slots.weight = Chain(wq, *rest) if rest else wq  # type: ignore[union-attr]
    # An embedding's other operand is a one-hot matrix, exact at any bit width: its lookup has no input to quantize.
    lookup = "input" in type(layer).NO_SLOTS
    layer.slots.input = None if cfg.a_bits is None or lookup else input_quantizer(cfg.a_bits, cfg)  # type: ignore


@register_config
@dataclass(frozen=True)
class PTQ(Quantizers):
    """Post-training quantization pipeline (Hubara et al.): one call, :func:`thrifty.quant.quantize`.

    Pipelines: ``rtn`` (round to nearest), ``adaquant`` (AdaQuant only), ``light`` (BN tuning), ``advanced``
    (AdaQuant + BN tuning + bias tuning); any of them runs the ILP bit allocation first when ``budget`` is set
    (light = bit allocation + BN tuning, advanced = AdaQuant + bit allocation + BN tuning + bias tuning).

    Bits: weights ``w_bits`` (or an ILP allocation over ``candidate_bits`` when ``budget`` is set), activations
    ``a_bits`` (None = FP); the first and last GEMM layers (execution order) use ``first_last_bits`` for both
    (None = leave them in FP). ``group_size``: per-group weight scales (see :class:`QuantConfig`; W4A16 is
    ``PTQ(w_bits=4, a_bits=None, group_size=128)``). ``budget`` is a fraction of the FP32 size of the quantized layers
    (``budget_kind="size"``) or of their FP32 x FP32 bit-operations (``"bops"``).

    The quantizer grid fields (``per_channel``, ``group_size``, ``w_symmetric``, ``a_symmetric``,
    ``w_estimator``, ``a_estimator``) are :class:`Quantizers`', as in :class:`QuantConfig`.

    Args:
        w_bits: weight bits (2..16) without a budget.
        a_bits: activation bits (None: floating point).
        pipeline: "rtn", "adaquant", "light" or "advanced" (see above).
        first_last_bits: bits of the first and last GEMM layers, weights and inputs (None: floating point).
        budget: bit-allocation budget, a fraction of the FP32 size or bit-operations (None: no allocation).
        budget_kind: "size" or "bops": what ``budget`` is a fraction of.
        candidate_bits: weight bit widths the allocation chooses from.
        adaquant_mode: "sequential" (each layer fits on the quantized prefix's outputs) or "parallel" (on the FP
            model's).
        adaquant_iters: AdaQuant optimisation steps per layer.
        adaquant_batch: AdaQuant samples per step.
        lr_weight: AdaQuant learning rate of the weights.
        lr_bias: AdaQuant learning rate of the biases.
        lr_w_scale: AdaQuant learning rate of the weight quantizers' scales.
        lr_a_scale: AdaQuant learning rate of the input quantizers' scales.
        adaquant_relu: measure a layer's error after the ReLU that follows it, where one does.
        adaquant_max_shift: each latent weight stays within this many of its channel's quantization steps of its
            start (None: free).
        bn_tune: re-estimate BatchNorm statistics (None: as the pipeline says).
        bias_tune: tune the biases on the output loss (None: as the pipeline says).
        bias_iters: bias-tuning steps.
        bias_lr: bias-tuning learning rate.
        loss: "kl" or "mse" to the FP model's outputs ("auto": kl when the data has labels).
        batch_size: calibration samples per batch.
        seed: seeds AdaQuant and bias tuning.

    Example:
        >>> PTQ(w_bits=4, a_bits=8, pipeline="advanced", budget=0.13).candidate_bits
        (2, 3, 4, 8)
    """

    w_bits: int = dataclasses.field(default=4, kw_only=False)
    a_bits: Optional[int] = dataclasses.field(default=8, kw_only=False)
    pipeline: Literal["rtn", "adaquant", "light", "advanced"] = "advanced"
    first_last_bits: Optional[int] = 8
    # bit allocation
    budget: Optional[float] = None
    budget_kind: Literal["size", "bops"] = "size"
    candidate_bits: tuple[int, ...] = (2, 3, 4, 8)
    # AdaQuant
    adaquant_mode: Literal["sequential", "parallel"] = "sequential"
    adaquant_iters: int = 200
    adaquant_batch: int = 32
    lr_weight: float = 1e-2
    lr_bias: float = 1e-3
    lr_w_scale: float = 1e-2
    lr_a_scale: float = 1e-2
    adaquant_relu: bool = False  # measure a layer's error after the ReLU it feeds (found by probing)
    adaquant_max_shift: Optional[float] = 1.0  # latent weights stay within this many steps of their start
    # BN / bias tuning
    bn_tune: Optional[bool] = None  # None: on for light/advanced
    bias_tune: Optional[bool] = None  # None: on for advanced
    bias_iters: int = 100
    bias_lr: float = 1e-3
    loss: Literal["auto", "kl", "mse"] = "auto"
    batch_size: int = 32
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.first_last_bits is not None:
            check_bits(self.first_last_bits, "first_last_bits")
        if self.pipeline not in PIPELINES:
            raise ValueError(f"pipeline must be one of {PIPELINES}, got {self.pipeline!r}")
        if not self.candidate_bits or len(set(self.candidate_bits)) != len(self.candidate_bits):
            raise ValueError(f"candidate_bits must be distinct bit-widths, got {self.candidate_bits!r}")
        for b in self.candidate_bits:
            check_bits(b, "candidate_bits")
        if self.budget is not None and not 0.0 < self.budget <= 1.0:
            raise ValueError(f"budget must be a fraction in (0, 1], got {self.budget}")
        if self.budget_kind not in ("size", "bops"):
            raise ValueError(f"budget_kind must be 'size' or 'bops', got {self.budget_kind!r}")
        if self.budget_kind == "bops" and self.budget is not None and self.a_bits is None:
            raise ValueError("budget_kind='bops' needs quantized activations (a_bits)")
        if self.adaquant_mode not in ("sequential", "parallel"):
            raise ValueError(f"adaquant_mode must be 'sequential' or 'parallel', got {self.adaquant_mode!r}")
        for f in ("adaquant_iters", "adaquant_batch", "bias_iters", "batch_size"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v < (0 if f.endswith("iters") else 1):
                raise ValueError(f"{f} must be a {'non-negative' if f.endswith('iters') else 'positive'} int, got {v!r}")
        for f in ("lr_weight", "lr_bias", "lr_w_scale", "lr_a_scale", "bias_lr"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0:
                raise ValueError(f"{f} must be a non-negative number (0 = not learned), got {v!r}")
        if self.adaquant_max_shift is not None and not self.adaquant_max_shift > 0:
            raise ValueError(f"adaquant_max_shift must be None or > 0, got {self.adaquant_max_shift!r}")
        if self.loss not in ("auto", "kl", "mse"):
            raise ValueError(f"loss must be 'auto', 'kl' or 'mse', got {self.loss!r}")

    @property
    def uses_adaquant(self) -> bool:
        return self.pipeline in ("adaquant", "advanced")

    @property
    def uses_bn_tune(self) -> bool:
        return self.pipeline in ("light", "advanced") if self.bn_tune is None else self.bn_tune

    @property
    def uses_bias_tune(self) -> bool:
        return self.pipeline == "advanced" if self.bias_tune is None else self.bias_tune

    @property
    def uses_bitalloc(self) -> bool:
        return self.budget is not None


register_pipeline(PTQ, "needs calibration data", "thrifty.quant.quantize(model, cfg, data)")
