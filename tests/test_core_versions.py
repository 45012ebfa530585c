"""A config's version belongs to its class: YAML records it, older files are upgraded, newer ones refused."""
import importlib
import json
import pathlib
from dataclasses import dataclass
from typing import ClassVar

import pytest

from thrifty.core import CONFIGS, Config, from_dict, from_yaml, register_config, to_dict, to_yaml
from thrifty.core.config import _CONFIG_MODULES
from thrifty.sparse import NM


def test_version_is_not_a_constructor_argument():
    with pytest.raises(TypeError, match="version"):
        NM(2, 4, version=5)  # before: accepted, and its YAML was then refused
    text = NM(2, 4).to_yaml()
    assert "version: 1" in text and from_yaml(text) == NM(2, 4)
    assert "version" not in repr(NM(2, 4))


@register_config
@dataclass(frozen=True)
class _Rate(Config):
    version: ClassVar[int] = 3
    rate: float = 0.1
    unit: str = "fraction"

    @classmethod
    def upgrade(cls, d, from_version):
        d = dict(d)
        if from_version == 1:  # v1 stored a percentage under "percent"
            d["rate"] = d.pop("percent") / 100
        d.setdefault("unit", "fraction")  # v2 had no unit
        return d


@register_config
@dataclass(frozen=True)
class _Bumped(Config):
    version: ClassVar[int] = 2
    k: int = 1


def test_from_dict_upgrades_older_versions_and_refuses_newer():
    assert to_dict(_Rate(0.5))["version"] == 3 and from_yaml(to_yaml(_Rate(0.5))) == _Rate(0.5)
    assert from_dict({"kind": "_Rate", "version": 1, "percent": 25}) == _Rate(0.25)
    assert from_dict({"kind": "_Rate", "version": 2, "rate": 0.3}) == _Rate(0.3)
    assert from_dict({"kind": "_Rate", "rate": 0.3}) == _Rate(0.3)  # no version: the current one
    with pytest.raises(ValueError, match=r"_Rate: config version 4 is newer than this thrifty supports \(3\)"):
        from_dict({"kind": "_Rate", "version": 4, "rate": 0.3})
    for bad in (0, -1, True, "2", 2.0):
        with pytest.raises(ValueError, match="_Rate: config version must be a positive integer"):
            from_dict({"kind": "_Rate", "version": bad})
    with pytest.raises(ValueError, match=r"_Rate: unknown field\(s\) \['percent'\]"):
        from_dict({"kind": "_Rate", "version": 3, "percent": 25})
    with pytest.raises(ValueError, match=r"_Bumped: config version 1 is older than this thrifty's \(2\) and _Bumped "
                                         "defines no upgrade"):
        from_yaml("kind: _Bumped\nversion: 1\nk: 2\n")


def test_register_config_refuses_a_version_field():
    @dataclass(frozen=True)
    class _Fielded(Config):
        version: int = 2  # type: ignore[misc]

    with pytest.raises(TypeError, match="'version' is a class attribute"):
        register_config(_Fielded)


def test_every_registered_config_round_trips_with_its_version():
    for mod in _CONFIG_MODULES:
        importlib.import_module(mod)
    for name, cls in sorted(CONFIGS.items()):
        try:
            cfg = cls()
        except TypeError:  # required arguments: exercised by that config's own tests
            continue
        d = to_dict(cfg)
        assert d["version"] == cls.version >= 1 and from_dict(d) == cfg, name
    # Dicts written by earlier versions (version as a field) still load.
    root = pathlib.Path(__file__).resolve().parents[1] / "results"
    found = 0

    def walk(v):
        nonlocal found
        if isinstance(v, dict):
            if "kind" in v and v.get("kind") in CONFIGS:
                from_dict(v)
                found += 1
            else:
                for x in v.values():
                    walk(x)
        elif isinstance(v, list):
            for x in v:
                walk(x)

    for p in sorted(root.glob("*.json")):
        walk(json.loads(p.read_text()))
    assert found > 0
