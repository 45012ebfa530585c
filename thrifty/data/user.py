"""User datasets: tensor files (.pt / .npz) and class-per-subfolder image folders."""
from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path
from typing import Union

import numpy as np
import torch
from torch.utils.data import TensorDataset

from .common import Splits, stratified_split

__all__ = ["load_tensors", "load_image_folder", "IMAGE_EXTENSIONS"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
PathLike = Union[str, os.PathLike]


def _check_xy(x, y, path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        x = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x)
        y = torch.as_tensor(np.asarray(y) if not isinstance(y, torch.Tensor) else y)
    except (TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"{path}: x and y must be array-like ({e})") from None
    if x.ndim == 0 or y.ndim != 1:
        raise ValueError(f"{path}: need x with a batch dimension and 1-D labels y, got x {tuple(x.shape)}, "
                         f"y {tuple(y.shape)}")
    if len(x) != len(y):
        raise ValueError(f"{path}: x has {len(x)} samples but y has {len(y)} labels")
    if len(x) == 0:
        raise ValueError(f"{path}: dataset is empty (0 samples)")
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        if y.is_floating_point() and torch.equal(y, y.round()):
            y = y.long()
        else:
            raise ValueError(f"{path}: labels y must be integer class indices, got dtype {y.dtype}")
    y = y.long()
    if int(y.min()) < 0:
        raise ValueError(f"{path}: labels must be >= 0, found {int(y.min())}")
    if not x.is_floating_point():
        x = x.float()
    return x.float(), y


def _split_xy(name: str, x: torch.Tensor, y: torch.Tensor, seed: int, test_fraction: float) -> Splits:
    if len(x) < 2:
        raise ValueError(f"{name}: need at least 2 samples to split into train and test, got {len(x)}")
    tr, te = stratified_split(y.numpy(), test_fraction, seed)
    if len(te) == 0:  # every class is a singleton: fall back to a plain seeded split
        perm = np.random.default_rng(seed).permutation(len(y))
        k = max(1, round(len(y) * test_fraction))
        tr, te = np.sort(perm[k:]), np.sort(perm[:k])
    tr, te = torch.from_numpy(tr), torch.from_numpy(te)
    return Splits(name, TensorDataset(x[tr], y[tr]), TensorDataset(x[te], y[te]),
                  int(y.max()) + 1, tuple(x.shape[1:]))


def load_tensors(path: PathLike, seed: int = 0, test_fraction: float = 0.2) -> Splits:
    """Load (x, y) from a .pt file (dict with "x", "y" or a tuple/list (x, y)) or an .npz (keys x, y).

    x is cast to float32, y must be integer class indices; the split is stratified and seeded.
    num_classes = max(y) + 1. No normalisation is applied.

    Example:
        >>> import torch, tempfile, os
        >>> p = os.path.join(tempfile.mkdtemp(), "d.pt")
        >>> torch.save({"x": torch.randn(20, 3), "y": torch.arange(20) % 2}, p)
        >>> s = load_tensors(p)
        >>> s.input_shape, s.num_classes, len(s.train) + len(s.test)
        ((3,), 2, 20)
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"dataset file not found: {path}")
    if not path.is_file():
        raise ValueError(f"{path}: expected a .pt or .npz file, got a directory")
    suffix = path.suffix.lower()
    if suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as z:
                missing = {"x", "y"} - set(z.files)
                if missing:
                    raise ValueError(f"{path}: .npz must contain arrays 'x' and 'y'; missing "
                                     f"{sorted(missing)} (found {sorted(z.files)})")
                x, y = z["x"], z["y"]
        except ValueError as e:
            if str(path) in str(e):
                raise
            raise ValueError(f"{path}: corrupt or unreadable .npz file ({e})") from None
        except (OSError, zipfile.BadZipFile, EOFError) as e:
            raise ValueError(f"{path}: corrupt or unreadable .npz file ({e})") from None
    elif suffix == ".pt":
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except (RuntimeError, pickle.UnpicklingError, EOFError, OSError, ValueError, zipfile.BadZipFile) as e:
            raise ValueError(f"{path}: corrupt or unreadable .pt file ({type(e).__name__}: {e})") from None
        if isinstance(obj, dict):
            if not {"x", "y"} <= set(obj):
                raise ValueError(f"{path}: dict must have keys 'x' and 'y', found {sorted(map(str, obj))}")
            x, y = obj["x"], obj["y"]
        elif isinstance(obj, (tuple, list)) and len(obj) == 2:
            x, y = obj
        else:
            raise ValueError(f"{path}: expected a dict with 'x', 'y' or a pair (x, y), got {type(obj).__name__}")
    else:
        raise ValueError(f"{path}: unsupported file type {path.suffix!r}; use .pt or .npz")
    x, y = _check_xy(x, y, path)
    return _split_xy(path.stem, x, y, seed, test_fraction)


def _read_image(path: Path, size: tuple[int, int], mode: str) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError  # Pillow is a dependency of matplotlib

    try:
        with Image.open(path) as im:
            im = im.convert(mode).resize((size[1], size[0]), Image.BILINEAR)
            arr = np.asarray(im, dtype=np.float32) / 255.0
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"{path}: corrupt or unreadable image ({e})") from None
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def load_image_folder(path: PathLike, size: int | tuple[int, int], seed: int = 0,
                      test_fraction: float = 0.2, channels: int | None = None) -> Splits:
    """Images in class-per-subfolder layout (``path/<class>/*.png|jpg|jpeg``) -> Splits.

    Classes are the sorted subfolder names (label = position). Images are resized bilinearly to
    ``size``; ``channels`` is 1 (grayscale) or 3 (RGB), default: 1 if every image is grayscale else 3.
    Standardised with one scalar mean/std from the train split. The split is stratified and seeded.

    Example:
        >>> import tempfile, numpy as np
        >>> from PIL import Image
        >>> root = Path(tempfile.mkdtemp())
        >>> for label in ("cat", "dog"):
        ...     (root / label).mkdir()
        ...     for i in range(5):
        ...         Image.fromarray(np.full((12, 12), 40 * i, np.uint8)).save(root / label / f"{i}.png")
        >>> s = load_image_folder(root, size=8)
        >>> s.input_shape, s.num_classes, len(s.train) + len(s.test)
        ((1, 8, 8), 2, 10)
    """
    from PIL import Image

    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"image folder not found: {root}")
    if not root.is_dir():
        raise ValueError(f"{root}: expected a folder with one subfolder per class")
    hw = (size, size) if isinstance(size, int) else tuple(size)
    if len(hw) != 2 or any(not isinstance(s, int) or s < 1 for s in hw):
        raise ValueError(f"size must be a positive int or (height, width), got {size!r}")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    files, labels = [], []
    for label, cls in enumerate(classes):
        for f in sorted((root / cls).iterdir()):
            if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS:
                files.append(f)
                labels.append(label)
    if not files:
        raise ValueError(f"{root}: no images ({'/'.join(IMAGE_EXTENSIONS)}) found in class subfolders "
                         f"(found subfolders: {classes})")
    if channels is None:
        gray = True
        for f in files:
            try:
                with Image.open(f) as im:
                    gray = gray and im.mode in ("1", "L", "LA", "I", "I;16", "F")
            except Exception as e:  # reported properly by _read_image below
                del e
        channels = 1 if gray else 3
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels!r}")
    x = torch.from_numpy(np.stack([_read_image(f, hw, "L" if channels == 1 else "RGB") for f in files]))
    y = torch.tensor(labels, dtype=torch.long)
    s = _split_xy(root.name, x, y, seed, test_fraction)
    xtr, ytr = s.train.tensors
    xte, yte = s.test.tensors
    mean = xtr.mean()
    std = xtr.std().clamp_min(1e-8) if xtr.numel() > 1 else torch.tensor(1.0)
    return Splits(s.name, TensorDataset((xtr - mean) / std, ytr), TensorDataset((xte - mean) / std, yte),
                  len(classes), s.input_shape)
