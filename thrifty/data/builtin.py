"""Bundled datasets, all built offline: scikit-learn digits, MNIST-1D (generated), stdlib sentences.

Raw arrays are generated once per process (functools.lru_cache); each load_dataset call returns
fresh tensors so in-place edits by a caller never leak into the cache.
"""
from __future__ import annotations

import functools
import random
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from .common import Splits, stratified_split
from .text import GROUPS, text_corpus

__all__ = ["load_dataset", "DATASETS", "MNIST1D_NUM_SAMPLES"]

DATASETS = ("digits", "digits32", "mnist1d", "text")
# MNIST-1D's canonical size (5000 signals, generator seed 42); generation takes ~1.5 s on one core.
MNIST1D_NUM_SAMPLES = 5000
_TEST_FRACTION = {"digits": 0.3, "digits32": 0.3, "mnist1d": 0.2, "text": 0.3}


@functools.lru_cache(maxsize=1)
def _digits_raw() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.images.astype(np.float32) / 16.0, d.target.astype(np.int64)  # (1797, 8, 8) in [0, 1]


@functools.lru_cache(maxsize=1)
def _mnist1d_raw() -> tuple[np.ndarray, np.ndarray]:
    # make_dataset is the local generator (get_dataset may download); it reseeds the global
    # numpy/random RNGs, so restore them to keep load_dataset free of side effects.
    from mnist1d.data import get_dataset_args, make_dataset

    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        args = get_dataset_args()
        args.num_samples = MNIST1D_NUM_SAMPLES
        d = make_dataset(args)
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    x = np.concatenate([d["x"], d["x_test"]]).astype(np.float32)
    y = np.concatenate([d["y"], d["y_test"]]).astype(np.int64)
    return x, y


def _standardise(train: torch.Tensor, test: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # One scalar mean/std from train: keeps the image structure and avoids blowing up
    # near-constant border pixels (per-feature scaling would give them huge values).
    mean, std = train.mean(), train.std().clamp_min(1e-8)
    return (train - mean) / std, (test - mean) / std


def _splits(name: str, x: np.ndarray, y: np.ndarray, seed: int) -> tuple:
    tr, te = stratified_split(y, _TEST_FRACTION[name], seed)
    xt, yt = torch.tensor(x), torch.tensor(y)
    return xt[tr], yt[tr], xt[te], yt[te]


def load_dataset(name: str, seed: int = 0, root: str | None = None) -> Splits:
    """Load a bundled dataset (no network) or a user dataset, split deterministically from ``seed``.

    Names (stratified splits):
      - "digits":   sklearn 8x8 digits, 1797 samples flattened to (64,), x/16 then standardised with the
                    train mean/std; 70/30 split (1258 train / 539 test), 10 classes.
      - "digits32": the same images upscaled bilinearly to (1, 32, 32), standardised; same split.
      - "mnist1d":  MNIST-1D generated locally (5000 signals of shape (40,), mnist1d's generator seed 42,
                    already zero-mean unit-std); 80/20 split (4000 / 1000), 10 classes.
      - "text":     ~1900 English sentences (see thrifty.data.text); x = long indices into
                    ``train_texts`` / ``test_texts``, y = topic-group label; 70/30 split.
    Any other name is treated as a user dataset: a .pt/.npz file or image folder at ``name`` or at
    ``root/name`` (also trying the .pt and .npz suffixes); see load_tensors / load_image_folder.

    Example:
        >>> s = load_dataset("digits32", seed=0)
        >>> s.input_shape, s.num_classes, len(s.train), len(s.test)
        ((1, 32, 32), 10, 1258, 539)
    """
    if not isinstance(name, str):
        raise TypeError(f"dataset name must be a str, got {type(name).__name__}")
    if root is not None and name in DATASETS:
        raise ValueError(f"load_dataset: root={str(root)!r} applies to user datasets only; {name!r} is bundled "
                         "(it would be ignored)")
    if name in ("digits", "digits32"):
        imgs, y = _digits_raw()
        xtr, ytr, xte, yte = _splits(name, imgs, y, seed)
        if name == "digits":
            xtr, xte = _standardise(xtr.flatten(1), xte.flatten(1))
        else:
            up = lambda t: F.interpolate(t[:, None], size=(32, 32), mode="bilinear", align_corners=False)
            xtr, xte = _standardise(up(xtr), up(xte))
        return Splits(name, TensorDataset(xtr, ytr), TensorDataset(xte, yte), 10, tuple(xtr.shape[1:]))
    if name == "mnist1d":
        x, y = _mnist1d_raw()
        xtr, ytr, xte, yte = _splits(name, x, y, seed)
        return Splits(name, TensorDataset(xtr, ytr), TensorDataset(xte, yte), 10, (x.shape[1],))
    if name == "text":
        sents, labels = text_corpus()
        tr, te = stratified_split(np.asarray(labels), _TEST_FRACTION[name], seed)
        y = torch.tensor(labels, dtype=torch.long)
        # x are indices into the *split's own* text tuple, so train.tensors[0][i] -> train_texts[...]
        return Splits(
            name,
            TensorDataset(torch.arange(len(tr)), y[tr]),
            TensorDataset(torch.arange(len(te)), y[te]),
            len(GROUPS),
            (),
            train_texts=tuple(sents[i] for i in tr),
            test_texts=tuple(sents[i] for i in te),
        )
    return _load_user(name, seed, root)


def _load_user(name: str, seed: int, root: str | None) -> Splits:
    from .user import load_image_folder, load_tensors

    base = Path(root) / name if root is not None else Path(name)
    candidates = [base] + [base.with_name(base.name + ext) for ext in (".pt", ".npz")]
    for p in candidates:
        if p.is_dir():
            return load_image_folder(p, size=32, seed=seed)
        if p.is_file():
            return load_tensors(p, seed=seed)
    raise ValueError(
        f"unknown dataset {name!r}: not one of {', '.join(DATASETS)} and no file or folder at "
        f"{', '.join(str(p) for p in candidates)}"
    )
