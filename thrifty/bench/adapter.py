"""Call a model with keyword inputs from positional ones, returning only its compared output tensor.

ONNX export and the benchmark backends call a model positionally (``model(*inputs)``) and read one output tensor.
Hugging Face models do not fit that as they are: GPT-2's ``forward(input_ids, cache, attention_mask, ...)`` takes
its key/value cache between the ids and the mask, and decoders return a ``Cache`` object beside their logits
(``use_cache`` defaults to True), which ``torch.onnx.export`` cannot trace. :class:`KeywordCall` wraps such a model:
its ``forward(*inputs)`` calls ``model(**dict(zip(names, inputs)), use_cache=False)`` (``use_cache`` only where
the forward takes it) and returns the tensor PTQ compares (:func:`thrifty.quant.calib.model_output`: a
SentenceTransformer's ``sentence_embedding``, else ``logits``, else ``last_hidden_state``, or the ``output=``
field). Nothing else changes: the decoder without a cache computes the same logits (a single forward pass over
the whole sequence, which is what a cache would be filled from).

Example:
    >>> import torch, torch.nn as nn
    >>> class M(nn.Module):
    ...     def forward(self, x, cache=None, mask=None):
    ...         return {"logits": x * mask, "cache": object()}
    >>> needs_keywords(M(), ["x", "mask"])
    True
    >>> KeywordCall(M(), ["x", "mask"])(torch.ones(1, 2), torch.zeros(1, 2)).tolist()
    [[0.0, 0.0]]
"""
from __future__ import annotations

import inspect
from typing import Any, Optional, Sequence

import torch.nn as nn
from torch import Tensor

__all__ = ["KeywordCall", "needs_keywords", "keyword_call"]

# forward options that make a decoder return its key/value cache (an object no exporter can trace)
_NO_CACHE = {"use_cache": False}


def _params(model: nn.Module) -> dict[str, inspect.Parameter]:
    try:
        return dict(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):  # a builtin / C forward
        return {}


def needs_keywords(model: nn.Module, names: Sequence[str]) -> bool:
    """Whether ``model`` must be called with ``names`` as keywords: they are parameters of its ``forward`` but not
    its leading positional ones in some order (GPT-2's ``attention_mask`` comes after ``cache``), or the forward
    takes ``use_cache`` (a decoder would return its cache)."""
    params = _params(model)
    if not names or not all(n in params for n in names):
        return False
    positional = [p.name for p in params.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return set(names) != set(positional[:len(names)]) or any(k in params for k in _NO_CACHE)


class KeywordCall(nn.Module):
    """``forward(*inputs)`` = the compared output tensor of ``model(**dict(zip(names, inputs)), use_cache=False)``
    (see the module docstring). The wrapped model is the child ``model``; ``strip`` and state dicts see it there."""

    def __init__(self, model: nn.Module, names: Sequence[str], output: Any = None) -> None:
        super().__init__()
        params = _params(model)
        unknown = [n for n in names if n not in params]
        if unknown:
            raise TypeError(f"{type(model).__name__}.forward has no parameters {unknown} "
                            f"(it takes {[p for p in params if p != 'self'][:8]})")
        self.model, self.names, self.output = model, tuple(names), output
        self.fixed = {k: v for k, v in _NO_CACHE.items() if k in params and k not in self.names}

    def forward(self, *inputs: Tensor) -> Tensor:
        from thrifty.quant.calib import model_output

        if len(inputs) != len(self.names):
            raise TypeError(f"KeywordCall({type(self.model).__name__}) takes {len(self.names)} inputs "
                            f"{list(self.names)}, got {len(inputs)}")
        return model_output(self.model(**dict(zip(self.names, inputs)), **self.fixed), self.output)


def keyword_call(model: nn.Module, names: Optional[Sequence[str]], output: Any = None) -> nn.Module:
    """``model`` itself when a positional call with ``names`` is right, else a :class:`KeywordCall` around it."""
    if names is None or isinstance(model, KeywordCall) or not needs_keywords(model, names):
        return model
    return KeywordCall(model, names, output)
