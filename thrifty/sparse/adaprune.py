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
import functools
import warnings
from dataclasses import replace
from typing import Any, Iterable, Mapping, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from thrifty.core import Filter, config_first, wrap_layers
from thrifty.core.revert import holdout_rows, keep_if_better
from thrifty.nn import gemm_op
from thrifty.quant.blocks import PROBE, Blocks, check_chain, find_blocks, split_layers, walk_blocks
from thrifty.quant.calib import Batch, Output, as_batches, capture, shared_inputs, take, token_rows
from thrifty.sparse.weights import NM, nm_masks, sparsify
from thrifty.utils import show_progress

__all__ = ["adaprune", "nm_for_density", "plan_from_unstructured", "reestimate_bn", "prune_layer", "tune_block"]

Plan = Union[NM, Mapping[str, NM]]
BLOCK_CHUNK = 32  # block-wise mode streams a block's inputs in micro-batches of at most this many samples
SHARE_INPUTS = True  # one input capture for consecutive layers reading the same tensor (False: one per layer)


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


def _keep(layer: nn.Module):
    """What :func:`capture` keeps of a layer's activations: per-token rows (padding left out) for a linear layer."""
    return token_rows if gemm_op(layer).kind in ("linear", "linear_t") else None


def _rows(layer: nn.Module, ts: list[Tensor], name: str) -> Tensor:
    """One tensor of a layer's captured activations (``ts``: per batch, already rows for a linear layer),
    concatenated while the pieces are released (``ts`` is emptied): the whole set is held once, not twice."""
    if _keep(layer) is None and len({tuple(t.shape[1:]) for t in ts}) != 1:
        raise ValueError(f"adaprune: layer {name!r} sees activations of different shapes across calibration "
                         f"batches ({sorted({tuple(t.shape) for t in ts})}); give batches of one shape")
    if len(ts) == 1:
        return ts.pop()
    out = torch.empty((sum(t.shape[0] for t in ts),) + tuple(ts[0].shape[1:]), dtype=ts[0].dtype,
                      device=ts[0].device)
    at = 0
    for i in range(len(ts)):
        t, ts[i] = ts[i], None  # type: ignore[call-overload]
        out[at:at + t.shape[0]].copy_(t)
        at += t.shape[0]
        del t
    ts.clear()
    return out


_MSE_ROWS = 1024  # rows per forward when prune_layer measures a layer's whole-set error (bounds the transient)


def reestimate_bn(model: nn.Module, x: Any, batch_size: int = 64) -> nn.Module:
    """Reset BatchNorm running statistics and re-estimate them (cumulative average) on calibration data ``x``
    (a tensor, a dataset, or batches as in :func:`thrifty.quant.calib.as_batches`)."""
    from thrifty.train.bn import reestimate_bn as _reestimate

    return _reestimate(model, x if _is_batches(x) else as_batches(x, batch_size))


def _is_batches(x: Any) -> bool:
    return isinstance(x, list) and bool(x) and all(isinstance(b, Batch) for b in x)


def _fan_in(layer: nn.Module, target: Tensor) -> tuple[int, int]:
    """``(output rows, fan-in)`` of a GEMM layer's fit: ``target`` holds ``rows x out`` values."""
    w = gemm_op(layer).gemm_weight(layer.weight.detach())
    return target.numel() // max(w.shape[0], 1), w[0].numel()


def prune_layer(layer: nn.Module, mk: Any, inp: Tensor, target: Tensor, *, steps: int, lr: float, batch_size: int,
                remask_every: int, gen: torch.Generator) -> dict[str, Any]:
    """AdaPrune one masked layer in place: fit it (mask recomputed every ``remask_every`` steps) to ``target``.

    The fit is kept only if it lowers the layer's error below plain magnitude pruning's. A layer with few
    output rows for its fan-in (:func:`thrifty.core.revert.holdout_rows`: a classifier fed 16 samples) is
    fitted without every 4th sample and judged on those (``"held_out"`` in the report: their number; the
    MSEs reported are then theirs), so a fit that only memorises the calibration samples is undone; a fit that
    passes is then redone from the same start on every sample (more rows, the same steps), as the data is scarce.
    """
    dev = inp.device
    params = [layer.weight] + ([layer.bias] if layer.bias is not None else [])
    split = holdout_rows(inp.shape[0], *_fan_in(layer, target))
    all_in, all_t = inp, target
    start = None if split is None else [t.detach().clone() for t in params + [mk.mask]]  # for the refit
    chk_in, chk_t = inp, target
    if split is not None:  # copies, of a small set only (fewer output rows than twice the fan-in)
        fit_rows, chk_rows = (i.to(dev) for i in split)
        inp, target, chk_in, chk_t = inp[fit_rows], target[fit_rows], inp[chk_rows], target[chk_rows]

    @torch.no_grad()
    def mse() -> float:  # in slices of _MSE_ROWS rows: no whole-set output tensor
        tot = sum(float(F.mse_loss(layer(chk_in[i:i + _MSE_ROWS]), chk_t[i:i + _MSE_ROWS], reduction="sum"))
                  for i in range(0, chk_in.shape[0], _MSE_ROWS))
        return tot / max(chk_t.numel(), 1)

    def fit(x: Tensor, y: Tensor) -> None:
        opt = torch.optim.Adam(params, lr=lr)
        for step in range(steps):
            idx = torch.randint(0, x.shape[0], (min(batch_size, x.shape[0]),), generator=gen).to(dev)
            if step % remask_every == 0:
                mk.refresh(layer.weight)  # re-mask from the current dense weights
            loss = F.mse_loss(layer(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        mk.refresh(layer.weight)

    # never make a layer worse than plain magnitude pruning
    with keep_if_better(params + [mk.mask], mse) as out:
        fit(inp, target)
    if start is not None and out.kept:  # the held-out check passed: the same fit on all the (scarce) rows
        with torch.no_grad():
            for t, s0 in zip(params + [mk.mask], start):
                t.copy_(s0)
        fit(all_in, all_t)
    for p in params:
        p.grad = None
    return {"pattern": mk.cfg.label, "mse_before": out.before, "mse_after": out.after,
            "rel_mse_after": out.after / max(float(chk_t.pow(2).mean()), 1e-30), "reverted": not out.kept,
            "held_out": 0 if split is None else len(split[1])}


def _block_out(block: nn.Module, b: Batch) -> Tensor:
    out = block(*b.args, **b.kwargs)
    while isinstance(out, (tuple, list)):
        out = out[0]
    return out


def tune_block(block: nn.Module, ref: nn.Module, q_in: list[Batch], fp_in: list[Batch], *, steps: int, lr: float,
               batch_size: int, gen: torch.Generator) -> dict[str, float]:
    """Fit every float parameter of a pruned block (kept weights behind fixed masks, biases, norms) so its output
    on the pruned stream matches the FP block's output on the FP stream (MSE over real tokens)."""
    with torch.no_grad():
        targets = [_block_out(ref, b) for b in fp_in]
    params = [p for p in block.parameters() if p.is_floating_point()]

    def rows(y: Tensor, b: Batch) -> Tensor:
        return token_rows(y, b) if y.dim() >= 3 else y

    @torch.no_grad()
    def mse() -> float:
        tot = sum(float(F.mse_loss(rows(_block_out(block, b), b), rows(t, b), reduction="sum")) for b, t in zip(q_in, targets))
        return tot / sum(rows(t, b).numel() for b, t in zip(q_in, targets))

    flags = [p.requires_grad for p in params]
    sizes = torch.tensor([float(b.size) for b in q_in])
    opt = torch.optim.Adam(params, lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(steps, 1))
    try:
        for p in params:
            p.requires_grad_(True)
        with keep_if_better(params, mse) as out, torch.enable_grad():
            for _ in range(steps):
                i = int(torch.multinomial(sizes, 1, generator=gen))
                idx = torch.randperm(q_in[i].size, generator=gen)[:batch_size]
                b = q_in[i].select(idx)
                loss = F.mse_loss(rows(_block_out(block, b), b), rows(targets[i][idx.to(targets[i].device)], b))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)
            p.grad = None
    return {"mse_before": out.before, "mse_after": out.after, "reverted": not out.kept}


def adaprune(model: nn.Module, config: Plan | None = None, data: Any = None, *,
             plan: Plan | None = None, steps: int = 200, lr: float = 1e-3, batch_size: int = 32,
             num_samples: int | None = None, filter: Filter = None, bn: bool = True, remask_every: int = 1,
             progress: bool | None = None, seed: int = 0, output: Output = None,
             blocks: Blocks = None, block_steps: int = 0, block_lr: float = 1e-4) -> dict[str, dict[str, Any]]:
    """Convert ``model`` to N:M in place with AdaPrune; returns per-layer reconstruction MSEs (and "reverted").

    ``plan``: one NM config for every layer passing ``filter``, or ``{layer_name: NM}`` (e.g. from
    :func:`plan_from_unstructured`). Masks end up fixed (``recompute_every=0``). ``data``: calibration data in
    any form :func:`thrifty.quant.calib.as_batches` takes (a tensor, a dataset of ``(x, y)`` with labels unused,
    batches, dicts such as a tokenizer's output with its ``attention_mask``); ``num_samples`` caps it. A linear
    layer is fitted on its per-token rows, padding positions (``attention_mask == 0``) left out.
    ``blocks``: None fits every layer against the whole model (each capture reruns the model's prefix);
    ``"auto"``, a container name or a list of block names works block by block (:mod:`thrifty.quant.blocks`:
    one block's activations at a time, one pass through each block), with the same per-layer objective;
    ``block_steps > 0`` then also fits each pruned block as a whole to the FP block's output
    (:func:`tune_block`, Adam at ``block_lr``; its entry in the report is ``"block <name>"``). ``remask_every``: re-mask
    every that many steps (1 = every step; larger saves time with exact transposable masks of big layers).
    ``plan`` defaults to ``NM(2, 4)``; the older order ``adaprune(model, data, plan)`` (or ``plan=``) still
    works for one release, with a DeprecationWarning.
    """
    plan, data = config_first("adaprune", config, data, plan, default=NM(2, 4), accepts=(NM, Mapping),
                              call="adaprune(model, plan, data)")
    if data is None:
        raise TypeError("adaprune needs data: adaprune(model, plan, data)")
    if block_steps and blocks is None:
        raise ValueError("adaprune: block_steps needs blocks= (block-wise calibration)")
    if steps < 0 or lr <= 0 or batch_size < 1 or remask_every < 1 or block_steps < 0 or block_lr <= 0:
        raise ValueError(f"adaprune: need steps >= 0, lr > 0, batch_size >= 1, remask_every >= 1, block_steps >= 0, "
                         f"block_lr > 0; got {steps}, {lr}, {batch_size}, {remask_every}, {block_steps}, {block_lr}")
    batches = take(as_batches(data, 256, output), num_samples)
    if next(model.parameters(), None) is None:
        raise ValueError("adaprune: model has no parameters")
    was_training = model.training
    model.eval()
    names = None if blocks is None else find_blocks(model, blocks)  # bad names fail before the model is touched
    if names is not None:
        try:
            check_chain(model, names, batches[0])
        except ValueError:
            model.train(was_training)
            raise
    dense = copy.deepcopy(model).eval()
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
    masked = [(n, layer, mk) for n, layer, mk in nm_masks(model)]
    gen = torch.Generator().manual_seed(seed)
    report: dict[str, dict[str, Any]] = {}
    fit = functools.partial(prune_layer, steps=steps, lr=lr, batch_size=batch_size, remask_every=remask_every,
                            gen=gen)

    # layers whose first call reads the same tensor as an earlier one's (query, key, value): when one is fitted
    # right after the other, the captured input rows serve both (that tensor predates both layers' outputs)
    root = shared_inputs(model, {n: layer for n, layer, _ in masked}, take(batches[:1], PROBE)[0]) \
        if SHARE_INPUTS else {}

    def fit_all(fulls: list[str], mdl: nn.Module, ref: nn.Module, q_in: list[Batch], fp_in: list[Batch],
                cut: int = 0) -> None:
        """Fit ``fulls`` in order, ``mdl``/``ref`` being the (pruned, dense) module they are captured in."""
        held = None  # the last layer's input rows, kept only while the next layer reads the same tensor
        for i, full in enumerate(fulls):
            layer, mk = model.get_submodule(full), mks[full]
            keep = _keep(layer)
            target = _rows(layer, capture(ref, ref.get_submodule(full[cut:]), fp_in, inputs=False, outputs=True,
                                          keep=keep)[1], full)
            inp = held if held is not None else _rows(layer, capture(mdl, layer, q_in, keep=keep)[0], full)
            held = None
            report[full] = fit(layer, mk, inp, target)
            nxt = fulls[i + 1] if i + 1 < len(fulls) else None
            if nxt is not None and root.get(nxt, nxt) == root.get(full, full) \
                    and _keep(model.get_submodule(nxt)) is keep:
                held = inp
            del inp, target
            bar.set_postfix(layer=full, mse=f"{report[full]['mse_after']:.3g}")
            bar.update()

    mks = {n: mk for n, _, mk in masked}
    bar = tqdm(total=len(masked), desc="adaprune", disable=not show_progress(progress), leave=False)
    if names is None:
        fit_all([n for n, _, _ in masked], model, dense, batches, batches)
    else:
        before, per, after = split_layers(model, [n for n, _, _ in masked], names, batches[0])
        fit_all(before, model, dense, batches, batches)
        for blk, q_in, fp_in in walk_blocks(model, dense, names, batches, chunk=BLOCK_CHUNK):
            qb, fb = model.get_submodule(blk), dense.get_submodule(blk)
            fit_all(per[blk], qb, fb, q_in, fp_in, cut=len(blk) + 1)
            if block_steps:
                report[f"block {blk}"] = tune_block(qb, fb, q_in, fp_in, steps=block_steps, lr=block_lr,
                                                    batch_size=batch_size, gen=gen)
        fit_all(after, model, dense, batches, batches)
    bar.close()
    if bn:
        reestimate_bn(model, batches)
    model.train(was_training)
    return report
