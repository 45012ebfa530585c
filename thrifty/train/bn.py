"""BatchNorm recalibration at a chosen input size (Mix & Match test-time step).

Statistics are reset and re-estimated as a cumulative average (``momentum=None``) over ``batches``
training batches resized to ``size``; only BatchNorm buffers (running_mean, running_var,
num_batches_tracked) change. Every other module stays in eval mode while doing so.

Example:
    >>> import torch; from torch.utils.data import TensorDataset
    >>> m = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4))
    >>> ds = TensorDataset(torch.randn(32, 1, 8, 8), torch.zeros(32).long())
    >>> _ = recalibrate_bn(m, ds, size=12, batches=2, batch_size=16)
    >>> int(m[1].num_batches_tracked)
    2
"""
from __future__ import annotations

from typing import Any, Iterable, Iterator

import torch
from torch import nn
from torch.utils.data import Dataset

from thrifty.train.augment import resize

__all__ = ["recalibrate_bn", "reestimate_bn", "bn_layers"]


def bn_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@torch.no_grad()
def reestimate_bn(model: nn.Module, batches: Iterable[Any]) -> nn.Module:
    """Reset BN running statistics and re-estimate them as a cumulative average over ``batches``.

    A batch is an input tensor or a :class:`thrifty.quant.calib.Batch` (tuples / dicts of model inputs).

    Only BatchNorm layers run in train mode; every other module stays in eval mode. Modes and momenta
    are restored afterwards. The shared mechanism behind BN recalibration (Mix & Match) and the BN
    re-estimation step of AdaPrune.
    """
    from thrifty.quant.calib import Batch, run  # late: thrifty.quant imports thrifty.train

    bns = [m for m in bn_layers(model) if m.track_running_stats]
    if not bns:
        return model
    modes = {m: m.training for m in model.modules()}
    momenta = [bn.momentum for bn in bns]
    try:
        model.eval()
        for bn in bns:
            bn.reset_running_stats()
            bn.momentum = None  # cumulative moving average over the calibration batches
            bn.train()
        for x in batches:
            if isinstance(x, Batch):
                run(model, x)
            else:
                model(x)
    finally:
        for bn, mom in zip(bns, momenta):
            bn.momentum = mom
        for m, mode in modes.items():
            m.train(mode)
    return model


@torch.no_grad()
def recalibrate_bn(model: nn.Module, ds: Dataset, size: int | None = None, batches: int = 50,
                   batch_size: int = 64, seed: int = 0) -> nn.Module:
    """Re-estimate BN statistics of ``model`` (in place) on ``batches`` batches of ``ds`` at ``size``.

    Returns ``model``. A model without BatchNorm is returned unchanged."""
    from thrifty.train.loop import _check_dataset
    from thrifty.train.sampling import collate

    _check_dataset(ds, "BN calibration dataset")
    if batches < 1 or batch_size < 1:
        raise ValueError(f"recalibrate_bn: batches and batch_size must be >= 1, got {batches}, {batch_size}")
    if not bn_layers(model):
        return model
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(ds), generator=g)

    def stream() -> Iterator[torch.Tensor]:
        for b in range(batches):
            idx = order[(torch.arange(batch_size) + b * batch_size) % len(ds)]
            x = collate(ds, idx.tolist())[0].to(device)
            yield resize(x, size) if size is not None else x

    return reestimate_bn(model, stream())
