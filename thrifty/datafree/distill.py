"""Distillation fine-tuning of a quantized model from its FP teacher, on any inputs (e.g. BNS samples).

After post-training quantization the quantized copy can be fine-tuned end to end to reproduce the FP
model's soft outputs: the loss is KL(softmax(teacher / T) || softmax(student / T)) on the given inputs, so
no label and no real data is needed (The Knowledge Within uses it with its BNS samples). Every floating
point Parameter of the student is trained (weights behind their straight-through quantizers, biases,
learnable quantizer scales); exactly-zero weights stay zero, so N:M / pruned masks survive. The student is
restored when the fine-tuning does not lower the KL on the data, and its mode and ``requires_grad`` flags
are restored either way. The teacher is never modified.

Example:
    >>> import torch, torch.nn as nn, thrifty
    >>> _ = torch.manual_seed(0)
    >>> fp = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
    >>> calib = torch.randn(64, 8)              # first/last layer at 8 bits, the middle one at 2
    >>> res = thrifty.quant.quantize(fp, thrifty.PTQ(w_bits=2, a_bits=8, pipeline="rtn"), calib, progress=False)
    >>> r = distill(res.model, fp, Distill(steps=20, lr=1e-3), calib, progress=False)
    >>> r["kept"], r["kl_after"] < r["kl_before"], r["steps"]
    (True, True, 20)
"""
from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn as nn
from torch import Tensor
from tqdm.auto import tqdm

from thrifty.core import Config, register_config, register_pipeline
from thrifty.core.compat import config_first
from thrifty.core.revert import keep_if_better
from thrifty.quant.calib import Batch, Output, as_batches, output_loss, pool, run
from thrifty.utils import show_progress

__all__ = ["Distill", "distill"]


@register_config
@dataclass(frozen=True)
class Distill(Config):
    """KL fine-tuning of a student to its teacher: ``steps`` Adam steps at ``lr`` (cosine to zero) on batches of
    ``batch_size``, logits softened by ``temperature``; ``seed`` draws the batches.

    Args:
        steps: Adam steps.
        lr: peak learning rate (cosine to zero).
        batch_size: samples per step.
        temperature: softens the teacher's and student's logits.
        seed: draws the batches.

    Example:
        >>> Distill(steps=50).lr
        0.0001
    """

    steps: int = 100
    lr: float = 1e-4
    batch_size: int = 64
    temperature: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.steps, int) or isinstance(self.steps, bool) or self.steps < 0:
            raise ValueError(f"Distill.steps must be a non-negative integer, got {self.steps!r}")
        if self.lr <= 0 or self.batch_size < 1 or self.temperature <= 0:
            raise ValueError(f"Distill: lr, batch_size and temperature must be positive, got {self.lr}, "
                             f"{self.batch_size}, {self.temperature}")


register_pipeline(Distill, "needs a teacher and data", "thrifty.datafree.distill(student, teacher, cfg, data)")


_KL = output_loss("kl")  # KL(softmax(teacher) || softmax(student)), the PTQ pipeline's output loss


def _kl(s: Tensor, t: Tensor, temperature: float) -> Tensor:
    return _KL(s / temperature, t / temperature) * temperature ** 2


@torch.no_grad()
def _mean_kl(student: nn.Module, chunks: list[Batch], targets: list[Tensor], temperature: float) -> float:
    tot = sum(float(_kl(run(student, b), t, temperature)) * b.size for b, t in zip(chunks, targets))
    return tot / sum(b.size for b in chunks)


def _chunks(p: Batch, batch_size: int) -> list[Batch]:
    return [p.select(torch.arange(i, min(i + batch_size, p.size))) for i in range(0, p.size, batch_size)]


def distill(student: nn.Module, teacher: nn.Module, config: Optional[Distill] = None,
            data: Any = None, *, progress: Optional[bool] = None, output: Output = None,
            **overrides: Any) -> dict[str, Any]:
    """Fine-tune ``student`` in place to match ``teacher``'s outputs on ``data``; see the module docstring.

    ``config`` defaults to ``Distill()``; keyword ``overrides`` replace its fields (``steps=50``). The older
    order ``distill(student, teacher, data, steps=...)`` still works for one release, with a DeprecationWarning.
    ``data``: inputs in any form :func:`thrifty.quant.calib.as_batches` takes (tensors, datasets, dicts of model
    keyword arguments); ``output`` picks the compared field of a dict / ``ModelOutput`` result.
    Returns ``{"kl_before", "kl_after", "kept", "steps"}`` (mean KL over ``data``; ``kept`` is False when the
    fine-tuned weights were discarded because they did not lower it).
    """
    if not isinstance(student, nn.Module) or not isinstance(teacher, nn.Module):
        raise TypeError("distill: student and teacher must be nn.Modules")
    cfg, data = config_first("distill", config, data, default=Distill(), accepts=(Distill,),
                             call="distill(student, teacher, cfg, data)")
    if overrides:
        cfg = cfg.replace(**overrides)  # type: ignore[assignment]
    if data is None:
        raise TypeError("distill needs data: distill(student, teacher, cfg, data)")
    steps, lr, batch_size, temperature, seed = cfg.steps, cfg.lr, cfg.batch_size, cfg.temperature, cfg.seed
    # whole-set pools where the inputs stack (one for a tensor), else the user's batches (e.g. padded per batch)
    pools = pool(as_batches(data, batch_size, output))
    per_pool = [_chunks(p, batch_size) for p in pools]
    chunks = [c for cs in per_pool for c in cs]
    t_mode = {m: m.training for m in teacher.modules()}
    teacher.eval()
    try:
        with torch.no_grad():
            targets = [run(teacher, b) for b in chunks]
    finally:
        for m, t in t_mode.items():
            m.training = t
    bounds = [0] + list(itertools.accumulate(len(cs) for cs in per_pool))
    pool_targets = [torch.cat(targets[bounds[i]:bounds[i + 1]]) for i in range(len(pools))]
    sizes = torch.tensor([float(p.size) for p in pools])
    s_mode = {m: m.training for m in student.modules()}
    student.eval()  # BN (if any is left) keeps its running statistics; no dropout
    params = [p for p in student.parameters() if p.is_floating_point()]
    flags = {p: p.requires_grad for p in student.parameters()}
    try:
        before = _mean_kl(student, chunks, targets, temperature)
        if steps == 0 or not params:
            return {"kl_before": before, "kl_after": before, "kept": True, "steps": 0}
        # pruned (exactly zero) weights stay pruned: re-zeroed after every step
        keep = _zero_masks(student)
        for p in student.parameters():
            p.requires_grad_(p.is_floating_point())
        opt = torch.optim.Adam(params, lr=lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
        gen = torch.Generator().manual_seed(seed)
        kl = functools.partial(_mean_kl, student, chunks, targets, temperature)
        with keep_if_better(student, kl, before, strict=True) as out, torch.enable_grad():
            for _ in tqdm(range(steps), desc="distill", unit="step", leave=False,
                          disable=not show_progress(progress)):
                i = int(torch.multinomial(sizes, 1, generator=gen)) if len(pools) > 1 else 0
                idx = torch.randint(pools[i].size, (min(batch_size, pools[i].size),), generator=gen)
                loss = _kl(run(student, pools[i].select(idx)), pool_targets[i][idx], temperature)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                with torch.no_grad():
                    for p, m in keep:
                        p.mul_(m)
            for p in params:
                p.grad = None
        return {"kl_before": before, "kl_after": out.after, "kept": out.kept, "steps": steps}
    finally:
        for p, f in flags.items():
            p.requires_grad_(f)
        for m, t in s_mode.items():
            m.training = t


def _zero_masks(model: nn.Module) -> list[tuple[nn.Parameter, Tensor]]:
    """(weight, nonzero mask) for every matrix/conv weight that holds exact zeros (pruned entries)."""
    out = []
    for name, p in model.named_parameters():
        if name.endswith("weight") and p.dim() > 1 and bool(p.eq(0).any()):
            out.append((p, p.ne(0).to(p.dtype)))
    return out
