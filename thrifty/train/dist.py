"""torch.distributed helpers for the training loop (torchrun / gloo on CPU).

`fit` calls :func:`setup` itself: under ``torchrun --nproc_per_node=2`` (``WORLD_SIZE=2``) it joins the
process group with the gloo backend (nccl when CUDA is available), wraps the model in
DistributedDataParallel and shards data with DistributedSampler. Only rank 0 writes files.

Example:
    >>> rank, world = setup()
    >>> (rank, world)
    (0, 1)
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

__all__ = ["setup", "is_main", "rank_world"]


def rank_world() -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) when not distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def setup() -> tuple[int, int]:
    """Join the process group when launched with WORLD_SIZE > 1 (env:// rendezvous); returns (rank, world)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and dist.is_available() and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend, init_method="env://")
    return rank_world()


def is_main() -> bool:
    """True on rank 0 (or when not distributed): the process that writes checkpoints and reports."""
    return rank_world()[0] == 0
