"""A small nn.Module quantizer for the Gemm layers' ``weight`` and ``input`` slots.

Three modes:

* ``dynamic`` (initial): the range is estimated from every tensor it sees (no state). Good for weights during
  training.
* ``calibrate``: observes ranges (global min/max, or the running average of per-batch estimates for the other
  estimators) and passes its input through unchanged, so a calibration pass sees the full-precision model.
* ``frozen``: uses stored ``scale``/``zero_point`` (learnable Parameters if ``learnable=True``, else buffers).

All arithmetic is :mod:`thrifty.ops.quant`. Example:
    >>> import torch, torch.nn as nn
    >>> from thrifty.nn import wrap
    >>> layer = wrap(nn.Linear(8, 4))
    >>> layer.add("weight", UniformQuantizer(4, per_channel=True, axis=0).init_from(layer.weight))
    ... # doctest: +ELLIPSIS
    GemmLinear(...)
    >>> q = UniformQuantizer(8); layer.add("input", q.calibrate())  # doctest: +ELLIPSIS
    GemmLinear(...)
    >>> _ = layer(torch.randn(16, 8)); q.freeze().mode
    'frozen'
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn as nn
from torch import Tensor

from thrifty.ops import quant as Q

__all__ = ["UniformQuantizer"]


class UniformQuantizer(nn.Module):
    """Uniform fake-quantizer ``x -> q(x)`` with calibration state (see module docstring).

    Args:
        bits: 2..16.
        symmetric: signed narrow range with zero point 0, else asymmetric ``[0, 2^b-1]`` with integer zero point.
        per_channel: one scale/zero point per index of dimension ``axis``.
        group_size: with ``per_channel``, one scale/zero point per ``group_size`` consecutive elements of each
            channel's other dimensions flattened (the GEMM reduction; the weight-only "W4A16 g128" of LLMs);
            parameters shaped ``(channels, groups)``, a short last group is a group of its own.
        rounding: ``"nearest"`` or ``"stochastic"`` (``seed`` makes it reproducible).
        estimator: ``"minmax"``, ``"sample_minmax"``, ``"percentile"`` or ``"mse"`` (kwargs in ``estimator_kw``).
        learnable: scale and zero point become Parameters when frozen (AdaQuant optimises them).
        momentum: None averages per-batch estimates over the calibration batches; a float uses an EMA.
        gradient: ``"clipped"`` (STE inside the range, 0 outside, gradients to scale/zp) or ``"identity"``.
    """

    def __init__(self, bits: int = 8, symmetric: bool = False, per_channel: bool = False, axis: int = 0,
                 rounding: Q.Rounding = "nearest", estimator: str = "minmax", learnable: bool = False,
                 momentum: Optional[float] = None, gradient: str = "clipped", seed: Optional[int] = None,
                 estimator_kw: Optional[dict[str, Any]] = None, group_size: Optional[int] = None) -> None:
        super().__init__()
        Q.check_bits(bits)
        Q.check_group_size(group_size)
        if group_size is not None and not per_channel:
            raise ValueError(f"group_size={group_size} needs per_channel=True (groups split each output channel)")
        if group_size is not None and estimator not in ("minmax", "mse"):
            raise ValueError(f"group_size={group_size}: per-group ranges support the minmax and mse estimators, "
                             f"got {estimator!r}")
        Q._check_rounding(rounding)
        if estimator not in ("minmax", "sample_minmax", "percentile", "mse"):
            raise ValueError(f"unknown range estimator {estimator!r}; use minmax, sample_minmax, percentile or mse")
        if gradient not in ("clipped", "identity"):
            raise ValueError(f"gradient must be 'clipped' or 'identity', got {gradient!r}")
        if momentum is not None and not 0.0 < momentum <= 1.0:
            raise ValueError(f"momentum must be None or in (0, 1], got {momentum}")
        self.bits, self.symmetric, self.per_channel, self.axis = bits, symmetric, per_channel, axis
        self.rounding, self.estimator, self.learnable = rounding, estimator, learnable
        self.momentum, self.gradient, self.seed, self.group_size = momentum, gradient, seed, group_size
        self.estimator_kw = dict(estimator_kw or {})
        self._generator: Optional[torch.Generator] = None
        self._calibrating = False
        self._n_obs = 0
        self.register_buffer("frozen_flag", torch.tensor(False))
        self._frozen = False  # frozen_flag as a Python bool: reading the buffer would be a data-dependent branch
        # for torch.export and torch.jit.trace (kept in sync by calibrate, freeze and load_state_dict)
        self.register_buffer("min_val", torch.zeros(()))
        self.register_buffer("max_val", torch.zeros(()))
        if learnable:
            self.scale = nn.Parameter(torch.ones(()))
            self.zero_point = nn.Parameter(torch.zeros(()))
        else:
            self.register_buffer("scale", torch.ones(()))
            self.register_buffer("zero_point", torch.zeros(()))

    # --------------------------------------------------------------------------------------- state
    @property
    def mode(self) -> str:
        if self._calibrating:
            return "calibrate"
        frozen = self.__dict__.get("_frozen")
        return "frozen" if (bool(self.frozen_flag) if frozen is None else frozen) else "dynamic"

    @property
    def _axis(self) -> Optional[int]:
        return self.axis if self.per_channel else None

    def spec(self) -> dict[str, Any]:
        """Constructor arguments (plain data) that rebuild this quantizer; see :meth:`from_spec`."""
        return dict(bits=self.bits, symmetric=self.symmetric, per_channel=self.per_channel, axis=self.axis,
                    rounding=self.rounding, estimator=self.estimator, learnable=self.learnable,
                    momentum=self.momentum, gradient=self.gradient, seed=self.seed,
                    estimator_kw=dict(self.estimator_kw), group_size=self.group_size)

    @classmethod
    def from_spec(cls, spec: dict[str, Any], layer: Optional[nn.Module] = None) -> "UniformQuantizer":
        """The quantizer :meth:`spec` describes (``layer`` is unused: the saved state sets the ranges)."""
        return cls(**spec)

    def calibrate(self) -> "UniformQuantizer":
        """Enter calibration mode (forgets previous observations); returns self."""
        self._calibrating = True
        self._n_obs = 0
        self.frozen_flag.fill_(False)
        self._frozen = False
        return self

    @torch.no_grad()
    def observe(self, x: Tensor) -> None:
        """Fold one batch into the observed range."""
        lo, hi = Q.estimate_range(x.detach(), self.estimator, bits=self.bits, symmetric=self.symmetric,  # type: ignore[arg-type]
                                  axis=self._axis, group_size=self.group_size, **self.estimator_kw)
        if self._n_obs == 0:
            new_lo, new_hi = lo, hi
        elif self.estimator == "minmax":
            new_lo, new_hi = torch.minimum(self.min_val, lo), torch.maximum(self.max_val, hi)
        elif self.momentum is None:  # cumulative mean of the per-batch estimates
            k = self._n_obs
            new_lo, new_hi = (self.min_val * k + lo) / (k + 1), (self.max_val * k + hi) / (k + 1)
        else:
            new_lo, new_hi = Q.ema_range((self.min_val, self.max_val), (lo, hi), self.momentum)
        self.min_val, self.max_val = new_lo.to(self.min_val.device), new_hi.to(self.max_val.device)
        self._n_obs += 1

    @torch.no_grad()
    def freeze(self) -> "UniformQuantizer":
        """Compute scale/zero point from the observed range and use them from now on; returns self."""
        if self._calibrating and self._n_obs == 0:
            raise RuntimeError("UniformQuantizer.freeze(): calibration saw no data")
        self._calibrating = False
        self._set_qparams(*Q.qparams_from_range(self.min_val, self.max_val, self.bits, self.symmetric))
        self.frozen_flag.fill_(True)
        self._frozen = True
        return self

    def init_from(self, t: Tensor) -> "UniformQuantizer":
        """Calibrate on one tensor (e.g. a weight) and freeze; returns self."""
        self.calibrate()
        self.observe(t)
        return self.freeze()

    def set_bits(self, bits: int) -> "UniformQuantizer":
        """Change the bit-width; a frozen quantizer recomputes its parameters from the stored range."""
        self.bits = Q.check_bits(bits)
        if self.mode == "frozen":
            self.freeze()
        return self

    def _set_qparams(self, scale: Tensor, zp: Tensor) -> None:
        dev = self.min_val.device
        scale, zp = scale.to(dev).float(), zp.to(dev).float()
        if self.learnable:
            self.scale = nn.Parameter(scale.clone())
            self.zero_point = nn.Parameter(zp.clone())
        else:
            self.scale, self.zero_point = scale, zp

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[override]
        # Per-channel parameters have a data-dependent shape: adopt the saved shapes before copying.
        for name in ("min_val", "max_val", "scale", "zero_point"):
            key = prefix + name
            if key in state_dict and getattr(self, name).shape != state_dict[key].shape:
                cur = getattr(self, name)
                new = torch.zeros(state_dict[key].shape, dtype=cur.dtype, device=cur.device)
                if isinstance(cur, nn.Parameter):
                    setattr(self, name, nn.Parameter(new))
                else:
                    setattr(self, name, new)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._frozen = bool(self.frozen_flag)

    # ------------------------------------------------------------------------------------- forward
    def _gen(self, device: torch.device) -> Optional[torch.Generator]:
        if self.rounding != "stochastic" or self.seed is None:
            return None
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device).manual_seed(self.seed)
        return self._generator

    def forward(self, x: Tensor) -> Tensor:
        if self._calibrating:
            self.observe(x)
            return x
        gen = self._gen(x.device)
        if self.mode == "dynamic":
            return Q.fake_quantize_tensor(x, self.bits, symmetric=self.symmetric, axis=self._axis,
                                          rounding=self.rounding, generator=gen, estimator=self.estimator,  # type: ignore[arg-type]
                                          straight_through=True, group_size=self.group_size, **self.estimator_kw)
        f = Q.fake_quantize if (self.gradient == "clipped" or self.learnable) else Q.fake_quantize_ste
        return f(x, self.scale, None if self.symmetric else self.zero_point, self.bits, symmetric=self.symmetric,
                 axis=self._axis, rounding=self.rounding, generator=gen, group_size=self.group_size)  # type: ignore[arg-type]

    @torch.no_grad()
    def step_like(self, x: Tensor) -> Tensor:
        """The frozen quantization step of every element of ``x`` (the tensor it quantizes), shaped like ``x``."""
        s = self.scale.detach().abs()
        if s.dim() == 0:
            return s.expand_as(x)
        if self.group_size is not None:
            g = Q.group_view(x, self.axis, self.group_size)
            return Q.ungroup(s.reshape(g.shape[0], g.shape[1], 1).expand_as(g), x.shape, self.axis)
        return Q._bcast(s, x, self.axis).expand_as(x)

    def extra_repr(self) -> str:
        kind = "sym" if self.symmetric else "asym"
        ch = f"per_channel(axis={self.axis})" if self.per_channel else "per_tensor"
        ch += f", group_size={self.group_size}" if self.group_size is not None else ""
        extra = ", learnable" if self.learnable else ""
        return f"bits={self.bits}, {kind}, {ch}, {self.rounding}, {self.estimator}, mode={self.mode}{extra}"
