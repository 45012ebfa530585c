"""Per-layer costs measured on ONNX Runtime, in context: latency (ms per batch) and deployed bytes.

Method: every cost is a difference of whole deployed graphs. For the reference assignment (all FP32 at first)
and for each (layer, candidate), the model with only that layer switched (derived from one round-to-nearest PTQ
run per candidate, :func:`deploy_graphs`: the latency does not depend on the weights' values) is exported
exactly as the final plan will be (``export_onnx``,
residual Adds made integer with the calibration data) and timed by ONNX Runtime at the user's batch size and
thread count; its cost is the difference to the reference. In-context differences include what a
per-layer microbenchmark of the ONNX subgraph misses: the QuantizeLinear/DequantizeLinear pairs at the layer's
boundaries, which fusions ORT's optimiser finds, and the thread pool's behaviour. Sessions are timed in
interleaved rounds (each round runs every graph once) so that a slow spell of a shared machine hits all of them
alike; the median of the rounds is kept. Bytes are the serialized ONNX sizes, so the additive size prediction is
exact up to protobuf framing.

Latency is not additive: a layer switched alone to int8 pays for its own QuantizeLinear/DequantizeLinear
boundary, which int8 neighbours share (an MLP whose layers are each slower alone in int8 runs 40 % faster all
int8). So the model is boundary-aware (``pairwise=True``, the default): for every producer -> consumer pair of
layers (:func:`thrifty.plan.graph.layer_edges`) and candidate ``c`` it has an interaction term

    I_ab = T(a, b switched) - T(a switched) - T(b switched) + T(reference)

and predicts ``T(x) = T_ref + sum_l d_l[x_l] + sum_(a,b) I_ab[x_a == x_b == c]``, exact for a runtime whose cost
is per layer plus per precision boundary. Every term is measured from both sides, in the FP32 graph and in the
all-``c`` graph (switching layers back); the two estimates are averaged, and the model is then fitted by least
squares to every graph timed (:func:`refit`, the averages as a prior), so what the pairwise model leaves out
(a layer three steps away changing the fusion) is spread over the terms instead of landing on one end. A mixed
pair (two different candidates) is not timed: when both quantize their inputs alike (int8, int7 and w4a8 all take
u8 activations) the tensor between them crosses the same QuantizeLinear/DequantizeLinear boundary as a same-
candidate pair, so its term is the mean of the two candidates' terms (:func:`pair_weights`; refitting sees that
sharing too); any other mix (W4 weight-only beside int8) gets none. The graph
with every layer switched is predicted and compared with its measurement (``CostTable.additivity``);
``pairwise=False`` keeps the additive model (two-sided per-layer differences only).

Random mixes: besides those designed graphs, ``mixes`` random assignments per candidate (each with a random
share of its layers switched) are timed. The model, fitted without them, predicts them first: that error
(``CostTable.mix_check``) is how well it predicts the partly-quantized graphs a planner picks, which neither end
of the additivity check is. Then they join the fit.

Timing: sessions are timed in interleaved rounds, in a shuffled order each round; a graph that runs faster than
``min_ms`` is run several times per round. Graphs are timed in groups of at most ``max_sessions`` sessions
(memory), each group with ``anchors`` sessions of the reference graph; a graph's latency is the median over
rounds of its time over the anchors' (geometric mean) in the same round, so a slow spell of a shared machine
cancels. Several anchors because a session's speed depends on where its memory landed (two sessions of one
MiniLM graph differ by up to 2 % however long they are timed): with one anchor, created first, its session's
luck moved every graph of its group alike, and MiniLM's single-layer differences summed to three times the
measured all-int8 saving. ``CostTable.noise`` is the median relative standard error of those medians (from
their rounds' interquartile range): the resolution the predicted differences are judged against; it does not
see the session-to-session spread, which the mixes' check does.

Tables are cached as JSON under ``$THRIFTY_CACHE/plan`` keyed by the FP32 graph's hash, the ONNX Runtime
version, the CPU, threads, batch, candidates, the method (mixes, anchors) and the layer pairs (atomic writes; an
unreadable entry is measured again).

Example:
    >>> t = CostTable(key={"k": 1}, layers=["a"], candidates=["fp32", "int8"], base_ms=2.0, base_bytes=100,
    ...               latency_ms={"a": {"fp32": 0.0, "int8": -0.5}}, bytes={"a": {"fp32": 0, "int8": -30}})
    >>> t.predict({"a": "int8"})
    (1.5, 70.0)
"""
from __future__ import annotations

import copy
import hashlib
import itertools
import json
import os
import platform
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Sequence

import numpy as np
import torch.nn as nn

from thrifty.plan.config import candidate, export_plan, plan_from_picks, quantize_plan
from thrifty.plan.timing import time_beside, time_graphs
from thrifty.utils import atomic_write_text, get_logger

__all__ = ["CostTable", "measure_costs", "refit", "pair_weights", "deploy_graphs", "iter_graphs", "time_graphs", "weight_bytes",
           "cache_path", "machine_key", "load_cached"]

log = get_logger("thrifty.plan")


@dataclass
class CostTable:
    """Measured costs relative to the reference assignment ``ref`` (None = every layer FP32).

    ``latency_ms[layer][cand]`` and ``bytes[layer][cand]`` are differences to the reference graph's
    ``base_ms`` / ``base_bytes`` (0 for the reference's own candidate; a candidate the layer does not accept
    has no entry). ``pairs["a|b"][cand]``: the latency interaction of layers a and b both at ``cand``;
    ``edges``: the layer pairs measured; ``noise``: relative standard error of one timed median.
    """

    key: dict[str, Any]
    layers: list[str]
    candidates: list[str]
    base_ms: float
    base_bytes: int
    latency_ms: dict[str, dict[str, float]]
    bytes: dict[str, dict[str, float]]
    ref: Optional[dict[str, str]] = None
    additivity: dict[str, dict[str, float]] = field(default_factory=dict)
    seconds: float = 0.0
    # every graph timed for the table: (non-FP32 picks, ms, bytes); the planner's fallback chooses among them
    measured: list[tuple[dict[str, str], float, int]] = field(default_factory=list)
    pairs: dict[str, dict[str, float]] = field(default_factory=dict)
    edges: list[list[str]] = field(default_factory=list)
    noise: float = 0.0
    # the model's relative error on random mixes before they joined its fit (measure_costs' `mixes`)
    mix_check: dict[str, float] = field(default_factory=dict)
    # the machine's 1-minute load average when the measurement started and ended (a cache entry outlives it)
    load: list[float] = field(default_factory=list)
    # candidate -> the candidate whose latency terms it shares: both deploy to graphs of identical structure (the
    # same nodes, dtypes and shapes; only values differ), so the runtime runs the same kernels for them, up to
    # what the values change (all-zero weight zero points skip a correction): `twin_offset[c]` per layer
    twins: dict[str, str] = field(default_factory=dict)
    twin_offset: dict[str, float] = field(default_factory=dict)

    def pair_terms(self, scale: float = 1.0) -> dict[tuple[str, str], dict[tuple[str, str], float]]:
        """The latency pair terms in :func:`thrifty.plan.solve.solve`'s form, times ``scale``: a measured term
        for each candidate both layers picked, and the derived one of each mixed pair that shares its boundary."""
        out: dict[tuple[str, str], dict[tuple[str, str], float]] = {}
        for k, d in self.pairs.items():
            terms = {}
            a, b = k.split("|", 1)
            for ca, cb in itertools.product(self.latency_ms[a], self.latency_ms[b]):
                w = pair_weights(d, ca, cb)
                if w:
                    terms[(ca, cb)] = scale * sum(v * d[c] for c, v in w.items())
            out[(a, b)] = terms
        return out

    def predict(self, picks: Mapping[str, str]) -> tuple[float, float]:
        """Predicted (latency ms, bytes) of a per-layer choice: reference plus the summed differences plus the
        pair terms of neighbours that picked the same candidate (or two that share their boundary)."""
        ms = self.base_ms + sum(self.latency_ms[n][c] for n, c in picks.items())
        for k, d in self.pairs.items():
            a, b = k.split("|", 1)
            if a in picks and b in picks:
                ms += sum(v * d[c] for c, v in pair_weights(d, picks[a], picks[b]).items())
        by = self.base_bytes + sum(self.bytes[n][c] for n, c in picks.items())
        return float(ms), float(by)

    def fastest(self) -> tuple[float, dict[str, str]]:
        """The smallest predicted latency of any choice (pair terms included: an ILP) and that choice."""
        from thrifty.plan.solve import solve

        ch = solve(self.latency_ms, {}, {}, "fastest plan", value_pairs=self.pair_terms())
        return self.base_ms + ch.objective, {n: str(c) for n, c in ch.picks.items()}

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "CostTable":
        return cls(**json.loads(text))


def _input_quant(name: str) -> Optional[tuple]:
    """How a candidate quantizes its layer's input (bits, symmetric), or None when the input stays float."""
    cfg = candidate(name).config
    cfg = getattr(cfg, "quant", cfg)  # a pruned layer (SparseQuant) quantizes its input as its quant says
    a_bits = getattr(cfg, "a_bits", None)
    return None if a_bits is None else (a_bits, getattr(cfg, "a_symmetric", False))


def pair_weights(terms: Mapping[str, float], ca: str, cb: str) -> dict[str, float]:
    """How a producer -> consumer pair picking ``ca`` and ``cb`` draws on its measured terms (candidate ->
    term): both the same candidate, that candidate's term; two candidates that quantize their inputs alike
    (int8 beside int7: one shared boundary), the mean of those of the two that were measured; else nothing.

        >>> pair_weights({"int8": -1.0, "int7": -0.6}, "int8", "int7")
        {'int8': 0.5, 'int7': 0.5}
        >>> pair_weights({"int8": -1.0, "w4": 0.1}, "int8", "w4"), pair_weights({"int8": -1.0}, "fp32", "fp32")
        ({}, {})
        >>> pair_weights({"int8": -1.0, "int8-2:4": -0.8}, "int8-2:4", "int8")
        {'int8-2:4': 0.5, 'int8': 0.5}
    """
    if ca == cb:
        return {ca: 1.0} if ca in terms else {}
    qa = _input_quant(ca)
    if qa is None or qa != _input_quant(cb):
        return {}
    have = [c for c in (ca, cb) if c in terms]
    return {c: 1.0 / len(have) for c in have}


def deploy_graphs(model: nn.Module, picks: Sequence[Mapping[str, str]], calib: Any, example: tuple,
                  input_names: Optional[Sequence[str]] = None, residual_calib: bool = True,
                  reuse_ranges: bool = True) -> list[bytes]:
    """The ONNX graph of ``model`` for each assignment in ``picks`` (see :func:`iter_graphs`)."""
    return list(iter_graphs(model, picks, calib, example, input_names, residual_calib, reuse_ranges))


def iter_graphs(model: nn.Module, picks: Sequence[Mapping[str, str]], calib: Any, example: tuple,
                input_names: Optional[Sequence[str]] = None, residual_calib: bool = True,
                reuse_ranges: bool = True) -> Iterator[bytes]:
    """The ONNX graph of ``model`` for each assignment in ``picks`` (layer -> candidate; absent = FP32).

    One round-to-nearest PTQ run per candidate quantizes every layer; an assignment's graph is that model with
    the slots of its FP32 layers emptied (latency and bytes do not depend on the weights' values), so a table
    of L layers costs one PTQ run, not L. An assignment mixing quantized candidates gets its own PTQ run.
    ``reuse_ranges``: the residual Adds' output quantizers (``residual_calib``) are calibrated once for all the
    graphs (:func:`thrifty.bench.int8_graph.quantize_residuals`' ``ranges``) instead of once per graph; their
    scales then come from the first graph calibrated, which changes no graph's nodes, sizes or latency.
    """
    from thrifty.nn import gemm_layers

    full: dict[str, nn.Module] = {}
    every_layer = list(dict.fromkeys(n for p in picks for n in p))
    family = next((c for p in picks for c in p.values() if c != "fp32"), None)
    ranges: Optional[dict] = {} if reuse_ranges else None
    with tempfile.TemporaryDirectory() as d:
        for i, p in enumerate(picks):
            q = {n: c for n, c in p.items() if c != "fp32"}
            kinds = set(q.values())
            if len(kinds) > 1:
                m = quantize_plan(model, plan_from_picks(q), calib).model
            elif kinds or family:
                # an all-FP32 assignment among quantized ones is derived too: the PTQ copy has its BatchNorms
                # folded, and the differences must not count that (once per layer) as the layer's bytes
                c = next(iter(kinds)) if kinds else family
                if c not in full:  # every layer that takes `c` (W4 weight-only: the Linear ones)
                    mods = dict(model.named_modules())
                    full[c] = quantize_plan(model, plan_from_picks(
                        {n: c for n in every_layer if candidate(c).accepts(mods[n])}), calib).model
                m = copy.deepcopy(full[c])
                for n, layer in gemm_layers(m):
                    if n not in q:
                        layer.slots.weight = None
                        layer.slots.input = None
            else:
                m = model
            path = export_plan(m, plan_from_picks(q), example, Path(d) / f"{i}.onnx", input_names=input_names,
                               calib=calib if residual_calib and q else None, residual_ranges=ranges)
            data = path.read_bytes()
            path.unlink()
            yield data


def _facts(graph: bytes) -> tuple[int, str]:
    """(:func:`weight_bytes`, a hash of the structure of the graph the runtime runs: nodes with their inputs,
    outputs and attributes, initializers' names, dtypes and shapes; not their values). N:M-compressed weights
    count as stored, and the structure is the decompressed graph's (what the runtime runs)."""
    import onnx

    from thrifty.bench.nm_onnx import METADATA_KEY, densify

    m = onnx.load_from_string(graph)
    stored = _initializer_bytes(m)
    if any(p.key == METADATA_KEY for p in m.metadata_props):
        m = densify(m)  # in place: the graph is parsed once
    h = hashlib.sha256()
    for n in m.graph.node:
        h.update(repr((n.op_type, n.domain, list(n.input), list(n.output),
                       [a.SerializeToString() for a in n.attribute])).encode())
    for t in m.graph.initializer:
        h.update(repr((t.name, t.data_type, list(t.dims))).encode())
    return stored, h.hexdigest()[:20]


def _initializer_bytes(m: Any) -> int:
    from onnx import numpy_helper

    return int(sum(numpy_helper.to_array(t).nbytes for t in m.graph.initializer))


def weight_bytes(graph: bytes) -> int:
    """Bytes a deployed graph stores in its initializers (weights, biases, scales, zero points): the size that
    a size budget limits. Protobuf framing and node names are left out: they are not a layer's cost and they
    make per-layer differences non-additive.

    Example:
        >>> import onnx, numpy as np
        >>> from onnx import helper, numpy_helper
        >>> g = helper.make_graph([], "g", [], [], [numpy_helper.from_array(np.zeros((2, 3), np.float32), "w")])
        >>> weight_bytes(helper.make_model(g).SerializeToString())
        24
    """
    import onnx

    return _initializer_bytes(onnx.load_from_string(graph))


def refit(table: CostTable, extra: Sequence[tuple[Mapping[str, str], float]] = (), weight: float = 1.0,
          prior: float = 1.0) -> CostTable:
    """The table with its latency terms (per layer and per pair) refitted by least squares to every graph it
    timed (``table.measured``, weight 1) and to the ``extra`` (picks, measured ms) points (weight ``weight``),
    pulled towards the current terms with weight ``prior`` per term (one pseudo-observation each, so a term no
    graph determines keeps its value). Bytes are exact and unchanged."""
    import dataclasses

    ref = {n: "fp32" for n in table.layers} | dict(table.ref or {})
    tw = table.twins  # a twin's terms are its first twin's plus one offset per layer (one parameter for both)
    terms = [(n, c, None) for n in table.layers for c in table.latency_ms[n] if c != ref[n] and c not in tw]
    terms += [(k, c, tuple(k.split("|", 1))) for k, d in table.pairs.items() for c in d if c not in tw]
    terms += [("*", c, None) for c in tw]
    theta0 = np.array([table.twin_offset.get(c, 0.0) if n == "*" else table.latency_ms[n][c] if e is None
                       else table.pairs[n][c] for n, c, e in terms])

    def row(picks: Mapping[str, str]) -> np.ndarray:
        p = {n: picks.get(n, "fp32") for n in table.layers}
        out = []
        for n, c, e in terms:
            if n == "*":
                out.append(float(sum(v == c for v in p.values())))
            elif e is None:
                out.append(float(tw.get(p[n], p[n]) == c))
            else:
                w = pair_weights(table.pairs[n], p[e[0]], p[e[1]])
                out.append(sum(v for o, v in w.items() if tw.get(o, o) == c))
        return np.array(out)

    data = [(row(p), ms - table.base_ms, 1.0) for p, ms, _ in table.measured]
    data += [(row(p), ms - table.base_ms, float(weight)) for p, ms in extra]
    if not terms or not data:
        return table
    a = np.vstack([np.sqrt(w) * r for r, _, w in data] + [np.sqrt(prior) * np.eye(len(terms))])
    y = np.concatenate([[np.sqrt(w) * v for _, v, w in data], np.sqrt(prior) * theta0])
    theta = np.linalg.lstsq(a, y, rcond=None)[0]
    lat = {n: dict(d) for n, d in table.latency_ms.items()}
    pairs = {k: dict(d) for k, d in table.pairs.items()}
    off = {c: float(v) for (n, c, _), v in zip(terms, theta) if n == "*"}
    for (n, c, e), v in zip(terms, theta):
        if n != "*":
            d = (pairs if e else lat)[n]
            d.update({o: float(v) + (0.0 if e else off.get(o, 0.0)) for o in d if tw.get(o, o) == c})
    return dataclasses.replace(table, latency_ms=lat, pairs=pairs, twin_offset=off)


def _tie(table: CostTable) -> None:
    """Tie each twin candidate (``table.twins``) to its first twin, in place: one per-layer and pair term for
    both (the mean of the two estimates, less the twin's offset) and one offset per twin, the mean difference
    of its per-layer terms from its first twin's."""
    for c, o in table.twins.items():
        both = [d for d in table.latency_ms.values() if c in d and o in d]
        off = float(np.mean([d[c] - d[o] for d in both])) if both else 0.0
        table.twin_offset[c] = off
        for d in both:
            d[o] = 0.5 * (d[o] + d[c] - off)
            d[c] = d[o] + off
        for d in table.pairs.values():
            if c in d and o in d:
                d[o] = d[c] = 0.5 * (d[o] + d[c])


def machine_key(threads: int, batch: int) -> dict[str, Any]:
    """What a latency depends on besides the graph: runtime version, CPU model and flags, threads, batch."""
    import onnxruntime as ort

    cpu = platform.processor() or platform.machine()
    try:
        info = Path("/proc/cpuinfo").read_text().splitlines()
        name = next((ln.split(":", 1)[1].strip() for ln in info if ln.startswith("model name")), cpu)
        flags = next((ln.split(":", 1)[1].strip() for ln in info if ln.startswith("flags")), "")
        cpu = f"{name} [{hashlib.sha256(flags.encode()).hexdigest()[:8]}]"
    except OSError:
        pass
    return {"onnxruntime": ort.__version__, "cpu": cpu, "threads": int(threads), "batch": int(batch)}


def cache_path(key: Mapping[str, Any]) -> Path:
    """``$THRIFTY_CACHE/plan/costs-<hash of key>.json``."""
    from thrifty.train.recipes import cache_dir

    h = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return cache_dir() / "plan" / f"costs-{h}.json"


def load_cached(key: Mapping[str, Any]) -> Optional[CostTable]:
    """The cached table of ``key``, or None (missing, unreadable, or stored under another key)."""
    p = cache_path(key)
    if not p.is_file():
        return None
    try:
        t = CostTable.from_json(p.read_text())
    except (ValueError, TypeError, OSError) as e:
        warnings.warn(f"thrifty.plan: ignoring the unreadable cost cache {p.name} ({type(e).__name__}: {e}); "
                      "measuring again", stacklevel=2)
        return None
    return t if t.key == dict(key) else None


def _load() -> float:
    return float(os.getloadavg()[0]) if hasattr(os, "getloadavg") else float("nan")


def measure_costs(model: nn.Module, calib: Any, example: tuple, feed: Sequence[np.ndarray], layers: Sequence[str],
                  candidates: Sequence[str] = ("fp32", "int8"), *, threads: int = 1, rounds: int = 7,
                  input_names: Optional[Sequence[str]] = None, ref: Optional[Mapping[str, str]] = None,
                  cache: bool = True, check_additivity: bool = True, pairwise: bool = True, min_ms: float = 1.0,
                  max_sessions: int = 24, clock: str = "wall", mixes: Optional[int] = None, anchors: int = 3,
                  seed: int = 0) -> CostTable:
    """Measure the per-layer cost table of ``model`` (see the module doc); ``feed`` is one batch of inputs.

    ``ref``: the reference assignment to take differences to (default every layer FP32; a table around another
    reference is one-sided and additive). ``check_additivity``: also measure from the all-candidate side
    (two-sided terms) and check the prediction there. ``pairwise``: the boundary-aware pair terms (module doc).
    ``mixes``: random assignments of each candidate timed besides (default: as many as the layers that take it;
    with ``check_additivity`` only): the model is checked on them before they join its fit
    (``CostTable.mix_check``), which is how well it predicts the partly-quantized graphs a planner picks.
    ``anchors``: sessions of the reference graph timed in every group (:func:`thrifty.plan.timing.time_beside`).
    ``min_ms``, ``max_sessions``, ``clock``: see :func:`time_graphs`. ``cache=False`` always measures (and does
    not store).
    """
    from thrifty.plan.graph import layer_edges

    cands = list(dict.fromkeys(candidates))
    for c in cands:
        candidate(c)
    if "fp32" not in cands:
        raise ValueError("measure_costs: the candidates must include 'fp32' (the reference every layer can keep)")
    layers = list(layers)
    mods = dict(model.named_modules())
    unknown = [n for n in layers if n not in mods]
    if not layers or unknown:
        raise ValueError(f"measure_costs: no layers given, or layers the model does not have: {unknown}")
    reference = {n: "fp32" for n in layers} | dict(ref or {})
    batch = int(feed[0].shape[0])
    t0, load = time.perf_counter(), [_load()]
    fp32 = deploy_graphs(model, [{}], calib, example, input_names)[0]
    two = check_additivity and not ref
    if mixes is not None and mixes < 0:
        raise ValueError(f"measure_costs: mixes must be >= 0 or None, got {mixes}")
    edges = layer_edges(fp32, model, layers) if pairwise and not ref and len(layers) > 1 else []
    ok = {c: [n for n in layers if candidate(c).accepts(mods[n])] for c in cands if c != "fp32"}
    n_mix = {c: (len(a) if mixes is None else mixes) if two and len(a) > 2 else 0 for c, a in ok.items()}
    key = {"model": hashlib.sha256(fp32).hexdigest()[:20], **machine_key(threads, batch), "candidates": cands,
           "method": ("pairwise, " if edges else "") + ("two-sided" if two else "one-sided")
           + (f", {sum(n_mix.values())} mixes (seed {seed})" if any(n_mix.values()) else "")
           + f", {anchors} anchors, twins tied with an offset",
           "edges": [list(e) for e in edges], "layers": layers, **({"clock": clock} if clock != "wall" else {}),
           "ref": {n: c for n, c in reference.items() if c != "fp32"}}
    if cache and (hit := load_cached(key)) is not None:
        return hit
    picks: list[dict[str, str]] = []
    index: dict[str, int] = {}

    def want(p: Mapping[str, str]) -> int:  # every assignment is deployed and timed once
        k = json.dumps(sorted(p.items()))
        if k not in index:
            index[k] = len(picks)
            picks.append(dict(p))
        return index[k]

    want(reference)
    # a candidate a layer does not accept (W4 weight-only on a Conv, say) is left out of that layer's entries
    single = {(n, c): want(reference | {n: c}) for n in layers for c in cands
              if c != reference[n] and (c == "fp32" or n in ok[c])}
    groups = {c: a for c, a in ok.items() if two and len(a) > 1}  # two-sided: the all-`c` side too
    top = {c: reference | {n: c for n in a} for c, a in groups.items()}
    itop = {c: want(p) for c, p in top.items()}
    back = {(n, c): want(top[c] | {n: "fp32"}) for c, a in groups.items() for n in a}
    cedges = {c: [(a, b) for a, b in edges if a in ok[c] and b in ok[c]] for c in ok}
    pair_lo = {(a, b, c): want(reference | {a: c, b: c}) for c, es in cedges.items() for a, b in es}
    pair_hi = {(a, b, c): want(top[c] | {a: "fp32", b: "fp32"}) for c, es in cedges.items() for a, b in es
               if c in groups}
    n_fit = len(picks)
    rng = np.random.default_rng(seed)
    mix: list[int] = []  # random assignments of one candidate, each layer in with a probability drawn per graph
    for c, k in n_mix.items():
        for _ in range(k):
            f = rng.uniform(0.1, 0.9)
            i = want(reference | {n: c for n in ok[c] if rng.random() < f})
            if i >= n_fit and i not in mix:
                mix.append(i)
    facts: list[tuple[int, str]] = []
    graphs = iter(iter_graphs(model, picks, calib, example, input_names))
    ms, rse = time_beside(next(graphs), graphs, feed, threads, rounds, anchors=anchors, min_ms=min_ms,
                          max_sessions=max_sessions, clock=clock, each=lambda g: facts.append(_facts(g)))
    nbytes = [b for b, _ in facts]
    # candidates whose every-layer graphs have one structure run the same kernels: one set of latency terms
    # (else the planner would pick, layer by layer, whichever twin's estimate came out luckier)
    twins: dict[str, str] = {}
    for c in groups:
        first = next((o for o in groups if facts[itop[o]][1] == facts[itop[c]][1]), c)
        if first != c and ok[first] == ok[c]:
            twins[c] = first
    lat: dict[str, dict[str, float]] = {n: {reference[n]: 0.0} for n in layers}
    size: dict[str, dict[str, float]] = {n: {reference[n]: 0.0} for n in layers}
    for (n, c), i in single.items():
        lat[n][c] = ms[i] - ms[0]
        size[n][c] = float(nbytes[i] - nbytes[0])
    pairs: dict[str, dict[str, float]] = {}
    for (a, b, c), i in pair_lo.items():
        lo = ms[i] - ms[single[(a, c)]] - ms[single[(b, c)]] + ms[0]
        if (a, b, c) in pair_hi:
            hi = ms[itop[c]] - ms[back[(a, c)]] - ms[back[(b, c)]] + ms[pair_hi[(a, b, c)]]
            lo = 0.5 * (lo + hi)
        pairs.setdefault(f"{a}|{b}", {})[c] = lo
    table = CostTable(key, layers, cands, ms[0], nbytes[0], lat, size, None if not ref else dict(reference))
    table.twins = twins
    everything = [({n: c for n, c in p.items() if c != "fp32"}, t, b) for p, t, b in zip(picks, ms, nbytes)]
    table.measured = everything[:n_fit]
    alone = {c: table.predict(top[c])[0] for c in groups}  # from the FP32 side only, no pair terms
    table.pairs, table.edges, table.noise = pairs, [list(e) for e in edges], float(np.median(rse))
    for c in groups:  # the all-`c` side: what switching each layer back saves, less its pair terms
        for n in ok[c]:
            d = ms[itop[c]] - ms[back[(n, c)]] - sum(pairs[f"{a}|{b}"][c] for a, b in cedges[c] if n in (a, b))
            lat[n][c] = 0.5 * (lat[n][c] + d)
    _tie(table)
    if mix:  # how well the model predicts graphs it was not fitted to, before they join the fit
        fitted = refit(table) if pairs else table
        err = np.array([(fitted.predict(picks[i])[0] - ms[i]) / ms[i] for i in mix])
        table.mix_check = {"graphs": len(mix), "median_abs_rel_error": float(np.median(np.abs(err))),
                           "max_abs_rel_error": float(np.max(np.abs(err))), "mean_rel_error": float(np.mean(err))}
    table.measured = everything
    if pairs or mix:  # the model fitted to every graph timed (the two-sided estimates as its prior)
        table = refit(table)
    for c in groups:
        i = itop[c]
        pred_ms, pred_b = table.predict(top[c])
        table.additivity[f"all {c}"] = {"predicted_ms": pred_ms, "measured_ms": ms[i], "predicted_bytes": pred_b,
                                        "measured_bytes": float(nbytes[i]),
                                        "latency_rel_error": (pred_ms - ms[i]) / ms[i],
                                        "one_sided_predicted_ms": alone[c],
                                        "one_sided_rel_error": (alone[c] - ms[i]) / ms[i]}
    table.seconds, table.load = time.perf_counter() - t0, load + [_load()]
    if cache:
        p = cache_path(key)
        p.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(p, table.to_json())
    return table
