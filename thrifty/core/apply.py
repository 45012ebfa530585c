"""Swap layers in place and fill their slots; fold back to plain layers.

A *handler* is registered per config type: ``handler(layer, name, cfg)`` puts
transforms into the Gemm layer's slots. ``apply`` walks any nn.Module, wraps
the Linear / Conv2d layers that pass the filter and calls the handler on each.

Example:
    >>> import torch.nn as nn
    >>> model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    >>> wrapped = wrap_layers(model, filter="0")
    >>> [n for n, _ in wrapped]
    ['0']
"""
from __future__ import annotations

import fnmatch
from typing import Callable, Iterable, Sequence, Union

import torch
import torch.nn as nn

from thrifty.core.config import Config
from thrifty.nn.gemm import SLOT_NAMES, Chain, GemmConv2d, GemmLinear, Slots, is_gemm, wrap

__all__ = ["Filter", "register_handler", "handler_for", "apply", "strip", "wrap_layers", "make_filter", "iter_selected",
           "HANDLERS"]

Filter = Union[None, str, Sequence[str], Callable[[nn.Module, str], bool]]
Handler = Callable[[nn.Module, str, Config], None]
HANDLERS: dict[type, Handler] = {}


def register_handler(cfg_type: type[Config]) -> Callable[[Handler], Handler]:
    """Decorator: ``handler(layer, name, cfg)`` fills the slots of one Gemm layer for ``cfg_type``."""

    def deco(fn: Handler) -> Handler:
        HANDLERS[cfg_type] = fn
        return fn

    return deco


def handler_for(cfg: Config) -> Handler:
    for t in type(cfg).__mro__:
        if t in HANDLERS:
            return HANDLERS[t]
    raise TypeError(f"no handler registered for config type {type(cfg).__name__}; known: "
                    f"{sorted(t.__name__ for t in HANDLERS)}")


def _gemmable(m: nn.Module) -> bool:
    return is_gemm(m) or type(m) in (nn.Linear, nn.Conv2d)


def make_filter(filter: Filter) -> Callable[[nn.Module, str], bool]:
    """Normalise a filter: None (all GEMMs), glob pattern(s) on qualified names, or a predicate."""
    if filter is None:
        return lambda m, n: True
    if callable(filter):
        return filter
    pats = [filter] if isinstance(filter, str) else list(filter)
    if not all(isinstance(p, str) for p in pats):
        raise TypeError(f"filter must be None, a glob pattern, a list of patterns or a callable; got {filter!r}")
    return lambda m, n: any(fnmatch.fnmatchcase(n, p) for p in pats)


def _set_child(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def wrap_layers(model: nn.Module, filter: Filter = None) -> list[tuple[str, nn.Module]]:
    """Replace selected nn.Linear / nn.Conv2d by Gemm layers (in place); return them.

    A filter given as explicit names that match a module thrifty cannot wrap
    raises TypeError naming it; a predicate or a wildcard simply skips it.
    """
    pred = make_filter(filter)
    explicit = isinstance(filter, str) and not any(c in filter for c in "*?[") or (
        isinstance(filter, (list, tuple)) and all(isinstance(p, str) and not any(c in p for c in "*?[") for p in filter)
    )
    chosen: list[tuple[str, nn.Module]] = []
    for name, m in list(model.named_modules()):
        if name == "":
            if type(m) in (nn.Linear, nn.Conv2d) and pred(m, name):
                # a bare layer passed as the model: change its class in place (the caller holds the reference)
                _check_root(m)
                m.__class__ = GemmLinear if type(m) is nn.Linear else GemmConv2d
                m.slots = Slots()
                chosen.append((name, m))
            elif is_gemm(m) and pred(m, name):
                chosen.append((name, m))
            continue
        if not pred(m, name):
            continue
        if not _gemmable(m):
            if explicit and len(list(m.children())) == 0:
                raise TypeError(
                    f"layer {name!r} is {type(m).__name__}; thrifty's GEMM slots support nn.Linear and nn.Conv2d"
                )
            continue
        new = wrap(m, name)
        if new is not m:
            _set_child(model, name, new)
        chosen.append((name, new))
    if explicit:
        names = {n for n, _ in chosen}
        pats = [filter] if isinstance(filter, str) else list(filter)  # type: ignore[arg-type]
        missing = [p for p in pats if p not in names and not any(n.startswith(p + ".") for n in names)]
        if missing:
            raise ValueError(f"filter names no GEMM layer for {missing}")
    return chosen


def apply(model: nn.Module, config: Config, filter: Filter = None) -> nn.Module:
    """Fill slots of every selected GEMM layer of ``model`` according to ``config`` (in place).

    If the handler fails on some layer the model is restored to its previous state.

    Example:
        >>> import torch.nn as nn, thrifty
        >>> model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
        >>> _ = thrifty.apply(model, thrifty.NM(2, 4), filter="2")     # only the layer named "2"
        >>> type(model[0]).__name__, type(model[2]).__name__
        ('Linear', 'GemmLinear')
    """
    handler = handler_for(config)
    if not isinstance(model, nn.Module):
        raise TypeError(f"apply expects an nn.Module, got {type(model).__name__}")
    snapshot = _snapshot(model)
    try:
        layers = wrap_layers(model, filter)
        if not layers:
            raise ValueError(f"{type(config).__name__}: no nn.Linear/nn.Conv2d layer in the model passes the filter")
        for name, layer in layers:
            handler(layer, name, config)
    except Exception:
        _restore(model, snapshot)
        raise
    return model


def _check_root(m: nn.Module) -> None:
    wrap(m)  # raises TypeError for what a Gemm layer cannot represent (e.g. reflect padding)


def _snapshot(model: nn.Module) -> tuple[list, list, type]:
    tree = [(parent, cname, child) for parent in model.modules() for cname, child in parent._modules.items()]
    slots = []
    for m in model.modules():
        if is_gemm(m):
            for s in SLOT_NAMES:
                obj = getattr(m.slots, s)
                slots.append((m, s, obj, list(obj) if isinstance(obj, Chain) else None))
    return tree, slots, type(model)


def _restore(model: nn.Module, snap: tuple[list, list, type]) -> None:
    tree, slots, cls = snap
    if type(model) is not cls:  # a bare root layer was wrapped in place: undo it
        model.__class__ = cls
        del model.slots
    for parent, cname, child in tree:
        parent._modules[cname] = child
    for layer, s, obj, members in slots:
        setattr(layer.slots, s, obj)
        if members is not None:
            obj._modules.clear()
            for i, mm in enumerate(members):
                obj.add_module(str(i), mm)


def strip(model: nn.Module) -> nn.Module:
    """Replace every Gemm layer by a plain nn.Linear / nn.Conv2d with the weight transform baked in.

    Input, gradient and accumulator transforms have no plain-layer equivalent and are dropped.
    """
    for name, m in list(model.named_modules()):
        if not is_gemm(m):
            continue
        w = m.effective_weight()
        if isinstance(m, GemmLinear):
            plain: nn.Module = nn.Linear(m.in_features, m.out_features, m.bias is not None)
        else:
            assert isinstance(m, GemmConv2d)
            plain = nn.Conv2d(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding,  # type: ignore[arg-type]
                              m.dilation, m.groups, m.bias is not None, m.padding_mode)
        plain = plain.to(device=w.device, dtype=m.weight.dtype)
        with torch.no_grad():
            plain.weight.copy_(w)
            if m.bias is not None:
                plain.bias.copy_(m.bias)
        plain.train(m.training)
        if name == "":
            return plain
        _set_child(model, name, plain)
    return model


def iter_selected(model: nn.Module, filter: Filter = None) -> Iterable[tuple[str, nn.Module]]:
    pred = make_filter(filter)
    for name, m in model.named_modules():
        if _gemmable(m) and pred(m, name):
            yield name, m
