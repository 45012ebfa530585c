"""Hardware-aware compression planning: per-layer candidates chosen under measured latency and size budgets.

:mod:`~thrifty.plan.solve` is the exact multiple-choice knapsack (also behind ``thrifty.quant.allocate_bits``);
:mod:`~thrifty.plan.config` the :class:`Plan` config and the candidate registry; :mod:`~thrifty.plan.cost` the
per-layer cost table measured on ONNX Runtime; :mod:`~thrifty.plan.planner` the planner itself (``make_plan``).
The names below load lazily, so ``thrifty.quant`` can use the solver without importing the planner.

Example:
    >>> from thrifty.plan import Plan
    >>> Plan({"fc": None}).quantized()
    {}
"""
from __future__ import annotations

import importlib
from typing import Any

__all__ = ["Plan", "SparseQuant", "Candidate", "CANDIDATES", "register_candidate", "quantize_plan", "export_plan",
           "CostTable", "measure_costs", "make_plan", "PlanResult", "sensitivities"]

_WHERE = {"Plan": "config", "SparseQuant": "config", "Candidate": "config", "CANDIDATES": "config",
          "register_candidate": "config", "quantize_plan": "config", "export_plan": "config", "CostTable": "cost",
          "measure_costs": "cost", "make_plan": "planner", "PlanResult": "planner", "sensitivities": "planner"}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
