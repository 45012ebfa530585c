"""Keep a stage's result only if a loss did not get worse; otherwise put the weights back and say so.

Layer-wise or proxy objectives (AdaQuant, AdaPrune, bias tuning, distillation on a few samples) do not
guarantee a lower end-to-end loss. Every such stage in thrifty runs under :func:`keep_if_better`, so the
stages are monotone on the data they are measured on and the caller can tell which ones were undone.

A layer fitted on fewer output rows than it has inputs can match its calibration targets with weights that
other inputs contradict (16 images for a 32-input classifier: AdaPrune lowered its calibration error 5x and
raised the held-out error). :func:`holdout_rows` names the rows such a layer is judged on instead: they are
left out of its fit, so its guard measures data it did not fit.

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
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import torch
import torch.nn as nn

__all__ = ["Outcome", "keep_if_better", "holdout_rows", "holdout_split", "HOLDOUT_RATIO", "HOLDOUT_EVERY"]

HOLDOUT_RATIO = 2  # a layer with fewer output rows than this many times its fan-in is judged on held-out rows
HOLDOUT_EVERY = 4  # ... every HOLDOUT_EVERY-th of its samples (the last one of 2 or 3)


def holdout_rows(n: int, observations: int, unknowns: int) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """``(fit, check)`` indices into ``n`` cached samples, or None when the fit has enough data.

    A layer's fit: ``observations`` = the output rows the samples give (a linear layer: its rows; a
    convolution: samples times output pixels), ``unknowns`` = its fan-in, the weights behind one output
    (in_features; in/groups * kernel size). Bias tuning: the output values and the number of biases. With fewer
    than ``HOLDOUT_RATIO * unknowns`` observations a least-squares fit is under- or barely determined, so every
    ``HOLDOUT_EVERY``-th sample (deterministic: the data's own order) is kept out of the fit and the guard
    compares the error before and after on those. Fewer than 2 samples: None (nothing to hold out).

    Example:
        >>> holdout_rows(16, 16, 32)
        (tensor([ 0,  1,  2,  4,  5,  6,  8,  9, 10, 12, 13, 14]), tensor([ 3,  7, 11, 15]))
        >>> holdout_rows(16, 1024, 48) is None
        True
    """
    if n < 2 or observations >= HOLDOUT_RATIO * unknowns:
        return None
    check = torch.arange(min(HOLDOUT_EVERY, n) - 1, n, HOLDOUT_EVERY)
    keep = torch.ones(n, dtype=torch.bool)
    keep[check] = False
    return torch.arange(n)[keep], check


def holdout_split(pairs: Sequence[tuple[Any, Any]], sizes: Sequence[int], observations: int, unknowns: int,
                  select: Callable[[Any, torch.Tensor], Any]) -> Optional[tuple[list, list, list, list]]:
    """``(fit a's, fit b's, check a's, check b's)`` of a fit's batches, or None when it has enough data.

    ``pairs``: per batch its ``(inputs, targets)``, ``sizes`` its number of samples; each batch is split by
    :func:`holdout_rows` and ``select(part, indices)`` takes the samples out of either half (a one-sample batch
    is fitted whole). None also when no batch gives a held-out sample.

    Example:
        >>> x = torch.arange(8.0)
        >>> fit_x, fit_y, chk_x, chk_y = holdout_split([(x, -x)], [8], 8, 32, lambda t, i: t[i])
        >>> chk_x[0].tolist(), chk_y[0].tolist()
        ([3.0, 7.0], [-3.0, -7.0])
    """
    if observations >= HOLDOUT_RATIO * unknowns:
        return None
    parts: tuple[list, list, list, list] = ([], [], [], [])
    for (a, b), n in zip(pairs, sizes):
        split = holdout_rows(n, observations, unknowns)
        if split is None:  # a one-sample batch: fitted
            parts[0].append(a)
            parts[1].append(b)
            continue
        for k, idx in ((0, split[0]), (2, split[1])):
            parts[k].append(select(a, idx))
            parts[k + 1].append(select(b, idx))
    return parts if parts[2] else None


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
