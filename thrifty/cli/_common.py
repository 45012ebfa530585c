"""Shared CLI helpers: ``--config`` YAML defaults, the resolved config written next to outputs, progress.

``--config file.yaml`` holds a mapping of option names (``batch_size`` or ``batch-size``) to values; they
become the subcommand's defaults, so flags given explicitly on the command line still win. An unknown key
is an error naming the key and the file. The ``config.yaml`` that commands write next to their outputs
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
from typing import Any, Iterable, Iterator

import yaml
from tqdm.auto import tqdm

from thrifty import utils
from thrifty.utils import atomic_write_text, plain_data

__all__ = ["add_config_option", "apply_config_file", "resolved", "write_resolved_config", "show_progress",
           "progress", "step", "int_list", "INTERNAL_KEYS"]

# argparse destinations that are plumbing, not configuration
INTERNAL_KEYS = {"func", "command", "config", "debug", "_parser"}


def add_config_option(parser: argparse.ArgumentParser) -> None:
    """Give a subcommand parser ``--config FILE.yaml`` (idempotent)."""
    if any(a.dest == "config" for a in parser._actions):
        return
    parser.add_argument("--config", metavar="FILE.yaml", default=None,
                        help="YAML file of option defaults (keys are option names); explicit flags override it")


def _subparser(root: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    for action in root._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices[command]
    raise ValueError(f"no subcommand {command!r}")


def load_config_file(path: str | os.PathLike, parser: argparse.ArgumentParser, command: str = "") -> dict[str, Any]:
    """Read a ``--config`` YAML file and map its keys to the parser's option destinations."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"config file {p} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"config file {p} must hold a mapping of option names to values, got {type(data).__name__}")
    dests = {a.dest for a in parser._actions if a.dest not in ("help", argparse.SUPPRESS)} - INTERNAL_KEYS
    out: dict[str, Any] = {}
    for key, value in data.items():
        dest = str(key).replace("-", "_")
        if dest in INTERNAL_KEYS:
            continue
        if dest not in dests:
            raise ValueError(f"unknown key {key!r} in config file {p} for `thrifty {command}`; "
                             f"known keys: {', '.join(sorted(dests))}")
        out[dest] = value
    return out


def apply_config_file(root: argparse.ArgumentParser, args: argparse.Namespace, argv: list[str]) -> argparse.Namespace:
    """Re-parse ``argv`` with the YAML file's values as defaults (so explicit flags override them)."""
    if not getattr(args, "config", None):
        return args
    sub = _subparser(root, args.command)
    sub.set_defaults(**load_config_file(args.config, sub, args.command))
    return root.parse_args(argv)


def resolved(args: argparse.Namespace | dict[str, Any]) -> dict[str, Any]:
    """The configuration part of parsed arguments, as plain YAML-able data."""
    d = vars(args) if isinstance(args, argparse.Namespace) else dict(args)
    return {k: plain_data(v) for k, v in d.items() if k not in INTERNAL_KEYS and not k.startswith("_")}


def write_resolved_config(outdir: str | os.PathLike, config: argparse.Namespace | dict[str, Any],
                          name: str = "config.yaml") -> Path:
    """Atomically write the resolved configuration to ``outdir/config.yaml``; returns the path."""
    return atomic_write_text(Path(outdir) / name, yaml.safe_dump(resolved(config), sort_keys=False))


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


def int_list(text: str | list | tuple) -> list[int]:
    """Parse ``"16,24,32"`` (or a YAML list) into [16, 24, 32]."""
    if isinstance(text, (list, tuple)):
        return [int(x) for x in text]
    try:
        return [int(t) for t in str(text).split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def load_model_arg(args: argparse.Namespace) -> tuple:
    """``--model``: a saved model (stem or path) or a registry name (its cached pretrained baseline on ``--dataset``).

    Returns ``(model, meta, dataset)``; errors name the argument.
    """
    from thrifty.models import list_models
    from thrifty.train import load_model, pretrained
    from thrifty.train.io import model_paths

    wpath, ypath = model_paths(args.model)
    if wpath.is_file() or ypath.is_file():
        model, meta = load_model(args.model)
        return model, meta, args.dataset or meta.get("dataset")
    if args.model not in list_models():
        raise FileNotFoundError(f"--model {args.model!r} is neither a saved model ({wpath}) nor a registry name "
                                f"({', '.join(list_models())})")
    if not args.dataset:
        raise ValueError("--dataset is required with a registry model name (which pretrained baseline to use)")
    model, meta = pretrained(args.model, args.dataset, seed=args.seed, return_meta=True,
                             progress=show_progress())
    return model, meta, args.dataset
