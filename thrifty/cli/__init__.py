"""The ``thrifty`` command line. Subcommands are discovered, not listed.

Every module ``thrifty/cli/<cmd>.py`` (not starting with ``_``) that defines ``register(subparsers)`` is a
subcommand: ``register`` adds its parser with ``subparsers.add_parser(...)``, its arguments, and
``parser.set_defaults(func=run)`` where ``run(args) -> int | None``. Adding a command never edits this file.
Every subcommand parser also gets ``--config file.yaml`` (defaults from YAML; explicit flags win).

Bad input (thrifty's ValueError/TypeError, a missing file) ends as one line
``thrifty <cmd>: error: ...`` with exit code 2; ``--debug`` or ``THRIFTY_DEBUG=1`` shows the traceback.
Ctrl-C exits with 130 (``train`` first saves a checkpoint of the steps done).

Example (``main(["demo", "--quick"])`` runs what ``thrifty demo --quick`` runs):
    >>> args = build_parser().parse_args(["demo", "--quick"])
    >>> args.command, args.quick
    ('demo', True)
"""
from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys
from typing import Sequence

from thrifty.cli import _common

__all__ = ["main", "build_parser"]

# errors that describe the user's input or files; anything else is a bug and keeps its traceback
_USER_ERRORS = (ValueError, TypeError, FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError,
                FloatingPointError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="thrifty", description="Efficient deep learning toolkit (thrifty).")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors (or THRIFTY_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        mod = importlib.import_module(f"{__name__}.{info.name}")
        register = getattr(mod, "register", None)
        if callable(register):
            before = set(sub.choices)
            register(sub)
            for name in set(sub.choices) - before:
                _common.add_config_option(sub.choices[name])
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``thrifty`` console script; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    cmd = _common.command_of(parser, argv)
    debug = "--debug" in argv[:argv.index(cmd) if cmd else len(argv)] or \
        os.environ.get("THRIFTY_DEBUG", "") not in ("", "0")
    try:
        args = _common.parse_with_config(parser, argv)  # a --config file is read first: a bad one is a user error
    except _USER_ERRORS as e:
        if debug:
            raise
        print(f"thrifty {cmd}: error: {e}", file=sys.stderr)
        return 2
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        rc = args.func(args)
    except _USER_ERRORS as e:
        if debug:
            raise
        print(f"thrifty {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print(f"thrifty {args.command}: interrupted" + (f": {e}" if str(e) else ""), file=sys.stderr)
        return 130
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
