"""Model merging for models trained on different tasks from different initialisations.

FS-Merge (a foldable SuperNet of learned merge / unmerge maps, folded into one zoo model) and baselines:
weight averaging, permutation matching then averaging, knowledge distillation, and the ensemble (upper
bound). Every merged model is a plain zoo model whose head concatenates the task heads;
``model.task_slices[i]`` are task i's logits.

Example:
    >>> import torch
    >>> from thrifty.models import create
    >>> from thrifty.merge import fs_merge, FSMerge
    >>> a = create("mlp", in_features=8, hidden=(16,), num_classes=2).eval()
    >>> b = create("mlp", in_features=8, hidden=(16,), num_classes=2).eval()
    >>> m = fs_merge([a, b], FSMerge(optim={"steps": 5}), [torch.randn(16, 8), torch.randn(16, 8)], progress=False)
    >>> m.task_slices
    [(0, 2), (2, 4)]
"""
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn as nn

from thrifty.core.apply import register_pipeline
from thrifty.core.compat import config_first, deprecated_alias
from thrifty.core.config import CONFIG_ALIASES, Config, register_config
from thrifty.merge.arch import check_models, task_slices, zoo_kwargs
from thrifty.merge.baselines import (
    AverageMerge, DistillMerge, Ensemble, PermuteMerge, ZipMerge, _distill_alias, average, concat_heads, distill_merge,
    match_permutations, permute_and_average, zip_merge,
)
from thrifty.merge.data import augment_tasks, few_shot, task_inputs
from thrifty.merge.fsmerge import FSMerge, SuperNet, fs_merge, train_supernet
from thrifty.merge.maps import LinearMap, MergePoint

__all__ = [
    "FSMerge", "SuperNet", "fs_merge", "train_supernet", "LinearMap", "MergePoint", "check_models", "task_slices",
    "augment_tasks", "few_shot", "task_inputs", "AverageMerge", "PermuteMerge", "DistillMerge", "EnsembleMerge",
    "average",
    "permute_and_average", "match_permutations", "distill_merge", "Ensemble", "concat_heads", "merge",
    "MERGERS",
    "evaluate_tasks", "zoo_kwargs", "ZipMerge", "zip_merge",
]


@register_config
@dataclass(frozen=True)
class EnsembleMerge(Config):
    """Keep all models (the upper bound; K x the cost)."""


MERGERS: dict[type, Callable[..., nn.Module]] = {
    FSMerge: fs_merge, AverageMerge: average, PermuteMerge: permute_and_average, DistillMerge: distill_merge,
    ZipMerge: zip_merge,
    EnsembleMerge: lambda models, cfg=None, data=None: Ensemble(models),
}
for _t in MERGERS:
    register_pipeline(_t, "merges several models", "thrifty.merge.merge(models, cfg, data)")


def merge(models: Sequence[nn.Module], config: Config | None = None, data: Sequence | None = None, *,
          cfg: Config | None = None, progress: bool | None = None) -> nn.Module:
    """Dispatch on the config type: FSMerge, AverageMerge, PermuteMerge, ZipMerge, DistillMerge or EnsembleMerge.

    ``merge(models, cfg, data)``: ``data[i]`` holds unlabeled inputs of task i (AverageMerge and EnsembleMerge
    ignore it). The old order ``merge(models, data, cfg)`` works for one release with a DeprecationWarning.
    """
    config, data = config_first("merge", config, data, cfg, call="merge(models, cfg, data)")
    fn = MERGERS.get(type(config))
    if fn is None:
        raise TypeError(f"no merge method for config {type(config).__name__}; known: {[t.__name__ for t in MERGERS]}")
    # only the trained merges draw progress bars
    return fn(models, config, data, progress=progress) if fn in (fs_merge, distill_merge) else fn(models, config, data)


# Renamed for the naming rule (docs/naming.md); the old names work for one release.
CONFIG_ALIASES["PermuteAverage"] = "PermuteMerge"
__getattr__ = deprecated_alias(__name__, {"PermuteAverage": ("PermuteMerge", PermuteMerge),
                                          "distill": ("distill_merge", _distill_alias),
                                          "augment": ("augment_tasks", augment_tasks)})


@torch.no_grad()
def evaluate_tasks(model: nn.Module, test_sets: Sequence, slices: Sequence[tuple[int, int]] | None = None,
                   batch_size: int = 512) -> list[float]:
    """Per-task accuracy: task i's test set scored on its own logits ``slices[i]`` (default model.task_slices)."""
    slices = slices if slices is not None else getattr(model, "task_slices", None)
    if slices is None or len(slices) != len(test_sets):
        raise ValueError(f"need one logit slice per test set; model.task_slices={slices}")
    was = model.training
    model.eval()
    try:
        accs = []
        for (a, b), ds in zip(slices, test_sets):
            x, y = ds.tensors[0], ds.tensors[-1]
            correct = sum(int((model(x[s:s + batch_size])[:, a:b].argmax(1) == y[s:s + batch_size]).sum())
                          for s in range(0, len(x), batch_size))
            accs.append(correct / max(len(x), 1))
        return accs
    finally:
        model.train(was)
