"""Training checkpoints as one safetensors file, written atomically.

Layout of ``last.safetensors``:
  - ``model/<state_dict key>``: model parameters and buffers;
  - ``optim/<param index>/<state key>``: optimizer state tensors (momentum buffers, Adam moments, steps);
  - metadata (str -> str): ``format``, ``step``, and JSON blobs ``optim_param_groups``, ``optim_scalars``,
    ``extra`` (config, history, ...).

No pickle is involved, so a checkpoint can be loaded from an untrusted source. RNG streams are not stored:
the loop reseeds every step from (seed, step, rank), which makes resume exact on every rank.

Example:
    >>> import torch, tempfile, os
    >>> m = torch.nn.Linear(2, 2); opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    >>> p = os.path.join(tempfile.mkdtemp(), "last.safetensors")
    >>> save_checkpoint(p, m, opt, step=3, extra={"note": "hi"}).name
    'last.safetensors'
    >>> load_checkpoint(p, m, opt)["step"]
    3
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from thrifty.utils import atomic_write_bytes

__all__ = ["save_checkpoint", "load_checkpoint", "CheckpointError", "FORMAT"]

FORMAT = "thrifty-ckpt-1"


class CheckpointError(ValueError):
    """A checkpoint file is missing, corrupt, or does not match the model/optimizer."""


def _flatten_optimizer(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"optim/{idx}/{k}"] = v.detach().cpu().contiguous().clone()
            else:
                scalars.setdefault(str(idx), {})[k] = v
    meta = {"optim_param_groups": json.dumps(sd["param_groups"]), "optim_scalars": json.dumps(scalars)}
    return tensors, meta


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> dict[str, Any]:
    groups = json.loads(meta["optim_param_groups"])
    for g in groups:  # JSON turned tuples into lists; optimizers unpack e.g. betas either way, keep tuples
        for k, v in g.items():
            if k != "params" and isinstance(v, list):
                g[k] = tuple(v)
    state: dict[int, dict[str, Any]] = {}
    for idx, st in json.loads(meta["optim_scalars"]).items():
        state.setdefault(int(idx), {}).update(st)
    for key, v in tensors.items():
        if key.startswith("optim/"):
            _, idx, k = key.split("/", 2)
            state.setdefault(int(idx), {})[k] = v
    return {"state": state, "param_groups": groups}


def save_checkpoint(path: str | os.PathLike, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                    step: int, extra: dict[str, Any] | None = None) -> Path:
    """Atomically write model + optimizer state + ``step`` (+ JSON-able ``extra``) to ``path``."""
    # clone: safetensors refuses tensors that share storage (tied weights)
    tensors = {f"model/{k}": v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    meta = {"format": FORMAT, "step": str(int(step)), "extra": json.dumps(extra or {})}
    if optimizer is not None:
        t, m = _flatten_optimizer(optimizer)
        tensors.update(t)
        meta.update(m)
    return atomic_write_bytes(path, st_save(tensors, metadata=meta))


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read and validate a checkpoint file -> (tensors, metadata); raises CheckpointError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        data = path.read_bytes()
        tensors = st_load(data)
        n = int.from_bytes(data[:8], "little")  # the header: 8-byte length, then JSON with __metadata__
        meta = json.loads(data[8:8 + n]).get("__metadata__", {}) or {}
    except (SafetensorError, ValueError, OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"corrupt or unreadable checkpoint {path}: {e}") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a thrifty training checkpoint (format={meta.get('format')!r})")
    return tensors, meta


def load_checkpoint(path: str | os.PathLike, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer | None = None) -> dict[str, Any]:
    """Load a checkpoint into ``model`` (and ``optimizer``) in place; returns ``{"step", "extra"}``.

    The file is read and checked completely before anything is loaded, so a corrupt file leaves the
    model untouched.
    """
    tensors, meta = read_checkpoint(path)
    sd = {k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")}
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
    bad = [k for k in sd if k in own and own[k].shape != sd[k].shape]
    if missing or unexpected or bad:
        raise CheckpointError(f"checkpoint {path} does not match the model: missing={missing[:5]} "
                              f"unexpected={unexpected[:5]} shape mismatch={bad[:5]}")
    opt_sd = _unflatten_optimizer(tensors, meta) if optimizer is not None and "optim_param_groups" in meta else None
    if optimizer is not None and opt_sd is None:
        raise CheckpointError(f"checkpoint {path} holds no optimizer state")
    if opt_sd is not None and len(opt_sd["param_groups"]) != len(optimizer.param_groups):
        raise CheckpointError(f"checkpoint {path}: optimizer has {len(optimizer.param_groups)} param groups, "
                              f"checkpoint has {len(opt_sd['param_groups'])}")
    model.load_state_dict(sd)
    if opt_sd is not None:
        optimizer.load_state_dict(opt_sd)
    return {"step": int(meta["step"]), "extra": json.loads(meta.get("extra", "{}"))}
