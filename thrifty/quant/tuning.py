"""BN tuning and bias tuning of a quantized model against its FP reference.

BN tuning re-estimates, for every layer that had a BatchNorm folded into it, the per-channel statistics of the
quantized layer's output and re-normalises it to the FP statistics: ``y' = a (y_q - mu_q) + mu_fp`` with
``a = sigma_fp / sigma_q``. This is a train-mode BN pass over the calibration data folded straight back into the
layer; the target statistics are the FP model's on the *same* calibration data (rather than the stored
gamma/beta), which cancels the sampling noise of a tiny calibration set. Layers are processed in execution
order so each one sees already-corrected inputs. With per-output-channel weight quantization the rescaling
is exact on the integer grid (``q_{a s}(a W) = a q_s(W)``); otherwise only the mean is corrected.

Bias tuning trains only the biases of the quantized layers to match the FP model's outputs (KL for
classifiers, MSE otherwise).

Example:
    >>> import torch
    >>> channel_stats(torch.ones(2, 3, 4, 4), channel_dim=1)[0].tolist()
    [1.0, 1.0, 1.0]
"""
from __future__ import annotations

import contextlib

from typing import Callable, Optional

import torch
import torch.nn as nn
from torch import Tensor
from tqdm.auto import tqdm

from thrifty.core.revert import keep_if_better
from thrifty.quant.calib import Batch, capture, run
from thrifty.quant.quantizer import UniformQuantizer
from thrifty.utils import show_progress

__all__ = ["channel_stats", "bn_tune", "bias_tune", "calib_loss"]


def channel_stats(ys: Tensor | list[Tensor], channel_dim: int) -> tuple[Tensor, Tensor]:
    """Per-channel mean and variance over every other dimension (and over all batches)."""
    ys = [ys] if isinstance(ys, Tensor) else ys
    flat = torch.cat([y.movedim(channel_dim, -1).reshape(-1, y.shape[channel_dim]) for y in ys]).double()
    return flat.mean(0).float(), flat.var(0, unbiased=False).float()


@torch.no_grad()
def bn_tune(qmodel: nn.Module, fpmodel: nn.Module, names: list[str], batches: list[Batch], *,
            max_ratio: float = 4.0, eps: float = 1e-8, progress: Optional[bool] = None) -> dict[str, float]:
    """Re-normalise each named (folded) layer's quantized output to the FP statistics, in place.

    Returns ``{layer: mean |a - 1|}`` (how much the scale changed). ``max_ratio`` bounds ``a`` for safety on
    near-dead channels.
    """
    out: dict[str, float] = {}
    for name in tqdm(names, desc="BN tuning", unit="layer", disable=not show_progress(progress)):
        layer, fp_layer = qmodel.get_submodule(name), fpmodel.get_submodule(name)
        cdim = layer.op.channel_dim if hasattr(layer, "op") else 1 if isinstance(layer, nn.Conv2d) else -1
        _, yq = capture(qmodel, layer, batches, inputs=False, outputs=True)
        mu_q, var_q = channel_stats(yq, cdim)
        del yq
        _, yf = capture(fpmodel, fp_layer, batches, inputs=False, outputs=True)
        mu_f, var_f = channel_stats(yf, cdim)
        del yf
        wq = layer.slots.weight if hasattr(layer, "slots") else None
        exact = isinstance(wq, UniformQuantizer) and wq.per_channel and wq.axis in (0, -layer.weight.dim()) \
            and wq.mode == "frozen" and getattr(getattr(layer, "op", None), "out_axis", 0) == 0
        if exact:
            a = torch.sqrt((var_f + eps) / (var_q + eps)).clamp(1 / max_ratio, max_ratio)
            a = torch.where((var_q > eps) & (var_f > eps), a, torch.ones_like(a))
        else:
            a = torch.ones_like(mu_q)
        shape = (-1,) + (1,) * (layer.weight.dim() - 1)
        layer.weight.mul_(a.reshape(shape).to(layer.weight.dtype))
        if exact and not torch.all(a == 1):
            per_ch = a.reshape((-1,) + (1,) * (wq.scale.dim() - 1))  # (channels, groups) when per group
            wq.scale.data.mul_(per_ch.to(wq.scale.dtype))
            wq.min_val.mul_(per_ch)
            wq.max_val.mul_(per_ch)
        b = layer.bias if layer.bias is not None else torch.zeros_like(mu_q)
        new_b = a * (b - mu_q) + mu_f
        if layer.bias is None:
            layer.bias = nn.Parameter(new_b.to(layer.weight.dtype))
        else:
            layer.bias.copy_(new_b)
        out[name] = float((a - 1).abs().mean())
    return out


@torch.no_grad()
def calib_loss(model: nn.Module, batches: list[Batch], targets: list[Tensor],
               loss_fn: Callable[[Tensor, Tensor], Tensor]) -> float:
    """Sample-weighted mean of ``loss_fn(model(batch), target)`` over the calibration batches."""
    tot, n = 0.0, 0
    for b, t in zip(batches, targets):
        tot += float(loss_fn(run(model, b), t)) * b.size
        n += b.size
    return tot / max(n, 1)


def bias_tune(qmodel: nn.Module, names: list[str], batches: list[Batch], targets: list[Tensor],
              loss_fn: Callable[[Tensor, Tensor], Tensor], *, iters: int = 200, lr: float = 1e-3,
              seed: int = 0, restore: bool = True, progress: Optional[bool] = None) -> tuple[float, float]:
    """Train only the biases of the named layers to match ``targets`` (FP outputs); return (loss before, after).

    With ``restore`` the biases are put back (and ``after == before``) if the calibration loss does not improve;
    ``restore=False`` leaves that decision to the caller (the pipeline's guard, which records the revert).
    """
    biases = [qmodel.get_submodule(n).bias for n in names]
    biases = [b for b in biases if b is not None]
    before = calib_loss(qmodel, batches, targets, loss_fn)
    if not biases or iters == 0:
        return before, before
    flags = {p: p.requires_grad for p in qmodel.parameters()}
    for p in qmodel.parameters():
        p.requires_grad_(False)
    for b in biases:
        b.requires_grad_(True)
    opt = torch.optim.Adam(biases, lr=lr)
    g = torch.Generator().manual_seed(seed)
    loss = lambda: calib_loss(qmodel, batches, targets, loss_fn)  # noqa: E731
    # restore=False: the caller's guard decides (and records the revert); the tuning itself is the same
    guard = keep_if_better(biases, loss, before, strict=True) if restore else contextlib.nullcontext()
    with guard as out:
        try:
            with torch.enable_grad():
                for _ in tqdm(range(iters), desc="bias tuning", unit="step",
                              disable=not show_progress(progress)):
                    i = int(torch.randint(len(batches), (1,), generator=g))
                    step_loss = loss_fn(run(qmodel, batches[i]), targets[i])
                    opt.zero_grad(set_to_none=True)
                    step_loss.backward()
                    opt.step()
        finally:
            for p, f in flags.items():
                p.requires_grad_(f)
    return before, (out.after if restore else loss())
