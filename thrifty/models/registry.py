"""Model registry (timm-like) and size helpers."""
from __future__ import annotations

import inspect
from typing import Callable, TypeVar

import torch.nn as nn

__all__ = ["register_model", "create", "list_models", "count_params", "model_size_bytes"]

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}
F = TypeVar("F", bound=Callable[..., nn.Module])


def register_model(name: str) -> Callable[[F], F]:
    """Decorator registering a factory ``fn(**kw) -> nn.Module`` under ``name``.

    Example (registration is global: ``patch.dict`` removes "tiny" again afterwards):
        >>> from unittest import mock
        >>> with mock.patch.dict(_REGISTRY):
        ...     @register_model("tiny")
        ...     def tiny(num_classes: int = 2) -> nn.Module:
        ...         return nn.Linear(4, num_classes)
        ...     create("tiny", num_classes=3).out_features
        3
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"model name must be a non-empty str, got {name!r}")

    def deco(fn: F) -> F:
        if name in _REGISTRY and _REGISTRY[name] is not fn:
            raise ValueError(f"model {name!r} is already registered (by {_REGISTRY[name].__module__})")
        _REGISTRY[name] = fn
        return fn

    return deco


def list_models() -> list[str]:
    """Sorted names of the registered models."""
    return sorted(_REGISTRY)


def create(name: str, **kwargs) -> nn.Module:
    """Build a registered model: ``create("resnet20", num_classes=10, in_chans=1)``.

    Unknown names raise ValueError listing the available ones; unknown keyword arguments raise
    TypeError naming the model and its accepted arguments.

    Example:
        >>> m = create("mlp", in_features=64, num_classes=10)
        >>> sorted(n for n, _ in m.named_children())
        ['fc1', 'fc2', 'head']
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(list_models())}")
    fn = _REGISTRY[name]
    sig = inspect.signature(fn)
    try:
        sig.bind(**kwargs)
    except TypeError as e:
        raise TypeError(f"create({name!r}): {e}; accepted arguments: {', '.join(sig.parameters)}") from None
    model = fn(**kwargs)
    # how to build it again: thrifty.save records it, so thrifty.load needs no architecture
    model.__dict__["_thrifty_model"] = {"model": name, "model_kwargs": dict(kwargs)}
    return model


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of (unique) parameters; shared parameters are counted once."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def model_size_bytes(model: nn.Module) -> int:
    """Bytes held by the model's unique parameters and buffers at their current dtypes."""
    tensors = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())
