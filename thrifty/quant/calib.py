"""Calibration data handling and one-layer-at-a-time activation capture.

Calibration data may be a Tensor (split into batches), an ``(inputs, labels)`` tuple of tensors, a Dataset whose items are ``x`` or ``(x, y)``, a
DataLoader / list of batches where each batch is a Tensor, an ``(x, y)`` tuple, or a dict of keyword arguments
(``model(**batch)``, e.g. MiniLM's ``input_ids``/``attention_mask``). It is normalised once into a list of
:class:`Batch` objects (calibration sets are small by definition).

Example:
    >>> import torch
    >>> bs = as_batches(torch.randn(10, 3), batch_size=4)
    >>> [b.size for b in bs]
    [4, 4, 2]
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional

import torch
import torch.nn as nn
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from thrifty.utils import removing_hooks

__all__ = ["Batch", "as_batches", "run", "model_output", "capture", "execution_order", "relu_fed", "output_loss"]


@dataclass
class Batch:
    """One calibration batch: positional args, keyword args, optional labels."""

    args: tuple = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    labels: Optional[Tensor] = None

    @property
    def size(self) -> int:
        for t in list(self.args) + list(self.kwargs.values()):
            if isinstance(t, Tensor) and t.dim() > 0:
                return int(t.shape[0])
        return 1

    def to(self, device: torch.device) -> "Batch":
        mv = lambda t: t.to(device) if isinstance(t, Tensor) else t  # noqa: E731
        return Batch(tuple(mv(a) for a in self.args), {k: mv(v) for k, v in self.kwargs.items()},
                     None if self.labels is None else self.labels.to(device))


def _from_item(b: Any, where: str) -> Batch:
    if isinstance(b, Batch):
        return b
    if isinstance(b, Tensor):
        return Batch((b,))
    if isinstance(b, dict):
        if not b:
            raise ValueError(f"calibration data: empty dict batch ({where})")
        return Batch((), dict(b))
    if isinstance(b, (tuple, list)) and len(b) in (1, 2) and isinstance(b[0], (Tensor, dict)):
        x = b[0]
        y = b[1] if len(b) == 2 and isinstance(b[1], Tensor) else None
        inner = _from_item(x, where)
        if y is not None and y.dim() > 0 and y.shape[0] != inner.size:
            raise ValueError(f"calibration data: {inner.size} inputs but {y.shape[0]} labels ({where})")
        inner.labels = y
        return inner
    raise TypeError(f"calibration data: unsupported batch type {type(b).__name__} ({where}); use a Tensor, "
                    "an (x, y) tuple or a dict of model keyword arguments")


def as_batches(data: Any, batch_size: int = 32) -> list[Batch]:
    """Normalise calibration data into a non-empty list of :class:`Batch`; ValueError/TypeError otherwise."""
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
    if isinstance(data, (Batch, dict)):
        data = [data]
    if not isinstance(data, Iterable):
        raise TypeError(f"calibration data must be a Tensor, Dataset, DataLoader or list of batches, "
                        f"got {type(data).__name__}")
    out = [_from_item(b, f"batch {i}") for i, b in enumerate(data)]
    if not out or sum(b.size for b in out) == 0:
        raise ValueError("calibration data is empty")
    return out


def model_output(out: Any) -> Tensor:
    """The main tensor of a model output (tensor, first tuple element, ``.logits`` or first dict value)."""
    if isinstance(out, Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, dict):
        return next(iter(out.values()))
    if isinstance(out, (tuple, list)):
        return model_output(out[0])
    raise TypeError(f"cannot interpret model output of type {type(out).__name__}")


def run(model: nn.Module, b: Batch) -> Tensor:
    dev = _device(model)
    b = b.to(dev)
    return model_output(model(*b.args, **b.kwargs))


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


class _Stop(Exception):
    pass


@torch.no_grad()
def capture(model: nn.Module, layer: nn.Module, batches: list[Batch], *, inputs: bool = True,
            outputs: bool = False, stop: bool = True) -> tuple[list[Tensor], list[Tensor]]:
    """The raw inputs (before any input slot) and/or outputs of ``layer`` for every batch, on CPU-less device.

    With ``stop`` the forward pass is abandoned right after ``layer`` (only the prefix is computed).
    """
    xs: list[Tensor] = []
    ys: list[Tensor] = []

    def pre(_m, args):
        if inputs:
            xs.append(args[0].detach())

    def post(_m, _args, out):
        if outputs:
            ys.append(out.detach())
        if stop:
            raise _Stop

    with removing_hooks([layer.register_forward_pre_hook(pre), layer.register_forward_hook(post)]):
        for b in batches:
            n = len(xs) + len(ys)
            try:
                run(model, b)
            except _Stop:
                pass
            if len(xs) + len(ys) == n:
                raise RuntimeError("capture: the layer was not executed on a calibration batch")
    return xs, ys


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
