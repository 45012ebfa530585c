"""N:M sparsity for activations (forward) and neural gradients (backward) during training.

Two configs fill two slots of the wrapped GEMM layers (:mod:`thrifty.nn.gemm`):

* :class:`ActNM` -> ``layer.slots.input``: the MSE-optimal N:M mask (top-N
  magnitudes) on the layer's input X. The mask is grouped along the forward
  GEMM's reduction dim (Linear: ``in_features``, the last dim; Conv2d: input
  channels, dim 1). Its backward is the exact derivative of the masking: the
  input gradient is masked the same way.
* :class:`GradNM` -> ``layer.slots.grad_output``: N:M pruning of dY inside
  backward, unbiased by default (MVUE; ``method="mse"`` is the biased baseline
  that fails to train). ``gemms`` picks which backward GEMMs see the pruned dY;
  the others get dY untouched. Blocks follow the reduction dim of each GEMM,
  which is where N:M sparse tensor cores need them:

  ==============  ===============================  ============================  =====================
  GEMM            reduction                        Linear default                Conv2d default
  ==============  ===============================  ============================  =====================
  dX = dY W       output features                  ``input_dim=-1`` (out feat.)  ``input_dim=1`` (out ch.)
  dW = dY^T X     batch (x tokens / positions)     ``weight_dim=0`` (batch)      ``weight_dim=0`` (batch)
  ==============  ===============================  ============================  =====================

  For dW the default groups ``m`` consecutive samples of the batch at the same
  feature / channel and position (the batch is part of dW's reduction for
  every layer type, and blocks along dim 0 keep the innermost dims contiguous,
  which is what makes the masks cheap). When both GEMMs are pruned along the
  same dim one draw serves both; otherwise each GEMM gets an independent draw.
  Every draw is unbiased, so dX and dW stay unbiased estimates of the dense
  gradients. A batch that is not a multiple of ``m`` follows ``tail``.

Randomness: each layer owns a ``torch.Generator`` seeded from ``cfg.seed`` and
the layer's name, so runs repeat exactly (``seed=None`` uses torch's global RNG).
Sizes that are not a multiple of ``m`` follow ``tail`` (see :mod:`thrifty.ops.mvue`).

Example:
    >>> import torch, torch.nn as nn, thrifty
    >>> model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    >>> _ = thrifty.apply(model, GradNM(2, 4, method="mvue"))
    >>> _ = thrifty.apply(model, ActNM(2, 4), filter="2")
    >>> model(torch.randn(4, 8)).sum().backward()
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn as nn
from torch import Tensor

from thrifty.core import Config, register_config, register_handler
from thrifty.nn.gemm import GradTransform
from thrifty.ops.mvue import METHODS, mse_mask, nm_prune

__all__ = ["ActNM", "GradNM", "ActNMMask", "GradNMTransform", "parse_nm", "GEMMS"]

GEMMS = ("input", "weight")
_TAILS = ("pad", "dense", "error")


def parse_nm(text: str, what: str = "N:M") -> tuple[int, int]:
    """``"2:4"`` -> ``(2, 4)``; ValueError naming ``what`` otherwise.

    Example:
        >>> parse_nm("1:2")
        (1, 2)
    """
    try:
        n_s, m_s = str(text).split(":")
        n, m = int(n_s), int(m_s)
    except ValueError:
        raise ValueError(f"{what}: expected 'N:M' such as '2:4', got {text!r}") from None
    if not 1 <= n <= m:
        raise ValueError(f"{what}: need 1 <= N <= M, got {text!r}")
    return n, m


def _check_common(cls: str, n: int, m: int, tail: str, seed: Optional[int]) -> None:
    for f, v in (("n", n), ("m", m)):
        if not isinstance(v, int) or isinstance(v, bool):
            raise TypeError(f"{cls}.{f} must be an int, got {v!r}")
    if not 1 <= n <= m:
        raise ValueError(f"{cls}: need 1 <= n <= m, got n={n}, m={m}")
    if tail not in _TAILS:
        raise ValueError(f"{cls}.tail must be one of {_TAILS}, got {tail!r}")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise TypeError(f"{cls}.seed must be an int or None, got {seed!r}")


@register_config
@dataclass(frozen=True)
class ActNM(Config):
    """MSE-optimal N:M mask on a layer's input activations (forward).

    ``dim=None`` groups along the forward reduction: Linear last dim, Conv2d channels.
    Only ``method="mse"`` is offered: the forward value should be as close as possible to X,
    and unbiasedness buys nothing there.

    Args:
        n: inputs kept in every block of ``m``.
        m: block length along the grouping dim.
        method: mask rule; only "mse" (keep the N largest magnitudes) is offered.
        dim: grouping dim of the input (None: the forward reduction, Linear last dim, Conv2d channels).
        tail: what a size that is not a multiple of ``m`` does (see thrifty.ops.mvue).

    Example:
        >>> ActNM(2, 4).dim is None
        True
    """

    n: int = 2
    m: int = 4
    method: str = "mse"
    dim: Optional[int] = None
    tail: str = "pad"

    def __post_init__(self) -> None:
        _check_common("ActNM", self.n, self.m, self.tail, None)
        if self.method != "mse":
            raise ValueError(f"ActNM.method: activations use the MSE mask ('mse'); got {self.method!r} "
                             f"(the unbiased MVUE mask is for gradients: GradNM)")


@register_config
@dataclass(frozen=True)
class GradNM(Config):
    """N:M pruning of the neural gradient dY in backward, for the GEMMs named in ``gemms``.

    ``method``: ``"mvue"`` (unbiased, minimum variance) or ``"mse"`` (top-N, biased baseline).
    ``gemms``: any of ``("input", "weight")``: dX = dY W and dW = dY^T X.
    ``input_dim`` / ``weight_dim``: grouping dims of dY for each GEMM (None: its reduction,
    see the module docstring).

    The default prunes dY for both GEMMs (all backward GEMMs N:M sparse). Accuracy-wise
    ``gemms=("weight",)`` (the paper's setting) is the safer choice: pruning dX as well injects
    noise that compounds through the layers (per-draw relative error of resnet20's weight
    gradient 1.25 instead of 0.33 for 2:4, 3.8 instead of 0.45 for 1:2). In
    results/grad_sparsity.md (resnet20, 4 epochs, 4 seeds; dense itself spreads +-2.4 points)
    MVUE 2:4 on dW alone ends at 96.71 +- 0.49 % (dense median 96.85 %); 2:4 on both GEMMs has a
    median 0.8 points below dense but one seed of four at 72.5 %; 1:2 on dW alone also lost one
    seed (77.9 %). On the MLP every MVUE setting stays within 1.4 points of dense.

    Args:
        n: gradient entries kept in every block of ``m``.
        m: block length along the grouping dim.
        method: "mvue" (unbiased, minimum variance) or "mse" (top-N, biased baseline).
        gemms: backward GEMMs that use the pruned dY: any of "input" (dX = dY W) and "weight" (dW = dY^T X).
        input_dim: grouping dim of dY for the input-gradient GEMM (None: its reduction).
        weight_dim: grouping dim of dY for the weight-gradient GEMM (None: its reduction).
        tail: what a size that is not a multiple of ``m`` does (see thrifty.ops.mvue).
        seed: seeds each layer's generator together with its name (None: torch's global RNG).

    Example:
        >>> GradNM(1, 2, gemms=("weight",)).gemms
        ('weight',)
    """

    n: int = 2
    m: int = 4
    method: str = "mvue"
    gemms: tuple[str, ...] = GEMMS
    input_dim: Optional[int] = None
    weight_dim: Optional[int] = None
    tail: str = "pad"
    seed: Optional[int] = 0

    def __post_init__(self) -> None:
        _check_common("GradNM", self.n, self.m, self.tail, self.seed)
        if self.method not in METHODS:
            raise ValueError(f"GradNM.method must be one of {METHODS}, got {self.method!r}")
        gemms = (self.gemms,) if isinstance(self.gemms, str) else tuple(self.gemms)
        if not gemms or any(g not in GEMMS for g in gemms) or len(set(gemms)) != len(gemms):
            raise ValueError(f"GradNM.gemms must be a non-empty subset of {GEMMS}, got {self.gemms!r}")
        object.__setattr__(self, "gemms", gemms)


class ActNMMask(nn.Module):
    """Input-slot module: keep the top-``n`` of every ``m`` inputs along ``dim``; grads masked alike."""

    def __init__(self, n: int, m: int, dim: int, tail: str = "pad", where: str = "") -> None:
        super().__init__()
        self.n, self.m, self.dim, self.tail, self.where = n, m, dim, tail, where

    def forward(self, x: Tensor) -> Tensor:
        try:
            mask = mse_mask(x.detach(), self.n, self.m, self.dim, self.tail)  # type: ignore[arg-type]
        except ValueError as e:
            raise ValueError(f"ActNM on layer {self.where!r}: {e}") from None
        # A product with a constant 0/1 mask: the input gradient is masked alike (the exact derivative).
        # Measured: cheaper than a custom Function that recomputes the mask in backward (one kernel pass
        # ranking x again costs more than this streaming multiply).
        return x * mask

    def spec(self) -> dict[str, Any]:
        """Constructor arguments (plain data) that rebuild this mask; see :meth:`from_spec`."""
        return dict(n=self.n, m=self.m, dim=self.dim, tail=self.tail, where=self.where)

    @classmethod
    def from_spec(cls, spec: dict[str, Any], layer: Optional[nn.Module] = None) -> "ActNMMask":
        return cls(**spec)

    def extra_repr(self) -> str:
        return f"{self.n}:{self.m}, dim={self.dim}, tail={self.tail!r}"


class GradNMTransform(GradTransform):
    """grad_output-slot module: N:M-prune dY for the chosen backward GEMMs."""

    def __init__(self, n: int, m: int, method: str = "mvue", gemms: tuple[str, ...] = GEMMS,
                 input_dim: int = -1, weight_dim: int = 0, tail: str = "pad", seed: Optional[int] = 0,
                 where: str = "") -> None:
        super().__init__()
        self.n, self.m, self.method, self.gemms = n, m, method, tuple(gemms)
        self.input_dim, self.weight_dim, self.tail, self.seed, self.where = input_dim, weight_dim, tail, seed, where
        self._gens: dict[str, torch.Generator] = {}
        self.calls = 0  # backward passes seen (handy for tests and logging)

    def spec(self) -> dict[str, Any]:
        """Constructor arguments (plain data) that rebuild this transform; see :meth:`from_spec`."""
        return dict(n=self.n, m=self.m, method=self.method, gemms=list(self.gemms), input_dim=self.input_dim,
                    weight_dim=self.weight_dim, tail=self.tail, seed=self.seed, where=self.where)

    @classmethod
    def from_spec(cls, spec: dict[str, Any], layer: Optional[nn.Module] = None) -> "GradNMTransform":
        return cls(**{**spec, "gemms": tuple(spec["gemms"])})

    def _gen(self, device: torch.device) -> Optional[torch.Generator]:
        if self.seed is None or self.method != "mvue":
            return None
        key = str(device)
        if key not in self._gens:
            self._gens[key] = torch.Generator(device=device).manual_seed(self.seed)
        return self._gens[key]

    def _prune(self, dy: Tensor, dim: int) -> Tensor:
        try:
            return nm_prune(dy, self.n, self.m, self.method, dim, self._gen(dy.device), self.tail)  # type: ignore[arg-type]
        except ValueError as e:
            raise ValueError(f"GradNM on layer {self.where!r} (dY of shape {tuple(dy.shape)}): {e}") from None

    def forward(self, dy: Tensor) -> tuple[Tensor, Tensor]:
        self.calls += 1
        do_x, do_w = "input" in self.gemms, "weight" in self.gemms
        nd = dy.dim()
        if do_x and do_w and self.input_dim % max(nd, 1) == self.weight_dim % max(nd, 1):
            y = self._prune(dy, self.input_dim)
            return y, y
        gx = self._prune(dy, self.input_dim) if do_x else dy
        gw = self._prune(dy, self.weight_dim) if do_w else dy
        return gx, gw

    def pair(self, dy_x: Tensor, dy_w: Tensor) -> tuple[Tensor, Tensor]:
        if dy_x is dy_w:
            return self(dy_x)
        # streams already split upstream (e.g. 8-bit dX / 16-bit dW): prune each only for its own GEMM
        self.calls += 1
        gx = self._prune(dy_x, self.input_dim) if "input" in self.gemms else dy_x
        gw = self._prune(dy_w, self.weight_dim) if "weight" in self.gemms else dy_w
        return gx, gw

    def extra_repr(self) -> str:
        return (f"{self.n}:{self.m}, method={self.method!r}, gemms={self.gemms}, input_dim={self.input_dim}, "
                f"weight_dim={self.weight_dim}, tail={self.tail!r}, seed={self.seed}")


def _layer_seed(seed: Optional[int], name: str) -> Optional[int]:
    # distinct, reproducible streams per layer: identical layers must not share their masks
    return None if seed is None else (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


@register_handler(ActNM)
def _act_handler(layer: nn.Module, name: str, cfg: ActNM) -> None:
    dim = cfg.dim if cfg.dim is not None else layer.op.channel_dim
    layer.add("input", ActNMMask(cfg.n, cfg.m, dim, cfg.tail, where=name))  # type: ignore[operator]


@register_handler(GradNM)
def _grad_handler(layer: nn.Module, name: str, cfg: GradNM) -> None:
    in_dim = cfg.input_dim if cfg.input_dim is not None else layer.op.channel_dim
    w_dim = cfg.weight_dim if cfg.weight_dim is not None else layer.op.weight_grad_dim
    t = GradNMTransform(cfg.n, cfg.m, cfg.method, cfg.gemms, in_dim, w_dim, cfg.tail,
                        _layer_seed(cfg.seed, name), where=name)
    layer.add("grad_output", t)  # type: ignore[operator]
