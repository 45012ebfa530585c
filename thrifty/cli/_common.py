"""Shared CLI helpers: ``--config`` YAML defaults, the resolved config written next to outputs, progress.

``--config file.yaml`` holds what ``thrifty.to_yaml(cfg)`` writes (one config, or a list or mapping of
them) and/or option names (``batch_size`` or ``batch-size``) with values; they become the subcommand's
defaults, so flags given explicitly on the command line still win. An unknown kind, field or key is an
error naming it and the file. The ``config.yaml`` that commands write next to their outputs
(``write_resolved_config``) can be fed back with ``--config`` to repeat a run.

Example:
    >>> p = argparse.ArgumentParser(); _ = p.add_argument("--lr", type=float, default=0.1)
    >>> resolved(p.parse_args(["--lr", "0.5"]))
    {'lr': 0.5}
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import yaml
from tqdm.auto import tqdm

from thrifty import utils
from thrifty.utils import atomic_write_text, plain_data

__all__ = ["add_config_option", "parse_with_config", "command_of", "resolved", "write_resolved_config", "show_progress",
           "progress", "step", "int_list", "positive_int", "nonneg_int", "add_overwrite_option", "check_out_dir",
           "check_model_data", "INTERNAL_KEYS", "resolve_model", "load_model_arg", "provenance",
           "announce_baseline"]

# argparse destinations that are plumbing, not configuration
INTERNAL_KEYS = {"func", "command", "config", "debug", "_parser", "overwrite"}
# permission to replace files: only an explicit flag gives it, never a config file (nor a repeated run's config)
_FLAG_ONLY = {"overwrite"}


def add_config_option(parser: argparse.ArgumentParser) -> None:
    """Give a subcommand parser ``--config FILE.yaml`` (idempotent)."""
    if any(a.dest == "config" for a in parser._actions):
        return
    parser.add_argument("--config", metavar="FILE.yaml", default=None,
                        help="YAML defaults: what thrifty.to_yaml(cfg) writes (one config, or a list or mapping "
                             "of them), option names with values, or the config.yaml of an earlier run; "
                             "explicit flags override it")


def _subparser(root: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    for action in root._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices[command]
    raise ValueError(f"no subcommand {command!r}")


def _is_config(value: Any) -> bool:
    return isinstance(value, dict) and "kind" in value


def load_config_file(path: str | os.PathLike, parser: argparse.ArgumentParser, command: str = "") -> dict[str, Any]:
    """Read a ``--config`` YAML file into the parser's defaults (dest -> value).

    The file holds ``thrifty.to_yaml`` output (a mapping with ``kind``), a list of those, or a mapping whose
    values are those (config roles, e.g. ``train: {kind: TrainConfig, ...}``) or option values (``lr: 0.1``).
    """
    from thrifty.cli._fields import UNSET, _AliasAction, config_defaults, config_dests
    from thrifty.core.config import from_dict

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"config file {p} is not valid YAML: {e}") from None
    if _is_config(data):
        configs, flat = [("kind", data)], {}
    elif isinstance(data, list) and all(_is_config(x) for x in data):
        configs, flat = [(f"item {i}", x) for i, x in enumerate(data)], {}
    elif isinstance(data, dict):
        configs = [(k, v) for k, v in data.items() if _is_config(v)]
        flat = {k: v for k, v in data.items() if not _is_config(v)}
    else:
        raise ValueError(f"config file {p} must hold a config (a mapping with 'kind'), a list of configs or a "
                         f"mapping of option names to values, got {type(data).__name__}")
    actions = {a.dest: a for a in parser._actions if a.dest not in ("help", argparse.SUPPRESS)
               and a.dest not in INTERNAL_KEYS and not isinstance(a, _AliasAction)}
    by_flag = {s.lstrip("-").replace("-", "_"): a for a in parser._actions for s in a.option_strings}
    generated = config_dests(parser)
    out: dict[str, Any] = {}
    for key, value in flat.items():
        dest = str(key).replace("-", "_")
        if dest in _FLAG_ONLY:
            raise ValueError(f"key {key!r} in config file {p}: give --{dest} on the command line, not in a config "
                             "file")
        if dest in INTERNAL_KEYS:
            continue
        action = actions.get(dest) or by_flag.get(dest)
        if action is None:
            raise ValueError(f"unknown key {key!r} in config file {p} for `thrifty {command}`; "
                             f"known keys: {', '.join(sorted(actions))}")
        where = f"key {key!r} in config file {p}"
        if value is None and (action.dest in generated or isinstance(action, _AliasAction)):
            continue  # null: the field's default (older flat files wrote unset options as null)
        if isinstance(action, _AliasAction):  # an older option name: sets the fields it stood for
            if action.fixed is not UNSET and not isinstance(value, bool):
                raise ValueError(f"{where} must be true or false, got {value!r}")
            if action.fixed is UNSET or value:
                out.update(dict.fromkeys(action.targets, _coerce(action, value, where) if action.fixed is UNSET
                                         else action.fixed))
            continue
        out[dest if dest in actions else action.dest] = _coerce(action, value, where)
    for key, d in configs:
        where = f"config file {p}, key {key!r}"
        try:
            cfg = from_dict(d)
        except (ValueError, TypeError) as e:
            raise type(e)(f"{where}: {e}") from None
        out.update(config_defaults(parser, cfg, where))
    return out


def _coerce(action: argparse.Action, value: Any, where: str) -> Any:
    """Check and convert one YAML value as the command line would; errors name ``where`` (file and key).

    argparse converts only string defaults and never checks them against ``choices``, so YAML values
    would otherwise bypass every check a flag gets (``quick: "no"`` would be truthy)."""
    if value is None:
        return None
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse.BooleanOptionalAction)):
        if not isinstance(value, bool):
            raise ValueError(f"{where} must be true or false, got {value!r}")
        return value
    many = action.nargs in ("+", "*") or isinstance(action, argparse._AppendAction)
    if many:
        items = value if isinstance(value, list) else [value]
        return [_coerce_one(action, v, where) for v in items]
    return _coerce_one(action, value, where)


def _coerce_one(action: argparse.Action, value: Any, where: str) -> Any:
    takes_list = getattr(action.type, "accepts_list", False)  # e.g. int_list: a YAML list is one value
    if isinstance(value, (list, dict)) and not (takes_list and isinstance(value, list)):
        raise ValueError(f"{where} must be a single value, got {type(value).__name__} {value!r}")
    if isinstance(value, bool) and action.type is not None:
        raise ValueError(f"{where} must be {getattr(action.type, '__name__', 'a value')}, got {value!r}")
    if action.type is not None:
        try:
            # through str, as on the command line: int(2.5) would silently truncate, int("2.5") refuses
            value = action.type(value if isinstance(value, (str, list)) else str(value))
        except (ValueError, TypeError, argparse.ArgumentTypeError) as e:
            raise ValueError(f"{where}: invalid {getattr(action.type, '__name__', 'value')} value {value!r} "
                             f"({e})") from None
    if action.choices is not None and value not in action.choices:
        raise ValueError(f"{where} must be one of {', '.join(map(str, action.choices))}, got {value!r}")
    return value


def command_of(root: argparse.ArgumentParser, argv: list[str]) -> str | None:
    """The subcommand named in ``argv`` (the first word that is one: the root parser's options take no value)."""
    for action in root._actions:
        if isinstance(action, argparse._SubParsersAction):
            return next((a for a in argv if a in action.choices), None)
    return None


def parse_with_config(root: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Parse ``argv``, with the ``--config`` file's values as the subcommand's defaults (explicit flags win).

    The file is read first, so it may also hold the options a command requires (``model:`` of the
    ``config.yaml`` an earlier run wrote).
    """
    argv = list(argv)
    command = command_of(root, argv)
    if command is not None:
        pre = argparse.ArgumentParser(add_help=False)
        pre.add_argument("--config", default=None)
        path = pre.parse_known_args(argv[argv.index(command) + 1:])[0].config
        if path:
            sub = _subparser(root, command)
            defaults = load_config_file(path, sub, command)
            sub.set_defaults(**defaults)
            for action in sub._actions:
                if action.dest in defaults:
                    action.required = False
    return root.parse_args(argv)


def resolved(args: argparse.Namespace | dict[str, Any]) -> dict[str, Any]:
    """The configuration part of parsed arguments, as plain YAML-able data (generated config flags are left
    to the configs they build, see :func:`write_resolved_config`)."""
    from thrifty.cli._fields import config_dests

    d = vars(args) if isinstance(args, argparse.Namespace) else dict(args)
    skip = config_dests(args) if isinstance(args, argparse.Namespace) else set()
    return {k: plain_data(v) for k, v in d.items() if k not in INTERNAL_KEYS and not k.startswith("_")
            and k not in skip}


def write_resolved_config(outdir: str | os.PathLike, config: argparse.Namespace | dict[str, Any],
                          name: str = "config.yaml", configs: dict[str, Any] | None = None) -> Path:
    """Atomically write the resolved run to ``outdir/config.yaml``; returns the path.

    The options (``model: ...``) come first, then each config the command built under its role
    (``ptq: {kind: PTQ, ...}``): the file ``--config`` reads back to repeat the run.
    """
    from thrifty.core.config import to_dict

    data = {**resolved(config), **{k: to_dict(c) for k, c in (configs or {}).items() if c is not None}}
    return atomic_write_text(Path(outdir) / name, yaml.safe_dump(data, sort_keys=False))


def show_progress() -> bool:
    """Progress bars on a terminal; ``THRIFTY_PROGRESS=1`` forces them on, ``=0`` off (see thrifty.utils)."""
    return utils.show_progress()


def progress(iterable: Iterable[Any], desc: str, total: int | None = None, **kw: Any) -> Iterator[Any]:
    """tqdm over ``iterable`` when progress is shown, else the plain iterable."""
    return iter(tqdm(iterable, desc=desc, total=total, disable=not show_progress(), leave=False, **kw))


@contextlib.contextmanager
def step(message: str, quiet: bool = False) -> Iterator[None]:
    """Print ``message ...`` then ``done (X s)`` around a block (stderr)."""
    t0 = time.perf_counter()
    if not quiet:
        print(f"{message} ...", file=sys.stderr, flush=True)
    yield
    if not quiet:
        print(f"  done ({time.perf_counter() - t0:.1f} s)", file=sys.stderr, flush=True)


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    return _bounded_int(text, 1)


def nonneg_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    return _bounded_int(text, 0)


def _bounded_int(text: str, low: int) -> int:
    try:
        v = int(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if v < low:
        raise argparse.ArgumentTypeError(f"must be >= {low}, got {v}")
    return v


def add_overwrite_option(parser: argparse.ArgumentParser) -> None:
    """``--overwrite``: allow writing into an existing non-empty ``--out`` folder."""
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the outputs in an existing non-empty --out folder (refused otherwise)")


def check_out_dir(out: str | os.PathLike, overwrite: bool, hint: str = "") -> Path:
    """Refuse, before any work, to write into an existing non-empty folder unless ``overwrite``."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a folder")
    if not overwrite and out.is_dir() and any(out.iterdir()):
        raise ValueError(f"--out {out} already exists and is not empty; pass --overwrite to replace its "
                         f"outputs{hint} or choose another --out")
    return out


def check_model_data(model: Any, splits: Any, model_name: str, dataset: str, option: str = "--dataset",
                     shape_hint: Callable[[], str] | None = None) -> None:
    """A clear error, before any work, when the model cannot take the dataset: NaN/Inf weights, an input
    shape it refuses, or labels beyond its outputs (these would otherwise surface deep inside as
    IndexError/RuntimeError, or as a NaN loss with exit code 0)."""
    import torch

    from thrifty.train.loop import check_finite, check_finite_data

    try:
        check_finite(model)
    except ValueError as e:
        raise ValueError(f"model {model_name}: {e}") from None
    if splits.train_texts is not None:  # inputs are indices into texts, fed to the model by its tokenizer
        return
    check_finite_data(splits.train, f"{option} {dataset} (train split)")
    check_finite_data(splits.test, f"{option} {dataset} (test split)")
    x = splits.test.tensors[0][:2]
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(x)
    except (RuntimeError, ValueError, IndexError) as e:
        hint = shape_hint() if shape_hint is not None else ""
        raise ValueError(f"model {model_name} cannot take {option} {dataset} (input shape "
                         f"{tuple(x.shape[1:])}): {str(e).splitlines()[0]}{hint}") from None
    finally:
        model.train(was)
    top = int(max(int(splits.train.tensors[-1].max()), int(splits.test.tensors[-1].max())))
    if out.dim() == 2 and top >= out.shape[1]:
        raise ValueError(f"{option} {dataset} has labels up to {top}, but model {model_name} has "
                         f"{out.shape[1]} outputs (labels must be < num_classes)")


def int_list(text: str | list | tuple) -> list[int]:
    """Parse ``"16,24,32"`` (or a YAML list) into [16, 24, 32]."""
    if isinstance(text, (list, tuple)):
        return [int(x) for x in text]
    try:
        return [int(t) for t in str(text).split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


int_list.accepts_list = True  # type: ignore[attr-defined]


def resolve_model(spec: str | os.PathLike, dataset: str | None = None, seed: int = 0, *, option: str = "--model",
                  command: str = "") -> tuple[Any, dict[str, Any], str | None]:
    """The one reading of a model argument: a saved model (stem, ``.safetensors``/``.yaml`` file or run folder)
    or a registry name (its cached pretrained baseline on ``dataset``, trained first if not cached, announced).

    Returns ``(model, meta, dataset)``; ``meta["path"]`` is the weights file read. Errors name ``option``.
    """
    from thrifty.core.saved import model_paths, resolve_model_path
    from thrifty.models import list_models
    from thrifty.train import load_model, pretrained

    text = os.fspath(spec)
    p = Path(text)
    if p.is_dir() or any(f.is_file() for f in model_paths(p)):
        stem = resolve_model_path(p)
        model, meta = load_model(stem)
        meta["path"] = str(model_paths(stem)[0])
        return model, meta, dataset or meta.get("dataset")
    if text not in list_models():
        raise FileNotFoundError(f"saved model file not found: {model_paths(p)[0]} ({option} {text!r} is neither a "
                                f"saved model, a run folder nor a registry name: {', '.join(list_models())})")
    if not dataset:
        raise ValueError(f"{option} {text} is a registry name: give --dataset (which pretrained baseline to use), "
                         "or pass a saved model (a .safetensors file or a run folder)")
    announce_baseline(text, dataset, seed, option=option, command=command)
    model, meta = pretrained(text, dataset, seed=seed, return_meta=True, progress=show_progress())
    return model, meta, dataset


def announce_baseline(name: str, dataset: str, seed: int = 0, *, option: str = "--model", command: str = "") -> bool:
    """Say (stderr, one line) that registry model ``name`` is about to be trained on ``dataset`` because its
    pretrained baseline is not cached, and how to avoid it; returns whether it was said."""
    from thrifty.train import pretrained_cached, recipe

    if pretrained_cached(name, dataset, seed=seed):
        return False
    cfg = recipe(name, dataset)[1]
    length = f"{cfg.optim.steps} steps" if cfg.optim.steps else f"{cfg.epochs:g} epochs"
    print(f"thrifty {command}: {option} {name} names an architecture, not trained weights: training its "
          f"{dataset} baseline first ({length}, seed {seed}; cached for later runs). To skip this, pass a "
          f"trained model instead, e.g. {option} runs/<name> from `thrifty train --model {name} --dataset "
          f"{dataset} --out runs/<name>`.", file=sys.stderr, flush=True)
    return True


def load_model_arg(args: argparse.Namespace) -> tuple:
    """``--model`` of a command (see :func:`resolve_model`) -> ``(model, meta, dataset)``."""
    return resolve_model(args.model, args.dataset, args.seed, command=getattr(args, "command", "") or "")


def provenance(args: argparse.Namespace, meta: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    """What a command records about how it made a saved model: the command and the model it started from."""
    out: dict[str, Any] = {"command": f"thrifty {getattr(args, 'command', '') or ''}".strip()}
    if meta and meta.get("path"):
        out["parent"] = str(meta["path"])
    return {**out, **extra}
