"""Real English sentences built offline from the Python standard library's docstrings.

Each sentence is the first sentence of the docstring of a public function, class or method of a
fixed list of stdlib modules; the label is the index of the module's topic group (GROUPS).
Deterministic for a given Python version (docstrings change slightly across versions).
"""
from __future__ import annotations

import functools
import importlib
import inspect
import re
import warnings

__all__ = ["GROUPS", "load_texts", "text_corpus"]

# Topic groups -> modules. Labels are the group indices, in this order.
GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("text", ("string", "re", "textwrap", "difflib", "unicodedata", "codecs")),
    ("data types", ("collections", "datetime", "calendar", "heapq", "bisect", "array", "enum", "copy",
                    "pprint", "weakref", "types")),
    ("numeric", ("math", "cmath", "decimal", "fractions", "random", "statistics", "numbers")),
    ("functional", ("itertools", "functools", "operator")),
    ("files", ("os", "pathlib", "shutil", "glob", "fnmatch", "tempfile", "filecmp", "stat", "io")),
    ("formats", ("pickle", "json", "csv", "configparser", "zipfile", "tarfile", "gzip", "bz2", "lzma",
                 "zlib", "sqlite3", "base64", "hashlib", "struct")),
    ("concurrency", ("threading", "multiprocessing", "subprocess", "queue", "sched", "concurrent.futures",
                     "asyncio", "selectors")),
    ("internet", ("socket", "ssl", "email.message", "http.client", "http.server", "urllib.request",
                  "urllib.parse", "smtplib", "ftplib", "mailbox", "ipaddress")),
    ("development", ("unittest", "doctest", "inspect", "ast", "dis", "traceback", "logging", "argparse",
                     "typing", "warnings", "contextlib", "abc", "dataclasses", "pdb", "timeit", "tokenize")),
)

_MIN_CHARS, _MAX_CHARS, _MIN_WORDS = 25, 200, 5
_SENTENCE_END = re.compile(r"(?<=[a-z0-9)\]'\"])\.(\s|$)")
_BAD = re.compile(r">>>|[{}\\|@#$`=]|\w\(\)|::|==|\s-\w|_\w|\w_")


def _first_sentence(doc: str) -> str | None:
    para = doc.strip().split("\n\n")[0]
    para = " ".join(para.split())
    m = _SENTENCE_END.search(para)
    if m is None:
        return None
    s = para[: m.start() + 1]
    if not (_MIN_CHARS <= len(s) <= _MAX_CHARS) or len(s.split()) < _MIN_WORDS:
        return None
    if not s[0].isupper() or _BAD.search(s) or not s.isascii():
        return None
    return s


def _objects(module) -> list:
    """Public members of a module and their public methods, in sorted (deterministic) order."""
    out = [module]
    for name, obj in sorted(vars(module).items()):
        if name.startswith("_") or not (inspect.isclass(obj) or inspect.isroutine(obj)):
            continue
        out.append(obj)
        if inspect.isclass(obj):
            out.extend(m for n, m in sorted(vars(obj).items()) if not n.startswith("_") and inspect.isroutine(m))
    return out


@functools.lru_cache(maxsize=1)
def text_corpus() -> tuple[tuple[str, ...], tuple[int, ...]]:
    """All (sentences, group labels), deduplicated (first occurrence wins), in canonical order.

    Example:
        >>> sents, labels = text_corpus()
        >>> len(sents) == len(labels) >= 1000
        True
    """
    seen: set[str] = set()
    sents: list[str] = []
    labels: list[int] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # some stdlib modules warn on import (deprecations)
        for label, (_, modules) in enumerate(GROUPS):
            for mod_name in modules:
                try:
                    module = importlib.import_module(mod_name)
                except ImportError:  # optional stdlib pieces (e.g. _ssl, _sqlite3) may be absent
                    continue
                for obj in _objects(module):
                    doc = getattr(obj, "__doc__", None)
                    s = _first_sentence(doc) if isinstance(doc, str) else None
                    if s is not None and s.lower() not in seen:
                        seen.add(s.lower())
                        sents.append(s)
                        labels.append(label)
    return tuple(sents), tuple(labels)


def load_texts(n: int | None = None, seed: int = 0) -> list[str]:
    """Real English sentences (see module docstring).

    ``n=None`` returns all of them in canonical order; otherwise ``n`` sentences drawn without
    replacement by a permutation seeded with ``seed``.

    Example:
        >>> texts = load_texts(8, seed=0)
        >>> len(texts)
        8
    """
    import numpy as np

    sents, _ = text_corpus()
    if n is None:
        return list(sents)
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise ValueError(f"n must be a non-negative int or None, got {n!r}")
    if n > len(sents):
        raise ValueError(f"n={n} exceeds the {len(sents)} available sentences")
    perm = np.random.default_rng(seed).permutation(len(sents))[:n]
    return [sents[i] for i in perm]
