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
import re
import types
import typing
from typing import Any, ClassVar, TypeVar

import yaml

__all__ = ["Config", "register_config", "config_class", "to_dict", "from_dict", "to_yaml", "from_yaml", "CONFIGS",
           "import_config_modules", "CONFIG_ALIASES", "nest_moved", "with_overrides", "flat_fields"]

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
    # a field that moved into a nested config: old name -> its dotted place ("lr": "optim.lr"). The old keyword
    # still builds the config for one release (DeprecationWarning), reading it names the new place, and
    # :func:`nest_moved` turns an older file's flat key into the nested one (for ``upgrade``).
    moved_fields: ClassVar[dict[str, str]] = {}

    @classmethod
    def upgrade(cls, d: dict[str, Any], from_version: int) -> dict[str, Any]:
        """Turn the fields ``d`` of a ``from_version`` file (older than ``cls.version``) into current fields.

        The default puts the flat keys of ``moved_fields`` into their nested configs (:func:`nest_moved`) and
        knows no other change: a class that changes its fields otherwise overrides this.

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
        if cls.moved_fields:
            return nest_moved(cls, d)
        raise ValueError(f"{cls.__name__}: config version {from_version} is older than this thrifty's "
                         f"({cls.version}) and {cls.__name__} defines no upgrade from it")

    def replace(self, **changes: Any) -> "Config":
        """A copy with some fields changed (configs are immutable); a dict for a nested config changes only the
        keys it names: ``cfg.replace(optim={"lr": 0.05})``."""
        for k, v in changes.items():
            if isinstance(v, dict) and isinstance(getattr(self, k, None), Config):
                changes[k] = dataclasses.replace(getattr(self, k), **v)
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
    if not getattr(cls.__init__, "_nested_kw", False):
        _nested_keywords(cls)
    return cls


def _nested_default(cls: type, name: str) -> Any:
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    raise TypeError(f"{cls.__name__}.{name} has no default to start from")


def _nested_keywords(cls: type) -> None:
    """Wrap ``cls.__init__`` so that a dict given for a nested config changes only the keys it names
    (``FSMerge(optim={"lr": 0.05})`` keeps FSMerge's other optim defaults), and a moved field's old keyword
    (``FSMerge(lr=0.05)``) still sets it, with a DeprecationWarning; reading ``cfg.lr`` then names the new place.
    ``replace`` goes through ``__init__``, so it takes both too."""
    import functools
    import warnings

    init, moved = cls.__init__, dict(cls.moved_fields)

    @functools.wraps(init)
    def __init__(self: Any, *args: Any, **kw: Any) -> None:
        old = [k for k in kw if k in moved]
        if old:
            warnings.warn(f"{cls.__name__}({', '.join(k + '=...' for k in old)}): moved to "
                          f"{', '.join(cls.__name__ + '.' + moved[k] for k in old)}; the old keyword goes in the next "
                          "release", DeprecationWarning, stacklevel=2)
            for k in old:
                head, _, rest = moved[k].partition(".")
                kw.setdefault(head, {})
                if isinstance(kw[head], dict):
                    kw[head] = {**kw[head], rest: kw.pop(k)}
                else:
                    kw[head] = dataclasses.replace(kw[head], **{rest: kw.pop(k)})
        for k in [k for k, v in kw.items() if isinstance(v, dict) and k in _nested_fields(cls)]:
            try:
                kw[k] = dataclasses.replace(_nested_default(cls, k), **kw[k])
            except (TypeError, ValueError) as e:  # an unknown key, a bad value
                raise _nested_error(cls, k, e) from None
        init(self, *args, **kw)

    def __getattr__(self: Any, name: str) -> Any:
        if name in moved:
            raise AttributeError(f"{cls.__name__}.{name} moved to {cls.__name__}.{moved[name]}")
        raise AttributeError(f"{cls.__name__!r} object has no attribute {name!r}")

    __init__._nested_kw = True  # type: ignore[attr-defined]
    cls.__init__ = __init__  # type: ignore[method-assign]
    if moved:
        cls.__getattr__ = __getattr__  # type: ignore[attr-defined]


def _nested_error(cls: type, name: str, e: Exception) -> Exception:
    """A nested config's error named from the outer config: "OptimConfig.lr: ..." -> "TrainConfig.optim.lr: ..."."""
    msg = str(e)
    inner = re.match(r"(\w+)\.[a-z][a-z0-9_]*(?=[: ])", msg)  # "Inner.field: ..." or "Inner.field must ..."
    if inner and inner.group(1) in CONFIGS:
        return type(e)(f"{cls.__name__}.{name}.{msg[len(inner.group(1)) + 1:]}")
    return type(e)(f"{cls.__name__}.{name}: {msg}")


def _nested_fields(cls: type) -> set[str]:
    """The fields of ``cls`` that hold a config (resolved on first use: annotations may be forward references)."""
    if "_nested_names" not in cls.__dict__:
        hints = typing.get_type_hints(cls)
        cls._nested_names = frozenset(f.name for f in dataclasses.fields(cls)  # type: ignore[attr-defined]
                                      if f.init and _config_type(hints.get(f.name)))
    return cls._nested_names  # type: ignore[attr-defined]


def with_overrides(cfg: C, **changes: Any) -> C:
    """``cfg.replace(**changes)`` for a function whose keyword overrides name config fields
    (``synthesize(model, cfg, n, steps=5)``): a flat name that moved into a nested config sets it there, without the
    deprecation warning the constructor gives (the function's keywords are its own API).

    Example:
        >>> from thrifty.merge import FSMerge
        >>> with_overrides(FSMerge(), lr=0.05, mode="local").optim.lr
        0.05
    """
    moved = type(cfg).moved_fields
    own = {k: v for k, v in changes.items() if k not in moved}
    for k, v in changes.items():
        if k in moved:
            head, _, rest = moved[k].partition(".")
            inner = own.get(head, getattr(cfg, head))
            own[head] = {**inner, rest: v} if isinstance(inner, dict) else dataclasses.replace(inner, **{rest: v})
    return cfg.replace(**own) if own else cfg  # type: ignore[return-value]


def flat_fields(cfg: Config) -> dict[str, Any]:
    """The fields of ``cfg`` as :func:`to_dict` gives them, with the nested configs that ``moved_fields`` point into
    spread at the top: the layout before the fields moved, which results files and cache keys keep.

    Example:
        >>> from thrifty.datafree import Synth
        >>> d = flat_fields(Synth())
        >>> d["steps"], d["lr"], d["upsample"], "optim" in d
        (60, 0.4, 4, False)
    """
    heads = {p.split(".")[0] for p in type(cfg).moved_fields.values()}
    out: dict[str, Any] = {}
    for k, v in to_dict(cfg).items():
        if k in heads and isinstance(v, dict):
            out.update({f: x for f, x in v.items() if f not in ("kind", "version")})
        elif k not in ("kind", "version"):
            out[k] = v
    return out


def nest_moved(cls: type, d: dict[str, Any]) -> dict[str, Any]:
    """An older file's fields ``d`` with each flat key of ``cls.moved_fields`` put into its nested config's dict
    (the other fields of that config keep ``cls``'s defaults when the file is read).

    Example:
        >>> from thrifty.merge import FSMerge
        >>> nest_moved(FSMerge, {"mode": "local", "lr": 0.05})
        {'mode': 'local', 'optim': {'lr': 0.05}}
    """
    out = {k: v for k, v in d.items() if k not in cls.moved_fields}
    for k, v in d.items():
        if k in cls.moved_fields:
            head, _, rest = cls.moved_fields[k].partition(".")
            inner = out.setdefault(head, {})
            if not isinstance(inner, dict):
                raise ValueError(f"{cls.__name__}: both {k!r} and {head!r} given")
            inner[rest] = v
    return out


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
        moved = "".join(f"; {k} is now {cls.moved_fields[k]}" for k in sorted(unknown) if k in cls.moved_fields)
        raise ValueError(f"{cls.__name__}: unknown field(s) {sorted(unknown)}; fields are {sorted(names)}{moved}")
    for k, v in body.items():
        tp = _config_type(hints.get(k))
        if isinstance(v, dict) and tp is not None and v.get("kind", tp.__name__) == tp.__name__:
            # a nested config's keys left out keep the outer config's default for it (not the inner class's)
            dflt = _nested_default(cls, k) if _has_default(cls, k) else None
            body[k] = {**(to_dict(dflt) if isinstance(dflt, tp) else {"kind": tp.__name__}), **v}
    kwargs = {}
    for k, v in body.items():
        try:
            kwargs[k] = _decode(hints.get(k, Any), v, f"{cls.__name__}.{k}")
        except (TypeError, ValueError) as e:
            if not isinstance(v, dict):
                raise
            raise _nested_error(cls, k, e) from None
    return cls(**kwargs)


def _config_type(tp: Any) -> type | None:
    """The Config class of a field annotated ``SomeConfig`` or ``Optional[SomeConfig]``, else None."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        tp = args[0] if len(args) == 1 else None
    return tp if isinstance(tp, type) and issubclass(tp, Config) else None


def _has_default(cls: type, name: str) -> bool:
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    return f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING  # type: ignore[misc]


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
