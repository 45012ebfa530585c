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
    >>> m = fs_merge([a, b], [torch.randn(16, 8), torch.randn(16, 8)], FSMerge(steps=5, progress=False))
    >>> m.task_slices
    [(0, 2), (2, 4)]
"""
from thrifty.merge.arch import check_models, task_slices
from thrifty.merge.data import augment, few_shot, task_inputs
from thrifty.merge.fsmerge import FSMerge, SuperNet, fs_merge, train_supernet
from thrifty.merge.maps import LinearMap, MergePoint

__all__ = [
    "FSMerge", "SuperNet", "fs_merge", "train_supernet", "LinearMap", "MergePoint", "check_models", "task_slices",
    "augment", "few_shot", "task_inputs",
]
