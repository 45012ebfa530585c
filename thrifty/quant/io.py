"""Save and load quantized models in the one saved-model format (:mod:`thrifty.core.saved`).

``<stem>.safetensors`` holds the weights and quantizer parameters; ``<stem>.yaml`` the registry model name
and kwargs, the PTQ config, the folded BatchNorm pairs and every quantized layer's quantizer specs, so
:func:`load_quantized` (like ``thrifty.load``) rebuilds the exact module structure before loading the tensors.

Example:
    >>> import tempfile, os, torch
    >>> from thrifty.models import create
    >>> from thrifty.quant import PTQ, quantize
    >>> m = create("mlp", in_features=64, num_classes=10)
    >>> res = quantize(m, PTQ(w_bits=4, pipeline="rtn"), torch.randn(32, 64), progress=False)
    >>> stem = os.path.join(tempfile.mkdtemp(), "q")
    >>> _ = save_quantized(res, stem, {"model": "mlp", "model_kwargs": {"in_features": 64, "num_classes": 10}})
    >>> m2, meta = load_quantized(stem)
    >>> x = torch.randn(3, 64); bool(torch.equal(m2(x), res.model(x)))
    True
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional, Union

import torch.nn as nn

from thrifty.core.saved import load_with_meta, save
from thrifty.nn import is_gemm
from thrifty.quant.pipeline import QuantResult

__all__ = ["save_quantized", "load_quantized"]


def save_quantized(result: Union[QuantResult, nn.Module], path: Union[str, os.PathLike],
                   meta: Optional[dict[str, Any]] = None, provenance: Optional[dict[str, Any]] = None) -> Path:
    """Write a quantized model (a :class:`QuantResult` or its model) as ``<stem>.safetensors`` + ``<stem>.yaml``.

    ``meta`` may name the registry model (``"model"``, ``"model_kwargs"``) so that :func:`load_quantized`
    rebuilds it on its own; without them, loading needs the FP model passed in. Returns the weights path.
    """
    model = result.model if isinstance(result, QuantResult) else result
    if not isinstance(model, nn.Module):
        raise TypeError(f"save_quantized expects a QuantResult or nn.Module, got {type(result).__name__}")
    if not any(is_gemm(m) for m in model.modules()):
        raise ValueError("save_quantized: the model has no quantized (wrapped) layer")
    return save(result, path, meta=meta, provenance=provenance)


def load_quantized(path: Union[str, os.PathLike], model: Optional[nn.Module] = None) -> tuple[nn.Module, dict]:
    """Rebuild a model saved by :func:`save_quantized` -> (model in eval mode, metadata).

    ``model`` (the FP architecture, left unmodified) is used instead of the registry when given.
    """
    return load_with_meta(path, model)
