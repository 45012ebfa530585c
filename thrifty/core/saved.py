"""The one saved-model format: ``<stem>.safetensors`` (every tensor) + ``<stem>.yaml`` (the recipe and metadata).

What ``thrifty train``, ``quantize``, ``sparsify``, ``merge`` and ``demo`` write, and what every command
and :func:`load` read. The YAML holds the registry model name and keyword arguments (or nothing, and then
the architecture is passed in: ``load(path, model=arch)``), the structure that rebuilds a wrapped model
exactly (folded BatchNorms, Range BN swaps, every wrapped layer and the modules in its slots, each by its
class and ``spec()``), provenance (command, thrifty version, parent model file) and free metadata
(dataset, accuracies). Quantizer ranges, N:M masks and the like are tensors: they come from the weights.
:func:`save` also writes ``<stem>.plain.safetensors`` beside it, the stripped plain ``state_dict`` that
loads into the original architecture with ``load_state_dict(strict=True)`` for tools that know nothing of
thrifty. Every file is written atomically. A path can be a stem, either file, or a run folder.

A slot module is saved when its class has ``spec() -> dict`` and ``from_spec(spec, layer)``; every slot
module thrifty makes has them.

Example:
    >>> import tempfile, os, torch, thrifty as th
    >>> m = th.models.create("mlp", in_features=16, num_classes=4)
    >>> _ = th.apply(m, th.NM(2, 4))
    >>> path = save(m, os.path.join(tempfile.mkdtemp(), "model"))
    >>> m2 = load(path)
    >>> x = torch.randn(3, 16); bool(torch.equal(m2(x), m.eval()(x)))
    True
    >>> type(m2.fc1).__name__, sorted(p.name for p in path.parent.iterdir())
    ('GemmLinear', ['model.plain.safetensors', 'model.safetensors', 'model.yaml'])
"""
from __future__ import annotations

import copy
import importlib
import os
from pathlib import Path
from typing import Any, Optional, Union

import torch
import torch.nn as nn
import yaml
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from thrifty.core.apply import strip, wrap_layers
from thrifty.nn.gemm import Chain, is_gemm
from thrifty.nn.gemm_op import SLOT_NAMES
from thrifty.utils import atomic_write_bytes, atomic_write_text, plain_data

__all__ = ["save", "load", "load_with_meta", "model_paths", "resolve_model_path", "plain_state_dict", "FORMAT",
           "READABLE_FORMATS", "MODEL_FILE"]

FORMAT = "thrifty-model-2"
READABLE_FORMATS = ("thrifty-model-1", "thrifty-model-2", "thrifty-quantized-1")  # older files still load
MODEL_FILE = "model"  # the stem every command writes in its run folder
PathLike = Union[str, os.PathLike]


def model_paths(path: PathLike) -> tuple[Path, Path]:
    """(weights, metadata) paths for a stem, a ``.safetensors`` path or a ``.yaml`` path."""
    p = Path(path)
    stem = p.with_suffix("") if p.suffix in (".safetensors", ".yaml", ".yml") else p
    return stem.with_name(stem.name + ".safetensors"), stem.with_name(stem.name + ".yaml")


def _is_saved_model(ypath: Path) -> bool:
    try:
        doc = yaml.safe_load(ypath.read_text())
    except (yaml.YAMLError, OSError, UnicodeDecodeError):
        return False
    return isinstance(doc, dict) and doc.get("format") in READABLE_FORMATS


def resolve_model_path(path: PathLike) -> Path:
    """The stem of the saved model ``path`` names: a stem, its ``.safetensors``/``.yaml`` file, or a run folder.

    A folder gives its ``model`` stem, else its only saved model; several (or none) is a FileNotFoundError
    listing what the folder holds. Example:
        >>> resolve_model_path("runs/q/model.safetensors").as_posix()
        'runs/q/model'
    """
    p = Path(path)
    if p.is_dir():
        if all(f.is_file() for f in model_paths(p / MODEL_FILE)):
            return p / MODEL_FILE
        found = sorted(y.with_suffix("") for y in p.glob("*.yaml")
                       if y.with_suffix(".safetensors").is_file() and _is_saved_model(y))
        if len(found) == 1:
            return found[0]
        if found:
            raise FileNotFoundError(f"folder {p} holds several saved models: "
                                    f"{', '.join(f.name + '.safetensors' for f in found)}; name one of them")
        raise FileNotFoundError(f"folder {p} holds no saved model (a {MODEL_FILE}.safetensors + {MODEL_FILE}.yaml "
                                "pair)")
    return model_paths(p)[0].with_suffix("")


# ------------------------------------------------------------------------------------------------ saving
def _slot_entry(mod: nn.Module, layer: str, slot: str) -> dict[str, Any]:
    cls = type(mod)
    if not callable(getattr(mod, "spec", None)) or not callable(getattr(cls, "from_spec", None)):
        raise TypeError(f"cannot save layer {layer!r}: its {slot} slot holds {cls.__name__}, which has no "
                        "spec()/from_spec() to rebuild it from")
    return {"class": f"{cls.__module__}:{cls.__qualname__}", "spec": plain_data(mod.spec())}


def _layer_records(model: nn.Module) -> dict[str, dict[str, list]]:
    records: dict[str, dict[str, list]] = {}
    seen: set[int] = set()
    for name, m in model.named_modules():
        if not is_gemm(m) or id(m) in seen:
            continue
        seen.add(id(m))
        rec = {}
        for slot in SLOT_NAMES:
            obj = getattr(m.slots, slot)
            if obj is not None:
                members = list(obj) if isinstance(obj, Chain) else [obj]
                rec[slot] = [_slot_entry(x, name, slot) for x in members]
        records[name] = rec
    return records


def _range_bns(model: nn.Module) -> dict[str, dict[str, Any]]:
    from thrifty.nn.rangebn import _RangeBatchNorm

    return {n: {"num_chunks": m.num_chunks, "correction": m.correction, "bits": m.bits}
            for n, m in model.named_modules() if isinstance(m, _RangeBatchNorm)}


def _recipe(model: nn.Module, meta: dict[str, Any]) -> dict[str, Any]:
    built = model.__dict__.get("_thrifty_model") or {}  # set by thrifty.models.create
    name = meta.get("model", built.get("model"))
    kwargs = meta.get("model_kwargs", built.get("model_kwargs") if name == built.get("model") else None)
    return {"model": name, "model_kwargs": plain_data(kwargs or {})} if name else {}


def save(obj: Any, path: PathLike, *, meta: Optional[dict[str, Any]] = None,
         provenance: Optional[dict[str, Any]] = None, plain: bool = True) -> Path:
    """Write ``obj`` (a model, wrapped or not, or a :class:`thrifty.quant.QuantResult`) to ``path``.

    Writes ``<stem>.safetensors`` + ``<stem>.yaml`` (+ ``<stem>.plain.safetensors`` unless ``plain=False``).
    ``meta``: free metadata; its ``"model"`` / ``"model_kwargs"`` name the registry architecture (a model
    from ``thrifty.models.create`` knows its own). ``provenance``: e.g. ``{"command": "quantize", "parent":
    "runs/r20/model.safetensors"}``; the thrifty version is added. Nothing is written if the model cannot
    be rebuilt from what would be saved. Returns the weights path.
    """
    from thrifty import __version__

    meta = dict(meta or {})
    model, folded = obj, [list(p) for p in meta.pop("folded", [])]
    if not isinstance(obj, nn.Module) and hasattr(obj, "model") and hasattr(obj, "folded"):  # a QuantResult
        from thrifty.core.config import to_dict

        model, folded = obj.model, [list(p) for p in obj.folded]
        earlier = meta.get("quantization") if isinstance(meta.get("quantization"), dict) else {}
        meta["quantization"] = {**earlier, "config": to_dict(obj.config),
                                "bits": {k: list(v) for k, v in obj.bits.items()},
                                "size_fraction": obj.size_fraction, "losses": obj.losses}
    if not isinstance(model, nn.Module):
        raise TypeError(f"save expects an nn.Module or a QuantResult, got {type(obj).__name__}")
    folded = folded or [list(p) for p in model.__dict__.get("_thrifty_folded", [])]
    for k in ("format", "path", "structure", "provenance", "thrifty_version"):
        meta.pop(k, None)  # stale keys of a parent model's metadata
    recipe = _recipe(model, meta)
    structure = {"folded": folded, "range_bn": _range_bns(model), "layers": _layer_records(model)}
    prov = {"thrifty_version": __version__, **plain_data(provenance or {})}
    doc = {"format": FORMAT, **plain_data({**meta, **recipe}), "provenance": prov, "structure": structure}
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    wpath, ypath = model_paths(path)
    if recipe:  # refuse to write what would not load back
        try:
            _fill(_build(recipe, None, ypath), structure, tensors, ypath, wpath, recipe["model"])
        except ValueError as e:
            raise ValueError(f"save {wpath}: nothing written, the model would not load back from registry model "
                             f"{recipe['model']!r} with {recipe['model_kwargs']}: {e}") from None
    plain_sd = plain_state_dict(model, recipe, folded) if plain else None
    atomic_write_bytes(wpath, st_save(tensors, metadata={"format": FORMAT}))
    if plain_sd is not None:
        atomic_write_bytes(wpath.with_name(wpath.stem + ".plain.safetensors"),
                           st_save(plain_sd, metadata={"format": "plain-state-dict"}))
    atomic_write_text(ypath, yaml.safe_dump(doc, sort_keys=False))
    return wpath


def plain_state_dict(model: nn.Module, recipe: Optional[dict[str, Any]] = None,
                     folded: Optional[list] = None) -> dict[str, torch.Tensor]:
    """The stripped model's tensors (weight transforms baked in, Range BN as BatchNorm).

    With the registry ``recipe`` the keys are those of the original architecture: a folded BatchNorm comes
    back as an identity BatchNorm that carries the bias folding gave a bias-free layer."""
    from thrifty.quant.train8 import convert_to_batchnorm

    plain = convert_to_batchnorm(strip(copy.deepcopy(model)))
    if recipe and folded:
        from thrifty.models import create

        arch = create(recipe["model"], **recipe["model_kwargs"])
        with torch.no_grad():
            for layer_name, bn_name in folded:
                layer, bn = plain.get_submodule(layer_name), copy.deepcopy(arch.get_submodule(bn_name))
                bn.running_mean.zero_()
                bn.running_var.fill_(1.0 - bn.eps)  # (x - 0) / sqrt(1 - eps + eps) = x
                if bn.affine:
                    bn.weight.fill_(1.0)
                    bn.bias.zero_()
                if arch.get_submodule(layer_name).bias is None and layer.bias is not None:
                    if bn.affine:
                        bn.bias.copy_(layer.bias)
                    else:
                        bn.running_mean.copy_(-layer.bias)
                    layer.bias = None
                parent, _, child = bn_name.rpartition(".")
                setattr(plain.get_submodule(parent) if parent else plain, child, bn.to(layer.weight.device))
    return {k: v.detach().cpu().contiguous().clone() for k, v in plain.state_dict().items()}


# ------------------------------------------------------------------------------------------------ loading
def _slot_class(qual: Any, ypath: Path) -> type:
    mod_name, _, attr = str(qual).partition(":")
    if not (mod_name == "thrifty" or mod_name.startswith("thrifty.")) or not attr:
        raise ValueError(f"{ypath}: slot class {qual!r} is not a thrifty class (module:Class)")
    try:
        obj: Any = importlib.import_module(mod_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError):
        raise ValueError(f"{ypath}: unknown slot class {qual!r}") from None
    if not (isinstance(obj, type) and issubclass(obj, nn.Module) and callable(getattr(obj, "from_spec", None))):
        raise ValueError(f"{ypath}: {qual!r} is not a slot module class with from_spec()")
    return obj


def _build(recipe: dict[str, Any], arch: Optional[nn.Module], ypath: Path) -> nn.Module:
    if arch is not None:
        return copy.deepcopy(arch)
    if not recipe.get("model"):
        raise ValueError(f"{ypath} names no registry model; pass the architecture: thrifty.load(path, model=arch) "
                         "(pass the FP model)")
    from thrifty.models import create

    try:
        return create(recipe["model"], **(recipe.get("model_kwargs") or {}))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{ypath}: cannot build model {recipe['model']!r}: {e}") from None


def _fill(model: nn.Module, structure: dict[str, Any], sd: dict[str, torch.Tensor], ypath: Path,
          wpath: Path, name: str) -> nn.Module:
    """Rebuild the saved structure on the plain architecture ``model`` (in place), then load ``sd``."""
    from thrifty.nn.rangebn import convert_to_range_bn
    from thrifty.quant.fold import fold_pairs

    try:
        fold_pairs(model, [tuple(p) for p in structure.get("folded") or []])
        for name, spec in (structure.get("range_bn") or {}).items():
            parent, _, child = name.rpartition(".")
            holder = model.get_submodule(parent) if parent else model
            setattr(holder, child, convert_to_range_bn(holder.get_submodule(child), **spec))
        layers = structure.get("layers") or {}
        wrap_layers(model, list(layers))
        for lname, rec in layers.items():
            layer = model.get_submodule(lname)
            for slot, entries in rec.items():
                mods = [_slot_class(e["class"], ypath).from_spec(e.get("spec") or {}, layer) for e in entries]
                setattr(layer.slots, slot, mods[0] if len(mods) == 1 else Chain(*mods))
    except (TypeError, ValueError, AttributeError, KeyError) as e:
        raise ValueError(f"{ypath}: cannot rebuild the saved structure: {e}") from None
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise ValueError(f"weights {wpath} do not fit model {name!r}: {e}") from None
    return model


def _legacy_structure(doc: dict[str, Any]) -> dict[str, Any]:
    q = doc.get("quantization") or {}
    cls = "thrifty.quant.quantizer:UniformQuantizer"
    layers = {n: {s: [{"class": cls, "spec": spec}] for s, spec in (e or {}).items()}
              for n, e in (q.get("layers") or {}).items()}
    return {"folded": q.get("folded") or [], "range_bn": {}, "layers": layers}


def load_with_meta(path: PathLike, model: Optional[nn.Module] = None) -> tuple[nn.Module, dict[str, Any]]:
    """:func:`load`, also returning the metadata (the YAML, with ``quantization.config`` as a config object)."""
    stem = resolve_model_path(path)
    wpath, ypath = model_paths(stem)
    for p in (wpath, ypath):
        if not p.is_file():
            raise FileNotFoundError(f"saved model file not found: {p} (a saved model is a .safetensors + .yaml pair)")
    try:
        doc = yaml.safe_load(ypath.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ValueError(f"corrupt model metadata {ypath}: {e}") from None
    if not isinstance(doc, dict) or (doc.get("format") not in READABLE_FORMATS and "model" not in doc):
        raise ValueError(f"{ypath} is not thrifty model metadata (needs a 'format' or 'model' key)")
    try:
        sd = st_load(wpath.read_bytes())
    except (SafetensorError, ValueError, OSError) as e:
        raise ValueError(f"corrupt or unreadable weights {wpath}: {e}") from None
    legacy = doc.get("format") == "thrifty-quantized-1"  # its structure lives under "quantization"
    structure = _legacy_structure(doc) if legacy else (doc.get("structure") or {})
    built = _fill(_build(doc, model, ypath), structure, sd, ypath, wpath,
                  "the given architecture" if model is not None else doc["model"])
    q = doc.get("quantization")
    if isinstance(q, dict) and isinstance(q.get("config"), dict):
        from thrifty.core.config import from_dict

        q["config"] = from_dict(q["config"])
    return built.eval(), doc


def load(path: PathLike, model: Optional[nn.Module] = None) -> nn.Module:
    """Rebuild the model saved at ``path`` (stem, file or run folder), wrapped layers and all, in eval mode.

    ``model``: the plain architecture (left unmodified), needed when the file names no registry model.
    Raises FileNotFoundError / ValueError naming the file when it is missing, truncated or of another kind.
    """
    return load_with_meta(path, model)[0]
