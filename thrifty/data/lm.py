"""A raw English text stream for language modelling, built offline from whole stdlib docstrings, as bytes.

The documents are the full docstrings (``inspect.cleandoc``) of the modules of :data:`thrifty.data.text.GROUPS`
and their public members, ASCII only, deduplicated, in canonical order. Every tenth document is held out
(``split="test"``); the rest is ``"train"``. The tokenizer is byte-level (vocabulary 256, nothing to train or
download): ``encode`` maps text to its UTF-8 bytes. Deterministic for a given Python version.

Example:
    >>> ids = encode("Return x.")
    >>> ids.tolist()[:3], decode(ids)
    ([82, 101, 116], 'Return x.')
    >>> lm_windows("test", seq_len=64).shape[1]
    64
"""
from __future__ import annotations

import functools
import importlib
import inspect
import warnings

import torch
from torch import Tensor

from thrifty.data.text import GROUPS, _objects

__all__ = ["VOCAB_SIZE", "lm_documents", "lm_text", "encode", "decode", "lm_tokens", "lm_windows"]

VOCAB_SIZE = 256
_MIN_CHARS = 40
_HELD_OUT_EVERY = 10
_SEP = "\n\n"


@functools.lru_cache(maxsize=1)
def lm_documents() -> tuple[str, ...]:
    """Every distinct ASCII docstring of at least 40 characters (module order of GROUPS, then members sorted)."""
    seen: set[str] = set()
    docs: list[str] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # some stdlib modules warn on import (deprecations)
        for _, modules in GROUPS:
            for mod_name in modules:
                try:
                    module = importlib.import_module(mod_name)
                except ImportError:  # optional stdlib pieces may be absent
                    continue
                for obj in _objects(module):
                    doc = getattr(obj, "__doc__", None)
                    if not isinstance(doc, str):
                        continue
                    doc = inspect.cleandoc(doc)
                    if doc.isascii() and len(doc) >= _MIN_CHARS and doc not in seen:
                        seen.add(doc)
                        docs.append(doc)
    return tuple(docs)


def _check_split(split: str) -> str:
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    return split


def lm_text(split: str = "train") -> str:
    """The documents of one split joined by blank lines (held out: every tenth document)."""
    _check_split(split)
    held = split == "test"
    return _SEP.join(d for i, d in enumerate(lm_documents()) if (i % _HELD_OUT_EVERY == _HELD_OUT_EVERY - 1) == held)


def encode(text: str) -> Tensor:
    """UTF-8 bytes of ``text`` as an int64 tensor (byte-level tokens, vocabulary 256)."""
    if not isinstance(text, str):
        raise TypeError(f"encode expects a str, got {type(text).__name__}")
    raw = text.encode("utf-8")
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8).to(torch.int64) if raw else torch.zeros(0, dtype=torch.int64)


def decode(ids: Tensor) -> str:
    """Inverse of :func:`encode` (invalid UTF-8 sequences become U+FFFD)."""
    return bytes(ids.to(torch.uint8).tolist()).decode("utf-8", errors="replace")


@functools.lru_cache(maxsize=8)
def _tokens(split: str) -> Tensor:
    return encode(lm_text(split))


def lm_tokens(split: str = "train") -> Tensor:
    """The whole split as one token stream (a fresh tensor)."""
    return _tokens(_check_split(split)).clone()


def lm_windows(split: str = "test", seq_len: int = 128, n: int | None = None) -> Tensor:
    """Non-overlapping ``(windows, seq_len)`` token windows of a split, in order; the first ``n`` if given."""
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
        raise ValueError(f"seq_len must be an int >= 2, got {seq_len!r}")
    t = _tokens(_check_split(split))
    w = t[: t.numel() // seq_len * seq_len].reshape(-1, seq_len)
    if n is not None:
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= w.shape[0]:
            raise ValueError(f"n must be an int in 1..{w.shape[0]} (the {split} split's windows), got {n!r}")
        w = w[:n]
    return w.clone()
