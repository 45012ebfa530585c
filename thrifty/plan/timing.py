"""Timing ONNX graphs side by side on ONNX Runtime: interleaved rounds, groups of sessions, anchor sessions.

The cost table (:mod:`thrifty.plan.cost`) and the planner's measurements time graphs through
:func:`time_graphs`; see its docstring for why each group carries several sessions of one anchor graph.

Example:
    >>> sorted(CLOCKS)
    ['cpu', 'wall']
"""
from __future__ import annotations

import itertools
import time
from typing import Any, Callable, Iterable, Optional, Sequence

import numpy as np

__all__ = ["CLOCKS", "time_graphs", "time_beside"]

CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def _round_times(backends: Sequence[Any], feed: Sequence[np.ndarray], rounds: int, warmup: int, min_ms: float,
                 seed: int, clock: str = "wall") -> np.ndarray:
    """ms per run, [graph, round], interleaved rounds in a shuffled order, each run repeated to last ``min_ms``."""
    now = CLOCKS[clock]
    reps = []
    for be in backends:
        t = float("inf")
        for _ in range(max(1, warmup)):
            t0 = now()
            be(feed)
            t = min(t, now() - t0)
        reps.append(max(1, int(np.ceil(min_ms / max(1e3 * t, 1e-6)))))
    rng = np.random.default_rng(seed)
    ts = np.zeros((len(backends), rounds))
    for r in range(rounds):
        for i in rng.permutation(len(backends)):
            t0 = now()
            for _ in range(reps[i]):
                backends[i](feed)
            ts[i, r] = 1e3 * (now() - t0) / reps[i]
    return ts


def time_graphs(graphs: Iterable[bytes], feed: Sequence[np.ndarray], threads: int, rounds: int = 7,
                warmup: int = 2, *, min_ms: float = 1.0, max_sessions: int = 24, spread: bool = False,
                each: Optional[Callable[[bytes], None]] = None, clock: str = "wall", anchors: int = 1):
    """Milliseconds per run of each ONNX graph on ``feed``, timed in groups of at most ``max_sessions`` sessions
    in interleaved rounds (module doc). The first ``anchors`` graphs are timed in every group; a graph's latency
    is the median over rounds of its time divided by that round's anchor scale (the geometric mean over the
    anchors of their time over their overall median), so a slow spell of a shared machine cancels. An anchor's
    latency is its median over every group.

    Why several anchors: two sessions of one graph run at speeds a few tenths of a percent to 2 % apart however
    many rounds they get (where their memory landed), so one anchor per group would shift every graph of the
    group by its own session's luck, and a table built from small differences (one layer switched) would add
    that shift up once per graph. ``anchors`` sessions per group (pass the same graph several times: each is
    its own session) cut it by their square root; sessions are created in a shuffled order.

    With ``spread=True`` also each median's relative standard error (``0.93 IQR / sqrt(n)`` over the median of
    the normalised times; an anchor: of its times over all groups). ``graphs`` is consumed lazily,
    ``max_sessions`` at a time (``each(graph)`` is called on every one), so a long list of large graphs never
    sits in memory at once. ``clock``: ``"wall"`` (what a latency budget means), or ``"cpu"``, the process's CPU
    time: at one thread it is the run's time on a core of its own, so on a shared machine it leaves out the
    time the process waited for a core (not the cache and memory contention)."""
    from thrifty.bench.backends import OrtBackend

    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    if anchors < 1:
        raise ValueError(f"anchors must be >= 1, got {anchors}")
    if clock not in CLOCKS:
        raise ValueError(f"clock must be one of {sorted(CLOCKS)}, got {clock!r}")
    it = iter(graphs)
    head = list(itertools.islice(it, anchors))
    if not head:
        return ([], []) if spread else []
    for g in head:
        if each is not None:
            each(g)
    na = len(head)
    step = max(1, max_sessions - na)
    groups: list[np.ndarray] = []  # per group: [anchors + graphs, rounds]
    for k in itertools.count():
        chunk = list(itertools.islice(it, step))
        if k and not chunk:
            break
        for g in chunk:
            if each is not None:
                each(g)
        todo = head + chunk
        del chunk
        backends: list[Any] = [None] * len(todo)
        for i in np.random.default_rng(10_000 + k).permutation(len(todo)):
            backends[i] = OrtBackend(todo[i], threads=threads)
        del todo
        groups.append(_round_times(backends, feed, rounds, warmup, min_ms, seed=k, clock=clock))
        del backends
    anchor = np.concatenate([t[:na] for t in groups], axis=1)  # [anchors, groups x rounds]
    med = np.median(anchor, axis=1)
    normed: list[np.ndarray] = []
    for t in groups:
        scale = np.exp(np.mean(np.log(t[:na] / med[:, None]), axis=0))  # per round
        normed += [r / scale for r in t[na:]]
    ms = [float(m) for m in med] + [float(np.median(r)) for r in normed]
    if not spread:
        return ms

    def rse(v: np.ndarray) -> float:
        q1, q3 = np.percentile(v, [25, 75])
        return float(0.93 * (q3 - q1) / np.sqrt(len(v)) / max(abs(float(np.median(v))), 1e-30))

    return ms, [rse(a) for a in anchor] + [rse(r) for r in normed]


def time_beside(ref: bytes, graphs: Iterable[bytes], feed: Sequence[np.ndarray], threads: int, rounds: int = 7, *,
                anchors: int = 3, each: Optional[Callable[[bytes], None]] = None, **kw: Any):
    """(ms, relative standard errors) of ``[ref, *graphs]``: :func:`time_graphs` with ``ref`` as the anchor
    graph in ``anchors`` sessions per group, its latency their geometric mean. ``each`` is called once per
    graph, ``ref`` first; ``graphs`` is consumed lazily; other keywords go to :func:`time_graphs`."""
    if anchors < 1:
        raise ValueError(f"anchors must be >= 1, got {anchors}")

    def seen(gs: Iterable[bytes]) -> Iterable[bytes]:
        for g in gs:
            if each is not None:
                each(g)
            yield g

    if each is not None:
        each(ref)
    ms, se = time_graphs(itertools.chain([ref] * anchors, seen(graphs)), feed, threads, rounds, spread=True,
                         anchors=anchors, **kw)
    return [float(np.exp(np.mean(np.log(ms[:anchors]))))] + ms[anchors:], [float(np.median(se[:anchors]))] + se[anchors:]
