"""Save and load quantized models: ``<stem>.safetensors`` (weights + quantizer parameters) + ``<stem>.yaml``.

The YAML holds the registry model name and kwargs (as :mod:`thrifty.train.io`), the PTQ config, the folded
BatchNorm pairs and every quantized layer's quantizer specs, so :func:`load_quantized` rebuilds the exact
module structure (fold, wrap, attach quantizers) before loading the tensors. Both files are written atomically.

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

import copy
import os
from pathlib import Path
from typing import Any, Optional, Union

import torch
import torch.nn as nn
import yaml
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from thrifty.core import from_dict, to_dict, wrap_layers
from thrifty.nn import is_gemm
from thrifty.quant.fold import fold_pairs
from thrifty.quant.pipeline import QuantResult
from thrifty.quant.quantizer import UniformQuantizer
from thrifty.train.io import model_paths
from thrifty.utils import plain_data
from thrifty.utils import atomic_write_bytes, atomic_write_text

__all__ = ["save_quantized", "load_quantized", "FORMAT"]

FORMAT = "thrifty-quantized-1"


def _layer_specs(model: nn.Module) -> dict[str, dict[str, Any]]:
    specs: dict[str, dict[str, Any]] = {}
    for name, m in model.named_modules():
        if not is_gemm(m):
            continue
        entry = {}
        for slot in ("weight", "input"):
            q = getattr(m.slots, slot)
            if q is None:
                continue
            if not isinstance(q, UniformQuantizer):
                raise TypeError(f"save_quantized: layer {name!r} slot {slot!r} holds {type(q).__name__}; only "
                                "UniformQuantizer slots can be saved")
            entry[slot] = q.spec()
        for slot in ("grad_output", "accumulator"):
            if getattr(m.slots, slot) is not None:
                raise TypeError(f"save_quantized: layer {name!r} has a {slot} transform, which cannot be saved")
        specs[name] = entry
    return specs


def save_quantized(result: Union[QuantResult, nn.Module], path: Union[str, os.PathLike],
                   meta: Optional[dict[str, Any]] = None) -> Path:
    """Write a quantized model (a :class:`QuantResult` or its model) as ``<stem>.safetensors`` + ``<stem>.yaml``.

    ``meta`` needs ``"model"`` (registry name) and ``"model_kwargs"`` for :func:`load_quantized` to rebuild the
    model on its own; without them, loading needs the FP model passed in. Returns the weights path.
    """
    model = result.model if isinstance(result, QuantResult) else result
    if not isinstance(model, nn.Module):
        raise TypeError(f"save_quantized expects a QuantResult or nn.Module, got {type(result).__name__}")
    meta = dict(meta or {})
    quant: dict[str, Any] = {"layers": _layer_specs(model)}
    if not quant["layers"]:
        raise ValueError("save_quantized: the model has no quantized (wrapped) layer")
    if isinstance(result, QuantResult):
        quant.update(config=to_dict(result.config), folded=[list(p) for p in result.folded],
                     bits={k: list(v) for k, v in result.bits.items()}, size_fraction=result.size_fraction,
                     losses=result.losses)
    else:
        quant["folded"] = list(meta.pop("folded", []))
    wpath, ypath = model_paths(path)
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    atomic_write_bytes(wpath, st_save(tensors, metadata={"format": FORMAT}))
    meta.pop("format", None)  # e.g. the FP model's own format tag
    doc = {"format": FORMAT, **plain_data(meta), "quantization": plain_data(quant)}
    atomic_write_text(ypath, yaml.safe_dump(doc, sort_keys=False))
    return wpath


def load_quantized(path: Union[str, os.PathLike], model: Optional[nn.Module] = None) -> tuple[nn.Module, dict]:
    """Rebuild a model saved by :func:`save_quantized` -> (model in eval mode, metadata).

    ``model`` (the FP architecture, left unmodified) is used instead of the registry when given.
    """
    wpath, ypath = model_paths(path)
    for p in (wpath, ypath):
        if not p.is_file():
            raise FileNotFoundError(f"quantized model file not found: {p} (a .safetensors + .yaml pair)")
    try:
        meta = yaml.safe_load(ypath.read_text())
    except yaml.YAMLError as e:
        raise ValueError(f"corrupt quantized-model metadata {ypath}: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or "quantization" not in meta:
        raise ValueError(f"{ypath} is not a thrifty quantized model (format {FORMAT!r})")
    try:
        sd = st_load(wpath.read_bytes())
    except (SafetensorError, ValueError, OSError) as e:
        raise ValueError(f"corrupt or unreadable weights {wpath}: {e}") from None
    if model is None:
        if "model" not in meta:
            raise ValueError(f"{ypath} names no registry model; pass the FP model: load_quantized(path, model)")
        from thrifty.models import create
        model = create(meta["model"], **(meta.get("model_kwargs") or {}))
    else:
        model = copy.deepcopy(model)
    q = meta["quantization"]
    fold_pairs(model, [tuple(p) for p in q.get("folded", [])])
    layers = q["layers"]
    present = dict(model.named_modules())
    try:  # exact names, so that an embedding saved quantized is wrapped again
        wrap_layers(model, [n for n in layers if n in present])
    except TypeError as e:
        raise ValueError(f"{ypath}: {e}") from None
    for name, entry in layers.items():
        try:
            layer = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"{ypath}: layer {name!r} does not exist in the model") from None
        if not is_gemm(layer):
            raise ValueError(f"{ypath}: layer {name!r} is {type(layer).__name__}, not a GEMM layer")
        for slot, spec in entry.items():
            setattr(layer.slots, slot, UniformQuantizer.from_spec(spec))
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise ValueError(f"weights {wpath} do not fit the rebuilt quantized model: {e}") from None
    for p in model.parameters():
        p.requires_grad_(False)
    if "config" in q:
        meta["quantization"]["config"] = from_dict(q["config"])
    return model.eval(), meta
