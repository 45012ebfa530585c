"""AdaQuant: per-layer reconstruction of the FP output by optimising the weights and the quantizer steps.

For layer ``l`` with cached inputs ``X`` and FP outputs ``Y = W X + b`` (computed from FP inputs), minimise
``||Y - Q_w(W + V) Q_x(X) - b'||^2`` over ``V`` (the latent weight is optimised directly, i.e. ``W + V``),
the bias, and the scales / zero points of the weight and input quantizers (learnable UniformQuantizers),
with Adam and separate learning rates per group.

``sequential`` (default) caches the inputs that the already-quantized prefix produces, so each layer also
compensates the error of the layers before it; ``parallel`` caches the FP model's inputs. Only one layer's
inputs and outputs are cached at a time, so memory is bounded by the largest layer activation.

Example (one layer):
    >>> import torch, torch.nn as nn
    >>> from thrifty.nn import wrap
    >>> from thrifty.quant import UniformQuantizer
    >>> fp = nn.Linear(16, 8); layer = wrap(nn.Linear(16, 8)); _ = layer.load_state_dict(fp.state_dict())
    >>> _ = layer.add("weight", UniformQuantizer(3, per_channel=True, learnable=True).init_from(layer.weight))
    >>> _ = torch.manual_seed(0); x = torch.relu(torch.randn(256, 4) @ torch.randn(4, 16) + 0.5)  # correlated
    >>> y = fp(x).detach()
    >>> before, after = adaquant_layer(layer, [x], [y], iters=100)
    >>> after < before
    True
"""
from __future__ import annotations

import copy
import math
from typing import Optional

import torch
import torch.nn as nn
from torch import Tensor
from tqdm.auto import tqdm

from thrifty.core.revert import holdout_split
from thrifty.quant.calib import Batch, capture
from thrifty.utils import show_progress

__all__ = ["adaquant_layer", "adaquant", "reconstruction_error"]


def _sq_err(out: Tensor, y: Tensor, relu: bool) -> Tensor:
    # A ReLU consumer discards the negative part: errors where both outputs are negative cost nothing.
    return (out.relu() - y.relu()).pow(2) if relu else (out - y).pow(2)


@torch.no_grad()
def reconstruction_error(layer: nn.Module, xs: list[Tensor], ys: list[Tensor], relu: bool = False) -> float:
    """Mean squared error between ``layer(x)`` and the targets (after a ReLU if ``relu``) over all batches."""
    tot, n = 0.0, 0
    for x, y in zip(xs, ys):
        tot += float(_sq_err(layer(x), y, relu).sum())
        n += y.numel()
    return tot / max(n, 1)


def _sample(xs: list[Tensor], ys: list[Tensor], batch: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
    sizes = torch.tensor([x.shape[0] for x in xs], dtype=torch.float64)
    i = int(torch.multinomial(sizes, 1, generator=g))
    n = xs[i].shape[0]
    idx = torch.randperm(n, generator=g)[: min(batch, n)]
    return xs[i][idx], ys[i][idx]


def _holdout(layer: nn.Module, xs: list[Tensor], ys: list[Tensor]
             ) -> Optional[tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor]]]:
    """``(fit xs, fit ys, check xs, check ys)`` when ``layer`` has too few output rows for its fan-in to be judged
    on the data it fits (:func:`thrifty.core.revert.holdout_rows`, per batch), else None."""
    from thrifty.nn import gemm_op

    try:
        w = gemm_op(layer).gemm_weight(layer.weight.detach())
    except Exception:  # noqa: BLE001 - no GEMM weight layout (a lookup): judged on all its data as before
        return None
    positions, fan_in = sum(y.numel() for y in ys) // max(w.shape[0], 1), w[0].numel()
    return holdout_split(list(zip(xs, ys)), [x.shape[0] for x in xs], positions, fan_in,
                         lambda t, i: t[i.to(t.device)])


def adaquant_layer(layer: nn.Module, xs: list[Tensor], ys: list[Tensor], *, iters: int = 300, batch: int = 32,
                   lr_weight: float = 1e-2, lr_bias: float = 1e-3, lr_w_scale: float = 1e-2,
                   lr_a_scale: float = 1e-2, seed: int = 0, relu: bool = False,
                   max_shift: Optional[float] = None) -> tuple[float, float]:
    """Optimise one Gemm layer (in place) to reconstruct ``ys`` from ``xs``; return (mse before, mse after).

    Quantizer scales/zero points are optimised only if the quantizers are learnable and frozen; a group with
    learning rate 0 is not optimised. ``relu``: the error is measured after a ReLU (for a layer whose output
    only reaches the network through one). ``max_shift``: each latent weight stays within that many of its
    channel's quantization steps of its initial value (``0.5``..``1`` learns little more than the rounding).
    If the optimisation does not lower the error on the cached data, the layer is restored and
    ``(before, before)`` is returned. A layer with few output rows for its fan-in
    (:func:`thrifty.core.revert.holdout_rows`: a classifier fed 16 samples) is fitted without every 4th sample
    of each batch and judged on those (the returned MSEs are then theirs): a fit that only memorises the
    calibration samples is undone.
    """
    if len(xs) != len(ys) or not xs:
        raise ValueError("adaquant_layer: need the same (non-zero) number of input and target batches")
    if max_shift is not None and not max_shift > 0:
        raise ValueError(f"adaquant_layer: max_shift must be None or > 0, got {max_shift!r}")
    chk_x, chk_y = xs, ys
    split = _holdout(layer, xs, ys)
    if split is not None:
        xs, ys, chk_x, chk_y = split
    before = reconstruction_error(layer, chk_x, chk_y, relu)
    if iters == 0:
        return before, before
    state = copy.deepcopy(layer.state_dict())
    # Learning rates of the weights and of the quantizer steps are relative to the layer's mean quantization
    # step, so one setting fits layers whose weights differ in scale by orders of magnitude.
    wq, xq = layer.slots.weight, layer.slots.input
    w_step = float(wq.scale.detach().mean()) if wq is not None and hasattr(wq, "scale") else 1.0
    groups: list[dict] = [{"params": [layer.weight], "lr": lr_weight * w_step}]
    if layer.bias is not None:
        groups.append({"params": [layer.bias], "lr": lr_bias})
    for q, lr in ((wq, lr_w_scale), (xq, lr_a_scale)):
        ps = [p for p in (q.parameters() if q is not None else []) if p.requires_grad]
        if ps:
            step = float(q.scale.detach().mean()) if hasattr(q, "scale") else 1.0
            groups.append({"params": ps, "lr": lr * step})
    groups = [g for g in groups if g["lr"] > 0]
    if not groups:
        return before, before
    w0 = layer.weight.detach().clone()
    # the allowed shift per weight: max_shift steps of its own channel (the step at the start)
    bound = None
    if max_shift is not None and wq is not None and hasattr(wq, "scale"):
        if hasattr(wq, "step_like"):  # any layout: per channel along its own axis, per group
            bound = max_shift * wq.step_like(w0)
        else:
            sc = wq.scale.detach().abs()
            bound = max_shift * (sc.reshape((-1,) + (1,) * (w0.dim() - 1)) if sc.dim() else sc)
    params = [p for g in groups for p in g["params"]]
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(groups)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.5 * (1 + math.cos(math.pi * i / iters)))
    g = torch.Generator().manual_seed(seed)
    try:
        with torch.enable_grad():
            for _ in range(iters):
                x, y = _sample(xs, ys, batch, g)
                loss = _sq_err(layer(x), y, relu).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                if bound is not None:
                    with torch.no_grad():
                        layer.weight.copy_(torch.maximum(torch.minimum(layer.weight, w0 + bound), w0 - bound))
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)
    after = reconstruction_error(layer, chk_x, chk_y, relu)
    if not after < before:  # also catches NaN
        layer.load_state_dict(state)
        after = before
    return before, after


def adaquant(qmodel: nn.Module, fpmodel: nn.Module, names: list[str], batches: list[Batch], *,
             mode: str = "sequential", iters: int = 300, batch: int = 32, lr_weight: float = 1e-2,
             lr_bias: float = 1e-3, lr_w_scale: float = 1e-2, lr_a_scale: float = 1e-2, seed: int = 0,
             relu: frozenset[str] = frozenset(), max_shift: Optional[float] = None,
             progress: Optional[bool] = None, fp_batches: Optional[list[Batch]] = None,
             blocks: Optional[list[str]] = None) -> dict[str, tuple[float, float]]:
    """Run :func:`adaquant_layer` on ``names`` (in execution order); ``fpmodel`` has the same layer names.

    ``relu``: the layers whose error is measured after a ReLU (see :func:`thrifty.quant.calib.relu_fed`).
    ``fp_batches``: the FP model's inputs when they differ from ``batches`` (a block's FP stream).
    ``blocks``: work block by block (:mod:`thrifty.quant.blocks`); the per-layer objective is the same.
    Returns ``{layer: (mse before, mse after)}``.
    """
    if blocks is not None:
        return _blockwise(qmodel, fpmodel, names, batches, blocks, mode=mode, iters=iters, batch=batch,
                          lr_weight=lr_weight, lr_bias=lr_bias, lr_w_scale=lr_w_scale, lr_a_scale=lr_a_scale,
                          seed=seed, relu=relu, max_shift=max_shift, progress=progress)
    if mode not in ("sequential", "parallel"):
        raise ValueError(f"AdaQuant mode must be 'sequential' or 'parallel', got {mode!r}")
    out: dict[str, tuple[float, float]] = {}
    bar = tqdm(names, desc="AdaQuant", unit="layer", disable=not show_progress(progress))
    for i, name in enumerate(bar):
        layer, fp_layer = qmodel.get_submodule(name), fpmodel.get_submodule(name)
        xs_fp, ys = capture(fpmodel, fp_layer, batches if fp_batches is None else fp_batches, inputs=True,
                            outputs=True)
        xs = capture(qmodel, layer, batches)[0] if mode == "sequential" else xs_fp
        del xs_fp
        out[name] = adaquant_layer(layer, xs, ys, iters=iters, batch=batch, lr_weight=lr_weight, lr_bias=lr_bias,
                                   lr_w_scale=lr_w_scale, lr_a_scale=lr_a_scale, seed=seed + i,
                                   relu=name in relu, max_shift=max_shift)
        bar.set_postfix_str(f"{name}: {out[name][0]:.2e} -> {out[name][1]:.2e}")
        del xs, ys
    return out


def _blockwise(qmodel: nn.Module, fpmodel: nn.Module, names: list[str], batches: list[Batch], blocks: list[str],
               *, seed: int, relu: frozenset[str], **kw) -> dict[str, tuple[float, float]]:
    """:func:`adaquant` one block at a time: layers before the first block and after the last one (an embedding
    projection, a head) on the whole model, each block's layers on that block's two input streams."""
    from thrifty.quant.blocks import split_layers, walk_blocks

    before, per, after = split_layers(qmodel, names, blocks, batches[0])
    order = before + [n for b in blocks for n in per[b]] + after
    out = adaquant(qmodel, fpmodel, before, batches, seed=seed, relu=relu, **kw)
    for blk, q_in, fp_in in walk_blocks(qmodel, fpmodel, blocks, batches):
        if not per[blk]:
            continue
        cut = len(blk) + 1
        got = adaquant(qmodel.get_submodule(blk), fpmodel.get_submodule(blk), [n[cut:] for n in per[blk]], q_in,
                       fp_batches=fp_in, seed=seed + order.index(per[blk][0]),
                       relu=frozenset(n[cut:] for n in relu if n.startswith(blk + ".")), **kw)
        out.update({f"{blk}.{k}": v for k, v in got.items()})
    out.update(adaquant(qmodel, fpmodel, after, batches, seed=seed + len(order) - len(after), relu=relu, **kw))
    return out
