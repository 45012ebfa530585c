"""Frozen config dataclasses that round-trip to YAML.

Every technique is configured by a frozen dataclass deriving from :class:`Config`.
Registering the class (``@register_config``) lets ``from_yaml`` rebuild it from the
``kind`` key, so the CLI and Python share one description of a run.

The format version belongs to the class (``version: ClassVar[int]``), not to an instance: YAML
records it, and reading a file written at an older version goes through the class's
:meth:`Config.upgrade`.

Example:
    >>> from dataclasses import dataclass
    >>> @register_config
    ... @dataclass(frozen=True)
    ... class Demo(Config):
    ...     bits: int = 4
    >>> from_yaml(to_yaml(Demo(bits=8))) == Demo(bits=8)
    True
"""
from __future__ import annotations

import dataclasses
import enum
import types
import typing
from typing import Any, ClassVar, TypeVar

import yaml

__all__ = ["Config", "register_config", "config_class", "to_dict", "from_dict", "to_yaml", "from_yaml", "CONFIGS",
           "import_config_modules", "CONFIG_ALIASES"]

CONFIGS: dict[str, type["Config"]] = {}
# renamed config -> its current name: old YAML files still load (with a DeprecationWarning) for one release
CONFIG_ALIASES: dict[str, str] = {}
C = TypeVar("C", bound=type)


@dataclasses.dataclass(frozen=True)
class Config:
    """Base of every thrifty config: frozen, versioned, YAML round-trippable.

    A subclass that changes its fields in a way old files cannot express bumps ``version`` (a class
    attribute, ``version: ClassVar[int] = 2``) and overrides :meth:`upgrade`.
    """

    version: ClassVar[int] = 1

    @classmethod
    def upgrade(cls, d: dict[str, Any], from_version: int) -> dict[str, Any]:
        """Turn the fields ``d`` of a ``from_version`` file (older than ``cls.version``) into current fields.

        The default knows no older version: a class that bumps ``version`` overrides this.

        Example:
            >>> @register_config
            ... @dataclasses.dataclass(frozen=True)
            ... class Rate(Config):
            ...     version: ClassVar[int] = 2
            ...     rate: float = 0.1  # version 1 stored a percentage under "percent"
            ...     @classmethod
            ...     def upgrade(cls, d, from_version):
            ...         return {"rate": d.pop("percent") / 100, **d}
            >>> from_dict({"kind": "Rate", "version": 1, "percent": 25})
            Rate(rate=0.25)
        """
        raise ValueError(f"{cls.__name__}: config version {from_version} is older than this thrifty's "
                         f"({cls.version}) and {cls.__name__} defines no upgrade from it")

    def replace(self, **changes: Any) -> "Config":
        """A copy with some fields changed (configs are immutable)."""
        return dataclasses.replace(self, **changes)

    def to_yaml(self) -> str:
        return to_yaml(self)


def register_config(cls: C) -> C:
    """Class decorator: make ``cls`` rebuildable by name from YAML."""
    if not (isinstance(cls, type) and issubclass(cls, Config) and dataclasses.is_dataclass(cls)):
        raise TypeError(f"register_config expects a Config dataclass, got {cls!r}")
    if any(f.name == "version" for f in dataclasses.fields(cls)):
        raise TypeError(f"{cls.__name__}: 'version' is a class attribute of configs, not a field; "
                        "write `version: ClassVar[int] = N`")
    prev = CONFIGS.get(cls.__name__)
    if prev is not None and prev.__module__ != cls.__module__:
        raise ValueError(f"config name {cls.__name__!r} already registered by {prev.__module__}")
    CONFIGS[cls.__name__] = cls
    return cls


# Modules that define thrifty's own configs: imported on demand so that from_yaml works without the
# caller having imported the right subpackage first.
_CONFIG_MODULES = (
    "thrifty.quant", "thrifty.quant.train8", "thrifty.quant.accum", "thrifty.sparse", "thrifty.datafree",
    "thrifty.merge", "thrifty.train", "thrifty.bench.settings", "thrifty.plan.config",
)


def import_config_modules() -> None:
    """Import every module that registers thrifty's own configs (and their handlers and pipelines)."""
    import importlib

    for mod in _CONFIG_MODULES:
        try:
            importlib.import_module(mod)
        except ImportError:  # an optional part missing must not hide the clear error that follows
            continue


def config_class(kind: str) -> type[Config]:
    """The registered config class named ``kind`` (ValueError listing every known one)."""
    if kind not in CONFIGS:
        import_config_modules()
    if kind in CONFIG_ALIASES and kind not in CONFIGS:
        import warnings

        warnings.warn(f"config kind {kind!r} is now {CONFIG_ALIASES[kind]!r}; the old name goes in the next release",
                      DeprecationWarning, stacklevel=3)
        kind = CONFIG_ALIASES[kind]
    try:
        return CONFIGS[kind]
    except KeyError:
        raise ValueError(f"unknown config kind {kind!r}; known: {sorted(CONFIGS)}") from None


def _encode(v: Any) -> Any:
    if isinstance(v, Config):
        return to_dict(v)
    if isinstance(v, enum.Enum):
        return v.value
    if isinstance(v, (tuple, list)):
        return [_encode(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _encode(x) for k, x in v.items()}
    return v


def to_dict(cfg: Config) -> dict[str, Any]:
    """Plain-data dict with a ``kind`` key naming the config class."""
    out: dict[str, Any] = {"kind": type(cfg).__name__, "version": type(cfg).version}
    for f in dataclasses.fields(cfg):
        out[f.name] = _encode(getattr(cfg, f.name))
    return out


def _decode(tp: Any, v: Any, where: str) -> Any:
    if v is None:
        return None
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            if arg is type(None):
                continue
            try:
                return _decode(arg, v, where)
            except (TypeError, ValueError):
                continue
        return v
    if isinstance(v, dict) and "kind" in v:
        return from_dict(v)
    if origin is tuple or tp is tuple:
        args = typing.get_args(tp)
        if not isinstance(v, (list, tuple)):
            raise TypeError(f"{where}: expected a list, got {v!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_decode(args[0], x, where) for x in v)
        if args and len(args) == len(v):
            return tuple(_decode(a, x, where) for a, x in zip(args, v))
        return tuple(v)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return tp(v)
    if tp is float and isinstance(v, int) and not isinstance(v, bool):
        return float(v)
    return v


def from_dict(d: dict[str, Any]) -> Config:
    """Rebuild a config from :func:`to_dict` output; unknown keys are an error.

    A missing ``version`` means the current one; an older one goes through ``cls.upgrade``; a newer one
    is refused.
    """
    if not isinstance(d, dict) or "kind" not in d:
        raise ValueError(f"a config dict needs a 'kind' key, got {d!r}")
    cls = config_class(d["kind"])
    version = d.get("version", cls.version)
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ValueError(f"{cls.__name__}: config version must be a positive integer, got {version!r}")
    if version > cls.version:
        raise ValueError(f"{cls.__name__}: config version {version} is newer than this thrifty supports "
                         f"({cls.version}); upgrade thrifty to read it")
    body = {k: v for k, v in d.items() if k not in ("kind", "version")}
    if version < cls.version:
        body = cls.upgrade(body, version)
        if not isinstance(body, dict):
            raise TypeError(f"{cls.__name__}.upgrade must return a dict, got {type(body).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = set(body) - names
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown field(s) {sorted(unknown)}; fields are {sorted(names)}")
    kwargs = {k: _decode(hints.get(k, Any), v, f"{cls.__name__}.{k}") for k, v in body.items()}
    return cls(**kwargs)


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def from_yaml(text: str, source: str = "<string>") -> Config:
    """Rebuild a config from YAML text; ``source`` (a file name) is named in every error.

    YAML is read with ``yaml.safe_load`` only: a ``!!python/...`` tag is refused, never constructed.
    """
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ValueError(f"{source}: not valid thrifty YAML ({str(e).splitlines()[0]})") from e
    if not isinstance(data, dict):
        raise ValueError(f"{source}: expected a mapping with a 'kind' key, got {type(data).__name__}")
    return from_dict(data)
