"""Merging baselines: weight averaging, permutation matching + averaging, distillation, ensemble.

All return a model whose head concatenates the task heads (``model.task_slices``), like ``fs_merge``.

Example:
    >>> import torch
    >>> from thrifty.models import create
    >>> a = create("mlp", in_features=8, hidden=(16,), num_classes=2).eval()
    >>> b = create("mlp", in_features=8, hidden=(16,), num_classes=3).eval()
    >>> average([a, b])(torch.randn(4, 8)).shape
    torch.Size([4, 5])
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from thrifty.core.compat import config_first, progress_of
from thrifty.core.config import Config, register_config
from thrifty.core.optim import OptimConfig
from thrifty.utils import show_progress
from thrifty.merge.arch import MLPArch, ViTArch, arch_for, check_models, task_slices
from thrifty.merge.data import TrainedMerge, num_threads, task_inputs
from thrifty.merge.fsmerge import SuperNet
from thrifty.merge.maps import MergePoint
from thrifty.merge.matching import (
    correlation, head_aware_match, match_features, perm_matrix, weight_matching, zip_pairs,
)

__all__ = ["AverageMerge", "PermuteMerge", "ZipMerge", "DistillMerge", "average", "permute_and_average",
           "match_permutations", "zip_merge", "distill_merge", "Ensemble", "concat_heads"]


@register_config
@dataclass(frozen=True)
class AverageMerge(Config):
    """Plain weight averaging (task heads concatenated)."""


@register_config
@dataclass(frozen=True)
class PermuteMerge(Config):
    """Align every model's hidden units to model 0's ("weight" or "activation" matching), then average.

    Args:
        matching: "activation" (correlation of pre-activations) or "weight" (weight matching).
        max_iter: most rounds of weight matching's coordinate ascent.
    """

    matching: str = "activation"
    max_iter: int = 100

    def __post_init__(self) -> None:
        if self.matching not in ("weight", "activation"):
            raise ValueError(f"PermuteMerge.matching must be 'weight' or 'activation', got {self.matching!r}")


@register_config
@dataclass(frozen=True)
class ZipMerge(Config):
    """ZipIt-style merge of two MLPs: per hidden layer, greedily pair the most correlated units among both
    models' units (within a model too); each merged unit averages its pair, unmerge copies it back."""


@register_config
@dataclass(frozen=True)
class DistillMerge(TrainedMerge):
    """Knowledge distillation of K teachers into one student (init "first": model 0 + all heads) on the
    same unlabeled samples and augmentation as FS-Merge; KL at ``temperature`` on each task's logits. The
    optimisation, augmentation, threads and seed fields are :class:`thrifty.merge.data.TrainedMerge`'s
    (keyword-only).

    Args:
        init: the student: "first" (model 0 with all task heads) or "random" (a fresh model of the same width).
        temperature: softens the teachers' and student's logits.
        seed: seeds the augmentation, the batches and a "random" student.
    """

    init: str = "first"
    temperature: float = 2.0
    optim: OptimConfig = field(default=OptimConfig(steps=300, lr=1e-3, batch_size=64, weight_decay=0.0), kw_only=True)

    def __post_init__(self, progress: Optional[bool]) -> None:
        super().__post_init__(progress)
        if self.init not in ("first", "random"):
            raise ValueError(f"DistillMerge.init must be 'first' or 'random', got {self.init!r}")
        if self.temperature <= 0:
            raise ValueError(f"DistillMerge.temperature must be > 0, got {self.temperature!r}")


def concat_heads(model: nn.Module, models: Sequence[nn.Module]) -> nn.Module:
    """Replace ``model.head`` (in place) by the concatenation of the models' heads; sets task_slices."""
    heads = [m.head for m in models]
    head = nn.Linear(heads[0].in_features, sum(h.out_features for h in heads))
    with torch.no_grad():
        head.weight.copy_(torch.cat([h.weight for h in heads]))
        head.bias.copy_(torch.cat([h.bias for h in heads]))
    model.head = head
    model.task_slices = task_slices(models)
    return model


@torch.no_grad()
def average(models: Sequence[nn.Module], config: AverageMerge | None = None, data: Sequence | None = None, *,
            cfg: AverageMerge | None = None) -> nn.Module:
    """Average every parameter and buffer except the heads (catastrophic for distinct inits); ``data`` is unused."""
    config_first("average", config, data, cfg, default=AverageMerge(), accepts=(AverageMerge,),
                 call="average(models, cfg, data)")
    check_models(models)
    out = concat_heads(copy.deepcopy(models[0]), models)
    sds = [m.state_dict() for m in models]
    merged = {k: (sum(sd[k].float() for sd in sds) / len(sds)).to(v.dtype) for k, v in sds[0].items()
              if not k.startswith("head.")}
    out.load_state_dict({**out.state_dict(), **merged})
    return out.eval()


def _perm_point(perms: Sequence[torch.Tensor], has_m: bool = True, has_u: bool = True) -> MergePoint:
    k = len(perms)
    ps = [perm_matrix(p) for p in perms]
    return MergePoint.fixed([p / k for p in ps] if has_m else None, [p.T for p in ps] if has_u else None)


@torch.no_grad()
def _mlp_features(arch: MLPArch, x: torch.Tensor) -> list[list[torch.Tensor]]:
    """[model][layer] pre-activations (pre-activations avoid ties between dead ReLU units)."""
    out = []
    for p in arch.params:
        h, feats = x.flatten(1), []
        for l in range(1, len(arch.dims()) + 1):
            a = h @ p[f"fc{l}.weight"].T + p[f"fc{l}.bias"]
            feats.append(a)
            h = F.relu(a)
        out.append(feats)
    return out


@torch.no_grad()
def _vit_features(arch: ViTArch, x: torch.Tensor) -> list[dict[str, torch.Tensor]]:
    out = []
    for model in arch.models:
        got: dict[str, list[torch.Tensor]] = {"res": []}
        hooks = [model.blocks[0].register_forward_pre_hook(lambda _m, a: got["res"].append(a[0]))]
        for l, blk in enumerate(model.blocks):
            hooks.append(blk.register_forward_hook(lambda _m, _a, o: got["res"].append(o)))
            hooks.append(blk.attn.qkv.register_forward_hook(lambda _m, _a, o, l=l: got.__setitem__(f"qkv{l}", [o])))
            hooks.append(blk.mlp.fc1.register_forward_hook(lambda _m, _a, o, l=l: got.__setitem__(f"h{l}", [o])))
        try:
            model(x)
        finally:
            for h in hooks:
                h.remove()
        out.append({k: torch.cat(v, dim=1) if k == "res" else v[0] for k, v in got.items()})
    return out


def match_permutations(models: Sequence[nn.Module], x: torch.Tensor | None, matching: str = "activation",
                       max_iter: int = 100) -> dict[str, list[torch.Tensor]]:
    """Per merge point, one perm per model aligning it to model 0 (model 0's is the identity)."""
    arch = arch_for(models)
    k = len(models)
    if isinstance(arch, MLPArch):
        if matching == "weight":
            depth = len(arch.dims())
            wa = [arch.params[0][f"fc{l}.weight"] for l in range(1, depth + 1)]
            ba = [arch.params[0][f"fc{l}.bias"] for l in range(1, depth + 1)]
            per_model = [[torch.arange(d) for d in arch.dims()]]
            for p in arch.params[1:]:
                per_model.append(weight_matching(wa, ba, [p[f"fc{l}.weight"] for l in range(1, depth + 1)],
                                                 [p[f"fc{l}.bias"] for l in range(1, depth + 1)], max_iter))
        else:
            feats = _mlp_features(arch, x)
            per_model = [[match_features(feats[0][l], feats[i][l]) for l in range(len(feats[0]))] for i in range(k)]
        return {f"h{l + 1}": [per_model[i][l] for i in range(k)] for l in range(len(arch.dims()))}
    if matching == "weight":
        raise ValueError("weight matching is implemented for the MLP only; use matching='activation' for the ViT")
    d, heads, _, depth = arch.dims()
    feats = _vit_features(arch, x)
    out: dict[str, list[torch.Tensor]] = {"res": [match_features(feats[0]["res"], f["res"]) for f in feats]}
    for l in range(depth):
        qk, v = [], []
        for f in feats:
            ca = [correlation(feats[0][f"qkv{l}"][..., j * d:(j + 1) * d], f[f"qkv{l}"][..., j * d:(j + 1) * d])
                  for j in range(3)]
            pqk, pv = head_aware_match(ca[0] + ca[1], ca[2], heads)
            qk.append(pqk)
            v.append(pv)
        out[f"b{l}_qk"], out[f"b{l}_v"] = qk, v
        out[f"b{l}_h"] = [match_features(feats[0][f"h{l}"], f[f"h{l}"]) for f in feats]
    return out


def _points_from_perms(arch, perms: dict[str, list[torch.Tensor]]) -> nn.ModuleDict:
    if isinstance(arch, MLPArch):
        return nn.ModuleDict({n: _perm_point(p) for n, p in perms.items()})
    depth = arch.dims()[3]
    pr = perms["res"]
    pts = {"res": _perm_point(pr), "final": _perm_point(pr, has_m=False)}
    for l in range(depth):
        pts[f"b{l}_a"] = pts[f"b{l}_n2"] = _perm_point(pr, has_m=False)
        pts[f"b{l}_q"] = pts[f"b{l}_k"] = _perm_point(perms[f"b{l}_qk"], has_u=False)
        pts[f"b{l}_v"] = _perm_point(perms[f"b{l}_v"], has_u=False)
        pts[f"b{l}_o"] = _perm_point(perms[f"b{l}_v"], has_m=False)
        pts[f"b{l}_h"] = _perm_point(perms[f"b{l}_h"])
    return nn.ModuleDict(pts)


@torch.no_grad()
def permute_and_average(models: Sequence[nn.Module], config: PermuteMerge | None = None,
                        data: Sequence | None = None, *, cfg: PermuteMerge | None = None) -> nn.Module:
    """Permute each model's units into model 0's order (Hungarian assignment), then average.

    Expressed as a SuperNet with fixed maps M_i = P_i / K, U_i = P_i^T and folded, so LayerNorm affines
    are folded into the following Linear per model before averaging. ``data`` (per-task inputs, pooled)
    is needed for activation matching.
    """
    cfg, data = config_first("permute_and_average", config, data, cfg, default=PermuteMerge(),
                             accepts=(PermuteMerge,), call="permute_and_average(models, cfg, data)")
    check_models(models)
    x = None
    if cfg.matching == "activation":
        if data is None:
            raise ValueError("activation matching needs data (one entry of inputs per task)")
        x = torch.cat(task_inputs(models, data))
    perms = match_permutations(models, x, cfg.matching, cfg.max_iter)
    arch = arch_for(models)
    return SuperNet(models, points=_points_from_perms(arch, perms)).fold()


@torch.no_grad()
def zip_merge(models: Sequence[nn.Module], config: ZipMerge | None = None, data: Sequence | None = None, *,
              cfg: ZipMerge | None = None) -> nn.Module:
    """ZipIt-style zipping (full, every layer; two MLPs) as a folded SuperNet with fixed maps."""
    _, data = config_first("zip_merge", config, data, cfg, default=ZipMerge(), accepts=(ZipMerge,),
                           call="zip_merge(models, cfg, data)")
    if data is None:
        raise TypeError("zip_merge needs data: a few unlabeled inputs per task")
    check_models(models)
    if len(models) != 2 or not isinstance(arch_for(models), MLPArch):
        raise ValueError("zip_merge supports exactly two MLPs; use fs_merge or permute_and_average otherwise")
    arch = arch_for(models)
    feats = _mlp_features(arch, torch.cat(task_inputs(models, data)))
    pts = {}
    for l, d in enumerate(arch.dims()):
        both = torch.cat([feats[0][l], feats[1][l]], 1)
        pairs = zip_pairs(correlation(both, both))
        ms, us = [torch.zeros(d, d) for _ in range(2)], [torch.zeros(d, d) for _ in range(2)]
        for j, pair in enumerate(pairs):
            for f in pair:
                ms[f // d][j, f % d] += 0.5
                us[f // d][f % d, j] = 1.0
        pts[f"h{l + 1}"] = MergePoint.fixed(ms, us)
    return SuperNet(models, points=nn.ModuleDict(pts)).fold()


def distill_merge(models: Sequence[nn.Module], config: DistillMerge | None = None, data: Sequence | None = None, *,
                  cfg: DistillMerge | None = None, progress: bool | None = None) -> nn.Module:
    """Distill the K models into one (same class and width) on unlabeled task data."""
    cfg, data = config_first("distill_merge", config, data, cfg, default=DistillMerge(), accepts=(DistillMerge,),
                             call="distill_merge(models, cfg, data)")
    if data is None:
        raise TypeError("distill_merge needs data: a few unlabeled inputs per task")
    check_models(models)
    with num_threads(cfg.threads):
        return _distill(models, data, cfg, show_progress(progress_of(cfg, progress)))


def _distill_alias(models: Sequence[nn.Module], data: Sequence, cfg: DistillMerge = DistillMerge()) -> nn.Module:
    """``thrifty.merge.distill`` of the previous release (old argument order): now :func:`distill_merge`."""
    return distill_merge(models, cfg, data)


def _distill(models: Sequence[nn.Module], data: Sequence, cfg: DistillMerge, progress: bool) -> nn.Module:
    xs = task_inputs(models, data)
    pool = cfg.augmented(xs).x
    teachers = [copy.deepcopy(m).eval() for m in models]
    with torch.no_grad():
        targets = [torch.cat([teachers[i](x[s:s + 256]) for s in range(0, len(x), 256)]) for i, x in enumerate(pool)]
    if cfg.init == "first":
        student = concat_heads(copy.deepcopy(models[0]), models)
    else:
        torch.manual_seed(cfg.seed)
        net = SuperNet(models)
        student = net.arch.template(net.points)  # a freshly initialised zoo model of the same width
        student.task_slices = task_slices(models)
    slices = student.task_slices
    for p in student.parameters():
        p.requires_grad_(True)
    opt = torch.optim.AdamW(student.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    g = torch.Generator().manual_seed(cfg.seed + 1)
    per = max(1, cfg.optim.batch_size // len(models))
    t = cfg.temperature
    student.train()
    for step in tqdm(range(cfg.optim.steps), desc="distill", disable=not progress, leave=False):
        for grp in opt.param_groups:
            grp["lr"] = cfg.optim.cosine_lr(step, cfg.optim.steps)
        idx = [torch.randint(len(x), (min(per, len(x)),), generator=g) for x in pool]
        out = student(torch.cat([x[ix] for x, ix in zip(pool, idx)]))
        loss, s = 0.0, 0
        for i, ix in enumerate(idx):
            a, b = slices[i]
            logp = F.log_softmax(out[s:s + len(ix), a:b] / t, dim=1)
            loss = loss + F.kl_div(logp, F.log_softmax(targets[i][ix] / t, dim=1), log_target=True,
                                   reduction="batchmean") * t * t
            s += len(ix)
        opt.zero_grad(set_to_none=True)
        (loss / len(models)).backward()
        opt.step()
    student.eval()
    for p in student.parameters():
        p.requires_grad_(False)
    return student


class Ensemble(nn.Module):
    """All K models side by side (K x the cost): the upper bound; logits concatenated per task."""

    def __init__(self, models: Sequence[nn.Module]) -> None:
        super().__init__()
        check_models(models)
        self.members = nn.ModuleList(copy.deepcopy(m).eval() for m in models)
        self.task_slices = task_slices(models)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([m(x) for m in self.members], dim=1)
