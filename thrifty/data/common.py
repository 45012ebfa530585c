"""Splits container, deterministic stratified splitting and calibration subsets."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from torch.utils.data import TensorDataset

__all__ = ["Splits", "stratified_split", "calibration_subset", "labels_of"]


@dataclass(frozen=True)
class Splits:
    """A train/test pair of TensorDatasets ``(x, y)`` plus metadata.

    ``input_shape`` is the shape of one sample (without the batch dimension).
    For the "text" dataset, ``x`` holds long indices into ``train_texts`` / ``test_texts``
    (a TensorDataset cannot hold strings) and ``input_shape`` is ``()``.

    Example:
        >>> from thrifty.data import load_dataset
        >>> s = load_dataset("digits")
        >>> x, y = s.train[0]
        >>> tuple(x.shape) == s.input_shape
        True
    """

    name: str
    train: TensorDataset
    test: TensorDataset
    num_classes: int
    input_shape: tuple
    train_texts: Optional[tuple] = None
    test_texts: Optional[tuple] = None


def stratified_split(y: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic stratified split of sample indices -> (train_idx, test_idx), both sorted.

    Each class with >= 2 samples contributes round(n_c * test_fraction) (at least 1, at most n_c - 1)
    samples to the test split; a class with one sample stays in train.

    Example:
        >>> tr, te = stratified_split(np.array([0, 0, 1, 1]), 0.5, seed=0)
        >>> len(tr), len(te)
        (2, 2)
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    y = np.asarray(y)
    rng = np.random.default_rng(seed)
    test = []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        if len(idx) < 2:
            continue
        k = int(min(max(round(len(idx) * test_fraction), 1), len(idx) - 1))
        test.append(rng.permutation(idx)[:k])
    test_idx = np.sort(np.concatenate(test)) if test else np.zeros(0, dtype=np.int64)
    mask = np.ones(len(y), dtype=bool)
    mask[test_idx] = False
    return np.flatnonzero(mask), test_idx


def labels_of(ds: TensorDataset) -> torch.Tensor:
    """The label tensor (last tensor) of a TensorDataset, or of a Subset of one."""
    if isinstance(ds, torch.utils.data.Subset):
        return labels_of(ds.dataset)[torch.as_tensor(ds.indices, dtype=torch.long)]
    if not isinstance(ds, TensorDataset):
        raise TypeError(f"expected a TensorDataset (x, y), got {type(ds).__name__}")
    if len(ds.tensors) < 2:
        raise ValueError("TensorDataset must hold at least (x, y) tensors")
    return ds.tensors[-1]


def calibration_subset(ds: TensorDataset, per_class: int = 10, seed: int = 0) -> TensorDataset:
    """At most ``per_class`` samples of each class, chosen deterministically from ``seed``.

    The result keeps the original relative order of the chosen samples.

    Example:
        >>> from thrifty.data import load_dataset
        >>> calib = calibration_subset(load_dataset("digits").train, per_class=5)
        >>> len(calib)
        50
    """
    if not isinstance(per_class, int) or isinstance(per_class, bool) or per_class < 1:
        raise ValueError(f"per_class must be a positive int, got {per_class!r}")
    if isinstance(ds, torch.utils.data.Subset):
        idx = torch.as_tensor(ds.indices, dtype=torch.long)
        ds = TensorDataset(*(t[idx] for t in ds.dataset.tensors))
    y = labels_of(ds)
    if y.ndim != 1:
        raise ValueError(f"calibration_subset needs 1-D class labels, got label shape {tuple(y.shape)}")
    if len(y) == 0:
        raise ValueError("calibration_subset: dataset is empty")
    rng = np.random.default_rng(seed)
    y_np = y.cpu().numpy()
    chosen = [rng.permutation(np.flatnonzero(y_np == c))[:per_class] for c in np.unique(y_np)]
    idx = torch.from_numpy(np.sort(np.concatenate(chosen))).long()
    return TensorDataset(*(t[idx] for t in ds.tensors))
