"""FS-Merge: train a foldable SuperNet on a feature-reconstruction loss, then fold it into one zoo model.

The SuperNet keeps every input model frozen and learns merge / unmerge maps around them (see
thrifty.merge.maps and thrifty.merge.arch). Its forward pass runs the *composed* weights (sum_i M_i W_i U_i,
mathematically the same as running the per-model branches; ``SuperNet.explicit`` does the latter and the
tests check both agree), so the folded model computes exactly what was trained.

Loss (no labels): on task-i samples, the SuperNet's features unmerged into model i's space (U_i z) against
model i's own features, at every tap (MLP: each hidden layer; ViT: each block's residual output), plus
model i's logits against the merged model's task-i logits (``logit_weight``); each term is divided by the
target's mean square so layers weigh alike. ``mode="global"`` trains all maps end to end;
``mode="local"`` trains one layer's maps at a time on that layer's tap, earlier layers frozen (ViT: the
shared residual maps are trained with block 0 and then frozen; the last stage fits the head reads).

Example:
    >>> import torch
    >>> from thrifty.models import create
    >>> a = create("mlp", in_features=8, hidden=(16,), num_classes=3).eval()
    >>> b = create("mlp", in_features=8, hidden=(16,), num_classes=2).eval()
    >>> merged = fs_merge([a, b], FSMerge(optim={"steps": 5}), [torch.randn(20, 8), torch.randn(20, 8)], progress=False)
    >>> merged(torch.randn(4, 8)).shape, merged.task_slices
    (torch.Size([4, 5]), [(0, 3), (3, 5)])
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call
from tqdm.auto import tqdm

from thrifty.core.compat import config_first, progress_of
from thrifty.core.config import register_config
from thrifty.core.optim import OptimConfig
from thrifty.merge.arch import Arch, arch_for, check_models, task_slices
from thrifty.merge.maps import INITS, PARAMS, MergePoint, rect_eye
from thrifty.merge.matching import perm_matrix
from thrifty.utils import show_progress
from thrifty.merge.data import TaskData, TrainedMerge, num_threads, task_inputs

__all__ = ["FSMerge", "SuperNet", "fs_merge", "train_supernet"]


@register_config
@dataclass(frozen=True)
class FSMerge(TrainedMerge):
    """FS-Merge recipe. ``init``: "first" (model 1), "average" (weight averaging) or "permute" (activation
    matching to model 1, then averaging). ``optim.steps`` is the total budget (split evenly over the layers for
    "local"); ``augment`` augmented copies per sample (shifts for images, mixup within a task, Gaussian noise);
    ``width_mult`` scales the merged model's widths relative to the originals'. The optimisation, augmentation,
    threads and seed fields are :class:`thrifty.merge.data.TrainedMerge`'s (keyword-only).

    Args:
        param: parametrisation of each map: "diagonal", "lowrank", "diag_lowrank" or "full".
        rank: rank of the low-rank part of the maps.
        init: "first" (model 1), "average" (weight averaging) or "permute" (activation matching, then averaging).
        mode: "global" (all maps end to end) or "local" (one layer at a time).
        width_mult: merged width relative to the originals'.
        optim: AdamW with a cosine decay: ``steps`` in all (split over the layers for local mode), peak ``lr``,
            ``batch_size`` samples per step (split over the tasks), ``weight_decay``.
        logit_weight: weight of the logit-matching term of the loss.
        tol: stop once the loss falls below this.
        threads: torch threads while merging (the matrices are tiny; <= 0 leaves torch's setting).
        seed: seeds the maps' initialisation, the augmentation and the batches.
    """

    param: str = "diag_lowrank"
    rank: int = 8
    init: str = "average"
    mode: str = "global"
    width_mult: float = 1.0
    logit_weight: float = 1.0
    tol: float = 1e-10
    optim: OptimConfig = field(default=OptimConfig(steps=300, lr=1e-2, batch_size=64, weight_decay=0.0), kw_only=True)

    def __post_init__(self, progress: Optional[bool]) -> None:
        super().__post_init__(progress)
        checks = {"param": self.param in PARAMS, "init": self.init in INITS, "mode": self.mode in ("local", "global"),
                  "rank": self.rank >= 1, "width_mult": self.width_mult > 0, "logit_weight": self.logit_weight >= 0,
                  "tol": self.tol >= 0}
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"FSMerge.{name}: invalid value {getattr(self, name)!r}")


class _Stop(Exception):
    pass


class SuperNet(nn.Module):
    """Frozen input models + learned merge points; ``fold()`` returns a plain zoo model."""

    def __init__(self, models: Sequence[nn.Module], cfg: FSMerge = FSMerge(), points: nn.ModuleDict | None = None,
                 perms: dict[str, list[torch.Tensor]] | None = None) -> None:
        super().__init__()
        check_models(models, min_models=1)
        self.arch: Arch = arch_for(models)
        self.k = len(models)
        self.slices = task_slices(models)
        g = torch.Generator().manual_seed(cfg.seed)
        if cfg.init == "permute" and points is None and perms is None:
            raise ValueError('init="permute" needs the permutations (fs_merge computes them from the data)')

        def make(d: int, m: int, key: str = "", pattern: torch.Tensor | None = None, **kw) -> MergePoint:
            if cfg.init == "permute" and points is None:
                base = rect_eye(m, d) if pattern is None else pattern
                pattern = [base @ perm_matrix(p) for p in perms[key]]
            return MergePoint(self.k, d, m, cfg.init, cfg.param, cfg.rank, generator=g, pattern=pattern, **kw)

        self.points = points if points is not None else self.arch.points(cfg.width_mult, make)
        self._template = [self.arch.template(self.points)]  # a list: not a submodule, never trained
        for p in self._template[0].parameters():
            p.requires_grad_(False)

    def merged_state(self) -> dict[str, torch.Tensor]:
        return self.arch.compose(self.points)

    def forward(self, x: torch.Tensor, stop_at: int | None = None) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        """-> (concatenated per-task logits, merged features at each tap). ``stop_at`` ends after that tap."""
        tmpl = self._template[0]
        feats: list[torch.Tensor] = []
        names = [n for n, _ in self.arch.taps()]

        def hook(_mod: nn.Module, _inp: tuple, out: torch.Tensor) -> None:
            feats.append(self.arch.tap_fn(out))
            if stop_at is not None and len(feats) > stop_at:
                raise _Stop

        mods = dict(tmpl.named_modules())
        handles = [mods[n].register_forward_hook(hook) for n in names]
        try:
            logits = functional_call(tmpl, self.merged_state(), (x,))
        except _Stop:
            logits = None
        finally:
            for h in handles:
                h.remove()
        return logits, feats

    def unmerge(self, tap: int, z: torch.Tensor, i: int) -> torch.Tensor:
        """Merged features at ``tap`` -> model i's space."""
        return z @ self.points[self.arch.taps()[tap][1]].u(i).T

    def explicit(self, x: torch.Tensor) -> torch.Tensor:
        """Per-model branches run separately (the SuperNet as defined); equals ``fold()(x)``."""
        return self.arch.explicit(self.points, x)

    @torch.no_grad()
    def fold(self) -> nn.Module:
        """A plain zoo model of the merged width with the K task heads concatenated (``task_slices``)."""
        model = self.arch.template(self.points)
        model.load_state_dict({k: v.detach().clone().contiguous() for k, v in self.merged_state().items()})
        model.task_slices = list(self.slices)
        return model.eval()


@torch.no_grad()
def _teacher(arch: Arch, i: int, x: torch.Tensor, chunk: int = 256) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Model i's features at every tap (and its logits) on x."""
    model = arch.models[i]
    mods = dict(model.named_modules())
    taps: list[list[torch.Tensor]] = [[] for _ in arch.taps()]
    logits = []
    for s in range(0, len(x), chunk):
        got: list[torch.Tensor] = []
        hs = [mods[n].register_forward_hook(lambda _m, _i, o: got.append(arch.tap_fn(o))) for n, _ in arch.taps()]
        try:
            logits.append(model(x[s:s + chunk]))
        finally:
            for h in hs:
                h.remove()
        for t, f in zip(taps, got):
            t.append(f)
    return [torch.cat(t) for t in taps], torch.cat(logits)


def train_supernet(net: SuperNet, data: TaskData, cfg: FSMerge, *, progress: bool | None = None) -> list[float]:
    """Fit the merge points of ``net`` on unlabeled per-task inputs; returns the loss per step.

    ``progress`` None: :func:`thrifty.utils.show_progress` decides (a terminal, or THRIFTY_PROGRESS)."""
    k = net.k
    teach = [_teacher(net.arch, i, data.x[i]) for i in range(k)]
    scale = [[float(t.pow(2).mean().clamp_min(1e-8)) for t in feats] + [float(lg.pow(2).mean().clamp_min(1e-8))]
             for feats, lg in teach]
    n_taps = len(net.arch.taps())
    if cfg.mode == "global":
        stages = [([*net.points.keys()], None)]
    else:
        stages = [(names, tap) for names, tap in net.arch.stages()]
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    per_task = max(1, cfg.optim.batch_size // k)
    history: list[float] = []
    stage_steps = cfg.optim.steps if cfg.mode == "global" else max(1, cfg.optim.steps // len(stages))
    total = stage_steps * len(stages)
    bar = tqdm(total=total, desc=f"fs-merge ({cfg.mode})", disable=not show_progress(progress_of(cfg, progress)),
               leave=False)
    for p in net.points.parameters():
        p.requires_grad_(False)
    try:
        for si, (names, tap) in enumerate(stages):
            params = [p for n in names for p in net.points[n].parameters() if p.dtype.is_floating_point]
            for p in params:
                p.requires_grad_(True)
            last = si == len(stages) - 1
            use_taps = list(range(n_taps)) if tap is None else ([tap] if tap >= 0 else [])
            use_logits = tap is None or tap == -1 or (last and tap == n_taps - 1)
            stop = None if use_logits else max(use_taps)
            opt = torch.optim.AdamW(params, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
            for step in range(stage_steps):
                lr = cfg.optim.cosine_lr(step, stage_steps)
                for group in opt.param_groups:
                    group["lr"] = lr
                idx = [torch.randint(len(data.x[i]), (min(per_task, len(data.x[i])),), generator=gen) for i in range(k)]
                xb = torch.cat([data.x[i][ix] for i, ix in enumerate(idx)])
                logits, feats = net(xb, stop_at=stop)
                loss, s = 0.0, 0
                for i, ix in enumerate(idx):
                    rows = slice(s, s + len(ix))
                    s += len(ix)
                    for t in use_taps:
                        loss = loss + F.mse_loss(net.unmerge(t, feats[t][rows], i), teach[i][0][t][ix]) / scale[i][t]
                    if use_logits and cfg.logit_weight > 0:
                        a, b = net.slices[i]
                        loss = loss + cfg.logit_weight * F.mse_loss(logits[rows, a:b], teach[i][1][ix]) / scale[i][-1]
                loss = loss / k
                if loss.item() >= cfg.tol:
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                history.append(loss.item())
                bar.update(1)
                if step % 20 == 0:
                    bar.set_postfix(stage=si, loss=f"{loss.item():.4f}")
            for p in params:
                p.requires_grad_(False)
    finally:
        bar.close()
    return history


def fs_merge(models: Sequence[nn.Module], config: FSMerge | None = None, data: Sequence | None = None, *,
             cfg: FSMerge | None = None, progress: bool | None = None) -> nn.Module:
    """Merge K models (same zoo class, different tasks and inits) into one model of the zoo's class.

    ``data[i]``: unlabeled inputs of task i (a tensor, or a dataset whose first tensor is x); a few
    (16-100) per task suffice. Returns the folded model; its head concatenates the task heads and
    ``model.task_slices[i]`` says which logits belong to task i. The input models are not modified.
    """
    cfg, data = config_first("fs_merge", config, data, cfg, default=FSMerge(), accepts=(FSMerge,),
                             call="fs_merge(models, cfg, data)")
    if data is None:
        raise TypeError("fs_merge needs data: a few unlabeled inputs per task")
    check_models(models)
    with num_threads(cfg.threads):
        xs = task_inputs(models, data)
        perms = None
        if cfg.init == "permute":
            from thrifty.merge.baselines import match_permutations  # baselines builds on this module

            perms = match_permutations(models, torch.cat(xs), "activation")
        net = SuperNet(models, cfg, perms=perms)
        pool = cfg.augmented(xs)
        train_supernet(net, pool, cfg, progress=progress)
        return net.fold()
