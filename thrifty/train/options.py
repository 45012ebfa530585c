"""Training options that other packages contribute to ``thrifty train`` without editing cli/train.py.

A package adds ``thrifty/<pkg>/train_options.py`` that calls :func:`register_training_option`; the module
is found by :func:`discover_plugins` (any ``thrifty.<pkg>.train_options``). An option contributes:

  - ``add_arguments(parser)``: its flags (e.g. ``--regime``, ``--grad-nm``; a config's fields through
    ``thrifty.cli._fields.add_config_flags``);
  - ``configs(args) -> {role: Config | None}``: the configs its flags ask for (None: off); ``thrifty train``
    writes them to its config.yaml, and ``--config`` reads them back;
  - ``regime(args) -> Regime | None``: a regime for `fit` (several are chained with `Compose`);
  - ``prepare(model, args, configs) -> dict | None``: change the model before training (e.g.
    ``thrifty.apply``; ``configs`` are every option's, by role); the returned dict is recorded under
    ``options.<name>`` in the saved model's YAML;
  - ``finalize(model, args) -> None``: after training, before saving (e.g. ``thrifty.strip``).

Example:
    >>> opt = TrainingOption("example", add_arguments=lambda p: p.add_argument("--example-flag", type=int))
    >>> _ = register_training_option(opt)
    >>> "example" in {o.name for o in training_options(discover=False)}
    True
"""
from __future__ import annotations

import argparse
import importlib
import pkgutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from torch import nn

from thrifty.train.regime import Compose

__all__ = ["TrainingOption", "register_training_option", "training_options", "discover_plugins",
           "build_regime", "prepare_model", "finalize_model", "option_configs"]


@dataclass(frozen=True)
class TrainingOption:
    name: str
    add_arguments: Callable[[argparse.ArgumentParser], Any]
    regime: Callable[[argparse.Namespace], Any] | None = None
    prepare: Callable[[nn.Module, argparse.Namespace, dict[str, Any]], dict | None] | None = None
    finalize: Callable[[nn.Module, argparse.Namespace], None] | None = None
    configs: Callable[[argparse.Namespace], dict[str, Any]] | None = None


_OPTIONS: dict[str, TrainingOption] = {}


def register_training_option(option: TrainingOption) -> TrainingOption:
    """Register (or re-register, e.g. on module reload) a training option by name."""
    if not isinstance(option, TrainingOption):
        raise TypeError(f"expected a TrainingOption, got {type(option).__name__}")
    _OPTIONS[option.name] = option
    return option


def discover_plugins(basename: str) -> list[str]:
    """Import every ``thrifty.<pkg>.<basename>`` module that exists; returns their names."""
    import thrifty

    found = []
    for info in pkgutil.iter_modules(thrifty.__path__):
        # look for the file first: find_spec would import every subpackage (some import heavy libraries)
        if info.ispkg and any((Path(p) / info.name / f"{basename}.py").is_file() for p in thrifty.__path__):
            name = f"thrifty.{info.name}.{basename}"
            importlib.import_module(name)
            found.append(name)
    return found


def training_options(discover: bool = True) -> list[TrainingOption]:
    """All registered options (after importing the plugin modules), sorted by name."""
    if discover:
        discover_plugins("train_options")
    return [_OPTIONS[k] for k in sorted(_OPTIONS)]


def build_regime(args: argparse.Namespace) -> Any:
    """The regime the options ask for (None, one regime, or a `Compose` of several)."""
    regimes = [r for o in training_options(discover=False) if o.regime for r in [o.regime(args)] if r is not None]
    if not regimes:
        return None
    return regimes[0] if len(regimes) == 1 else Compose(*regimes)


def option_configs(args: argparse.Namespace) -> dict[str, Any]:
    """Every option's configs, by role (None where an option is off); validates them."""
    out: dict[str, Any] = {}
    for o in training_options(discover=False):
        if o.configs:
            out.update(o.configs(args))
    return out


def prepare_model(model: nn.Module, args: argparse.Namespace, configs: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run every option's ``prepare`` (``configs``: :func:`option_configs`' by default); returns
    {option name: recorded metadata}."""
    configs = option_configs(args) if configs is None else configs
    out = {}
    for o in training_options(discover=False):
        if o.prepare:
            meta = o.prepare(model, args, configs)
            if meta:
                out[o.name] = meta
    return out


def finalize_model(model: nn.Module, args: argparse.Namespace) -> None:
    for o in training_options(discover=False):
        if o.finalize:
            o.finalize(model, args)
