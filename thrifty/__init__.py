"""thrifty: efficient deep learning on any nn.Module.

The front door. Submodules load lazily, so ``import thrifty`` stays cheap.

Example:
    >>> import thrifty as th
    >>> model = th.models.create("mlp", in_features=64, num_classes=10)
    >>> _ = th.apply(model, th.NM(2, 4))                # 2:4 weights in every Linear, in place
    >>> type(model.fc1).__name__, type(th.strip(model).fc1).__name__
    ('GemmLinear', 'Linear')
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_SUBMODULES = {
    "core", "nn", "ops", "data", "models", "train", "quant", "sparse", "datafree", "merge", "bench", "utils",
}
# public name -> (module, attribute)
_EXPORTS = {
    "apply": ("thrifty.core", "apply"),
    "strip": ("thrifty.core", "strip"),
    "Config": ("thrifty.core", "Config"),
    "OptimConfig": ("thrifty.core", "OptimConfig"),
    "to_yaml": ("thrifty.core", "to_yaml"),
    "from_yaml": ("thrifty.core", "from_yaml"),
    "wrap": ("thrifty.nn", "wrap"),
    "save": ("thrifty.core.saved", "save"),
    "load": ("thrifty.core.saved", "load"),
    "quantize": ("thrifty.quant", "quantize"),
    "PTQ": ("thrifty.quant", "PTQ"),
    "sparsify": ("thrifty.sparse", "sparsify"),
    "NM": ("thrifty.sparse", "NM"),
    "fit": ("thrifty.train", "fit"),
    "evaluate": ("thrifty.train", "evaluate"),
    "synthesize": ("thrifty.datafree", "synthesize"),
    "Train8": ("thrifty.quant", "Train8"),
    "AccumConfig": ("thrifty.quant", "AccumConfig"),
    "QuantConfig": ("thrifty.quant", "QuantConfig"),
    "ActNM": ("thrifty.sparse", "ActNM"),
    "GradNM": ("thrifty.sparse", "GradNM"),
}

__all__ = sorted(_SUBMODULES | set(_EXPORTS))


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"thrifty.{name}")
    if name in _EXPORTS:
        mod, attr = _EXPORTS[name]
        return getattr(importlib.import_module(mod), attr)
    raise AttributeError(f"module 'thrifty' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
