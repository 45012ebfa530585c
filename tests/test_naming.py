"""The naming rule of docs/naming.md, checked on every public name, and the deprecation aliases of renames."""
from __future__ import annotations

import importlib
import inspect
import re

import pytest

import thrifty
from thrifty.core import Config, from_dict

MODULES = ["thrifty"] + [f"thrifty.{m}" for m in sorted(thrifty._SUBMODULES)]
BAD_SUFFIXES = ("Settings", "Options", "Params", "Cfg")


def _public() -> list[tuple[str, str, object]]:
    out = []
    for mod_name in MODULES:
        mod = importlib.import_module(mod_name)
        for name in getattr(mod, "__all__", []):
            obj = getattr(mod, name)
            if not inspect.ismodule(obj):
                out.append((mod_name, name, obj))
    return out


PUBLIC = _public()


def rule_violation(module: str, name: str, obj: object) -> str | None:
    """Why ``module.name`` breaks the naming rule, or None."""
    if isinstance(obj, type) and issubclass(obj, Config) and obj is not Config:
        if name.endswith(BAD_SUFFIXES):
            return f"{name}: a config ends in Config, Merge or nothing, not {BAD_SUFFIXES}"
        is_merge = obj.__module__.startswith("thrifty.merge")
        if is_merge != name.endswith("Merge"):
            return f"{name}: merge methods (and only they) are named <Method>Merge"
        if name != obj.__name__:
            return f"{name}: exported under another name than the class's ({obj.__name__}), which YAML uses"
    elif inspect.isfunction(obj) and not re.fullmatch(r"[a-z][a-z0-9_]*", name):
        return f"{name}: functions are lower_snake_case"
    return None


@pytest.mark.parametrize("module,name,obj", PUBLIC, ids=[f"{m}.{n}" for m, n, _ in PUBLIC])
def test_public_name_follows_the_rule(module, name, obj):
    assert rule_violation(module, name, obj) is None


def test_rule_catches_the_old_names():
    from dataclasses import dataclass

    @dataclass(frozen=True)
    class BenchSettings(Config):
        pass

    BenchSettings.__module__ = "thrifty.bench.settings"
    assert rule_violation("thrifty.bench", "BenchSettings", BenchSettings)
    PermuteAverage = type("PermuteAverage", (Config,), {"__module__": "thrifty.merge.baselines"})
    assert rule_violation("thrifty.merge", "PermuteAverage", PermuteAverage)
    assert rule_violation("thrifty", "FitModel", _helper)
    assert rule_violation("thrifty", "fit_model", _helper) is None


def _helper() -> None:
    pass


def test_one_name_one_thing():
    seen: dict[str, tuple[str, object]] = {}
    for module, name, obj in PUBLIC:
        first = seen.setdefault(name, (module, obj))
        assert first[1] is obj, f"{name} is a different object in {first[0]} and {module}"


def test_configs_reachable_where_their_technique_lives():
    import thrifty.quant as q

    assert q.Train8 is thrifty.Train8 and q.AccumConfig is thrifty.AccumConfig
    assert thrifty.QuantConfig is q.QuantConfig
    assert {"Train8", "AccumConfig", "QuantConfig", "PTQ"} <= set(q.__all__)


@pytest.mark.parametrize("module,old,new", [
    ("thrifty.merge", "PermuteAverage", "PermuteMerge"),
    ("thrifty.merge", "augment", "augment_tasks"),
    ("thrifty.bench", "BenchSettings", "BenchConfig"),
    ("thrifty.bench.settings", "BenchSettings", "BenchConfig"),
])
def test_renamed_names_warn_and_resolve(module, old, new):
    mod = importlib.import_module(module)
    with pytest.warns(DeprecationWarning, match=new):
        assert getattr(mod, old) is getattr(mod, new)
    assert old not in getattr(mod, "__all__", [])


def test_old_yaml_kinds_still_load():
    with pytest.warns(DeprecationWarning, match="PermuteMerge"):
        cfg = from_dict({"kind": "PermuteAverage", "matching": "weight"})
    assert type(cfg).__name__ == "PermuteMerge" and cfg.matching == "weight"
    with pytest.warns(DeprecationWarning, match="BenchConfig"):
        assert type(from_dict({"kind": "BenchSettings"})).__name__ == "BenchConfig"
