"""Exact folding of BatchNorm into the preceding Conv2d / Linear.

For ``y = BN(conv(x))`` in eval mode, ``BN(z) = gamma (z - mu) / sqrt(var + eps) + beta``, so with
``a = gamma / sqrt(var + eps)`` the conv's weight becomes ``a * W`` (per output channel) and its bias
``a * (b - mu) + beta``; the BN is replaced by ``nn.Identity``.

Which conv feeds which BN is found by running one batch with hooks (the BN's input tensor *is* the conv's
output tensor), so it works on any model, with or without ``torch.fx``-traceable control flow. The folded model
is then checked numerically on the same batch; a mismatch (e.g. the conv output is also used elsewhere) raises
and leaves the model unchanged.

Example:
    >>> import torch, torch.nn as nn
    >>> m = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2)).eval()
    >>> fold_bn(m, torch.randn(1, 1, 5, 5))
    [('0', '1')]
"""
from __future__ import annotations

import copy
from typing import Any, Optional

import torch
import torch.nn as nn
from torch import Tensor

from thrifty.quant.calib import Batch, as_batches, run
from thrifty.utils import removing_hooks

__all__ = ["fold_bn", "fold_pairs", "find_bn_pairs"]

_BN = (nn.BatchNorm1d, nn.BatchNorm2d)


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    p, _, child = name.rpartition(".")
    return (model.get_submodule(p) if p else model), child


# layers whose output channels are dim 0 of the weight (a transposed conv stores them in dim 1)
_FOLDABLE = (nn.Conv1d, nn.Conv2d, nn.Linear)


@torch.no_grad()
def find_bn_pairs(model: nn.Module, batch: Any) -> list[tuple[str, str]]:
    """``(layer, bn)`` name pairs where the BN's input is exactly a Conv1d/Conv2d/Linear's output on ``batch``."""
    b = batch if isinstance(batch, Batch) else as_batches(batch)[0]
    outs: dict[int, str] = {}
    bn_in: dict[str, int] = {}
    keep: list[Tensor] = []  # keep every output alive so that ids are never reused within the pass
    was = model.training
    with removing_hooks() as hooks:
        for name, m in model.named_modules():
            if isinstance(m, _FOLDABLE):
                def hook(_m, _a, o, name=name):
                    keep.append(o)
                    outs.setdefault(id(o), name)
                hooks.append(m.register_forward_hook(hook))
            elif isinstance(m, _BN) and m.track_running_stats and m.running_mean is not None:
                def pre(_m, a, name=name):
                    bn_in.setdefault(name, id(a[0]))
                hooks.append(m.register_forward_pre_hook(pre))
        model.eval()
        try:
            run(model, b)
        finally:
            model.train(was)
    pairs = []
    for bn, oid in bn_in.items():
        if oid in outs:
            layer = outs[oid]
            lm, bm = model.get_submodule(layer), model.get_submodule(bn)
            n_out = lm.out_features if isinstance(lm, nn.Linear) else lm.out_channels
            if n_out == bm.num_features and (isinstance(lm, nn.Conv2d) == isinstance(bm, nn.BatchNorm2d)):
                pairs.append((layer, bn))
    return pairs


@torch.no_grad()
def fold_pairs(model: nn.Module, pairs: list[tuple[str, str]]) -> None:
    """Fold each named BN into its named layer (in place); BNs become ``nn.Identity``."""
    for layer_name, bn_name in pairs:
        layer, bn = model.get_submodule(layer_name), model.get_submodule(bn_name)
        if not isinstance(bn, _BN):
            raise TypeError(f"fold: {bn_name!r} is {type(bn).__name__}, not a BatchNorm")
        if not isinstance(layer, _FOLDABLE):
            raise TypeError(f"fold: {layer_name!r} is {type(layer).__name__}, not Conv1d/Conv2d/Linear")
        w = layer.weight
        a = (bn.weight if bn.affine else torch.ones_like(bn.running_mean)) / torch.sqrt(bn.running_var + bn.eps)
        beta = bn.bias if bn.affine else torch.zeros_like(bn.running_mean)
        b = layer.bias if layer.bias is not None else torch.zeros_like(bn.running_mean)
        new_b = (b - bn.running_mean) * a + beta
        w.mul_(a.reshape(-1, *([1] * (w.dim() - 1))).to(w.dtype))
        if layer.bias is None:
            layer.bias = nn.Parameter(new_b.to(w.dtype).clone())
        else:
            layer.bias.copy_(new_b)
        parent, child = _parent(model, bn_name)
        setattr(parent, child, nn.Identity())


@torch.no_grad()
def fold_bn(model: nn.Module, example: Any, *, atol: float = 1e-4, rtol: float = 1e-4,
            pairs: Optional[list[tuple[str, str]]] = None) -> list[tuple[str, str]]:
    """Fold every BatchNorm that directly follows a Conv2d/Linear (in place) and return the folded pairs.

    ``example`` is one input batch (anything :func:`thrifty.quant.calib.as_batches` accepts). The folded model
    must reproduce the original eval-mode output on it (within ``atol``/``rtol``), else ValueError and the
    model is left unchanged.
    """
    b = example if isinstance(example, Batch) else as_batches(example)[0]
    was = model.training
    model.eval()
    try:
        ref = run(model, b)
        pairs = find_bn_pairs(model, b) if pairs is None else pairs
        if not pairs:
            return []
        trial = copy.deepcopy(model)
        fold_pairs(trial, pairs)
        out = run(trial, b)
        if not torch.allclose(out, ref, atol=atol, rtol=rtol):
            err = (out - ref).abs().max().item()
            raise ValueError(f"BN folding changed the model output (max abs diff {err:.3g}); a folded layer's output "
                             f"is probably also used outside its BatchNorm. Pairs: {pairs}")
        fold_pairs(model, pairs)
        return pairs
    finally:
        model.train(was)
