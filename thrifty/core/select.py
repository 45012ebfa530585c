"""Which layers a method can reach, and a check that the wrapped ones really run.

Three things decide whether a wrapped layer changes what a model computes:

* the layer itself (:func:`thrifty.nn.why_not_wrappable`: nn.Linear, convs, GPT-2 Conv1D, ... that keep their GEMM);
* its parent: nn.MultiheadAttention computes its projections from the weights directly
  (``F.multi_head_attention_forward`` reads ``out_proj.weight``), so it is converted to a
  :class:`thrifty.nn.GemmMultiheadAttention` whose ``in_proj`` (or ``q_proj``/``k_proj``/``v_proj``) and
  ``out_proj`` are called as modules; its attention matmuls ``qk``/``pv`` are reported only when asked for;
* fused inference paths: nn.TransformerEncoderLayer in eval/no-grad calls one fused kernel with the
  Linear weights instead of calling the Linear modules. :func:`keep_module_path` turns that path off
  for encoder layers that hold wrapped layers (and the nested-tensor path of their nn.TransformerEncoder).

Anything else that reads a wrapped layer's weight instead of calling it is caught by
:func:`uncalled_layers` on a probe forward.

Example:
    >>> import torch.nn as nn
    >>> m = nn.Sequential(nn.Linear(4, 4), nn.Conv3d(4, 4, 1))
    >>> [(n, why is None) for n, _, why in layer_status(m)]
    [('0', True), ('1', False)]
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Collection, Iterator, Optional

import torch
import torch.nn as nn

from thrifty.nn.attention import GemmMultiheadAttention, why_not_convertible
from thrifty.nn.gemm import gemm_like, is_gemm, why_not_wrappable
from thrifty.nn.hf_attention import is_hf_attention
from thrifty.nn.matmul import GemmMatmul, is_matmul

__all__ = ["layer_status", "outermost", "keep_module_path", "drop_module_path_hooks", "uncalled_layers"]

_IN_UNCONVERTIBLE = ("its nn.MultiheadAttention parent computes this projection from the weight directly and "
                     "cannot be converted (see the parent's entry)")


def layer_status(model: nn.Module, named: Collection[str] = (),
                 matmuls: bool = False) -> Iterator[tuple[str, nn.Module, Optional[str]]]:
    """Yield ``(name, module, why_not)`` for every wrappable or GEMM-like module, under every name it has.

    ``why_not`` is None for a layer thrifty can wrap, else the reason it cannot (the layer itself, see
    :func:`thrifty.nn.why_not_wrappable`, or a parent that never calls it). A module reachable under
    two names is yielded twice (same object). An nn.Embedding (a lookup, weight slot only) is yielded
    only under the names in ``named`` (a filter that names it exactly). An nn.MultiheadAttention is
    reported as the GEMMs of the :class:`~thrifty.nn.GemmMultiheadAttention` it becomes when wrapped
    (``<name>.in_proj``, ``<name>.out_proj``, ...: fresh modules until :func:`thrifty.core.wrap_layers`
    converts it). Activation-activation matmuls (:class:`~thrifty.nn.GemmMatmul`) only with ``matmuls``: those of
    a GemmMultiheadAttention and of transformers attention modules (``<name>.qk``/``<name>.pv``, attached by
    :func:`thrifty.nn.hf_attention.attach_matmuls` when wrapped).
    """
    mha: list[str] = []
    for name, m in model.named_modules(remove_duplicate=False):
        if any(p == "" or name.startswith(p + ".") for p in mha):
            continue
        if isinstance(m, nn.MultiheadAttention) and not isinstance(m, GemmMultiheadAttention):
            mha.append(name)
            why = why_not_convertible(m)
            if why is not None:
                yield name, m, why
                for cname, c in m.named_modules(prefix=name):
                    if cname != name and (gemm_like(c) or is_gemm(c)):
                        yield cname, c, _IN_UNCONVERTIBLE
                continue
            for cname, c in GemmMultiheadAttention.from_mha(m).named_children():
                if is_gemm(c) or (matmuls and is_matmul(c)):
                    yield (f"{name}.{cname}" if name else cname), c, None
            continue
        if is_matmul(m):
            if matmuls:
                yield name, m, None
            continue
        if matmuls and is_hf_attention(m) and not is_matmul(getattr(m, "qk", None)):
            for cname in ("qk", "pv"):  # the modules thrifty.nn.hf_attention.attach_matmuls would add
                yield (f"{name}.{cname}" if name else cname), GemmMatmul(), None
        if isinstance(m, GemmMultiheadAttention):
            continue
        if isinstance(m, nn.Embedding) and name not in named:
            continue
        why = why_not_wrappable(m)
        if why is None or gemm_like(m) or isinstance(m, nn.Embedding):
            yield name, m, why


def outermost(reasons: dict[str, str]) -> dict[str, str]:
    """Drop the entries inside another entry (``a.out_proj`` when ``a`` is there): one line per layer."""
    def inside(n: str, p: str) -> bool:
        return n != p and (p == "" or n.startswith(p + "."))

    return {n: w for n, w in reasons.items() if not any(inside(n, p) for p in reasons)}


_UNSET = object()


def _module_path_only(module: nn.Module, args: Any) -> None:
    """A no-op forward pre-hook: torch's fused encoder path is not taken while a submodule has a hook."""
    return None


def keep_module_path(model: nn.Module) -> None:
    """Make torch's fused transformer paths call the wrapped layers (in place, idempotent).

    nn.TransformerEncoderLayer skips its fused kernel when any submodule has a forward hook, so each
    wrapped layer inside one gets a no-op pre-hook (``strip`` drops it with the wrapper); an
    nn.TransformerEncoder whose layers hold wrapped layers stops converting to nested tensors (for
    good: with a padding mask its output at padded positions is then computed, not zero, in eval as
    in training).
    """
    for m in model.modules():
        if isinstance(m, nn.TransformerEncoderLayer):
            for sub in m.modules():
                if is_gemm(sub) and _module_path_only not in sub._forward_pre_hooks.values():
                    sub.register_forward_pre_hook(_module_path_only)
        elif isinstance(m, nn.TransformerEncoder) and any(is_gemm(s) for s in m.layers.modules()):
            m.use_nested_tensor = False


def drop_module_path_hooks(m: nn.Module) -> None:
    """Remove :func:`keep_module_path`'s pre-hook from ``m`` (a layer that is no longer wrapped)."""
    for k in [k for k, f in m._forward_pre_hooks.items() if f is _module_path_only]:
        del m._forward_pre_hooks[k]


class _Watch:
    """Per wrapped layer during a probe: calls of its forward, reads of its weight outside that forward."""

    def __init__(self) -> None:
        self.calls = self.reads = self.depth = 0


def _watched(cls: type) -> type:
    # A temporary subclass whose __getattr__ (how nn.Module serves Parameters) records who reads the weight.
    if cls not in _WATCHED:
        def __getattr__(self: nn.Module, name: str) -> Any:
            if name == "weight":
                w = self.__dict__["_thrifty_watch"]
                w.reads += w.depth == 0
            return cls.__getattr__(self, name)

        _WATCHED[cls] = type(f"Watched{cls.__name__}", (cls,), {"__getattr__": __getattr__})
    return _WATCHED[cls]


_WATCHED: dict[type, type] = {}


@contextlib.contextmanager
def _watching(layers: list[nn.Module]) -> Iterator[dict[int, _Watch]]:
    # No hooks: a hook would itself switch off the fused paths this check is meant to catch.
    watches: dict[int, _Watch] = {}
    patched: list[tuple[nn.Module, type, Any]] = []
    try:
        for m in layers:
            if isinstance(m, torch.jit.ScriptModule) or id(m) in watches:
                continue
            w = watches[id(m)] = _Watch()
            fwd = m.forward

            def counted(*args: Any, _f: Callable = fwd, _w: _Watch = w, **kwargs: Any) -> Any:
                _w.calls += 1
                _w.depth += 1
                try:
                    return _f(*args, **kwargs)
                finally:
                    _w.depth -= 1

            patched.append((m, type(m), m.__dict__.get("forward", _UNSET)))
            m.__dict__["forward"], m.__dict__["_thrifty_watch"] = counted, w
            m.__class__ = _watched(type(m))
        yield watches
    finally:
        for m, cls, before in patched:
            m.__class__ = cls
            del m.__dict__["_thrifty_watch"]
            if before is _UNSET:
                del m.__dict__["forward"]
            else:
                m.__dict__["forward"] = before


def uncalled_layers(model: nn.Module, run: Callable[[], Any]) -> list[str]:
    """Wrapped layers whose weight ``run()`` (one forward of ``model``) reads without calling the layer.

    That is what a fused path does (it hands the weights to one kernel), and it makes the layer's slots
    dead. A layer that the forward neither calls nor reads (an auxiliary head used only in training) is
    not reported. The forward runs in eval mode without gradients (where fused inference paths are
    taken); the model's train/eval flags are restored afterwards.
    """
    names = [(n, m) for n, m in model.named_modules(remove_duplicate=False) if is_gemm(m)]
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        with _watching([m for _, m in names]) as watches, torch.no_grad():
            run()
    finally:
        for m, t in modes:
            m.training = t
    return [n for n, m in names if id(m) in watches and watches[id(m)].calls == 0 and watches[id(m)].reads > 0]
