"""Keep a stage's result only if a loss did not get worse; otherwise put the weights back and say so.

Layer-wise or proxy objectives (AdaQuant, AdaPrune, bias tuning, distillation on a few samples) do not
guarantee a lower end-to-end loss. Every such stage in thrifty runs under :func:`keep_if_better`, so the
stages are monotone on the data they are measured on and the caller can tell which ones were undone.

Example:
    >>> import torch, torch.nn as nn
    >>> layer = nn.Linear(2, 1)
    >>> reverted = []
    >>> size = lambda: float(layer.weight.detach().abs().sum())
    >>> with keep_if_better(layer, size, stage="grow", reverted=reverted) as out, torch.no_grad():
    ...     _ = layer.weight.mul_(2)
    >>> out.kept, reverted
    (False, ['grow'])
"""
from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence, Union

import torch
import torch.nn as nn

__all__ = ["Outcome", "keep_if_better"]


@dataclass
class Outcome:
    """What :func:`keep_if_better` decided: the loss before and after (after = before when reverted)."""

    before: float
    after: float = math.nan
    kept: bool = True


@contextlib.contextmanager
def keep_if_better(state: Union[nn.Module, Sequence[torch.Tensor]], loss: Callable[[], float],
                   before: Optional[float] = None, *, strict: bool = False, stage: str = "",
                   reverted: Optional[list[str]] = None) -> Iterator[Outcome]:
    """Run the ``with`` block; keep its changes to ``state`` only if ``loss()`` did not rise, else restore them.

    ``state``: a module (its whole ``state_dict``: weights, masks, running statistics) or the tensors the
    stage may change (restored in place, so Parameters and optimizers stay valid). ``before``: the loss
    before the stage if already known (else measured on entry). ``strict``: keep only a strict decrease.
    A NaN loss after the stage always reverts. A reverted stage's name is appended to ``reverted``.
    An exception inside the block restores ``state`` too and propagates.
    """
    out = Outcome(before=float(loss()) if before is None else float(before))
    if isinstance(state, nn.Module):
        saved: object = copy.deepcopy(state.state_dict())
    else:
        saved = [t.detach().clone() for t in state]

    def restore() -> None:
        if isinstance(state, nn.Module):
            state.load_state_dict(saved)  # type: ignore[arg-type]
        else:
            with torch.no_grad():
                for t, s in zip(state, saved):  # type: ignore[arg-type]
                    t.copy_(s)

    try:
        yield out
    except BaseException:
        restore()
        raise
    out.after = float(loss())
    better = out.after < out.before if strict else out.after <= out.before
    if not better:  # also NaN
        restore()
        out.kept, out.after = False, out.before
        if reverted is not None:
            reverted.append(stage)
