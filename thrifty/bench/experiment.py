"""The experiment harness: the plumbing every script under ``experiments/`` and ``benchmarks/`` shares, so each
script holds only its science.

:class:`Experiment` gives the standard flags (``--quick``, ``--out DIR``, ``--seed``, ``--threads``,
``--render``), seeds every RNG, sets torch's thread count, names the outputs ``<out>/<name>[_quick].{json,md,png}``,
writes them atomically (the JSON with the environment it ran in: torch, Python, CPU, threads, command line), copies
the script's pre-registered hypotheses into the markdown, and re-renders the markdown from an existing JSON with
``--render`` (so a formatting change never needs a rerun, and never invents numbers). :func:`table` renders rows as
a markdown table with one number formatter, :func:`fmt`.

A script reads nothing it did not get as an argument: a dependency on another script's results is a flag naming
that file (see ``benchmarks/bench_int8.py --ptq-json``).

Example:
    >>> import tempfile, json
    >>> exp = Experiment("demo", "A demo experiment.", hypotheses=["1 + 1 is 2"])
    >>> args = exp.start(["--out", tempfile.mkdtemp(), "--quick"])
    >>> exp.stem
    'demo_quick'
    >>> res = {"rows": [{"case": "a", "value": 1 / 3}]}
    >>> _ = exp.write_json(res)
    >>> sorted(json.loads(exp.path(".json").read_text())["environment"])[:3]
    ['command', 'cpu', 'cpu_capability']
    >>> print(exp.write_markdown("# Demo\\n\\n" + table(res["rows"], digits=3)).read_text())
    # Demo
    <BLANKLINE>
    Pre-registered hypotheses (written in the script before the run):
    <BLANKLINE>
    - 1 + 1 is 2
    <BLANKLINE>
    | case | value |
    |---|---|
    | a | 0.333 |
    <BLANKLINE>
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch

from thrifty.utils import atomic_savefig, atomic_write_text, plain_data, seed_everything

__all__ = ["Experiment", "table", "fmt", "environment"]

HEADER = "Pre-registered hypotheses (written in the script before the run):"


def fmt(v: Any, digits: int = 2, *, percent: bool = False, sign: bool = False) -> str:
    """The one number format of the results tables: ``digits`` decimals for floats, ``-`` for None,
    ``percent`` scales a fraction by 100, ``sign`` writes ``+`` for non-negative numbers.

    Example:
        >>> fmt(0.98144, 2, percent=True), fmt(3, 2), fmt(None), fmt(-0.5, 1, sign=True), fmt(float("nan"))
        ('98.14', '3', '-', '-0.5', 'nan')
    """
    if v is None:
        return "-"
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return str(v)
    if isinstance(v, int) and not percent:
        return f"{v:+d}" if sign else str(v)
    x = 100.0 * v if percent else float(v)
    return f"{x:+.{digits}f}" if sign else f"{x:.{digits}f}"


def table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | Mapping[str, str] | None = None,
          digits: int | Mapping[str, int] = 2, formats: Mapping[str, Callable[[Any], str]] | None = None,
          align: str | None = None) -> str:
    """A markdown table of ``rows`` (dicts). ``columns`` picks the keys (a mapping renames them in the header);
    ``digits`` is the decimals for every column or per key; ``formats`` overrides the cell text per key;
    ``align`` is one letter per column, ``l`` or ``r`` (right-aligned), default all ``l``.

    Example:
        >>> print(table([{"n": 8, "err": 0.01234}, {"n": 32, "err": None}], {"n": "n per chunk", "err": "error"},
        ...             digits={"err": 4}), end="")
        | n per chunk | error |
        |---|---|
        | 8 | 0.0123 |
        | 32 | - |
    """
    if not rows:
        raise ValueError("table: no rows to render")
    keys = list(columns or rows[0])
    names = [columns[k] for k in keys] if isinstance(columns, Mapping) else keys
    formats = formats or {}
    align = align or "l" * len(keys)
    if len(align) != len(keys) or set(align) - {"l", "r"}:
        raise ValueError(f"table: align must be one of 'l'/'r' per column ({len(keys)}), got {align!r}")

    def cell(k: str, v: Any) -> str:
        if k in formats:
            return formats[k](v)
        return fmt(v, digits.get(k, 2) if isinstance(digits, Mapping) else digits)

    lines = ["| " + " | ".join(names) + " |", "|" + "".join("---:|" if a == "r" else "---|" for a in align)]
    lines += ["| " + " | ".join(cell(k, r.get(k)) for k in keys) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(command: str | None = None) -> dict[str, Any]:
    """What a result depends on besides the code: torch and Python versions, CPU, ISA level, threads, command.

    Example:
        >>> sorted(environment("python x.py"))
        ['command', 'cpu', 'cpu_capability', 'cpu_count', 'platform', 'python', 'threads', 'torch']
    """
    get_cap = getattr(torch.backends.cpu, "get_cpu_capability", None)
    return {"command": command if command is not None else _command_line(sys.argv),
            "cpu": _cpu_name(), "cpu_capability": get_cap() if get_cap else None, "cpu_count": os.cpu_count(),
            "platform": platform.platform(), "python": platform.python_version(), "threads": torch.get_num_threads(),
            "torch": torch.__version__}


def _command_line(argv: Sequence[str]) -> str:
    script = Path(argv[0]) if argv else Path("?")
    try:  # the script as a reader would type it from the repository root
        script = script.resolve().relative_to(Path.cwd())
    except ValueError:
        pass
    return " ".join(["python", shlex.quote(script.as_posix()), *map(shlex.quote, argv[1:])])


class Experiment:
    """One experiment or benchmark script's flags, seeding, outputs and provenance.

    ``name`` is the default results stem (``results/<name>.json``; ``<name>_quick`` under ``--quick``, so a quick
    run never overwrites a full one); ``description`` the script's docstring (the ``--help`` text); ``hypotheses``
    the claims the run tests, fixed in the script before it runs, shown by ``--help`` and copied under the
    markdown's title under ``header`` (say there when they were written after exploratory runs); ``threads`` and
    ``seed`` the flag defaults. ``parser`` takes the script's own flags before
    :meth:`start`.

    Example:
        >>> exp = Experiment("bench_x", "Bench x.", threads=2)
        >>> _ = exp.parser.add_argument("--repeats", type=int, default=5)
        >>> args = exp.start(["--repeats", "3", "--out", "/nonexistent-dir-is-only-created-on-write"])
        >>> (args.repeats, args.threads, args.seed, args.quick, exp.path("_a.png").name)
        (3, 2, 0, False, 'bench_x_a.png')
    """

    def __init__(self, name: str, description: str | None = None, *, hypotheses: Iterable[str] = (),
                 threads: int = 1, seed: int = 0, out: str | os.PathLike | None = None, header: str = HEADER):
        if not name or any(c in name for c in "/\\ ") or name.startswith("."):
            raise ValueError(f"Experiment name must be a plain file stem, got {name!r}")
        self.name = name
        self.hypotheses = [h.strip() for h in hypotheses]
        self.header = header  # how the hypotheses were written: before the runs unless the script says otherwise
        epilog = "\n".join([header, *(f"- {h}" for h in self.hypotheses)]) if self.hypotheses else None
        self.parser = argparse.ArgumentParser(description=description, epilog=epilog,
                                              formatter_class=argparse.RawDescriptionHelpFormatter)
        g = self.parser.add_argument_group("harness")
        g.add_argument("--quick", action="store_true", help="CI-sized run (writes <name>_quick.*)")
        g.add_argument("--out", type=Path, default=Path(out) if out is not None else Path("results"),
                       help="output folder (default: %(default)s)")
        g.add_argument("--name", default=name, help="results file stem (default %(default)s)")
        g.add_argument("--seed", type=int, default=seed, help="seed for Python, NumPy and torch (default %(default)s)")
        g.add_argument("--threads", type=int, default=threads, help="torch threads (default %(default)s)")
        g.add_argument("--render", action="store_true",
                       help="only rewrite the markdown (and plots) from the JSON already in --out; runs nothing")
        self.args: argparse.Namespace | None = None
        self.command = ""
        self._t0 = time.perf_counter()

    def start(self, argv: Sequence[str] | None = None) -> argparse.Namespace:
        """Parse the flags, seed every RNG and set torch's threads; returns the parsed flags."""
        args = self.parser.parse_args(argv)
        if args.threads < 1:
            self.parser.error(f"--threads must be >= 1, got {args.threads}")
        if not args.name or any(c in args.name for c in "/\\ ") or args.name.startswith("."):
            self.parser.error(f"--name must be a plain file stem, got {args.name!r}")
        seed_everything(args.seed)
        torch.set_num_threads(args.threads)
        self.args = args
        self.command = _command_line(sys.argv if argv is None else [sys.argv[0], *argv])
        self._t0 = time.perf_counter()
        return args

    def _need_args(self) -> argparse.Namespace:
        if self.args is None:
            raise RuntimeError(f"experiment {self.name!r}: call start() before writing outputs")
        return self.args

    @property
    def stem(self) -> str:
        """``--name`` (default ``name``), with ``_quick`` appended for a ``--quick`` run."""
        args = self._need_args()
        return f"{args.name}_quick" if args.quick else args.name

    @property
    def out(self) -> Path:
        return Path(self._need_args().out)

    def path(self, suffix: str) -> Path:
        """``<out>/<stem><suffix>``, e.g. ``path(".json")`` or ``path("_loss.png")``."""
        return self.out / f"{self.stem}{suffix}"

    def seconds(self) -> float:
        """Seconds since :meth:`start`, rounded to 0.1."""
        return round(time.perf_counter() - self._t0, 1)

    def write_json(self, result: Mapping[str, Any], suffix: str = ".json") -> Path:
        """Atomically write ``result`` plus an ``environment`` entry (see :func:`environment`)."""
        data = {**result, "environment": {**environment(self.command), "seconds": self.seconds()}}
        return atomic_write_text(self.path(suffix), json.dumps(plain_data(data), indent=1) + "\n")

    def read_json(self, suffix: str = ".json") -> dict[str, Any]:
        """The JSON a previous run wrote (for ``--render``); a clear error when there is none."""
        p = self.path(suffix)
        if not p.is_file():
            raise FileNotFoundError(f"experiment {self.name!r}: no {p} to render; run the experiment first")
        return json.loads(p.read_text())

    def markdown(self, text: str) -> str:
        """``text`` with the pre-registered hypotheses after its first line (the title), if there are any."""
        if not self.hypotheses:
            return text if text.endswith("\n") else text + "\n"
        title, _, rest = text.partition("\n")
        block = "\n".join([self.header, "", *(f"- {h}" for h in self.hypotheses)])
        return f"{title}\n\n{block}\n\n{rest.lstrip(chr(10))}".rstrip("\n") + "\n"

    def write_markdown(self, text: str, suffix: str = ".md") -> Path:
        """Atomically write :meth:`markdown` of ``text`` to ``<stem><suffix>``."""
        return atomic_write_text(self.path(suffix), self.markdown(text))

    def savefig(self, fig: Any, suffix: str = ".png", dpi: int = 110) -> Path:
        """Atomically save a matplotlib figure as ``<stem><suffix>`` and close it."""
        return atomic_savefig(fig, self.path(suffix), dpi=dpi)

    def run(self, science: Callable[[argparse.Namespace], dict], render: Callable[[dict], str],
            plot: Callable[[dict], None] | None = None, argv: Sequence[str] | None = None) -> int:
        """The whole script: :meth:`start`, ``science(args)`` -> a result dict written as the JSON (skipped with
        ``--render``), then ``render`` and ``plot`` of the result read back from that JSON. Returns 0."""
        args = self.start(argv)
        if not args.render:
            self.write_json(science(args))
        result = self.read_json()  # a fresh run renders from its JSON too: --render reproduces it exactly
        md = self.write_markdown(render(result))
        if plot is not None:
            plot(result)
        print(md.read_text(), end="")
        return 0
