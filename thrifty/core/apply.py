"""Swap layers in place and fill their slots; fold back to plain layers.

A *handler* is registered per config type: ``handler(layer, name, cfg)`` puts
transforms into the Gemm layer's slots. ``apply`` walks any nn.Module, wraps
the Linear / Conv2d layers that pass the filter and calls the handler on each.
A config may also register a *prepare* step, ``prepare(model, cfg) -> model``, that
swaps non-GEMM modules first (Train8: BatchNorm -> Range BN). A config that needs
more than a model (calibration data, several models, a training set) registers the
one pipeline that applies it, and ``apply`` names that pipeline in its TypeError.

Example:
    >>> import torch.nn as nn
    >>> model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    >>> wrapped = wrap_layers(model, filter="0")
    >>> [n for n, _ in wrapped]
    ['0']
"""
from __future__ import annotations

import fnmatch
import warnings
from typing import Any, Callable, Iterable, Optional, Sequence, Union

import torch
import torch.nn as nn

from thrifty.core.config import Config, import_config_modules
from thrifty.core.select import drop_module_path_hooks, keep_module_path, layer_status, outermost, uncalled_layers
from thrifty.nn.attention import GemmMultiheadAttention, convert_in_place
from thrifty.nn.gemm import SLOT_NAMES, Chain, SlotRefused, is_gemm, why_not_wrappable, wrap, wrap_in_place
from thrifty.nn.hf_attention import PREVIOUS, attach_matmuls, detach_matmuls, is_hf_attention
from thrifty.nn.matmul import GemmMatmul, is_matmul

__all__ = ["Filter", "register_handler", "handler_for", "apply", "strip", "wrap_layers", "make_filter", "iter_selected",
           "check_layers_run", "untied_views", "explicit_names", "HANDLERS", "register_prepare", "register_pipeline",
           "PIPELINES", "PREPARE"]

Filter = Union[None, str, Sequence[str], Callable[[nn.Module, str], bool]]
Handler = Callable[[nn.Module, str, Config], None]
Prepare = Callable[[nn.Module, Config], nn.Module]
HANDLERS: dict[type, Handler] = {}
PREPARE: dict[type, Prepare] = {}
# config type -> (what it needs beyond a model, the documented call that applies it)
PIPELINES: dict[type, tuple[str, str]] = {}


def register_handler(cfg_type: type[Config]) -> Callable[[Handler], Handler]:
    """Decorator: ``handler(layer, name, cfg)`` fills the slots of one Gemm layer for ``cfg_type``."""

    def deco(fn: Handler) -> Handler:
        HANDLERS[cfg_type] = fn
        return fn

    return deco


def register_prepare(cfg_type: type[Config]) -> Callable[[Prepare], Prepare]:
    """Decorator: ``prepare(model, cfg) -> model`` runs in :func:`apply` before any layer is wrapped.

    For whole-model changes a config implies beyond the GEMM slots (swapping BatchNorm for Range BN); the
    returned module replaces ``model`` (it differs only when the model itself is swapped).
    """

    def deco(fn: Prepare) -> Prepare:
        PREPARE[cfg_type] = fn
        return fn

    return deco


def register_pipeline(cfg_type: type[Config], needs: str, call: str) -> None:
    """Record that ``cfg_type`` is applied by a whole-model pipeline, not by :func:`apply`.

    ``needs`` says what apply lacks, ``call`` the documented entry point; both go into apply's TypeError
    (thrifty.quant registers PTQ this way):

    Example:
        >>> import torch.nn as nn, thrifty
        >>> try:
        ...     thrifty.apply(nn.Linear(4, 4), thrifty.PTQ())
        ... except TypeError as e:
        ...     print(str(e).split(":")[0])
        PTQ needs calibration data
    """
    PIPELINES[cfg_type] = (needs, call)


def _lookup(table: dict[type, Any], cfg: Config) -> Any:
    return next((table[t] for t in type(cfg).__mro__ if t in table), None)


def handler_for(cfg: Config) -> Handler:
    """The slot handler of ``cfg``'s type; TypeError naming the pipeline to call for whole-model configs."""
    if not isinstance(cfg, Config):
        raise TypeError(f"expected a thrifty Config, got {type(cfg).__name__}")
    fn = _lookup(HANDLERS, cfg)
    if fn is not None:
        return fn
    import_config_modules()  # so the "known" list and the pipeline names do not depend on earlier imports
    fn = _lookup(HANDLERS, cfg)
    if fn is not None:
        return fn
    pipe = _lookup(PIPELINES, cfg)
    name = type(cfg).__name__
    if pipe is not None:
        raise TypeError(f"{name} {pipe[0]}: use {pipe[1]} (thrifty.apply only fills the GEMM slots of one model)")
    pipes = sorted(f"{t.__name__} -> {c}" for t, (_, c) in PIPELINES.items())
    raise TypeError(f"no handler registered for config type {name}; apply knows "
                    f"{sorted(t.__name__ for t in HANDLERS)}; whole-model pipelines: {', '.join(pipes)}")


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


def explicit_names(filter: Filter) -> list[str]:
    """The names of a filter that names layers exactly (no wildcard); [] for other filters.

    Named layers that cannot take a method are an error; layers matched by a wildcard or predicate are
    skipped with a warning.
    """
    pats = [filter] if isinstance(filter, str) else filter if isinstance(filter, (list, tuple)) else None
    if pats and all(isinstance(p, str) and not any(c in p for c in "*?[") for p in pats):
        return list(pats)
    return []


MATMUL_NAMES = ("qk", "pv")


def names_matmul(filter: Filter) -> Callable[[str], bool]:
    """Whether ``filter`` asks for the attention matmul named ``name``: a pattern ending in ``qk``/``pv`` matches it.

    Matmuls have no weight, so the configs for weights (N:M masks, PTQ) do not apply: they are opt-in, by name
    (``"*.qk"``, ``["*.qk", "*.pv"]``, ``"encoder.layers.0.self_attn.pv"``), never by ``None`` or a callable.
    """
    pats = [filter] if isinstance(filter, str) else list(filter) if isinstance(filter, (list, tuple)) else []
    pats = [p for p in pats if isinstance(p, str) and p.endswith(MATMUL_NAMES)]
    return lambda n: any(fnmatch.fnmatchcase(n, p) for p in pats)


def _select(model: nn.Module, filter: Filter) -> tuple[list[tuple[list[str], nn.Module]], dict[str, str]]:
    """Layers passing ``filter``: ([(all names, module)] for wrappable ones, {name: why} for the others).

    A module reachable under several names is one layer: selected when any of its names passes.
    """
    pred = make_filter(filter)
    asked = names_matmul(filter)
    names: dict[int, list[str]] = {}
    status: dict[int, tuple[nn.Module, Optional[str]]] = {}
    for name, m, why in layer_status(model, explicit_names(filter), matmuls=True):
        names.setdefault(id(m), []).append(name)
        status[id(m)] = (m, why)
    chosen, refused = [], {}
    for key, ns in names.items():
        m, why = status[key]
        hit = [n for n in ns if pred(m, n) and (asked(n) or not is_matmul(m))]
        if not hit:
            continue
        if why is None:
            chosen.append((ns, m))
        else:
            refused[hit[0]] = why
    return chosen, refused


def wrap_layers(model: nn.Module, filter: Filter = None) -> list[tuple[str, nn.Module]]:
    """Replace the selected wrappable layers (Linear, convs, GPT-2 Conv1D, ...) by Gemm layers (in place).

    A layer reachable under several names is wrapped once and the wrapped layer put at every name.
    GEMM-like layers that pass the filter but cannot be wrapped (nn.Conv3d, nn.MultiheadAttention,
    ...) get a warning naming each; a filter that names one exactly raises TypeError with the reason.
    """
    _convert_attention(model, filter)
    chosen, refused = _select(model, filter)
    explicit = explicit_names(filter)
    got = {n for ns, _ in chosen for n in ns}
    if explicit:
        named = {p: refused[p] for p in explicit if p in refused}
        leaves = [p for p in explicit if p not in refused and p not in got and _is_other_leaf(model, p)]
        if named or leaves:
            raise TypeError("; ".join([f"layer {n!r} cannot be wrapped: {w}" for n, w in named.items()] + [
                f"layer {n!r} cannot be wrapped: {why_not_wrappable(model.get_submodule(n))}" for n in leaves]))
    if refused:
        warnings.warn("thrifty: these GEMM layers cannot be wrapped and stay as they are: "
                      + "; ".join(f"{n!r} ({w})" for n, w in outermost(refused).items()), stacklevel=3)
    out: list[tuple[str, nn.Module]] = []
    for ns, m in chosen:
        if ns[0] == "":
            wrap_in_place(m)  # a bare layer passed as the model: change its class in place (the caller holds it)
            out.append(("", m))
            continue
        new = m if is_matmul(m) else wrap(m, ns[0])
        if new is not m:
            for n in ns:
                _set_child(model, n, new)
        out.append((ns[0], new))
    keep_module_path(model)
    if explicit:
        missing = [p for p in explicit if p not in got and not any(n.startswith(p + ".") for n in got)]
        if missing:
            raise ValueError(f"filter names no GEMM layer for {missing}")
    return out


def _convert_attention(model: nn.Module, filter: Filter) -> None:
    """Turn each nn.MultiheadAttention one of whose GEMMs passes ``filter`` into a GemmMultiheadAttention, and
    give each transformers attention module whose ``qk``/``pv`` the filter names its GemmMatmul modules."""
    pred, asked = make_filter(filter), names_matmul(filter)
    found: dict[int, tuple[nn.Module, list[str]]] = {}
    for name, m in list(model.named_modules(remove_duplicate=False)):
        if isinstance(m, nn.MultiheadAttention) and not isinstance(m, GemmMultiheadAttention):
            found.setdefault(id(m), (m, []))[1].append(name)
        elif is_hf_attention(m) and not is_matmul(getattr(m, "qk", None)) and any(
                asked(n) and pred(GemmMatmul(), n) for n in (f"{name}.qk", f"{name}.pv")):
            attach_matmuls(m)
    for m, ns in found.values():
        try:
            new = GemmMultiheadAttention.from_mha(m)
        except TypeError:
            continue  # layer_status reports why
        kids = [(f"{n}.{c}" if n else c, k) for n in ns for c, k in new.named_children()]
        if not any(pred(k, n) and (asked(n) or not is_matmul(k)) for n, k in kids):
            continue
        for n in ns:
            if n == "":
                convert_in_place(model)  # the caller holds it
            else:
                _set_child(model, n, new)


def _is_other_leaf(model: nn.Module, name: str) -> bool:
    try:
        m = model.get_submodule(name)
    except AttributeError:
        return False
    return len(m._modules) == 0 and not is_gemm(m)


def apply(model: nn.Module, config: Config, filter: Filter = None, *, probe: Any = None) -> nn.Module:
    """Fill slots of every selected GEMM layer of ``model`` according to ``config`` (in place); returns the model.

    A config's registered prepare step runs first (``Train8(range_bn=True)`` swaps every BatchNorm for Range
    BN). A config that needs more than the model (PTQ's calibration data, a merge's several models) raises
    TypeError naming its pipeline (``thrifty.quant.quantize(model, cfg, data)``, ...).

    If anything fails the model is restored to its previous state. ``probe`` (an example input, or a
    tuple of positional inputs) makes apply run the model once on it (eval mode, no gradients, before
    any slot is filled) and raise ValueError naming every wrapped layer whose weight the forward reads
    without calling the layer (e.g. ``F.linear(x, self.fc.weight)`` instead of ``self.fc(x)``).

    A weight Parameter tied to another module (an embedding tied to the LM head) stays one Parameter;
    apply warns that until :func:`strip` only the wrapped layer sees the transformed weight.

    Example:
        >>> import torch.nn as nn, thrifty
        >>> model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
        >>> _ = thrifty.apply(model, thrifty.NM(2, 4), filter="2")     # only the layer named "2"
        >>> type(model[0]).__name__, type(model[2]).__name__
        ('Linear', 'GemmLinear')
        >>> _ = thrifty.apply(model, thrifty.NM(2, 4), filter="0", probe=torch.randn(2, 8))  # checks no bypass
    """
    handler = handler_for(config)
    if not isinstance(model, nn.Module):
        raise TypeError(f"apply expects an nn.Module, got {type(model).__name__}")
    prepare = _lookup(PREPARE, config)
    root, snapshot = model, _snapshot(model)
    try:
        if prepare is not None:
            model = prepare(model, config)
        layers = wrap_layers(model, filter)
        if not layers:
            raise ValueError(f"{type(config).__name__}: no nn.Linear/nn.Conv2d layer in the model passes the filter")
        if probe is not None:
            check_layers_run(model, probe)
        for name, layer in layers:
            try:
                handler(layer, name, config)
            except SlotRefused as e:
                raise SlotRefused(f"{type(config).__name__} on layer {name!r}: {e}") from None
    except Exception:
        _restore(root, snapshot)
        raise
    ties = untied_views(model)
    if ties:
        warnings.warn(ties, stacklevel=2)
    return model


def check_layers_run(model: nn.Module, probe: Any) -> None:
    """Run ``model`` on ``probe`` and raise ValueError naming each wrapped layer its forward bypasses."""
    args = probe if isinstance(probe, tuple) else (probe,)
    skipped = uncalled_layers(model, lambda: model(*args))
    if skipped:
        raise ValueError(f"the model's forward reads the weights of the wrapped layers {skipped} without calling "
                         "them (a fused path?), so thrifty's transforms would have no effect there; leave them out "
                         "with filter=")


def _holders(model: nn.Module) -> dict[int, list[tuple[str, nn.Module, str]]]:
    """id(Parameter) -> [(module name, module, attribute)] for every module holding it."""
    out: dict[int, list[tuple[str, nn.Module, str]]] = {}
    for name, m in model.named_modules(remove_duplicate=False):
        for attr, p in m._parameters.items():
            if p is not None:
                out.setdefault(id(p), []).append((name, m, attr))
    return out


def untied_views(model: nn.Module) -> Optional[str]:
    """A warning naming each transformed weight another module reads untransformed, or None.

    Example: an embedding tied to an N:M-masked LM head reads the dense weight until :func:`strip`.
    """
    lines = []
    for key, hs in _holders(model).items():
        gemms = {id(m): (n, m) for n, m, a in hs if is_gemm(m) and a == "weight" and m.slots.weight is not None}
        if not gemms or len({id(m) for _, m, _ in hs}) < 2:
            continue
        n0, m0 = next(iter(gemms.values()))
        eff = m0.effective_weight()
        others = [f"{n}.{a}" if n else a for n, m, a in hs if id(m) != id(m0) and not (
            is_gemm(m) and a == "weight" and torch.equal(m.effective_weight(), eff))]
        if others:
            lines.append(f"layer {n0!r} shares its weight Parameter with {', '.join(map(repr, others))}, "
                         "which read it without the layer's weight transform")
    if not lines:
        return None
    return ("; ".join(lines) + ". strip() keeps each tie and writes the transformed weight into the shared Parameter "
            "(strip(model, tied='untie') gives the wrapped layer its own copy instead)")


def _snapshot(model: nn.Module) -> tuple[list, list, type, list, dict, list, list]:
    tree = [(parent, cname, child) for parent in model.modules() for cname, child in parent._modules.items()]
    # keep_module_path's hooks land in dicts a wrapped layer shares with the original: undo them too.
    paths = [(m, set(m._forward_pre_hooks), getattr(m, "use_nested_tensor", None)) for m in model.modules()]
    slots = []
    for m in model.modules():
        if is_gemm(m) or is_matmul(m):
            for s in SLOT_NAMES:
                obj = getattr(m.slots, s)
                slots.append((m, s, obj, list(obj) if isinstance(obj, Chain) else None))
    kids = [(m, set(m._modules)) for m in model.modules()]
    impls = [(m, m.config._attn_implementation, m.__dict__.get(PREVIOUS)) for m in model.modules()
             if is_hf_attention(m)]
    return tree, slots, type(model), paths, dict(model.__dict__), kids, impls


def _restore(model: nn.Module, snap: tuple[list, list, type, list, dict, list, list]) -> None:
    tree, slots, cls, paths, root, kids, impls = snap
    for m, keys in kids:  # modules apply added (a transformers attention's qk / pv)
        for k in [k for k in m._modules if k not in keys]:
            del m._modules[k]
    for m, impl, previous in impls:
        if m.config._attn_implementation != impl:
            m.config._attn_implementation = impl
        if previous is None:
            m.__dict__.pop(PREVIOUS, None)
    if type(model) is not cls and issubclass(cls, nn.MultiheadAttention):  # converted in place, on new dicts
        model.__class__ = cls
        model.__dict__.clear()
        model.__dict__.update(root)
    elif type(model) is not cls:  # a bare root layer was wrapped in place: undo it
        model.__class__ = cls
        model._modules.pop("slots", None)  # (the added-modules sweep above may have taken it already)
        model.__dict__.pop("_thrifty_cls", None)
    for parent, cname, child in tree:
        parent._modules[cname] = child
    for layer, s, obj, members in slots:
        setattr(layer.slots, s, obj)
        if members is not None:
            obj._modules.clear()
            for i, mm in enumerate(members):
                obj.add_module(str(i), mm)
    for m, hooks, nested in paths:
        for k in [k for k in m._forward_pre_hooks if k not in hooks]:
            del m._forward_pre_hooks[k]
        if nested is not None:
            m.use_nested_tensor = nested


def strip(model: nn.Module, tied: str = "keep") -> nn.Module:
    """Replace every Gemm layer by its plain layer (nn.Linear, nn.Conv1d, GPT-2's Conv1D, ...) with the weight
    transform baked in.

    Input, gradient and accumulator transforms have no plain-layer equivalent and are dropped. A layer
    reachable under several names is replaced at each name by one plain layer; hooks registered on a
    layer stay on its plain replacement.

    ``tied`` says what happens to a weight Parameter that other modules hold too (an embedding tied to
    the LM head): ``"keep"`` (default) writes the transformed weight into that Parameter in place, so
    every holder sees the pruned / quantized values and the tie survives (ValueError if two wrapped
    holders transform it differently); ``"untie"`` gives the plain layer its own Parameter and leaves the
    other holders as they were. A weight no other module holds always gets a new Parameter.

    Example:
        >>> import torch.nn as nn
        >>> from thrifty.nn import wrap
        >>> type(strip(wrap(nn.Linear(2, 2)))).__name__
        'Linear'
    """
    if tied not in ("keep", "untie"):
        raise ValueError(f"strip: tied must be 'keep' or 'untie', got {tied!r}")
    holders = _holders(model)
    names: dict[int, list[str]] = {}
    layers: dict[int, nn.Module] = {}
    for name, m in model.named_modules(remove_duplicate=False):
        if is_gemm(m):
            names.setdefault(id(m), []).append(name)
            layers[id(m)] = m
    baked = {k: m.effective_weight() for k, m in layers.items()}
    shared: dict[int, tuple[str, torch.Tensor]] = {}  # id(weight) -> (first layer, its baked weight)
    if tied == "keep":
        for k, m in layers.items():
            if len({id(h) for _, h, _ in holders[id(m.weight)]}) < 2:
                continue
            first = shared.setdefault(id(m.weight), (names[k][0], baked[k]))
            if not torch.equal(first[1], baked[k]):
                raise ValueError(f"strip: layers {first[0]!r} and {names[k][0]!r} share one weight Parameter but "
                                 "transform it differently; strip(model, tied='untie') gives each its own copy")
    for k, m in layers.items():
        w = baked[k]
        plain = m.plain_like().to(device=w.device, dtype=m.weight.dtype)
        with torch.no_grad():
            if id(m.weight) in shared:
                m.weight.copy_(w)
                plain.weight = m.weight
            else:
                plain.weight.copy_(w)
            if m.bias is not None:
                plain.bias = m.bias
        plain.train(m.training)
        _move_hooks(m, plain)
        for name in names[k]:
            if name == "":
                return plain
            _set_child(model, name, plain)
    detach_matmuls(model)
    return _strip_attention(model)


def _strip_attention(model: nn.Module) -> nn.Module:
    # after the projections: a GemmMultiheadAttention becomes nn.MultiheadAttention on the same Parameters
    done: dict[int, nn.Module] = {}
    for name, m in list(model.named_modules(remove_duplicate=False)):
        if isinstance(m, GemmMultiheadAttention):
            plain = done.setdefault(id(m), m.to_mha())
            if name == "":
                return plain
            _set_child(model, name, plain)
    return model


def _move_hooks(layer: nn.Module, plain: nn.Module) -> None:
    # The user's hooks (shared with the layer wrap() replaced) go on with the plain layer; the same dicts,
    # so their handles still remove them. thrifty's own no-op pre-hook goes.
    for k, v in vars(layer).items():
        if "hook" in k:
            plain.__dict__[k] = v
    drop_module_path_hooks(plain)


def iter_selected(model: nn.Module, filter: Filter = None) -> Iterable[tuple[str, nn.Module]]:
    """``(name, layer)`` for each wrappable layer passing ``filter``, once per layer (first name)."""
    for ns, m in _select(model, filter)[0]:
        yield ns[0], m
