"""Calibration data handling and one-layer-at-a-time activation capture.

Calibration data may be a Tensor (split into batches), an ``(inputs, labels)`` tuple of tensors, a Dataset whose items are ``x`` or ``(x, y)``, a
DataLoader / list of batches where each batch is a Tensor, an ``(x, y)`` tuple, or a dict such as a tokenizer's
output (``input_ids``, ``attention_mask``, ``pixel_values``, ...). It is normalised once into a list of
:class:`Batch` objects (calibration sets are small by definition).

A dict batch is passed the way the model's ``forward`` takes it: as keyword arguments when every key is a
parameter name of ``forward`` (Hugging Face models, ``model(**batch)``), else as one positional argument when
``forward`` has exactly one required parameter (a SentenceTransformer's ``forward(features)``).

The compared output (``output=``) is a field name, a callable ``output(model_out) -> Tensor``, or None for the
default: the tensor itself, the first element of a tuple, or of a dict / ``ModelOutput`` the first present of
``sentence_embedding`` (SentenceTransformer), ``logits`` (classifiers, LMs), ``last_hidden_state`` (bare encoders),
else the first floating-point value.

Example:
    >>> import torch
    >>> bs = as_batches(torch.randn(10, 3), batch_size=4)
    >>> [b.size for b in bs]
    [4, 4, 2]
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Optional, Union

import torch
import torch.nn as nn
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from thrifty.utils import removing_hooks

__all__ = ["Batch", "Output", "as_batches", "run", "model_output", "capture", "execution_order", "shared_inputs",
           "relu_fed",
           "output_loss", "take", "pool", "token_rows"]

Output = Union[None, str, Callable[[Any], Tensor]]  # which part of a model's output is compared
_DEFAULT_FIELDS = ("sentence_embedding", "logits", "last_hidden_state")


@dataclass
class Batch:
    """One calibration batch: positional args, keyword args, optional labels, the compared output field."""

    args: tuple = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    labels: Optional[Tensor] = None
    output: Output = None
    token_mask: Optional[Tensor] = None  # [B, T], 1 = real token; None: the batch's 2-D ``attention_mask``

    @property
    def size(self) -> int:
        for t in list(self.args) + list(self.kwargs.values()):
            if isinstance(t, Tensor) and t.dim() > 0:
                return int(t.shape[0])
        return 1

    def to(self, device: torch.device) -> "Batch":
        mv = lambda t: t.to(device) if isinstance(t, Tensor) else t  # noqa: E731
        return Batch(tuple(mv(a) for a in self.args), {k: mv(v) for k, v in self.kwargs.items()},
                     None if self.labels is None else self.labels.to(device), self.output, self.token_mask)

    def select(self, idx: Tensor) -> "Batch":
        """The rows ``idx`` of every per-sample tensor (first dim == :attr:`size`); other values are kept."""
        n = self.size
        sel = lambda t: t[idx] if isinstance(t, Tensor) and t.dim() > 0 and t.shape[0] == n else t  # noqa: E731
        return Batch(tuple(sel(a) for a in self.args), {k: sel(v) for k, v in self.kwargs.items()},
                     None if self.labels is None else sel(self.labels), self.output,
                     None if self.token_mask is None else self.token_mask[idx])

    def tokens(self) -> Optional[Tensor]:
        """The ``[B, T]`` real-token mask (explicit, or the 2-D ``attention_mask`` among the inputs), if any."""
        if self.token_mask is not None:
            return self.token_mask
        m = self.kwargs.get("attention_mask")
        if m is None and self.args and isinstance(self.args[0], Mapping):
            m = self.args[0].get("attention_mask")
        return m if isinstance(m, Tensor) and m.dim() == 2 else None

    def call_args(self, model: nn.Module) -> tuple[tuple, dict[str, Any]]:
        """``(args, kwargs)`` for ``model``: a dict batch becomes one positional argument where the forward takes
        its features as one dict (see the module docstring)."""
        if self.args or not self.kwargs or not _takes_one_dict(model, tuple(self.kwargs)):
            return self.args, self.kwargs
        return (dict(self.kwargs),), {}


def _takes_one_dict(model: nn.Module, keys: tuple[str, ...]) -> bool:
    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):  # a builtin / C forward: keep keyword expansion
        return False
    named = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    if set(keys) <= named:
        return False
    required = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty]
    return len(required) == 1


def _from_item(b: Any, where: str) -> Batch:
    if isinstance(b, Batch):
        return b
    if isinstance(b, Tensor):
        return Batch((b,))
    if isinstance(b, Mapping):  # a dict, or a tokenizer's BatchEncoding (a UserDict)
        if not b:
            raise ValueError(f"calibration data: empty dict batch ({where})")
        return Batch((), dict(b))
    if isinstance(b, (tuple, list)) and len(b) in (1, 2) and isinstance(b[0], (Tensor, Mapping)):
        x = b[0]
        y = b[1] if len(b) == 2 and isinstance(b[1], Tensor) else None
        inner = _from_item(x, where)
        if y is not None and y.dim() > 0 and y.shape[0] != inner.size:
            raise ValueError(f"calibration data: {inner.size} inputs but {y.shape[0]} labels ({where})")
        inner.labels = y
        return inner
    raise TypeError(f"calibration data: unsupported batch type {type(b).__name__} ({where}); use a Tensor, "
                    "an (x, y) tuple or a dict of model keyword arguments")


def as_batches(data: Any, batch_size: int = 32, output: Output = None) -> list[Batch]:
    """Normalise calibration data into a non-empty list of :class:`Batch`; ValueError/TypeError otherwise.

    ``output`` selects the compared model output for every batch (see the module docstring).
    """
    if output is not None and not isinstance(output, str) and not callable(output):
        raise TypeError(f"output must be None, a field name or a callable, got {type(output).__name__}")
    out = _as_batches(data, batch_size)
    for b in out:
        b.output = output
    return out


def _as_batches(data: Any, batch_size: int) -> list[Batch]:
    if data is None:
        raise ValueError("calibration data is None")
    if isinstance(data, Tensor):
        if data.dim() == 0 or data.shape[0] == 0:
            raise ValueError(f"calibration data is empty (tensor of shape {tuple(data.shape)})")
        return [Batch((data[i:i + batch_size],)) for i in range(0, data.shape[0], batch_size)]
    if (isinstance(data, tuple) and len(data) == 2 and all(isinstance(t, Tensor) for t in data)
            and data[0].dim() > 0 and data[1].dim() == 1 and data[0].shape[0] == data[1].shape[0]):
        data = torch.utils.data.TensorDataset(*data)  # an (inputs, labels) pair
    if isinstance(data, Dataset) and hasattr(data, "__len__"):
        if len(data) == 0:  # type: ignore[arg-type]
            raise ValueError("calibration data is an empty dataset")
        data = DataLoader(data, batch_size=batch_size, shuffle=False)
    if isinstance(data, Mapping) and data and all(isinstance(v, Tensor) and v.dim() > 0 for v in data.values()) \
            and len({int(v.shape[0]) for v in data.values()}) == 1:  # one dict of whole-set tensors: split it
        n = int(next(iter(data.values())).shape[0])
        return [Batch((), {k: v[i:i + batch_size] for k, v in data.items()}) for i in range(0, n, batch_size)]
    if isinstance(data, (Batch, Mapping)):
        data = [data]
    if not isinstance(data, Iterable):
        raise TypeError(f"calibration data must be a Tensor, Dataset, DataLoader or list of batches, "
                        f"got {type(data).__name__}")
    out = [_from_item(b, f"batch {i}") for i, b in enumerate(data)]
    if not out or sum(b.size for b in out) == 0:
        raise ValueError("calibration data is empty")
    return out


def model_output(out: Any, output: Output = None) -> Tensor:
    """The compared tensor of a model output: ``output`` names a field or is a callable; None = the default rule.

    Example:
        >>> import torch
        >>> model_output({"input_ids": torch.ones(1, 3).long(), "sentence_embedding": torch.zeros(1, 4)}).shape
        torch.Size([1, 4])
    """
    if callable(output):
        t = output(out)
        if not isinstance(t, Tensor):
            raise TypeError(f"output= callable returned {type(t).__name__}, expected a Tensor")
        return t
    if isinstance(output, str):
        got = out.get(output) if isinstance(out, dict) else getattr(out, output, None)
        if not isinstance(got, Tensor):
            have = list(out.keys()) if isinstance(out, dict) else [type(out).__name__]
            raise ValueError(f"output={output!r}: the model output has no tensor field {output!r} (has {have})")
        return got
    if isinstance(out, Tensor):
        return out
    if isinstance(out, dict):  # transformers' ModelOutput is an OrderedDict
        for k in _DEFAULT_FIELDS:
            if isinstance(out.get(k), Tensor):
                return out[k]
        for v in out.values():
            if isinstance(v, Tensor) and v.is_floating_point():
                return v
        raise TypeError(f"model output dict has no floating-point tensor (keys {list(out)}); pass output=")
    if isinstance(getattr(out, "logits", None), Tensor):
        return out.logits
    if isinstance(out, (tuple, list)) and out:
        return model_output(out[0])
    raise TypeError(f"cannot interpret model output of type {type(out).__name__}; pass output=")


def run(model: nn.Module, b: Batch) -> Tensor:
    """``model`` on batch ``b`` (moved to the model's device), reduced to the compared output tensor."""
    b = b.to(_device(model))
    args, kwargs = b.call_args(model)
    return model_output(model(*args, **kwargs), b.output)


def take(batches: list[Batch], n: Optional[int]) -> list[Batch]:
    """The first ``n`` samples of ``batches`` (all of them for None)."""
    if n is None:
        return batches
    if n < 1:
        raise ValueError(f"num_samples must be >= 1 or None, got {n}")
    out: list[Batch] = []
    for b in batches:
        if n <= 0:
            break
        out.append(b if b.size <= n else b.select(torch.arange(n)))
        n -= b.size
    return out


def pool(batches: list[Batch]) -> list[Batch]:
    """Batches merged into one where every per-sample tensor has the same trailing shape (else unchanged)."""
    first = batches[0]
    keys = (len(first.args), tuple(first.kwargs), first.labels is not None)

    def parts(b: Batch) -> list[Any]:
        return list(b.args) + list(b.kwargs.values()) + ([b.labels] if b.labels is not None else [])

    same = all((len(b.args), tuple(b.kwargs), b.labels is not None) == keys for b in batches) and all(
        isinstance(t, Tensor) and t.dim() > 0 and t.shape[0] == b.size
        and t.shape[1:] == u.shape[1:] for b in batches for t, u in zip(parts(b), parts(first)))
    if len(batches) == 1 or not same:
        return batches
    cols = list(zip(*(parts(b) for b in batches)))
    cat = [torch.cat(c) for c in cols]
    na, nk = len(first.args), len(first.kwargs)
    return [Batch(tuple(cat[:na]), dict(zip(first.kwargs, cat[na:na + nk])),
                  cat[na + nk] if first.labels is not None else None, first.output)]


def token_rows(t: Tensor, b: Batch) -> Tensor:
    """A per-token activation ``[B, T, ..., C]`` as rows ``[N, C]``, padding positions left out.

    Padding is known from :meth:`Batch.tokens` (1 = real token) matching ``t``'s first two dims; the rows are
    what a linear layer sees one at a time, so a reconstruction loss on them ignores padding (which never
    reaches a pooled or masked output).
    """
    m = b.tokens()
    if m is not None and t.dim() >= 3 and tuple(t.shape[:2]) == tuple(m.shape):
        t = t[m.to(t.device).bool()]
    return t.reshape(-1, t.shape[-1])


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


class _Stop(Exception):
    pass


@torch.no_grad()
def capture(model: nn.Module, layer: nn.Module, batches: list[Batch], *, inputs: bool = True,
            outputs: bool = False, stop: bool = True,
            keep: Optional[Callable[[Tensor, Batch], Tensor]] = None) -> tuple[list[Tensor], list[Tensor]]:
    """The raw inputs (before any input slot) and/or outputs of ``layer`` for every batch, on CPU-less device.

    With ``stop`` the forward pass is abandoned right after ``layer`` (only the prefix is computed), or right
    before it when only its inputs are wanted (the layer itself is not run).
    ``keep(tensor, batch)``: what is kept of each captured tensor (e.g. :func:`token_rows`), applied in the
    hook, so the raw activation is not held beside it.
    """
    xs: list[Tensor] = []
    ys: list[Tensor] = []
    cur: list[Batch] = []
    held = (lambda t: keep(t, cur[0])) if keep is not None else (lambda t: t)  # noqa: E731

    def pre(_m, args):
        if inputs:
            xs.append(held(args[0].detach()))
            if stop and not outputs:
                raise _Stop

    def post(_m, _args, out):
        if outputs:
            ys.append(held(out.detach()))
        if stop:
            raise _Stop

    with removing_hooks([layer.register_forward_pre_hook(pre), layer.register_forward_hook(post)]):
        for b in batches:
            cur[:] = [b]
            n = len(xs) + len(ys)
            try:
                run(model, b)
            except _Stop:
                pass
            if len(xs) + len(ys) == n:
                raise RuntimeError("capture: the layer was not executed on a calibration batch")
    return xs, ys


@torch.no_grad()
def shared_inputs(model: nn.Module, layers: dict[str, nn.Module], batch: Batch) -> dict[str, str]:
    """``{layer: an earlier layer of ``layers`` whose first call got the very same input tensor}`` on ``batch``
    (e.g. a transformer's query, key and value projections, which all read the same hidden states).

    Such a layer's input was made before the earlier layer ran, so it does not depend on that layer's weights:
    a capture of one serves both, whatever is fitted to the earlier one."""
    first: dict[str, Tensor] = {}
    with removing_hooks() as hooks:
        for name, m in layers.items():
            def pre(_m, args, name=name):
                if name not in first and args and isinstance(args[0], Tensor):
                    first[name] = args[0]  # held (not only its id) so that no other tensor can reuse the id
            hooks.append(m.register_forward_pre_hook(pre))
        run(model, batch)
    out: dict[str, str] = {}
    seen: list[str] = []
    for name in layers:
        if name in first:
            src = next((s for s in seen if first[s] is first[name]), None)
            if src is not None:
                out[name] = src
            seen.append(name)
    return out


@torch.no_grad()
def execution_order(model: nn.Module, layers: dict[str, nn.Module], batch: Batch) -> list[str]:
    """Names of ``layers`` in the order of their first call on ``batch`` (uncalled ones are omitted)."""
    order: list[str] = []
    with removing_hooks() as hooks:
        for name, m in layers.items():
            def hook(_m, _a, _o, name=name):
                if name not in order:
                    order.append(name)
            hooks.append(m.register_forward_hook(hook))
        run(model, batch)
    return order


@torch.no_grad()
def relu_fed(model: nn.Module, names: list[str], batch: Batch) -> frozenset[str]:
    """The layers of ``names`` whose negative outputs do not reach the model output on ``batch``.

    Probe: make every negative output of the layer more negative (``2y - 1``); if the model output stays
    bitwise identical, the layer only feeds the rest of the network through a ReLU (or something else that
    zeroes negatives), so a reconstruction loss may ignore errors where both outputs are negative. Found by
    behaviour rather than by module type because ReLUs are often functional (``F.relu``).
    """
    ref = run(model, batch)
    out: set[str] = set()
    for n in names:
        def probe(_m, _a, y):
            return torch.where(y < 0, 2 * y - 1, y)
        with removing_hooks([model.get_submodule(n).register_forward_hook(probe)]):
            if torch.equal(run(model, batch), ref):
                out.add(n)
    return frozenset(out)


def output_loss(kind: str) -> Callable[[Tensor, Tensor], Tensor]:
    """``loss(q_out, fp_out)``: ``"kl"`` = KL(softmax(fp) || softmax(q)) per sample, ``"mse"`` = mean sq. error."""
    if kind == "kl":
        def kl(q: Tensor, fp: Tensor) -> Tensor:
            q, fp = q.reshape(-1, q.shape[-1]), fp.reshape(-1, fp.shape[-1])
            return nn.functional.kl_div(q.log_softmax(-1), fp.log_softmax(-1), log_target=True, reduction="batchmean")
        return kl
    if kind == "mse":
        return lambda q, fp: nn.functional.mse_loss(q, fp)
    raise ValueError(f"loss must be 'auto', 'kl' or 'mse', got {kind!r}")
