"""Per-task unlabeled inputs for merging: validation, few-shot subsets and augmented copies.

Example:
    >>> import torch
    >>> pool = augment_tasks([torch.randn(10, 64), torch.randn(10, 64)], copies=3, noise=0.05, mixup=0.3, shift=2)
    >>> [len(x) for x in pool.x]
    [40, 40]
"""
from __future__ import annotations

import contextlib
from dataclasses import InitVar, dataclass
from typing import ClassVar, Iterator, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import Dataset, Subset, TensorDataset

from thrifty.core.compat import dropped_progress, upgrade_drop_progress
from thrifty.core.config import Config, nest_moved
from thrifty.core.optim import OptimConfig

__all__ = ["TaskData", "TrainedMerge", "task_inputs", "augment_tasks", "MIN_SAMPLES", "few_shot", "num_threads"]

MIN_SAMPLES = 2


@dataclass(frozen=True, kw_only=True)
class TrainedMerge(Config):
    """The fields every merge method that trains on the tasks' unlabeled samples shares (FSMerge, DistillMerge):
    the optimisation, the augmentation of the samples, threads and seed. Keyword-only: a method's own fields keep
    their positions.

    Args:
        optim: AdamW with a cosine decay: ``steps``, peak ``lr``, ``batch_size`` samples per step (split over the
            tasks), ``weight_decay``.
        augment: augmented copies per sample (shifts for images, mixup within a task, Gaussian noise).
        noise: std of the Gaussian noise, relative to the data's.
        mixup: largest mixup weight within a task (<= 0.5).
        shift: largest random shift of image inputs, in pixels.
        threads: torch threads while merging (<= 0 leaves torch's setting).
        seed: seeds the augmentation and the batches.
    """

    optim: OptimConfig = OptimConfig(steps=300, lr=1e-3, batch_size=64, weight_decay=0.0)
    augment: int = 4
    noise: float = 0.05
    mixup: float = 0.3
    shift: int = 2
    threads: int = 1
    seed: int = 0
    # version 1 held ``progress``; bars follow thrifty.utils.show_progress now
    progress: InitVar[Optional[bool]] = None

    # version 2 dropped ``progress``; version 3 moved steps, lr, weight_decay and batch_size into ``optim``
    version: ClassVar[int] = 3
    moved_fields: ClassVar[dict[str, str]] = {k: "optim." + k for k in ("steps", "lr", "weight_decay", "batch_size")}

    @classmethod
    def upgrade(cls, d: dict, from_version: int) -> dict:
        return nest_moved(cls, upgrade_drop_progress(cls, d, from_version))

    def __post_init__(self, progress: Optional[bool]) -> None:
        dropped_progress(self, progress)
        checks = {"optim": isinstance(self.optim, OptimConfig), "augment": self.augment >= 0, "noise": self.noise >= 0,
                  "mixup": 0 <= self.mixup <= 0.5, "shift": self.shift >= 0}
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"{type(self).__name__}.{name}: invalid value {getattr(self, name)!r}")

    def augmented(self, xs: Sequence[torch.Tensor]) -> "TaskData":
        """The tasks' inputs ``xs`` with ``augment`` augmented copies per sample, drawn with ``seed``."""
        return augment_tasks(xs, self.augment, self.noise, self.mixup, self.shift, self.seed)


@dataclass
class TaskData:
    """x[i]: the (possibly augmented) unlabeled inputs of task i."""

    x: list[torch.Tensor]


def _inputs_of(d: object, i: int) -> torch.Tensor:
    if isinstance(d, torch.Tensor):
        return d
    if isinstance(d, TensorDataset):
        return d.tensors[0]
    if isinstance(d, Subset) and isinstance(d.dataset, TensorDataset):
        return d.dataset.tensors[0][torch.as_tensor(d.indices, dtype=torch.long)]
    if isinstance(d, Dataset):
        return torch.stack([d[j][0] for j in range(len(d))])  # type: ignore[arg-type]
    raise TypeError(f"data[{i}] must be a tensor or a dataset of (x, ...) samples, got {type(d).__name__}")


@torch.no_grad()
def task_inputs(models: Sequence[nn.Module], data: Sequence) -> list[torch.Tensor]:
    """Validate ``data`` (one entry per model/task) and return float input tensors."""
    if isinstance(data, (torch.Tensor, Dataset)) or not isinstance(data, (list, tuple)):
        raise TypeError("data must be a list with one entry (tensor or dataset of inputs) per model, "
                        f"got {type(data).__name__}")
    if len(data) != len(models):
        raise ValueError(f"data has {len(data)} entries but there are {len(models)} models; give one per task")
    xs = []
    for i, d in enumerate(data):
        x = _inputs_of(d, i)
        if not x.is_floating_point():
            raise TypeError(f"data[{i}] inputs have dtype {x.dtype}; expected floating point")
        if len(x) < MIN_SAMPLES:
            raise ValueError(f"data[{i}] has {len(x)} sample(s); merging needs at least {MIN_SAMPLES} per task")
        if not torch.isfinite(x).all():
            raise ValueError(f"data[{i}] contains NaN or inf")
        if i and x.shape[1:] != xs[0].shape[1:]:
            raise ValueError(f"data[{i}] samples have shape {tuple(x.shape[1:])}, data[0] {tuple(xs[0].shape[1:])}")
        try:
            models[i](x[:1].float())
        except Exception as e:  # noqa: BLE001 -- re-raised with the task named
            raise ValueError(f"models[{i}] cannot run on data[{i}] (sample shape {tuple(x.shape[1:])}): {e}") from e
        xs.append(x.detach().float().clone())
    return xs


def _shift(x: torch.Tensor, max_shift: int, g: torch.Generator) -> torch.Tensor:
    """Random translation by up to max_shift pixels (zero fill), per sample."""
    n, h, w = x.shape[0], x.shape[-2], x.shape[-1]
    p = max_shift
    padded = F.pad(x, (p, p, p, p))
    dy = torch.randint(0, 2 * p + 1, (n,), generator=g)
    dx = torch.randint(0, 2 * p + 1, (n,), generator=g)
    return torch.stack([padded[j, ..., dy[j]:dy[j] + h, dx[j]:dx[j] + w] for j in range(n)])


@torch.no_grad()
def augment_tasks(xs: Sequence[torch.Tensor], copies: int, noise: float = 0.05, mixup: float = 0.3, shift: int = 2,
            seed: int = 0) -> TaskData:
    """Originals plus ``copies`` augmented copies per task: random shifts (image inputs, N x C x H x W),
    mixup with another sample of the same task (weight <= ``mixup``), Gaussian noise (``noise`` x std)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for x in xs:
        parts = [x]
        std = float(x.std()) if x.numel() > 1 else 1.0
        for _ in range(copies):
            y = _shift(x, shift, g) if (x.ndim == 4 and shift > 0) else x.clone()
            if mixup > 0:
                lam = torch.rand((len(x),) + (1,) * (x.ndim - 1), generator=g) * mixup
                y = (1 - lam) * y + lam * y[torch.randperm(len(x), generator=g)]
            if noise > 0:
                y = y + noise * std * torch.randn(y.shape, generator=g)
            parts.append(y)
        out.append(torch.cat(parts))
    return TaskData(out)


@contextlib.contextmanager
def num_threads(n: int) -> Iterator[None]:
    """Temporarily run torch with ``n`` intra-op threads (n <= 0: leave it alone).

    Merging works on tiny matrices; on a busy machine extra threads mostly spin (measured here: 200
    FS-Merge steps of a small MLP took 0.9 s with 1 thread and 157 s with 2 under load)."""
    if n <= 0:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def few_shot(ds: TensorDataset, n: int, seed: int = 0) -> TensorDataset:
    """``n`` samples of ``ds`` chosen at random (deterministic in ``seed``)."""
    if n > len(ds):
        raise ValueError(f"asked for {n} samples but the dataset has only {len(ds)}")
    idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:n]
    return TensorDataset(*(t[idx] for t in ds.tensors))
