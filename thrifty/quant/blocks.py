"""Block-wise sequential calibration: compress one block (a transformer layer, a residual stage) at a time.

The inputs of the first block (positional and keyword arguments: hidden states, attention mask, position
embeddings, ...) are captured once, with a hook that stops the forward pass there. Each block is then
compressed against the FP block, and the compressed block's outputs become the next block's inputs; the FP
reference stream is advanced the same way. Only two streams of one block's activations (compressed and FP)
plus one layer's are alive at a time, and every forward pass runs one block, never the whole model.

Memory: a stream is advanced batch by batch in place (each batch's inputs to the finished block are released
as its outputs are made), the streams can be cut into micro-batches (``walk_blocks(..., chunk=)``: a block's
transient activations are then those of ``chunk`` samples), and the structural checks (:func:`check_chain`,
:func:`split_layers`) run on the first :data:`PROBE` samples of a batch, keeping one block output at a time.

Blocks are found automatically (the container of repeated same-type children holding the most parameters:
``encoder.layer`` of a BERT, ``transformer.h`` of a GPT-2, the stages of a ResNet built as a Sequential) or
named: ``blocks="encoder.layer"`` (a container: its children) or a list of module names. Consecutive blocks
must be chained (block ``i + 1``'s first argument is block ``i``'s first output, its other arguments the
same); :func:`check_chain` verifies that on one batch.

Example:
    >>> import torch, torch.nn as nn
    >>> net = nn.Sequential(nn.Linear(4, 8), nn.Sequential(*[nn.Linear(8, 8) for _ in range(3)]), nn.Linear(8, 2))
    >>> find_blocks(net)
    ['1.0', '1.1', '1.2']
"""
from __future__ import annotations

from typing import Any, Iterator, Optional, Sequence, Union

import torch
import torch.nn as nn
from torch import Tensor

from thrifty.quant.calib import Batch, execution_order, take
from thrifty.utils import removing_hooks

__all__ = ["Blocks", "find_blocks", "block_inputs", "block_forward", "check_chain", "walk_blocks", "split_layers",
           "split_batches", "PROBE"]

Blocks = Union[None, str, Sequence[str]]  # None: whole model; "auto": found; a container name or module names
PROBE = 2  # samples the structural checks run on (the calibration batch's first ones)


def _probe(batch: Batch) -> Batch:
    """The first :data:`PROBE` samples of ``batch`` (a structural check needs no more)."""
    return take([batch], PROBE)[0]


def split_batches(batches: list[Batch], chunk: Optional[int]) -> list[Batch]:
    """``batches`` cut into consecutive micro-batches of at most ``chunk`` samples (None: as they are); the order
    of the samples, hence of their per-token rows, is kept."""
    if chunk is None:
        return batches
    if chunk < 1:
        raise ValueError(f"blocks: chunk must be a positive number of samples, got {chunk}")
    out: list[Batch] = []
    for b in batches:
        n = b.size
        out += [b] if n <= chunk else [b.select(torch.arange(i, min(i + chunk, n))) for i in range(0, n, chunk)]
    return out


def _params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def find_blocks(model: nn.Module, blocks: Blocks = "auto") -> list[str]:
    """The names of ``model``'s blocks in order; ValueError naming what is wrong otherwise (see module doc)."""
    mods = dict(model.named_modules())
    if blocks is None or blocks == "auto":
        best: Optional[tuple[int, int, str]] = None
        for name, m in mods.items():
            kids = list(m.children())
            if isinstance(m, (nn.ModuleList, nn.Sequential)) and len(kids) >= 2 \
                    and len({type(k) for k in kids}) == 1 and all(_params(k) for k in kids):
                key = (_params(m), len(kids), name)
                if best is None or key[:2] > best[:2]:
                    best = key
        if best is None:
            raise ValueError(f"blocks: {type(model).__name__} has no container of repeated blocks (a ModuleList or "
                             "Sequential of same-type layers); name them with blocks=[...]")
        return [f"{best[2]}.{k}" if best[2] else k for k, _ in mods[best[2]].named_children()]
    names = [blocks] if isinstance(blocks, str) else list(blocks)
    if not names or not all(isinstance(n, str) for n in names):
        raise TypeError(f"blocks must be None, 'auto', a module name or a list of module names, got {blocks!r}")
    bad = [n for n in names if n == "" or n not in mods]
    if bad:
        raise ValueError(f"blocks: {bad} name no submodule of {type(model).__name__}")
    if len(names) == 1 and isinstance(mods[names[0]], (nn.ModuleList, nn.Sequential)):
        names = [f"{names[0]}.{k}" for k, _ in mods[names[0]].named_children()]
    nested = [(a, b) for a in names for b in names if a != b and b.startswith(a + ".")]
    if nested or len(set(names)) != len(names):
        raise ValueError(f"blocks: {nested or names} overlap; name disjoint modules")
    return names


def _first(out: Any) -> Tensor:
    # a transformer layer returns its hidden states, or a tuple starting with them
    while isinstance(out, (tuple, list)):
        out = out[0]
    if not isinstance(out, Tensor):
        raise TypeError(f"blocks: a block returned {type(out).__name__}; expected a Tensor or a tuple starting with one")
    return out


class _Stop(Exception):
    pass


@torch.no_grad()
def block_inputs(model: nn.Module, block: nn.Module, batches: list[Batch]) -> list[Batch]:
    """The arguments ``block`` is called with, per calibration batch (the forward stops at the block)."""
    got: list[tuple[tuple, dict]] = []

    def pre(_m: nn.Module, args: tuple, kwargs: dict) -> None:
        det = lambda v: v.detach() if isinstance(v, Tensor) else v  # noqa: E731
        got.append((tuple(det(a) for a in args), {k: det(v) for k, v in kwargs.items()}))
        raise _Stop

    from thrifty.quant.calib import run

    out: list[Batch] = []
    with removing_hooks([block.register_forward_pre_hook(pre, with_kwargs=True)]):
        for b in batches:
            try:
                run(model, b)
            except _Stop:
                pass
            if len(got) != len(out) + 1:
                raise RuntimeError("blocks: the first block was not executed on a calibration batch")
            args, kwargs = got[-1]
            mask = b.tokens()
            out.append(Batch(args, kwargs, token_mask=None if mask is None else mask.to(_first(args).device)))
    return out


def _advance(block: nn.Module, b: Batch) -> Batch:
    return Batch((_first(block(*b.args, **b.kwargs)),) + tuple(b.args[1:]), b.kwargs, token_mask=b.token_mask)


@torch.no_grad()
def block_forward(block: nn.Module, inputs: list[Batch], *, inplace: bool = False) -> list[Batch]:
    """The next block's inputs: ``block``'s first output in place of the first argument, the rest unchanged.

    ``inplace``: replace ``inputs``' entries one by one (and return that list), so each batch's old inputs are
    released as soon as its outputs exist: one batch of the two is alive at a time instead of the whole stream.
    """
    if not inplace:
        return [_advance(block, b) for b in inputs]
    for i in range(len(inputs)):
        inputs[i] = _advance(block, inputs[i])
    return inputs


@torch.no_grad()
def check_chain(model: nn.Module, names: list[str], batch: Batch) -> None:
    """ValueError unless each named block feeds the next (its first output is the next one's first input)."""
    from thrifty.quant.calib import run

    # on the batch's first PROBE samples; only the last finished block's output is kept (not one per block)
    seen: set[str] = set()
    done: set[str] = set()
    last: dict[str, Tensor] = {}  # {block: its first output} for the block whose successor is still to come
    bad: list[str] = []
    with removing_hooks() as hooks:
        for i, n in enumerate(names):
            def pre(_m, args, kwargs, i=i, n=n):
                if n in seen:
                    return
                first = args[0] if args else next(iter(kwargs.values()), None)
                if not isinstance(first, Tensor):
                    return
                seen.add(n)
                if i:
                    prev = last.pop(names[i - 1], None)
                    if prev is not None and not (first is prev or (first.shape == prev.shape
                                                                   and torch.equal(first, prev))):
                        bad.append(n)

            def post(_m, _a, out, i=i, n=n):
                if n not in done:
                    done.add(n)
                    if i + 1 < len(names):
                        last[n] = _first(out)
            hooks.append(model.get_submodule(n).register_forward_pre_hook(pre, with_kwargs=True))
            hooks.append(model.get_submodule(n).register_forward_hook(post))
        run(model, _probe(batch))
    missing = [n for n in names if n not in seen or n not in done]
    if missing:
        raise ValueError(f"blocks: {missing} did not run on the calibration data (or took no tensor input)")
    for a, b in zip(names, names[1:]):
        if b in bad or a in last:  # a's output was never consumed by b's first call: b ran before a finished
            raise ValueError(f"blocks: {b!r} is not fed by {a!r} (its first input is not {a!r}'s output); "
                             "name chained blocks with blocks=[...]")


def split_layers(model: nn.Module, names: list[str], blocks: list[str],
                 batch: Batch) -> tuple[list[str], dict[str, list[str]], list[str]]:
    """``names`` (in execution order) split into (before the first block, {block: its layers}, the rest)."""
    order = execution_order(model, {n: model.get_submodule(n) for n in names}, _probe(batch))
    inside = {n: next((b for b in blocks if n.startswith(b + ".")), None) for n in order}
    first = next((i for i, n in enumerate(order) if inside[n] is not None), len(order))
    per: dict[str, list[str]] = {b: [] for b in blocks}
    for n in order:
        if inside[n] is not None:
            per[inside[n]].append(n)  # type: ignore[index]
    rest = [n for n in order[first:] if inside[n] is None]
    return order[:first], per, rest


def walk_blocks(model: nn.Module, ref: nn.Module, blocks: list[str], batches: list[Batch], *,
                chunk: Optional[int] = None) -> Iterator[tuple[str, list[Batch], list[Batch]]]:
    """Yield ``(block, compressed-stream inputs, FP-stream inputs)`` per block, in order.

    The caller compresses ``model``'s block before asking for the next one; the streams then advance through
    the compressed block and through ``ref``'s (FP) block, in place: the yielded lists are the same objects
    from block to block, their entries replaced batch by batch (a finished block's inputs are released as the
    next block's are made; a caller must not keep them). The first capture happens at the first ``next``,
    so layers before the first block may be compressed before it. ``chunk``: cut the streams into
    micro-batches of at most that many samples (:func:`split_batches`).
    """
    q_in = split_batches(block_inputs(model, model.get_submodule(blocks[0]), batches), chunk)
    fp_in = split_batches(block_inputs(ref, ref.get_submodule(blocks[0]), batches), chunk)
    for i, name in enumerate(blocks):
        yield name, q_in, fp_in
        if i + 1 < len(blocks):
            block_forward(model.get_submodule(name), q_in, inplace=True)
            block_forward(ref.get_submodule(name), fp_in, inplace=True)
    q_in.clear()
    fp_in.clear()
