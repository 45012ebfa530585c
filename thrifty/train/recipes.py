"""Train-once FP32 baselines with good default recipes, cached as saved models (safetensors + yaml).

Cache folder: ``$THRIFTY_CACHE`` or ``<repo>/.cache/thrifty``; entries are keyed by (model, model kwargs,
dataset, seed, TrainConfig) hash, so changing a recipe trains a new entry instead of returning stale weights.
A file lock makes concurrent callers (parallel experiments) wait for one training run instead of each
training its own copy. The data split is always ``load_dataset(dataset, seed=0)``: every experiment sees the
same test set; ``seed`` only changes initialisation and data order.

Example (a short recipe in a scratch cache; ``pretrained("resnet20", "digits32")`` is the usual call):
    >>> import os, tempfile
    >>> from unittest import mock
    >>> with mock.patch.dict(os.environ, THRIFTY_CACHE=tempfile.mkdtemp()):
    ...     model, meta = pretrained("mlp", "digits", steps=20, return_meta=True, progress=False)  # trains
    ...     again = pretrained("mlp", "digits", steps=20, progress=False)                         # cached
    >>> meta["test_acc"] > 0.5, all((a == b).all() for a, b in zip(model.parameters(), again.parameters()))
    (True, True)
"""
from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

from thrifty.core import OptimConfig, flat_fields, to_dict, with_overrides
from thrifty.train.io import load_model, model_kwargs_for, model_paths, save_model
from thrifty.train.loop import TrainConfig, evaluate, fit
from thrifty.utils import seed_everything, show_progress

__all__ = ["RECIPES", "recipe", "flat_train_config", "with_train_overrides", "pretrained", "pretrained_cached", "cache_dir",
           "cached_model"]

# (model, dataset) -> (extra model kwargs, TrainConfig). Measured accuracies and times: README / results.
RECIPES: dict[tuple[str, str], tuple[dict[str, Any], TrainConfig]] = {
    ("resnet20", "digits32"): ({}, TrainConfig(epochs=8, optim=OptimConfig(steps=0, lr=0.1, batch_size=64,
                                                                            weight_decay=5e-4))),
    ("mlp", "digits"): ({}, TrainConfig(epochs=30, optim=OptimConfig(steps=0, lr=0.05, batch_size=64,
                                                                     weight_decay=5e-4))),
    ("mlp", "digits32"): ({}, TrainConfig(epochs=30, optim=OptimConfig(steps=0, lr=0.05, batch_size=64,
                                                                        weight_decay=5e-4))),
    ("mlp", "mnist1d"): ({"hidden": (256, 256)}, TrainConfig(
        epochs=60, optim=OptimConfig(steps=0, lr=2e-3, batch_size=128, weight_decay=0.05), optimizer="adamw")),
    ("vit", "digits32"): ({}, TrainConfig(epochs=40, optim=OptimConfig(steps=0, lr=2e-3, batch_size=64,
                                                                       weight_decay=0.05),
                                          optimizer="adamw", warmup=40)),
}
_DEFAULT = ({}, TrainConfig(epochs=20, optim=OptimConfig(steps=0, lr=1e-3, batch_size=64, weight_decay=0.01),
                            optimizer="adamw"))


def cache_dir() -> Path:
    """$THRIFTY_CACHE, else <repo>/.cache/thrifty."""
    env = os.environ.get("THRIFTY_CACHE")
    return Path(env) if env else Path(__file__).resolve().parents[2] / ".cache" / "thrifty"


def recipe(model_name: str, dataset_name: str, **overrides: Any) -> tuple[dict[str, Any], TrainConfig]:
    """(model kwargs extras, TrainConfig) for a pair; ``overrides`` naming TrainConfig fields (or the fields of
    its ``optim``: ``steps=20``, ``lr=0.05``) change the config, the others are model keyword arguments."""
    kw, cfg = RECIPES.get((model_name, dataset_name), _DEFAULT)
    cfg, rest = with_train_overrides(cfg, overrides)
    return {**kw, **rest}, cfg


def with_train_overrides(cfg: TrainConfig, overrides: dict[str, Any]) -> tuple[TrainConfig, dict[str, Any]]:
    """``cfg`` with the ``overrides`` that name its fields or its ``optim``'s fields (flat: ``lr=0.05``), and the
    overrides left over (model keyword arguments).

    Example:
        >>> cfg, rest = with_train_overrides(TrainConfig(), {"lr": 0.05, "epochs": 2, "width": 8})
        >>> cfg.optim.lr, cfg.epochs, rest
        (0.05, 2, {'width': 8})
    """
    names = {f.name for f in dataclasses.fields(TrainConfig)} | set(TrainConfig.moved_fields)
    cfg = with_overrides(cfg, **{k: v for k, v in overrides.items() if k in names})
    return cfg, {k: v for k, v in overrides.items() if k not in names}


def flat_train_config(cfg: TrainConfig) -> dict[str, Any]:
    """``cfg`` in the version-1 layout (``optim``'s fields at the top), as cache keys and results files hold it:
    the baselines cached, and the results written, before ``optim`` was nested stay valid and comparable.
    ``from_dict`` reads it back (through ``TrainConfig.upgrade``).

    Example:
        >>> d = flat_train_config(TrainConfig(optim={"lr": 0.05}))
        >>> d["version"], d["lr"], d["epochs"], "optim" in d
        (1, 0.05, 10, False)
    """
    return {"kind": "TrainConfig", **flat_fields(cfg), "version": 1}


def pretrained(model_name: str, dataset_name: str, seed: int = 0, *, return_meta: bool = False,
               progress: bool | None = None, **overrides: Any) -> Any:
    """A trained model (eval mode) for ``(model_name, dataset_name, seed)``, trained once and then cached.

    ``overrides``: TrainConfig fields (epochs=..., lr=...) or model kwargs (width=...). With
    ``return_meta=True`` returns ``(model, meta)``; meta holds test_acc, train_seconds, config, cache path.
    """
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int, got {seed!r}")
    name, key, kwargs, cfg, splits = _entry(model_name, dataset_name, seed, **overrides)
    model, meta = cached_model(name, key, lambda stem: _train_and_save(
        stem, model_name, kwargs, dataset_name, seed, cfg, splits, progress))
    return (model, meta) if return_meta else model


def _stem(name: str, key: dict[str, Any]) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=list).encode()).hexdigest()[:12]
    return cache_dir() / "pretrained" / f"{name}-{digest}"


def cached_model(name: str, key: dict[str, Any], train: Callable[[Path], None]) -> tuple[torch.nn.Module, dict]:
    """Load the cache entry ``<name>-<digest of key>`` (``$THRIFTY_CACHE/pretrained``), calling ``train(stem)``
    to create it first when it is missing; -> (model, meta with its "path").

    A file lock makes concurrent callers wait for one ``train`` instead of each training its own copy."""
    stem = _stem(name, key)
    stem.parent.mkdir(parents=True, exist_ok=True)
    with open(stem.with_name(stem.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one trainer per entry; others wait, then load
        try:
            if not all(p.is_file() for p in model_paths(stem)):
                train(stem)
            model, meta = load_model(stem)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    meta["path"] = str(model_paths(stem)[0])
    return model, meta


def _entry(model_name: str, dataset_name: str, seed: int, **overrides: Any) -> tuple[str, dict, dict, TrainConfig, Any]:
    from thrifty.data import load_dataset

    extra_kw, cfg = recipe(model_name, dataset_name, **overrides)
    cfg = dataclasses.replace(cfg, seed=seed)
    splits = load_dataset(dataset_name, seed=0)
    kwargs = model_kwargs_for(model_name, splits.input_shape, splits.num_classes, **extra_kw)
    key = {"model": model_name, "model_kwargs": kwargs, "dataset": dataset_name, "seed": seed,
           "train": flat_train_config(cfg), "format": 1}
    return f"{model_name}-{dataset_name}-seed{seed}", key, kwargs, cfg, splits


def pretrained_cached(model_name: str, dataset_name: str, seed: int = 0, **overrides: Any) -> bool:
    """Whether :func:`pretrained` would load a cached baseline (True) or train one first (False)."""
    name, key, *_ = _entry(model_name, dataset_name, seed, **overrides)
    return all(p.is_file() for p in model_paths(_stem(name, key)))


def _train_and_save(stem: Path, model_name: str, kwargs: dict, dataset_name: str, seed: int, cfg: TrainConfig,
                    splits: Any, progress: bool | None) -> None:
    from thrifty.models import create

    seed_everything(seed)
    model = create(model_name, **kwargs)
    t0 = time.perf_counter()
    show = show_progress(progress)
    if show:
        print(f"[thrifty] training {model_name} on {dataset_name} (seed {seed}) once; cached at {stem}",
              file=sys.stderr)
    fit(model, cfg, splits.train, progress=show)
    seconds = time.perf_counter() - t0
    ev = evaluate(model, splits.test)
    meta = {"model": model_name, "model_kwargs": kwargs, "dataset": dataset_name, "seed": seed,
            "train_config": to_dict(cfg), "test_acc": ev["acc"], "test_loss": ev["loss"],
            "train_seconds": round(seconds, 2), "torch": torch.__version__}
    save_model(model, stem, meta)
