"""N:M weight sparsity on any model: the `NM` config, its mask module, and `sparsify`.

`sparsify(model, NM(n, m, ...))` wraps the selected Linear / Conv2d layers and puts an `NMMask` in their
weight slot, so the forward GEMM sees ``W * mask``. Blocks follow :mod:`thrifty.ops.nm` (reduction dim,
conv channels-last, zero-padding tail rule). With ``transposable=True`` the mask is also N:M along the
output dim; since the core computes the input gradient as ``dX = dY @ W_masked``, the backward
input-gradient GEMM is then N:M too (both GEMMs accelerable).

Two ways to train:

* fixed mask (``recompute_every=0``, default): the mask is computed once, from the weights at sparsify
  time, and gradients reach only the kept weights (fine-tuning after pruning / AdaPrune);
* sparse training (``recompute_every=k``): dense weights are kept and trained with a straight-through
  gradient (the forward uses ``W * mask``, the backward passes ``dW`` to every weight); the mask is
  recomputed from the current dense weights at the first training-mode forward and then every k-th
  one (one forward per optimizer step in `thrifty.train.fit`). Eval-mode forwards never change it.

Layers whose reduction is shorter than M (or, for transposable masks, whose output dim is shorter than M)
cannot take the pattern: `sparsify` raises naming them when the filter named them explicitly, and skips
them with a warning when the filter is a wildcard, a predicate or None.

Example:
    >>> import torch, torch.nn as nn
    >>> model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
    >>> _ = sparsify(model, NM(2, 4, transposable=True))
    >>> [round(d, 2) for d in density(model).values()]
    [0.5, 0.5]
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Iterator, Literal, Optional

import torch
import torch.nn as nn
from torch import Tensor

from thrifty.core import (Config, Filter, apply, explicit_names, from_dict, iter_selected, make_filter,
                          register_config, register_handler, to_dict)
from thrifty.nn.gemm import Chain, SlotRefused, gemm_layers, gemm_op
from thrifty.nn.gemm_op import GemmOp
from thrifty.ops import nm as nmops

__all__ = ["NM", "NMMask", "sparsify", "nm_masks", "density", "refresh_masks", "can_take", "parse_nm_text"]


@register_config
@dataclass(frozen=True)
class NM(Config):
    """N:M weight sparsity.

    ``transposable``: N:M along the reduction and along the output dim (M x M tiles). ``method``: "exact"
    (best kept magnitude per tile) or "approx" (greedy 2-approximation; rows/columns may keep < N).
    ``recompute_every``: 0 keeps the mask fixed (gradients only to kept weights); k > 0 recomputes it every
    k training steps from the dense weights. ``straight_through``: gradient to all dense weights (default:
    True iff ``recompute_every > 0``).

    Args:
        n: weights kept in every block of ``m`` along the GEMM reduction.
        m: block length.
        transposable: also N:M along the output dim (M x M tiles), so the backward GEMM is N:M sparse too.
        method: transposable mask solver: "exact" (best kept magnitude per tile) or "approx" (greedy).
        recompute_every: recompute the mask every this many training steps (0: fixed mask).
        straight_through: gradient to all dense weights (None: when ``recompute_every > 0``).
    """

    n: int = 2
    m: int = 4
    transposable: bool = False
    method: Literal["exact", "approx"] = "exact"
    recompute_every: int = 0
    straight_through: Optional[bool] = None

    def __post_init__(self) -> None:
        nmops.check_nm(self.n, self.m)
        if self.method not in ("exact", "approx"):
            raise ValueError(f"NM.method must be 'exact' or 'approx', got {self.method!r}")
        if not isinstance(self.recompute_every, int) or isinstance(self.recompute_every, bool) \
                or self.recompute_every < 0:
            raise ValueError(f"NM.recompute_every must be an int >= 0, got {self.recompute_every!r}")
        if not isinstance(self.transposable, bool):
            raise TypeError(f"NM.transposable must be a bool, got {self.transposable!r}")
        if self.method == "approx" and not self.transposable:
            # a plain N:M mask is always the exact top-N per block; "approx" would be silently ignored
            raise ValueError("NM.method='approx' applies to transposable masks only; set transposable=True "
                             "or leave method='exact'")

    @property
    def ste(self) -> bool:
        return self.recompute_every > 0 if self.straight_through is None else bool(self.straight_through)

    @property
    def label(self) -> str:
        return f"{'T' if self.transposable else ''}{self.n}:{self.m}"


def parse_nm_text(text: str) -> tuple[int, int]:
    """``"4:8"`` -> ``(4, 8)`` with a clear error (shared by the CLI)."""
    try:
        a, b = str(text).split(":")
        n, m = int(a), int(b)
    except ValueError:
        raise ValueError(f"--nm: expected N:M such as 2:4 or 4:8, got {text!r}") from None
    nmops.check_nm(n, m)
    return n, m


class NMMask(nn.Module):
    """Weight-slot transform ``W -> W * mask`` holding an N:M (optionally transposable) mask buffer."""

    def __init__(self, cfg: NM, weight: Tensor, op: Optional[GemmOp] = None) -> None:
        super().__init__()
        self.cfg = cfg
        # blocks run along the GEMM's reduction whatever the stored layout (GPT-2 Conv1D, ConvTranspose)
        self.op = op if op is not None else GemmOp("linear" if weight.dim() == 2 else "conv2d")
        self.register_buffer("mask", torch.ones_like(weight, dtype=torch.bool))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self._stale = False
        self.refresh(weight)

    def spec(self) -> dict[str, Any]:
        """Plain data that rebuilds this transform on its layer (the mask itself is in the state_dict)."""
        return {"config": to_dict(self.cfg), "layer_name": getattr(self, "layer_name", None)}

    @classmethod
    def from_spec(cls, spec: dict[str, Any], layer: nn.Module) -> "NMMask":
        """The transform :meth:`spec` describes, sized for ``layer`` (the saved mask is loaded afterwards)."""
        cfg = from_dict(spec["config"])
        if not isinstance(cfg, NM):
            raise TypeError(f"NMMask spec holds a {type(cfg).__name__} config, not NM")
        mask = cls(cfg, layer.weight.detach(), layer.op)
        if spec.get("layer_name") is not None:
            mask.layer_name = spec["layer_name"]
        return mask

    def compute(self, w: Tensor) -> Tensor:
        c = self.cfg
        try:
            op = self.__dict__.get("op") or GemmOp("linear")  # (a mask pickled before layouts existed: [out, ...])
            g = op.gemm_weight(w)
            mask = nmops.transposable_mask(g, c.n, c.m, c.method) if c.transposable else nmops.nm_mask(g, c.n, c.m)
            return op.from_gemm_weight(mask, w.shape)
        except (ValueError, TypeError) as e:  # e.g. weights turned NaN during training: say which layer
            where = getattr(self, "layer_name", None)
            raise type(e)(f"layer {where!r}: {e}" if where is not None else str(e)) from None

    @torch.no_grad()
    def refresh(self, w: Tensor) -> None:
        """Recompute the mask from ``w`` (the tensor this transform receives) now."""
        self.mask.copy_(self.compute(w.detach()))
        self._stale = False

    def request_refresh(self) -> None:
        """Recompute the mask at the next forward, from whatever weight reaches this transform."""
        self._stale = True

    def forward(self, w: Tensor) -> Tensor:
        every = self.cfg.recompute_every
        if self.training and torch.is_grad_enabled() and every > 0:
            if int(self.steps) % every == 0:
                self._stale = True
            self.steps += 1
        if self._stale:
            self.refresh(w)
        masked = w * self.mask.to(w.dtype)
        if self.cfg.ste:
            return w + (masked - w).detach()  # value W*mask, gradient to every dense weight
        return masked

    def extra_repr(self) -> str:
        c = self.cfg
        mode = f"every {c.recompute_every} steps" if c.recompute_every else "fixed"
        return f"{c.label}, method={c.method}, mask={mode}, straight_through={c.ste}"


def _masks_in(slot: Optional[nn.Module]) -> list[NMMask]:
    if slot is None:
        return []
    members = list(slot) if isinstance(slot, Chain) else [slot]
    return [m for m in members if isinstance(m, NMMask)]


def _input_to(layer: nn.Module, mask: NMMask) -> Tensor:
    """The tensor ``mask`` receives in the layer's weight chain (quantizers before it applied)."""
    w = layer.weight
    slot = layer.slots.weight
    for member in (list(slot) if isinstance(slot, Chain) else [slot]):
        if member is mask:
            return w
        w = member(w)
    raise ValueError("mask is not in this layer's weight slot")


def can_take(layer: nn.Module, cfg: NM) -> Optional[str]:
    """None if ``layer`` can take the pattern, else the reason."""
    if getattr(layer, "weight", None) is None:
        return "an activation-activation GEMM has no weight to prune (ActNM prunes its operands)"
    try:
        w = gemm_op(layer).gemm_weight(layer.weight)
    except SlotRefused as e:
        return str(e)
    red = w[0].numel() if w.dim() > 1 else 0
    if w.dim() < 2:
        return f"weight is {w.dim()}-D"
    if red < cfg.m:
        return f"its reduction dim ({red}) is shorter than M={cfg.m}"
    if cfg.transposable and w.shape[0] < cfg.m:
        return f"its output dim ({w.shape[0]}) is shorter than M={cfg.m} (transposable masks need both)"
    groups = getattr(layer, "groups", 1)
    if cfg.transposable and groups > 1 and (w.shape[0] // groups) % cfg.m:
        return (f"it is a grouped conv with {w.shape[0] // groups} output channels per group, not a multiple of "
                f"M={cfg.m} (the input-gradient GEMM of each group would not be N:M)")
    return None


@register_handler(NM)
def _nm_handler(layer: nn.Module, name: str, cfg: NM) -> None:
    why = can_take(layer, cfg)
    if why:
        raise ValueError(f"layer {name!r} cannot take {cfg.label} sparsity: {why}")
    with torch.no_grad():
        w = layer.slots.weight(layer.weight) if layer.slots.weight is not None else layer.weight
    try:
        mask = NMMask(cfg, w.detach(), layer.op)
    except (ValueError, TypeError) as e:
        raise type(e)(f"layer {name!r}: {e}") from None
    mask.layer_name = name
    layer.add("weight", mask)


def sparsify(model: nn.Module, cfg: NM = NM(), filter: Filter = None, *, probe: Any = None) -> nn.Module:
    """Apply N:M weight sparsity (``cfg``) to the Linear / Conv2d layers of ``model`` that pass ``filter``.

    In place; returns ``model``. Unsuitable layers are skipped with a warning (or raise, when named
    explicitly). On error the model is left unchanged. ``probe``: an example input, checked as in
    :func:`thrifty.apply` (no wrapped layer may have its weight read without being called).

    Example:
        >>> m = nn.Sequential(nn.Conv2d(8, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1))
        >>> _ = sparsify(m, NM(4, 8), filter="0")
        >>> float(m[0].effective_weight().ne(0).float().mean())
        0.5
    """
    if not isinstance(cfg, NM):
        raise TypeError(f"sparsify expects an NM config, got {type(cfg).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"sparsify expects an nn.Module, got {type(model).__name__}")
    skipped = {}
    for name, layer in iter_selected(model, filter):
        why = can_take(layer, cfg)
        if why:
            skipped[name] = why
    if skipped:
        if explicit_names(filter):
            raise ValueError("; ".join(f"layer {n!r} cannot take {cfg.label} sparsity: {w}" for n, w in skipped.items()))
        warnings.warn("sparsify: skipping " + "; ".join(f"{n!r} ({w})" for n, w in skipped.items()), stacklevel=2)
        base = make_filter(filter)
        filter = lambda mod, n: base(mod, n) and n not in skipped  # noqa: E731
    return apply(model, cfg, filter, probe=probe)


def nm_masks(model: nn.Module) -> Iterator[tuple[str, nn.Module, NMMask]]:
    """Yield ``(layer_name, layer, mask_module)`` for every N:M weight mask in ``model``."""
    for name, layer in gemm_layers(model):
        for mk in _masks_in(layer.slots.weight):
            yield name, layer, mk


def refresh_masks(model: nn.Module) -> int:
    """Recompute every N:M mask of ``model`` from its current weights now; returns how many."""
    k = 0
    for _, layer, mk in nm_masks(model):
        with torch.no_grad():
            mk.refresh(_input_to(layer, mk))
        k += 1
    return k


def density(model: nn.Module) -> dict[str, float]:
    """Fraction of nonzero effective weights per N:M-masked layer."""
    return {name: float(layer.effective_weight().ne(0).float().mean()) for name, layer, _ in nm_masks(model)}
