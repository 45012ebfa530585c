"""Saved-model format shared by `thrifty train`, `thrifty eval` and later commands.

A saved model is a file pair ``<stem>.safetensors`` (the state_dict) + ``<stem>.yaml`` (metadata: registry
model name, its keyword arguments, dataset, metrics, anything JSON/YAML-able). ``load_model`` rebuilds the
model with ``thrifty.models.create(meta["model"], **meta["model_kwargs"])`` and loads the weights.

Example:
    >>> import tempfile, os
    >>> from thrifty.models import create
    >>> m = create("mlp", in_features=64, num_classes=10)
    >>> stem = os.path.join(tempfile.mkdtemp(), "model")
    >>> _ = save_model(m, stem, {"model": "mlp", "model_kwargs": {"in_features": 64, "num_classes": 10}})
    >>> m2, meta = load_model(stem)
    >>> meta["model"]
    'mlp'
"""
from __future__ import annotations

import inspect
import math
import os
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from thrifty.utils import atomic_write_bytes, atomic_write_text, plain_data

__all__ = ["save_model", "load_model", "model_paths", "model_kwargs_for", "FORMAT"]

FORMAT = "thrifty-model-1"


def model_paths(path: str | os.PathLike) -> tuple[Path, Path]:
    """(weights, metadata) paths for a stem, a ``.safetensors`` path or a ``.yaml`` path."""
    p = Path(path)
    stem = p.with_suffix("") if p.suffix in (".safetensors", ".yaml", ".yml") else p
    return stem.with_name(stem.name + ".safetensors"), stem.with_name(stem.name + ".yaml")


def save_model(model: torch.nn.Module, path: str | os.PathLike, meta: dict[str, Any]) -> Path:
    """Atomically write ``<stem>.safetensors`` + ``<stem>.yaml``; ``meta`` needs "model" and "model_kwargs".

    Returns the weights path."""
    if "model" not in meta or "model_kwargs" not in meta:
        raise ValueError("save_model: meta needs 'model' (registry name) and 'model_kwargs'")
    wpath, ypath = model_paths(path)
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    atomic_write_bytes(wpath, st_save(tensors, metadata={"format": FORMAT, "model": str(meta["model"])}))
    atomic_write_text(ypath, yaml.safe_dump({"format": FORMAT, **plain_data(meta)}, sort_keys=False))
    return wpath


def load_model(path: str | os.PathLike) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rebuild a model saved by `save_model` -> (model in eval mode, metadata).

    Raises FileNotFoundError / ValueError naming the file when either half is missing or corrupt."""
    from thrifty.models import create

    wpath, ypath = model_paths(path)
    for p in (wpath, ypath):
        if not p.is_file():
            raise FileNotFoundError(f"saved model file not found: {p} (a saved model is a .safetensors + .yaml pair)")
    try:
        meta = yaml.safe_load(ypath.read_text())
    except yaml.YAMLError as e:
        raise ValueError(f"corrupt model metadata {ypath}: {e}") from None
    if not isinstance(meta, dict) or "model" not in meta:
        raise ValueError(f"{ypath} is not thrifty model metadata (needs a 'model' key)")
    try:
        sd = st_load(wpath.read_bytes())
    except (SafetensorError, ValueError, OSError) as e:
        raise ValueError(f"corrupt or unreadable weights {wpath}: {e}") from None
    model = create(meta["model"], **(meta.get("model_kwargs") or {}))
    try:
        model.load_state_dict(sd)
    except RuntimeError as e:
        raise ValueError(f"weights {wpath} do not fit model {meta['model']!r}: {e}") from None
    return model.eval(), meta


def model_kwargs_for(model_name: str, input_shape: tuple, num_classes: int, **extra: Any) -> dict[str, Any]:
    """Keyword arguments that size a registry model for a dataset (num_classes, in_chans/in_features/img_size).

    Example:
        >>> model_kwargs_for("resnet20", (1, 32, 32), 10)
        {'num_classes': 10, 'in_chans': 1}
    """
    from thrifty.models import registry

    fn = registry._REGISTRY.get(model_name)
    if fn is None:
        raise ValueError(f"unknown model {model_name!r}; available: {', '.join(registry.list_models())}")
    params = inspect.signature(fn).parameters
    kw: dict[str, Any] = {}
    if "num_classes" in params:
        kw["num_classes"] = int(num_classes)
    shape = tuple(int(s) for s in input_shape)
    if "in_chans" in params and len(shape) >= 2:
        kw["in_chans"] = shape[0]
    if "in_features" in params and shape:
        kw["in_features"] = math.prod(shape)
    if "img_size" in params and len(shape) == 3:
        kw["img_size"] = shape[-1]
    kw.update(extra)
    return kw
