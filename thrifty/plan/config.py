"""The :class:`Plan` config (layer name -> that layer's config) and the registry of per-layer candidates.

A plan is what the planner writes and the user edits: YAML of per-layer configs. ``thrifty.apply(model, plan)``
fills each listed layer's slots with its own config (round to nearest; any mix of configs), and
:func:`quantize_plan` runs the PTQ pipeline the plan names (``rtn`` or ``adaquant``...) once over the quantized
layers, each with its own config (any mix of ``QuantConfig``).
A *candidate* is a named per-layer choice the cost model can measure and the planner can pick: ``fp32``,
``int8``, ``int7`` (u8s8-exact without VNNI), ``w4a8`` and ``w4`` (weight-only, per group, Linear layers only,
deployed as MatMulNBits); new deployment paths (N:M storage) add theirs with :func:`register_candidate`.

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

import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch.nn as nn

from thrifty.core import Config, from_dict, handler_for, register_config, register_handler
from thrifty.quant.config import PIPELINES, PTQ, QuantConfig

__all__ = ["Plan", "Candidate", "CANDIDATES", "register_candidate", "quantize_plan", "plan_from_picks"]


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

    One run of the plan's PTQ pipeline (``rtn``, ``adaquant``...; ``ptq`` overrides it) over exactly the plan's
    quantized layers, each with its own ``QuantConfig`` (``layer_configs``): a plan mixing candidates (int8,
    int7, W4 weight-only...) is calibrated and optimised in one pass, AdaQuant fitting each layer on the outputs
    of the already quantized layers before it, whatever their configs, and the loss is measured against the FP
    model. Every layer gets exactly its config: PTQ's first/last-layer policy does not apply (a plan that wants
    8-bit first and last layers says so per layer). Returns the QuantResult, or None when the plan quantizes
    nothing (the copy is then ``model`` itself, untouched).
    """
    from thrifty.quant import quantize

    if not isinstance(plan, Plan):
        raise TypeError(f"quantize_plan expects a Plan, got {type(plan).__name__}")
    q = plan.quantized()
    if not q:
        return None
    other = {n: type(c).__name__ for n, c in q.items() if not isinstance(c, QuantConfig)}
    if other:
        raise ValueError(f"quantize_plan: PTQ takes QuantConfig layers; {other} are not (apply them with "
                         f"thrifty.apply(model, plan), round to nearest)")
    missing = [n for n in q if n not in dict(model.named_modules())]
    if missing:
        raise ValueError(f"quantize_plan: the plan names layers the model does not have: {missing}")
    base = ptq or PTQ(pipeline=plan.pipeline, adaquant_iters=plan.adaquant_iters)
    if len(set(q.values())) == 1:  # one shared config: QuantResult.config records it (the layers still get theirs)
        qc: QuantConfig = next(iter(q.values()))  # type: ignore[assignment]
        base = base.replace(w_bits=qc.w_bits, a_bits=qc.a_bits, first_last_bits=qc.w_bits, per_channel=qc.per_channel,
                            group_size=qc.group_size, w_symmetric=qc.w_symmetric, a_symmetric=qc.a_symmetric,
                            w_estimator=qc.w_estimator, a_estimator=qc.a_estimator)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "these layers stay in floating point": the plan says so on purpose
        return quantize(model, base, calib, layer_configs=q, progress=False)  # type: ignore[arg-type]
