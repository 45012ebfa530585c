"""Command-line flags generated from config dataclass fields, and back.

A command calls :func:`add_config_flags` once per config it consumes; every field becomes a flag
(``--<prefix><field-name>``): its type comes from the annotation (``bool`` -> ``--x/--no-x``, ``Optional``
accepts ``none``, ``Literal``/enum -> choices, tuples and lists -> comma-separated values, a nested config
-> ``--<field>.<inner>``), its help from the field's entry in the config's docstring ``Args:`` section
(or ``field(metadata={"help": ...})``). A flag left out takes its value from a *base* config (the field
default unless the command passes another, e.g. a training recipe), so an added config field is on the CLI
without a hand-written flag. :func:`config_from_args` builds the config; its validation errors name the flag.

``--config FILE.yaml`` (see :func:`thrifty.cli._common.parse_with_config`) reads what ``thrifty.to_yaml``
writes: each config's fields become the defaults of its flags (:func:`config_defaults`), explicit flags win.

Example:
    >>> import dataclasses
    >>> from thrifty.core import Config
    >>> @dataclasses.dataclass(frozen=True)
    ... class Toy(Config):
    ...     '''Args:
    ...         bits: weight bits.
    ...         fast: skip the slow part.
    ...     '''
    ...     bits: int = 4
    ...     fast: bool = False
    >>> p = argparse.ArgumentParser(); _ = add_config_flags(p, "toy", Toy)
    >>> config_from_args(p.parse_args(["--bits", "8", "--fast"]), "toy")
    Toy(bits=8, fast=True)
    >>> config_argv(p, Toy(bits=2))
    ['--bits', '2', '--no-fast']
"""
from __future__ import annotations

import argparse
import dataclasses
import enum
import inspect
import re
import sys
import types
import typing
from typing import Any, Callable, Iterable, Mapping, Optional

from thrifty.core.config import Config

__all__ = ["UNSET", "Alias", "ConfigGroup", "field_docs", "add_config_flags", "config_from_args", "config_argv",
           "config_defaults", "groups_of", "config_dests", "changed_flags"]


class _Unset:
    """The default of a generated flag: not given, so the base config's value is used."""

    def __repr__(self) -> str:
        return "UNSET"

    def __deepcopy__(self, memo: Any) -> "_Unset":  # "is UNSET" must survive a copied Namespace
        return self


UNSET: Any = _Unset()


@dataclasses.dataclass(frozen=True)
class Alias:
    """An older flag name kept for one release: sets ``fields`` (to the flag's value, or to ``const``)."""

    fields: tuple[str, ...]
    const: Any = UNSET


@dataclasses.dataclass
class ConfigGroup:
    """The flags generated for one config role of a command (``name`` is its key in config.yaml)."""

    name: str
    classes: tuple[type[Config], ...]
    prefix: str
    dests: dict[str, str]  # field (dotted for nested) -> argparse dest
    flags: dict[str, str]  # field -> flag
    generated: set[str] = dataclasses.field(default_factory=set)  # fields whose flag this group added
    on_load: Optional[Callable[[Config], dict[str, Any]]] = None

    def flag(self, field: str) -> str:
        return self.flags.get(field, f"--{self.prefix}{field.replace('_', '-')}")


def _field_entries(doc: str) -> dict[str, str]:
    """``name: text`` entries of the ``Args:``/``Attributes:`` section of a (dedented) docstring."""
    out: dict[str, str] = {}
    lines = inspect.cleandoc(doc).splitlines()
    in_section, indent, cur = False, None, None
    for line in lines:
        if re.fullmatch(r"(Args|Attributes|Fields):\s*", line.strip()) and not line.startswith(" "):
            in_section, indent, cur = True, None, None
            continue
        if not in_section:
            continue
        if not line.strip():
            continue
        lead = len(line) - len(line.lstrip())
        if lead == 0:  # the section ended
            in_section = False
            continue
        m = re.match(r"(\w+)(?:\s*\([^)]*\))?:\s*(.*)", line.strip())
        if m and (indent is None or lead == indent):
            indent, cur = lead, m.group(1)
            out[cur] = m.group(2).strip()
        elif cur is not None:
            out[cur] = f"{out[cur]} {line.strip()}".strip()
    return out


def field_docs(cls: type) -> dict[str, str]:
    """Help text of each field of ``cls``: ``metadata["help"]``, else its docstring ``Args:`` entry.

    Example:
        >>> from thrifty.bench import BenchConfig
        >>> field_docs(BenchConfig)["max_batch"].split(" (")[0]
        'dynamic batching limit of the SUT'
    """
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):  # a subclass's entry wins over its base's
        if klass.__dict__.get("__doc__"):
            docs.update(_field_entries(klass.__doc__))
    for f in dataclasses.fields(cls):
        if f.metadata.get("help"):
            docs[f.name] = str(f.metadata["help"])
    return {f.name: docs[f.name] for f in dataclasses.fields(cls) if f.init and docs.get(f.name)}


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return UNSET


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) != len(typing.get_args(tp)):
            return (args[0] if len(args) == 1 else typing.Union[tuple(args)]), True
    return tp, False


def _scalar(tp: Any) -> Callable[[Any], Any]:
    """Text (or a YAML scalar) -> a value of the simple type ``tp``."""
    if tp is bool:
        def parse_bool(text: Any) -> bool:
            if isinstance(text, bool):
                return text
            s = str(text).strip().lower()
            if s in ("true", "yes", "1", "on"):
                return True
            if s in ("false", "no", "0", "off"):
                return False
            raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
        return parse_bool
    if tp in (int, float, str):
        def parse(text: Any) -> Any:
            try:
                return tp(text)
            except (TypeError, ValueError):
                raise argparse.ArgumentTypeError(f"expected {tp.__name__}, got {text!r}") from None
        parse.__name__ = tp.__name__
        return parse
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return lambda text: text if isinstance(text, tp) else tp(text)
    if typing.get_origin(tp) is typing.Literal:
        kinds = {type(a) for a in typing.get_args(tp)}
        return _scalar(kinds.pop()) if len(kinds) == 1 else str
    import yaml

    def parse_yaml(text: Any) -> Any:  # anything else: a YAML value (e.g. a dict)
        return yaml.safe_load(text) if isinstance(text, str) else text
    return parse_yaml


def _sequence(tp: Any) -> Optional[Callable[[Any], Any]]:
    """Parser of a tuple/list annotation from ``"a,b,c"`` (or a YAML list); None if ``tp`` is not one."""
    origin = typing.get_origin(tp) or tp
    if origin not in (tuple, list):
        return None
    args = typing.get_args(tp)
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis or origin is list:
        elems: Optional[list] = None
        one = _scalar(args[0] if args else str)
    else:
        elems = [_scalar(a) for a in args] if args else None
        one = _scalar(str)

    def parse(text: Any) -> Any:
        items = list(text) if isinstance(text, (list, tuple)) else [t.strip() for t in str(text).split(",")
                                                                     if t.strip()]
        if elems is not None:
            if len(items) != len(elems):
                raise argparse.ArgumentTypeError(f"expected {len(elems)} comma-separated values, got {text!r}")
            vals = [p(x) for p, x in zip(elems, items)]
        else:
            vals = [one(x) for x in items]
        return tuple(vals) if origin is tuple else vals

    parse.accepts_list = True  # type: ignore[attr-defined]  # a YAML list is one value
    parse.__name__ = "list"
    return parse


def _flag_kwargs(tp: Any, optional: bool, zero_is_none: bool) -> dict[str, Any]:
    if tp is bool:
        return {"action": argparse.BooleanOptionalAction}
    conv = _sequence(tp) or _scalar(tp)
    choices: Optional[list] = None
    if typing.get_origin(tp) is typing.Literal:
        choices = list(typing.get_args(tp))
    elif isinstance(tp, type) and issubclass(tp, enum.Enum):
        choices = list(tp)
    if optional or zero_is_none:
        inner = conv

        def conv(text: Any) -> Any:  # noqa: F811 - "none" (or 0 where that means off) is None
            if text is None or str(text).strip().lower() in ("none", "null", "") or \
                    (zero_is_none and str(text).strip() == "0"):
                return None
            return inner(text)
        conv.__name__ = getattr(inner, "__name__", "value")
        conv.accepts_list = getattr(inner, "accepts_list", False)  # type: ignore[attr-defined]
        if choices is not None:
            choices = choices + [None]
    kw: dict[str, Any] = {"type": conv}
    if choices is not None:
        kw["choices"] = choices
        kw["metavar"] = "{" + ",".join("none" if c is None else str(getattr(c, "value", c)) for c in choices) + "}"
    return kw


def _show(v: Any) -> str:
    if v is None:
        return "none"
    if isinstance(v, enum.Enum):
        return str(v.value)
    if isinstance(v, (tuple, list)):
        return ",".join(_show(x) for x in v)
    return str(v)


class _AliasAction(argparse.Action):
    """An older flag: tells the user the new name (stderr, once per run) and sets the new fields' dests."""

    def __init__(self, option_strings: list[str], dest: str, targets: tuple[str, ...] = (), new: str = "",
                 const: Any = UNSET, **kw: Any) -> None:
        self.targets, self.new, self.fixed = targets, new, const
        super().__init__(option_strings, dest, nargs=0 if const is not UNSET else None, **kw)

    def __call__(self, parser: argparse.ArgumentParser, ns: argparse.Namespace, values: Any,
                 option_string: Optional[str] = None) -> None:
        print(f"thrifty: {option_string} is deprecated and goes in the next release; use {self.new}",
              file=sys.stderr)
        for d in self.targets:
            setattr(ns, d, self.fixed if self.fixed is not UNSET else values)


def groups_of(obj: argparse.ArgumentParser | argparse.Namespace) -> list[ConfigGroup]:
    """The config groups registered on a parser (or recorded in its parsed arguments)."""
    if isinstance(obj, argparse.Namespace):
        return list(getattr(obj, "_config_groups", None) or [])
    if not hasattr(obj, "_config_groups"):
        obj._config_groups = []  # type: ignore[attr-defined]
        obj.set_defaults(_config_groups=obj._config_groups)  # type: ignore[attr-defined]
    return obj._config_groups  # type: ignore[attr-defined]


def config_dests(obj: argparse.ArgumentParser | argparse.Namespace) -> set[str]:
    """Every argparse dest that a generated config flag writes (not the hand-written ones a config shares)."""
    return {g.dests[k] for g in groups_of(obj) for k in g.generated}


def add_config_flags(parser: argparse.ArgumentParser, name: str, *classes: type[Config], prefix: str = "",
                     skip: Iterable[str] = (), aliases: Mapping[str, Alias] | None = None,
                     dests: Mapping[str, str] | None = None,
                     zero_is_none: Iterable[str] = (), on_load: Optional[Callable[[Config], dict[str, Any]]] = None,
                     title: Optional[str] = None) -> ConfigGroup:
    """Add one flag per field of ``classes`` (their union, for a choice of configs such as merge methods).

    A field whose dest the parser already has (a hand-written option, e.g. ``--seed``) is read from it;
    ``skip`` fields are the command's business (not flags); ``dests`` maps a field to a hand-written
    option's dest (``{"method": "data_free"}``: ``--data-free`` is Synth's method); ``aliases`` keeps older
    flag names for one release; ``zero_is_none`` fields also take ``0`` for None (an older "0 = off" convention);
    ``on_load(cfg)`` gives the other dests a config file sets along with the fields (e.g. which method).
    """
    if not classes:
        raise TypeError("add_config_flags needs at least one config class")
    skip, zero = set(skip), set(zero_is_none)
    container = parser.add_argument_group(title) if title else parser
    taken = {a.dest for a in parser._actions}
    group = ConfigGroup(name, tuple(classes), prefix, {}, {}, on_load=on_load)
    _add_fields(parser, container, group, [(c.__name__, c, UNSET) for c in classes], prefix, "", skip, zero, taken,
                dict(dests or {}))
    aliases = {**_moved_aliases(parser, group, prefix), **(aliases or {})}
    for old, alias in aliases.items():
        targets = tuple(group.dests[f] for f in alias.fields)
        neg = alias.const is False  # an old "--x-no-y" store-true flag is the new "--no-x-y"
        new = " and ".join(("--no-" + group.flag(f)[2:]) if neg else group.flag(f) for f in alias.fields)
        first = next(a for a in parser._actions if a.dest == targets[0])
        kw = {} if alias.const is not UNSET else {"type": first.type, "choices": first.choices,
                                                  "metavar": first.metavar}
        container.add_argument(old, action=_AliasAction, dest=targets[0], targets=targets, new=new,
                               const=alias.const, default=UNSET, help=f"deprecated: use {new}", **kw)
    groups_of(parser).append(group)
    return group


def _moved_aliases(parser: argparse.ArgumentParser, group: ConfigGroup, prefix: str) -> dict[str, Alias]:
    """The flags of fields that moved into a nested config (``--lr`` -> ``--optim.lr``), kept for one release."""
    have = {s for a in parser._actions for s in a.option_strings}
    out: dict[str, Alias] = {}
    for cls in group.classes:
        for old, new in cls.moved_fields.items():
            flag = "--" + prefix + old.replace("_", "-")
            if new in group.generated and flag not in have:
                out[flag] = Alias((new,))
    return out


def _add_fields(parser: argparse.ArgumentParser, container: Any, group: ConfigGroup,
                classes: Iterable[tuple[str, type, Any]], prefix: str, path: str, skip: set, zero: set, taken: set,
                renamed: dict[str, str]) -> None:
    """``classes``: (owner's name, class, the owner's value of it: a nested config's default, or UNSET at the top)."""
    seen: dict[str, list[tuple[type, dataclasses.Field, str, Any]]] = {}
    for label, cls, base in classes:
        for f in dataclasses.fields(cls):
            if f.init and (path + f.name) not in skip:
                dflt = _default(f) if base is UNSET else getattr(base, f.name)
                seen.setdefault(f.name, []).append((cls, f, label, dflt))
    for fname, owners in seen.items():
        key = path + fname
        dest = renamed.get(key) or (prefix + key).replace("-", "_")
        flag = "--" + prefix + key.replace("_", "-")
        if dest in taken:  # a hand-written option holds this field
            flag = next((a.option_strings[0] for a in parser._actions if a.dest == dest and a.option_strings), flag)
        group.dests[key], group.flags[key] = dest, flag
        if dest in taken:
            continue
        cls0 = owners[0][0]
        tp, optional = _strip_optional(typing.get_type_hints(cls0)[fname])
        if isinstance(tp, type) and issubclass(tp, Config) and dataclasses.is_dataclass(tp):
            del group.dests[key], group.flags[key]
            # each owner's own default for the nested config (FSMerge's optim.lr differs from DistillMerge's)
            inner = [(label, tp, d if isinstance(d, tp) else UNSET) for _, _, label, d in owners]
            _add_fields(parser, container, group, inner, prefix, key + ".", skip, zero, taken, renamed)
            continue
        helps = [field_docs(c).get(fname, "") for c, *_ in owners]
        text = next((h for h in helps if h), "").replace("``", "")  # reST literals read as plain words in --help
        defaults = {label: d for _, _, label, d in owners}
        if len(set(map(_show, defaults.values()))) == 1:
            dflt = f"default: {_show(next(iter(defaults.values())))}"
        else:
            dflt = "default: " + ", ".join(f"{k} {_show(v)}" for k, v in defaults.items())
        if len(owners) < len(group.classes):
            dflt += "; only " + ", ".join(defaults)
        kw = _flag_kwargs(tp, optional, key in zero)
        if key in zero:
            dflt += "; 0 or none: off"
        container.add_argument(flag, dest=dest, default=UNSET, help=f"{text} ({dflt})".replace("%", "%%"), **kw)
        taken.add(dest)
        group.generated.add(key)


def _group(args: argparse.Namespace | argparse.ArgumentParser, name: str) -> ConfigGroup:
    for g in groups_of(args):
        if g.name == name:
            return g
    raise ValueError(f"no config flags named {name!r}; known: {[g.name for g in groups_of(args)]}")


def _values(args: argparse.Namespace, group: ConfigGroup, cls: type, base: Any, path: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        key = path + f.name
        tp, _ = _strip_optional(hints[f.name])
        if key not in group.dests and isinstance(tp, type) and issubclass(tp, Config):
            # flags left out keep the outer config's value (its default for it, not the nested class's)
            inner_base = getattr(base, f.name) if base is not None else _default(f)
            sub = _values(args, group, tp, None if inner_base is UNSET else inner_base, key + ".")
            if sub:
                out[f.name] = tp(**{**_init_fields(inner_base), **sub}) if inner_base not in (UNSET, None) else tp(**sub)
            continue
        v = getattr(args, group.dests[key], UNSET) if key in group.dests else UNSET
        if v is not UNSET:
            out[f.name] = v
    return out


def _init_fields(cfg: Any) -> dict[str, Any]:
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.init}


def config_from_args(args: argparse.Namespace, name: str, cls: Optional[type[Config]] = None,
                     base: Optional[Config] = None) -> Config:
    """The config of group ``name``: flags given (or set by a config file) over ``base`` (default ``cls()``).

    ``cls`` picks one class of a multi-class group (e.g. the merge method); a flag given that ``cls`` has no
    field for is an error naming it; a validation error names the flags of the fields it mentions.
    """
    group = _group(args, name)
    cls = cls or group.classes[0]
    if cls not in group.classes:
        raise TypeError(f"{name}: {cls.__name__} is not one of {[c.__name__ for c in group.classes]}")
    own = {f.name for f in dataclasses.fields(cls) if f.init}
    # a hand-written option (e.g. --seed) is shared with the command; only generated flags can be stray
    stray = changed_flags(args, name, [k for k in group.generated if k.split(".")[0] not in own])
    if stray:
        raise ValueError(f"{', '.join(stray)} do(es) not apply to {cls.__name__}")
    try:
        values = _values(args, group, cls, base)
        return dataclasses.replace(base, **values) if base is not None else cls(**values)
    except (ValueError, TypeError) as e:
        named = [group.flag(k) for k in group.dests if re.search(rf"\b{re.escape(k.split('.')[-1])}\b", str(e))]
        raise type(e)(f"{' / '.join(named) or cls.__name__}: {e}") from None


def _field_default(cls: type, key: str) -> Any:
    head, _, rest = key.partition(".")
    f = next((f for f in dataclasses.fields(cls) if f.name == head), None)
    value = UNSET if f is None else _default(f)
    for part in rest.split(".") if rest else ():
        value = getattr(value, part, UNSET)
    return value


def changed_flags(args: argparse.Namespace, name: str, fields: Optional[Iterable[str]] = None) -> list[str]:
    """The generated flags of group ``name`` (or of its ``fields``) given, or set by a config file, with a value
    other than the field's default: what a command refuses when the config is off (the flags would be ignored).

    A value equal to the default changes nothing (older flat config files list every option).
    """
    group = _group(args, name)
    out = []
    for key in sorted(group.generated if fields is None else fields):
        value = getattr(args, group.dests[key], UNSET)
        defaults = [d for d in (_field_default(c, key) for c in group.classes) if d is not UNSET]
        if value is not UNSET and any(value != d for d in defaults):
            out.append(group.flag(key))
    return out


def config_defaults(parser: argparse.ArgumentParser, cfg: Config, where: str) -> dict[str, Any]:
    """Parser defaults that make ``cfg`` what the flags build (for ``--config``): its fields, plus ``on_load``.

    ``where`` (file and key) is named in the error when no group of the command takes ``cfg``'s kind.
    """
    for g in groups_of(parser):
        if type(cfg) in g.classes:
            out = {g.dests[k]: v for k, v in _flat_fields(cfg).items() if k in g.dests}
            return {**out, **(g.on_load(cfg) if g.on_load else {})}
    takes = sorted({c.__name__ for g in groups_of(parser) for c in g.classes})
    raise ValueError(f"{where}: this command takes no {type(cfg).__name__} config (it takes "
                     f"{', '.join(takes) or 'none'})")


def _flat_fields(cfg: Config, path: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in _init_fields(cfg).items():
        if isinstance(v, Config):
            out.update(_flat_fields(v, path + k + "."))
        out[path + k] = v
    return out


def config_argv(parser: argparse.ArgumentParser, cfg: Config) -> list[str]:
    """The flags that make the command build ``cfg`` (inverse of :func:`config_from_args`)."""
    defaults = config_defaults(parser, cfg, type(cfg).__name__)
    by_dest = {a.dest: a for a in parser._actions if a.option_strings and not isinstance(a, _AliasAction)}
    argv: list[str] = []
    for dest, v in defaults.items():
        a = by_dest.get(dest)
        if a is None:
            continue
        opt = a.option_strings[0]
        if isinstance(a, argparse.BooleanOptionalAction):
            if v is not None:
                argv.append(opt if v else "--no-" + opt[2:])
        elif isinstance(a, argparse._StoreTrueAction):
            if v:
                argv.append(opt)
        elif isinstance(a, argparse._StoreFalseAction):
            if not v:
                argv.append(opt)
        elif a.nargs in ("+", "*"):
            argv += [opt, *map(_show, v)]
        else:
            argv += [opt, _show(v)]
    return argv
