"""The :class:`Plan` config (layer name -> that layer's config) and the registry of per-layer candidates.

A plan is what the planner writes and the user edits: YAML of per-layer configs. ``thrifty.apply(model, plan)``
fills each listed layer's slots with its own config (round to nearest; any mix of configs), and
:func:`quantize_plan` runs the PTQ pipeline the plan names (``rtn`` or ``adaquant``...) once over the quantized
layers, each with its own config (any mix of ``QuantConfig``).
A *candidate* is a named per-layer choice the cost model can measure and the planner can pick: ``fp32``,
``int8``, ``int7`` (u8s8-exact without VNNI), ``w4a8`` and ``w4`` (weight-only, per group, Linear layers only,
deployed as MatMulNBits), ``int8-2:4`` and ``int8-t4:8`` (:class:`SparseQuant`: symmetric int8 weights pruned
2:4, or transposable 4:8, stored compressed in the ONNX file; the runtime runs them dense); new deployment paths
add theirs with :func:`register_candidate`. :func:`export_plan` writes a quantized plan's ONNX file, its pruned
layers compressed.

Example:
    >>> import torch.nn as nn, thrifty
    >>> from thrifty.quant import QuantConfig
    >>> plan = Plan({"0": QuantConfig(w_bits=8, a_bits=8), "2": None})
    >>> from thrifty.core import from_yaml
    >>> from_yaml(plan.to_yaml()) == plan
    True
    >>> m = thrifty.apply(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)), plan)
    >>> type(m[0].slots.weight).__name__, m[2].slots.weight is None
    ('UniformQuantizer', True)
"""
from __future__ import annotations

import copy
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch.nn as nn

from thrifty.core import Config, from_dict, handler_for, register_config, register_handler
from thrifty.quant.config import PIPELINES, PTQ, QuantConfig
from thrifty.sparse.weights import NM, can_take, sparsify

__all__ = ["Plan", "SparseQuant", "Candidate", "CANDIDATES", "register_candidate", "quantize_plan", "plan_from_picks",
           "export_plan"]


@register_config
@dataclass(frozen=True)
class SparseQuant(Config):
    """A layer pruned N:M and quantized, its weights stored compressed when deployed.

    The weights must be quantized symmetrically, so that a pruned weight is the integer code 0 and
    :func:`thrifty.bench.nm_onnx.save_nm_onnx` can store the kept codes and their in-block indices only
    (2:4 int8: 0.625 of the int8 bytes). In a :class:`Plan`, :func:`quantize_plan` prunes the layer (AdaPrune
    when the plan's pipeline learns) and then runs the PTQ pipeline against the *dense* model, so AdaQuant also
    compensates the pruning and the calibration loss counts it.

    Args:
        nm: the N:M pattern (``NM(2, 4)``; ``NM(4, 8, transposable=True)`` for a transposable mask).
        quant: the layer's quantizers; ``w_symmetric=True``, no weight groups.

    Example:
        >>> SparseQuant().nm.label, SparseQuant().quant.w_symmetric
        ('2:4', True)
    """

    nm: NM = NM(2, 4)
    quant: QuantConfig = QuantConfig(w_bits=8, a_bits=8, w_symmetric=True)

    def __post_init__(self) -> None:
        if not isinstance(self.nm, NM) or not isinstance(self.quant, QuantConfig):
            raise TypeError(f"SparseQuant takes nm=NM(...) and quant=QuantConfig(...), got "
                            f"{type(self.nm).__name__} and {type(self.quant).__name__}")
        if not self.quant.w_symmetric or self.quant.group_size is not None:
            raise ValueError("SparseQuant.quant must quantize weights symmetrically per channel (w_symmetric=True, "
                             "group_size=None): a pruned weight is then the code 0 and is stored compressed")
        if self.nm.recompute_every:
            raise ValueError("SparseQuant.nm: a post-training mask is fixed (recompute_every=0)")


@register_handler(SparseQuant)
def _sparse_quant_handler(layer: nn.Module, name: str, cfg: SparseQuant) -> None:
    handler_for(cfg.nm)(layer, name, cfg.nm)
    handler_for(cfg.quant)(layer, name, cfg.quant)


@register_config
@dataclass(frozen=True)
class Plan(Config):
    """Per-layer configs: ``layers[name]`` is the layer's config (``QuantConfig``, ...) or None (kept FP32).

    ``pipeline``: the PTQ pipeline :func:`quantize_plan` runs on the quantized layers (``rtn``, ``adaquant``,
    ``light``, ``advanced``); ``adaquant_iters`` its AdaQuant steps per layer.

    Args:
        layers: layer name -> its config (``QuantConfig``, ...), or None to keep the layer in FP32.
        pipeline: the PTQ pipeline :func:`quantize_plan` runs: "rtn", "adaquant", "light" or "advanced".
        adaquant_iters: AdaQuant optimisation steps per layer.
    """

    layers: dict[str, Optional[Config]] = field(default_factory=dict)
    pipeline: str = "rtn"
    adaquant_iters: int = 200

    def __post_init__(self) -> None:
        if not isinstance(self.layers, dict):
            raise TypeError(f"Plan.layers must be a dict layer name -> config or None, got {type(self.layers).__name__}")
        layers = {}
        for name, cfg in self.layers.items():
            if isinstance(cfg, dict):  # read back from YAML
                cfg = from_dict(cfg)
            if cfg is not None and not isinstance(cfg, Config):
                raise TypeError(f"Plan: layer {name!r} has {type(cfg).__name__}, not a thrifty config or None")
            if isinstance(cfg, Plan):
                raise TypeError(f"Plan: layer {name!r} holds a Plan; plans do not nest")
            layers[str(name)] = cfg
        object.__setattr__(self, "layers", layers)
        if self.pipeline not in PIPELINES:
            raise ValueError(f"Plan.pipeline must be one of {PIPELINES}, got {self.pipeline!r}")
        if self.adaquant_iters < 0:
            raise ValueError(f"Plan.adaquant_iters must be >= 0, got {self.adaquant_iters}")

    def quantized(self) -> dict[str, Config]:
        """The layers the plan changes (every entry that is not None)."""
        return {n: c for n, c in self.layers.items() if c is not None}


@register_handler(Plan)
def _plan_handler(layer: nn.Module, name: str, cfg: Plan) -> None:
    inner = cfg.layers.get(name)
    if inner is not None:
        handler_for(inner)(layer, name, inner)


@dataclass(frozen=True)
class Candidate:
    """One per-layer choice: its name, the layer config a plan records (None = FP32), and which layers take it."""

    name: str
    config: Optional[Config]
    accepts: Callable[[nn.Module], bool] = lambda layer: True
    note: str = ""


CANDIDATES: dict[str, Candidate] = {}


def register_candidate(cand: Candidate) -> Candidate:
    """Make ``cand`` measurable by the cost model and choosable by the planner (by its name)."""
    if not isinstance(cand, Candidate):
        raise TypeError(f"register_candidate expects a Candidate, got {type(cand).__name__}")
    CANDIDATES[cand.name] = cand
    return cand


register_candidate(Candidate("fp32", None, note="the layer stays float32"))
register_candidate(Candidate("int8", QuantConfig(w_bits=8, a_bits=8), note="W8A8 per-channel, QDQ int8 on ORT"))
register_candidate(Candidate("w4a8", QuantConfig(w_bits=4, a_bits=8),
                             note="4-bit weight grid in int8 QDQ containers (int8 speed and bytes on ORT today)"))
register_candidate(Candidate("int7", QuantConfig(w_bits=7, a_bits=8, w_symmetric=True),
                             note="W7A8 symmetric per-channel: codes within +-63 run ONNX Runtime's fast u8s8 kernels "
                                  "exactly without VNNI (AVX2), where 8-bit weights need the slower u8u8 ones"))
W4_GROUP = 32
register_candidate(Candidate("w4", QuantConfig(w_bits=4, a_bits=None, group_size=W4_GROUP),
                             accepts=lambda layer: isinstance(layer, nn.Linear),
                             note=f"4-bit weight-only, one scale and zero point per {W4_GROUP} weights, float "
                                  "activations; nn.Linear only, deployed as ONNX Runtime's MatMulNBits"))


def _takes(nm: NM) -> Callable[[nn.Module], bool]:
    return lambda layer: isinstance(layer, (nn.Linear, nn.Conv2d)) and can_take(layer, nm) is None


for _name, _nm in (("int8-2:4", NM(2, 4)), ("int8-t4:8", NM(4, 8, transposable=True))):
    register_candidate(Candidate(_name, SparseQuant(_nm), accepts=_takes(_nm),
                                 note=f"W8A8 symmetric with {_nm.label} weights stored compressed (kept codes plus "
                                      "in-block indices); ONNX Runtime has no N:M kernel, so it runs them dense"))


def candidate(name: str) -> Candidate:
    """The registered candidate ``name`` (ValueError listing the known ones)."""
    try:
        return CANDIDATES[name]
    except KeyError:
        raise ValueError(f"unknown plan candidate {name!r}; known: {sorted(CANDIDATES)}") from None


def plan_from_picks(picks: dict[str, Any], pipeline: str = "rtn", adaquant_iters: int = 200) -> Plan:
    """The Plan of a per-layer candidate choice ``{layer: candidate name}``."""
    return Plan({n: candidate(str(c)).config for n, c in picks.items()}, pipeline, adaquant_iters)


def quantize_plan(model: nn.Module, plan: Plan, calib: Any, *, ptq: Optional[PTQ] = None):
    """A quantized copy of ``model`` following ``plan``, through :func:`thrifty.quant.quantize`.

    One run of the plan's PTQ pipeline (``rtn`` or ``adaquant``...; ``ptq`` overrides it) over exactly the plan's
    quantized layers, each with its own ``QuantConfig`` (``layer_configs``): a plan mixing candidates (int8,
    int7, W4 weight-only...) is calibrated and optimised in one pass, AdaQuant fitting each layer on the outputs
    of the already quantized layers before it, whatever their configs, and the loss is measured against the FP
    model. :class:`SparseQuant` layers are pruned first, on a copy: AdaPrune (:func:`thrifty.sparse.adaprune`,
    ``adaquant_iters`` steps per layer) when the pipeline learns, magnitude masks for ``rtn``; the PTQ pipeline
    then fits and scores the pruned copy against ``model`` itself, so the losses count the pruning. Every layer
    gets exactly its config: PTQ's first/last-layer policy does not apply (a plan that wants 8-bit first and
    last layers says so per layer). Returns the QuantResult, or None when the plan quantizes nothing (the copy
    is then ``model`` itself, untouched).
    """
    from thrifty.quant import quantize

    if not isinstance(plan, Plan):
        raise TypeError(f"quantize_plan expects a Plan, got {type(plan).__name__}")
    q = plan.quantized()
    if not q:
        return None
    other = {n: type(c).__name__ for n, c in q.items() if not isinstance(c, (QuantConfig, SparseQuant))}
    if other:
        raise ValueError(f"quantize_plan: PTQ takes QuantConfig and SparseQuant layers; {other} are not (apply them "
                         f"with thrifty.apply(model, plan), round to nearest)")
    missing = [n for n in q if n not in dict(model.named_modules())]
    if missing:
        raise ValueError(f"quantize_plan: the plan names layers the model does not have: {missing}")
    pruned = {n: c.nm for n, c in q.items() if isinstance(c, SparseQuant)}
    base = ptq or PTQ(pipeline=plan.pipeline, adaquant_iters=plan.adaquant_iters)
    src = model
    if pruned:
        src = copy.deepcopy(model)
        if base.uses_adaquant and base.adaquant_iters:  # AdaPrune: the kept weights fitted to the dense outputs
            from thrifty.sparse.adaprune import adaprune

            adaprune(src, pruned, calib, steps=base.adaquant_iters, progress=False, seed=base.seed)
        else:  # round to nearest: magnitude masks
            for nm in dict.fromkeys(pruned.values()):
                sparsify(src, nm, filter=[n for n, p in pruned.items() if p == nm])
    qcfg: dict[str, QuantConfig] = {n: c.quant if isinstance(c, SparseQuant) else c  # type: ignore[misc]
                                    for n, c in q.items()}
    if len(set(qcfg.values())) == 1:  # one shared config: QuantResult.config records it (the layers still get theirs)
        qc = next(iter(qcfg.values()))
        base = base.replace(w_bits=qc.w_bits, a_bits=qc.a_bits, first_last_bits=qc.w_bits, per_channel=qc.per_channel,
                            group_size=qc.group_size, w_symmetric=qc.w_symmetric, a_symmetric=qc.a_symmetric,
                            w_estimator=qc.w_estimator, a_estimator=qc.a_estimator)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "these layers stay in floating point": the plan says so on purpose
        return quantize(src, base, calib, layer_configs=qcfg, progress=False, reference=model if pruned else None)


def export_plan(qmodel: nn.Module, plan: Plan, example: tuple, path: str | os.PathLike, *,
                input_names: Optional[Sequence[str]] = None, calib: Any = None,
                residual_ranges: Optional[dict] = None) -> Path:
    """Export ``qmodel`` (:func:`quantize_plan`'s model of ``plan``) to ONNX at ``path``
    (:func:`thrifty.bench.export.export_onnx`; ``calib`` makes the residual Adds integer), with the weights of
    its :class:`SparseQuant` layers stored compressed (:func:`thrifty.bench.nm_onnx.save_nm_onnx`; ONNX Runtime
    sessions made by thrifty load such a file as it is). Returns ``path``."""
    from thrifty.bench.export import export_onnx, weight_codes_name
    from thrifty.bench.nm_onnx import save_nm_onnx

    out = export_onnx(qmodel, example, path, input_names=input_names, calib=calib, residual_ranges=residual_ranges)
    pruned = {weight_codes_name(n): (c.nm.n, c.nm.m) for n, c in plan.quantized().items() if isinstance(c, SparseQuant)}
    if pruned:
        import onnx

        # a layer off the exported forward path (an unused pooler) has no weights in the graph
        there = {i.name for i in onnx.load(str(out), load_external_data=False).graph.initializer}
        pruned = {k: v for k, v in pruned.items() if k in there}
    if pruned:
        save_nm_onnx(out, out, layers=pruned)
    return Path(out)
