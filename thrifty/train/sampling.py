"""How the loop draws data: an endless stream of per-epoch DistributedSampler orders, cut into batches.

A step may draw any number of samples (regimes change the batch size), the position in the stream is
recomputed from the batch sizes of earlier steps (exact resume without saving sampler state), and each DDP
process reads its own shard of the same permutation.

Example:
    >>> batches = index_batches(10, lambda t: 4, start=0, total=3, seed=0, rank=0, world=1)
    >>> [len(b) for b in batches]
    [4, 4, 4]
"""
from __future__ import annotations

from typing import Callable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, TensorDataset
from torch.utils.data._utils.collate import default_collate

__all__ = ["collate", "index_batches", "loader"]


def collate(ds: Dataset, idx: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(ds, TensorDataset):  # fast path: one gather per tensor instead of per-sample collate
        i = torch.as_tensor(idx, dtype=torch.long)
        return ds.tensors[0][i], ds.tensors[-1][i]
    x, y = default_collate([ds[i] for i in idx])[:2]
    return x, y


def index_batches(n: int, sizes: Callable[[int], int], start: int, total: int, seed: int,
                  rank: int, world: int) -> Iterator[list[int]]:
    """Index batches for steps start..total-1 from an endless stream of per-epoch DistributedSampler orders."""
    sampler = DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=True, seed=seed)
    per_rank = len(sampler)
    pos = sum(sizes(t) for t in range(start))  # replay the cursor: exact resume without saving sampler state
    epoch, off = divmod(pos, per_rank)
    order: list[int] | None = None
    for step in range(start, total):
        need, batch = sizes(step), []
        while need:
            if order is None:
                sampler.set_epoch(epoch)
                order = list(iter(sampler))
            take = min(need, per_rank - off)
            batch += order[off:off + take]
            need, off = need - take, off + take
            if off == per_rank:
                epoch, off, order = epoch + 1, 0, None
        yield batch


def loader(ds: Dataset, batches: Iterator[list[int]], num_workers: int) -> Iterator[tuple[torch.Tensor, ...]]:
    if num_workers == 0:
        return (collate(ds, b) for b in batches)
    return iter(DataLoader(ds, batch_sampler=batches, num_workers=num_workers))
