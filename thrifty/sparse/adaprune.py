"""AdaPrune: turn a dense or unstructured-sparse trained model into N:M with a little calibration data.

Layer by layer, in forward order, the pruned layer is fitted to reproduce the *dense* model's output of
that layer, fed with the inputs it receives in the *partly pruned* model (so each layer also corrects the
error accumulated before it):

    min_{W'} || W X_dense - (W' * mask(W')) X_pruned ||^2 ,   mask recomputed from W' every step

Gradients reach the kept weights (and the bias); re-masking lets a weight that grows past a kept one
swap in. Afterwards BatchNorm statistics are re-estimated on the calibration set (the pruned network's
activations have different statistics). No labels are used.

`nm_for_density` / `plan_from_unstructured` give the rule for converting an unstructured-sparse model:
each layer gets the sparsest N:M pattern (M from a candidate list) that still keeps at least the layer's
unstructured density, ties going to the larger M (more mask diversity, closer to unstructured).

Example:
    >>> import torch, torch.nn as nn
    >>> from torch.utils.data import TensorDataset
    >>> _ = torch.manual_seed(0)
    >>> model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    >>> calib = TensorDataset(torch.randn(128, 16), torch.zeros(128).long())
    >>> report = adaprune(model, NM(2, 4), calib, steps=50, progress=False)
    >>> all(r["mse_after"] <= r["mse_before"] for r in report.values())
    True
"""
from __future__ import annotations

import copy
import warnings
from dataclasses import replace
from typing import Any, Iterable, Mapping, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from thrifty.core import Filter, config_first, wrap_layers
from thrifty.core.revert import keep_if_better
from thrifty.sparse.weights import NM, nm_masks, sparsify
from thrifty.utils import show_progress

__all__ = ["adaprune", "nm_for_density", "plan_from_unstructured", "reestimate_bn"]

Plan = Union[NM, Mapping[str, NM]]


def nm_for_density(dens: float, ms: Iterable[int] = (4, 8)) -> tuple[int, int] | None:
    """The sparsest N:M (M in ``ms``) with N/M >= ``dens``; ties -> larger M; None if none is below dense.

    Example:
        >>> nm_for_density(0.5), nm_for_density(0.3), nm_for_density(0.2, ms=(4, 8, 16)), nm_for_density(0.95)
        ((4, 8), (3, 8), (4, 16), None)
    """
    if not 0.0 <= dens <= 1.0:
        raise ValueError(f"density must be in [0, 1], got {dens}")
    best: tuple[int, int] | None = None
    for m in ms:
        if not isinstance(m, int) or m < 2:
            raise ValueError(f"candidate M must be an int >= 2, got {m!r}")
        n = max(1, -(-round(dens * m * 10**9) // 10**9))  # ceil(dens*m), robust to float noise
        if n >= m:
            continue
        if best is None or n / m < best[0] / best[1] or (n / m == best[0] / best[1] and m > best[1]):
            best = (n, m)
    return best


def plan_from_unstructured(model: nn.Module, ms: Iterable[int] = (4, 8), transposable: bool = False,
                           method: str = "exact", filter: Filter = None) -> dict[str, NM]:
    """Per-layer N:M configs for an unstructured-sparse model (see module doc); dense layers are left out."""
    from thrifty.core import iter_selected

    plan = {}
    for name, layer in iter_selected(model, filter):
        w = layer.weight.detach()
        choice = nm_for_density(float(w.ne(0).float().mean()), tuple(ms))
        if choice is not None:
            plan[name] = NM(choice[0], choice[1], transposable=transposable, method=method)  # type: ignore[arg-type]
    return plan


def _inputs(data: Union[Dataset, Tensor], n: int | None) -> Tensor:
    if isinstance(data, Tensor):
        x = data
    else:
        if not hasattr(data, "__len__") or len(data) == 0:
            raise ValueError("adaprune: calibration data is empty")
        x = torch.stack([data[i][0] if isinstance(data[i], (tuple, list)) else data[i] for i in range(len(data))])
    if x.shape[0] == 0:
        raise ValueError("adaprune: calibration data is empty")
    return x[:n] if n else x


@torch.no_grad()
def _capture(model: nn.Module, layer: nn.Module, x: Tensor, batch: int, want: str) -> Tensor:
    got: list[Tensor] = []

    def hook(mod: nn.Module, inp: tuple, out: Tensor) -> None:
        got.append((inp[0] if want == "input" else out).detach().clone())

    h = layer.register_forward_hook(hook)
    try:
        for i in range(0, x.shape[0], batch):
            model(x[i:i + batch])
    finally:
        h.remove()
    if not got:
        raise ValueError("adaprune: a layer was never called by the model's forward")
    return torch.cat(got)


@torch.no_grad()
def reestimate_bn(model: nn.Module, x: Tensor, batch_size: int = 64) -> nn.Module:
    """Reset BatchNorm running statistics and re-estimate them (cumulative average) on inputs ``x``."""
    from thrifty.train.bn import reestimate_bn as _reestimate

    return _reestimate(model, (x[i:i + batch_size] for i in range(0, x.shape[0], batch_size)))


def adaprune(model: nn.Module, config: Plan | None = None, data: Union[Dataset, Tensor, None] = None, *,
             plan: Plan | None = None, steps: int = 200, lr: float = 1e-3, batch_size: int = 32,
             num_samples: int | None = None, filter: Filter = None, bn: bool = True, remask_every: int = 1,
             progress: bool | None = None, seed: int = 0) -> dict[str, dict[str, Any]]:
    """Convert ``model`` to N:M in place with AdaPrune; returns per-layer reconstruction MSEs (and "reverted").

    ``plan``: one NM config for every layer passing ``filter``, or ``{layer_name: NM}`` (e.g. from
    :func:`plan_from_unstructured`). Masks end up fixed (``recompute_every=0``). ``data``: a dataset of
    ``(x, y)`` (labels unused) or a tensor of inputs; ``num_samples`` caps it. ``remask_every``: re-mask
    every that many steps (1 = every step; larger saves time with exact transposable masks of big layers).
    ``plan`` defaults to ``NM(2, 4)``; the older order ``adaprune(model, data, plan)`` (or ``plan=``) still
    works for one release, with a DeprecationWarning.
    """
    plan, data = config_first("adaprune", config, data, plan, default=NM(2, 4), accepts=(NM, Mapping),
                              call="adaprune(model, plan, data)")
    if data is None:
        raise TypeError("adaprune needs data: adaprune(model, plan, data)")
    if steps < 0 or lr <= 0 or batch_size < 1 or remask_every < 1:
        raise ValueError(f"adaprune: need steps >= 0, lr > 0, batch_size >= 1, remask_every >= 1; got {steps}, "
                         f"{lr}, {batch_size}, {remask_every}")
    x = _inputs(data, num_samples)
    try:
        dev = next(model.parameters()).device
    except StopIteration:
        raise ValueError("adaprune: model has no parameters") from None
    x = x.to(dev)
    dense = copy.deepcopy(model).eval()
    was_training = model.training
    model.eval()
    if isinstance(plan, NM):
        sparsify(model, replace(plan, recompute_every=0, straight_through=False), filter)
    else:
        if not plan:
            raise ValueError("adaprune: empty per-layer plan")
        for name, cfg in plan.items():
            sparsify(model, replace(cfg, recompute_every=0, straight_through=False), [name])
    with warnings.catch_warnings():  # sparsify has named what it skips
        warnings.simplefilter("ignore")
        wrap_layers(dense, filter)  # empty slots (the same function): the names sparsify gave (MultiheadAttention)
    dense_layers = dict(dense.named_modules())
    masked = [(n, layer, mk) for n, layer, mk in nm_masks(model)]
    gen = torch.Generator().manual_seed(seed)
    report: dict[str, dict[str, Any]] = {}
    bar = tqdm(masked, desc="adaprune", disable=not show_progress(progress), leave=False)
    for name, layer, mk in bar:
        target = _capture(dense, dense_layers[name], x, 256, "output")
        inp = _capture(model, layer, x, 256, "input")
        params = [layer.weight] + ([layer.bias] if layer.bias is not None else [])

        @torch.no_grad()
        def mse() -> float:
            return float(F.mse_loss(layer(inp), target))

        opt = torch.optim.Adam(params, lr=lr)
        # never make a layer worse than plain magnitude pruning
        with keep_if_better(params + [mk.mask], mse) as out:
            for step in range(steps):
                idx = torch.randint(0, inp.shape[0], (min(batch_size, inp.shape[0]),), generator=gen).to(dev)
                if step % remask_every == 0:
                    mk.refresh(layer.weight)  # re-mask from the current dense weights
                loss = F.mse_loss(layer(inp[idx]), target[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            mk.refresh(layer.weight)
        for p in params:
            p.grad = None
        report[name] = {"pattern": mk.cfg.label, "mse_before": out.before, "mse_after": out.after,
                        "rel_mse_after": out.after / max(float(target.pow(2).mean()), 1e-30), "reverted": not out.kept}
        bar.set_postfix(layer=name, mse=f"{out.after:.3g}")
    if bn:
        reestimate_bn(model, x)
    model.train(was_training)
    return report
