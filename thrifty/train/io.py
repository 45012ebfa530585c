"""``save_model`` / ``load_model``: the registry-model face of the one saved-model format (:mod:`thrifty.core.saved`).

A saved model is a file pair ``<stem>.safetensors`` (the state_dict) + ``<stem>.yaml`` (metadata: registry
model name, its keyword arguments, dataset, metrics, anything JSON/YAML-able, and the structure of any
wrapped layers). ``load_model`` rebuilds the model and loads the weights.

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

from thrifty.core.saved import FORMAT, load_with_meta, model_paths, save

__all__ = ["save_model", "load_model", "model_paths", "model_kwargs_for", "FORMAT"]


def save_model(model: torch.nn.Module, path: str | os.PathLike, meta: dict[str, Any],
               provenance: dict[str, Any] | None = None) -> Path:
    """Atomically write ``<stem>.safetensors`` + ``<stem>.yaml`` (+ the plain export); ``meta`` needs "model"
    and "model_kwargs". The model may be wrapped (see :func:`thrifty.save`). Returns the weights path."""
    if "model" not in meta or "model_kwargs" not in meta:
        raise ValueError("save_model: meta needs 'model' (registry name) and 'model_kwargs'")
    return save(model, path, meta=meta, provenance=provenance)


def load_model(path: str | os.PathLike) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rebuild a model saved by `save_model` / :func:`thrifty.save` (stem, file or run folder) -> (model in eval
    mode, metadata). Raises FileNotFoundError / ValueError naming the file when either half is missing or
    corrupt."""
    return load_with_meta(path)


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
