"""Small shared helpers: seeding, atomic file writes, logging.

Example:
    >>> from thrifty.utils import seed_everything, atomic_write_text
    >>> seed_everything(0)
    >>> _ = atomic_write_text("/tmp/thrifty_example.txt", "hello")
"""
from __future__ import annotations

import glob
import logging
import os
import random
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator, Union

import numpy as np
import torch

PathLike = Union[str, os.PathLike]

__all__ = ["seed_everything", "atomic_save", "atomic_write_text", "atomic_write_bytes", "remove_stale_temp_files",
           "get_logger", "removing_hooks", "plain_data", "show_progress", "atomic_savefig", "fmt_acc", "fmt_value"]


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) RNGs.

    Example:
        >>> seed_everything(123)
    """
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def _atomic_write(path: PathLike, write: Callable[[BinaryIO], None]) -> Path:
    """Write via `write(fileobj)` to a temp file in the target folder, then os.replace.

    The temp file lives in the same directory so os.replace is atomic (same filesystem);
    on any failure the temp file is removed and an existing target is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            # mkstemp creates 0600; the result gets the mode open() would give it under the user's umask
            os.fchmod(f.fileno(), 0o666 & ~_umask())
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def _umask() -> int:
    """The process umask, read without changing it where Linux allows (os.umask must set it to read it,
    which would briefly affect files other threads create)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def remove_stale_temp_files(path: PathLike) -> list[Path]:
    """Delete the temp files that interrupted atomic writes of ``path`` left next to it; returns them.

    A write killed by SIGKILL or a power loss leaves ``.<name>.<random>.tmp`` (the target itself is
    untouched). Call it only when no other process is writing ``path``.

    Example:
        >>> remove_stale_temp_files("/tmp/thrifty_example.txt")
        []
    """
    path = Path(path)
    if not path.parent.is_dir():
        return []
    stale = sorted(path.parent.glob(f".{glob.escape(path.name)}.*.tmp"))
    for p in stale:
        try:
            p.unlink()
        except FileNotFoundError:
            pass
    return stale


def atomic_save(obj: Any, path: PathLike) -> Path:
    """Atomically write `obj` to `path`.

    `obj` may be bytes/bytearray (written as is), a callable taking a binary file object
    (e.g. ``lambda f: np.save(f, arr)``), or anything else, which is saved with torch.save.

    Example:
        >>> atomic_save({"w": torch.zeros(2)}, "/tmp/thrifty_example.pt")
        PosixPath('/tmp/thrifty_example.pt')
    """
    if isinstance(obj, (bytes, bytearray, memoryview)):
        data = bytes(obj)
        return _atomic_write(path, lambda f: f.write(data))
    if callable(obj) and not isinstance(obj, torch.nn.Module):
        return _atomic_write(path, obj)
    return _atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_bytes(path: PathLike, data: bytes) -> Path:
    """Atomically write raw bytes to `path`."""
    return _atomic_write(path, lambda f: f.write(bytes(data)))


def atomic_savefig(fig: Any, path: PathLike, dpi: int = 110) -> Path:
    """Atomically save a matplotlib figure as PNG to ``path`` and close it (a plot is never half-written).

    Example:
        >>> import matplotlib; matplotlib.use("Agg"); import matplotlib.pyplot as plt, tempfile, os
        >>> p = atomic_savefig(plt.figure(), os.path.join(tempfile.mkdtemp(), "plot.png"))
        >>> p.read_bytes()[:4] == bytes([0x89]) + b"PNG"
        True
    """
    import matplotlib.pyplot as plt

    try:
        return _atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=dpi))
    finally:
        plt.close(fig)


def atomic_write_text(path: PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Atomically write `text` to `path`.

    Example:
        >>> atomic_write_text("/tmp/thrifty_example.md", "# results\\n")
        PosixPath('/tmp/thrifty_example.md')
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be str, got {type(text).__name__}")
    data = text.encode(encoding)
    return _atomic_write(path, lambda f: f.write(data))


def get_logger(name: str = "thrifty", level: int | str | None = None) -> logging.Logger:
    """Return a logger under the "thrifty" hierarchy with one stderr handler on the root "thrifty" logger.

    Level defaults to $THRIFTY_LOG_LEVEL or INFO.

    Example:
        >>> log = get_logger("thrifty.data")
        >>> log.debug("loaded")
    """
    if not name.startswith("thrifty"):
        name = f"thrifty.{name}"
    root = logging.getLogger("thrifty")
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        root.addHandler(handler)
        root.setLevel(os.environ.get("THRIFTY_LOG_LEVEL", "INFO").upper())
        root.propagate = False
    logger = logging.getLogger(name)
    if level is not None:
        logger.setLevel(level.upper() if isinstance(level, str) else level)
    return logger


@contextmanager
def removing_hooks(handles: list | None = None) -> Iterator[list]:
    """Yield a list for hook handles and remove every handle in it on exit, errors included.

    Example:
        >>> m = torch.nn.Linear(2, 2)
        >>> with removing_hooks() as hooks:
        ...     hooks.append(m.register_forward_hook(lambda *a: None))
        >>> len(m._forward_hooks)
        0
    """
    handles = [] if handles is None else handles
    try:
        yield handles
    finally:
        for h in handles:
            h.remove()


def plain_data(v: Any) -> Any:
    """YAML-safe plain data: str keys, lists for tuples, Python scalars for numpy/torch ones, str for the rest.

    Example:
        >>> plain_data({1: (np.float32(0.5), Path("a"))})
        {'1': [0.5, 'a']}
    """
    if isinstance(v, dict):
        return {str(k): plain_data(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [plain_data(x) for x in v]
    if v is None:
        return None
    for t in (bool, str, int, float):  # subclasses (numpy.float64, torch.__version__) are not safe_dump-able
        if isinstance(v, t):
            return t(v)
    if isinstance(v, os.PathLike):
        return os.fspath(v)
    item = getattr(v, "item", None)
    if callable(item):
        try:
            return plain_data(item())
        except (ValueError, RuntimeError, TypeError):  # a tensor / array of several elements
            pass
    return str(v)


def show_progress(progress: bool | None = None) -> bool:
    """Whether to draw progress bars: ``progress`` if given, else ``THRIFTY_PROGRESS`` (1/0), else a TTY on stderr.

    The one policy for every bar in thrifty; configs never hold it. Example:
        >>> show_progress(False)
        False
    """
    if progress is not None:
        return bool(progress)
    env = os.environ.get("THRIFTY_PROGRESS")
    if env is not None:
        return env.strip().lower() not in ("0", "", "false", "no", "off")
    import sys

    return sys.stderr.isatty()


def fmt_acc(fraction: Any) -> str:
    """An accuracy (a fraction in [0, 1]) as thrifty prints every accuracy: percent with 2 decimals.

    Example:
        >>> fmt_acc(0.9814471243042672), fmt_acc(1), fmt_acc(None), fmt_acc(float("nan"))
        ('98.14%', '100.00%', 'n/a', 'nan%')
    """
    if fraction is None:
        return "n/a"
    return f"{100 * float(fraction):.2f}%"


def fmt_value(key: str, value: Any) -> str:
    """One result value for a person to read: accuracies (a key naming ``acc`` or ``top1``, value in [0, 1]) as
    :func:`fmt_acc`, other floats to 4 significant digits (one decimal from 1000 on), the rest as they are.

    Example:
        >>> fmt_value("w4a8_advanced_acc", 0.9814471243042672), fmt_value("size_fraction", 0.15791234), fmt_value("steps", 3)
        ('98.14%', '0.1579', '3')
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    k = key.lower()
    if ("acc" in k or "top1" in k) and isinstance(value, float) and 0.0 <= value <= 1.0:
        return fmt_acc(value)
    if isinstance(value, int):
        return str(value)
    return f"{value:.4g}" if abs(value) < 1000 else f"{value:.1f}"  # no exponent for a throughput
