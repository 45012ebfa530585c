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

Additivity is checked, not assumed: for each candidate, the graph with *every* layer switched is measured too
and compared with the reference plus the summed differences (``CostTable.additivity``). It does not hold from
one side: a layer switched alone to int8 pays for its own QuantizeLinear/DequantizeLinear boundary, which int8
neighbours share (an MLP whose layers are each slower alone in int8 runs 40 % faster all int8). So the latency
difference of (layer, candidate) is two-sided: the mean of switching it in the FP32 graph and switching it back
in the all-candidate graph, which halves the interaction error at both ends; the planner then re-linearises
around its chosen plan when that plan's measured latency is still off.

Tables are cached as JSON under ``$THRIFTY_CACHE/plan`` keyed by the FP32 graph's hash, the ONNX Runtime
version, the CPU, threads, batch and candidates (atomic writes; an unreadable entry is measured again).

Example:
    >>> t = CostTable(key={"k": 1}, layers=["a"], candidates=["fp32", "int8"], base_ms=2.0, base_bytes=100,
    ...               latency_ms={"a": {"fp32": 0.0, "int8": -0.5}}, bytes={"a": {"fp32": 0, "int8": -30}})
    >>> t.predict({"a": "int8"})
    (1.5, 70.0)
"""
from __future__ import annotations

import copy
import hashlib
import json
import platform
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import torch.nn as nn

from thrifty.plan.config import candidate, plan_from_picks, quantize_plan
from thrifty.utils import atomic_write_text, get_logger

__all__ = ["CostTable", "measure_costs", "deploy_graphs", "time_graphs", "weight_bytes", "cache_path", "machine_key", "load_cached"]

log = get_logger("thrifty.plan")


@dataclass
class CostTable:
    """Measured costs relative to the reference assignment ``ref`` (None = every layer FP32).

    ``latency_ms[layer][cand]`` and ``bytes[layer][cand]`` are differences to the reference graph's
    ``base_ms`` / ``base_bytes`` (0 for the reference's own candidate; a candidate the layer does not accept
    has no entry).
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

    def predict(self, picks: Mapping[str, str]) -> tuple[float, float]:
        """Predicted (latency ms, bytes) of a per-layer choice: reference plus the summed differences."""
        ms = self.base_ms + sum(self.latency_ms[n][c] for n, c in picks.items())
        by = self.base_bytes + sum(self.bytes[n][c] for n, c in picks.items())
        return float(ms), float(by)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "CostTable":
        return cls(**json.loads(text))


def deploy_graphs(model: nn.Module, picks: Sequence[Mapping[str, str]], calib: Any, example: tuple,
                  input_names: Optional[Sequence[str]] = None, residual_calib: bool = True) -> list[bytes]:
    """The ONNX graph of ``model`` for each assignment in ``picks`` (layer -> candidate; absent = FP32).

    One round-to-nearest PTQ run per candidate quantizes every layer; an assignment's graph is that model with
    the slots of its FP32 layers emptied (latency and bytes do not depend on the weights' values), so a table
    of L layers costs one PTQ run, not L. An assignment mixing quantized candidates gets its own PTQ run.
    """
    from thrifty.bench.export import export_onnx
    from thrifty.nn import gemm_layers

    full: dict[str, nn.Module] = {}
    every_layer = list(dict.fromkeys(n for p in picks for n in p))
    family = next((c for p in picks for c in p.values() if c != "fp32"), None)
    out = []
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
                if c not in full:
                    full[c] = quantize_plan(model, plan_from_picks({n: c for n in every_layer}), calib).model
                m = copy.deepcopy(full[c])
                for n, layer in gemm_layers(m):
                    if n not in q:
                        layer.slots.weight = None
                        layer.slots.input = None
            else:
                m = model
            path = export_onnx(m, example, Path(d) / f"{i}.onnx", input_names=input_names,
                               calib=calib if residual_calib and q else None)
            out.append(path.read_bytes())
    return out


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
    from onnx import numpy_helper

    m = onnx.load_from_string(graph)
    return int(sum(numpy_helper.to_array(t).nbytes for t in m.graph.initializer))


def time_graphs(graphs: Sequence[bytes], feed: Sequence[np.ndarray], threads: int, rounds: int = 7,
                warmup: int = 2) -> list[float]:
    """Median milliseconds per run of each ONNX graph on ``feed``, timed in interleaved rounds."""
    from thrifty.bench.backends import OrtBackend

    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    backends = [OrtBackend(g, threads=threads) for g in graphs]
    for be in backends:
        for _ in range(warmup):
            be(feed)
    ts: list[list[float]] = [[] for _ in backends]
    for _ in range(rounds):
        for i, be in enumerate(backends):
            t = time.perf_counter()
            be(feed)
            ts[i].append(time.perf_counter() - t)
    return [1e3 * float(np.median(t)) for t in ts]


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


def measure_costs(model: nn.Module, calib: Any, example: tuple, feed: Sequence[np.ndarray], layers: Sequence[str],
                  candidates: Sequence[str] = ("fp32", "int8"), *, threads: int = 1, rounds: int = 7,
                  input_names: Optional[Sequence[str]] = None, ref: Optional[Mapping[str, str]] = None,
                  cache: bool = True, check_additivity: bool = True) -> CostTable:
    """Measure the per-layer cost table of ``model`` (see the module doc); ``feed`` is one batch of inputs.

    ``ref``: the reference assignment to take differences to (default every layer FP32); the planner passes
    its chosen plan here to re-linearise around it. ``cache=False`` always measures (and does not store).
    """
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
    t0 = time.perf_counter()
    fp32 = deploy_graphs(model, [{}], calib, example, input_names)[0]
    key = {"model": hashlib.sha256(fp32).hexdigest()[:20], **machine_key(threads, batch), "candidates": cands,
           "method": "two-sided" if check_additivity and not ref else "one-sided",
           "layers": layers, "ref": {n: c for n, c in reference.items() if c != "fp32"}}
    if cache and (hit := load_cached(key)) is not None:
        return hit
    variants: list[tuple[str, str]] = [(n, c) for n in layers for c in cands
                                       if c != reference[n] and candidate(c).accepts(mods[n])]
    others = [c for c in cands if c != "fp32" and all(candidate(c).accepts(mods[n]) for n in layers)] \
        if check_additivity and not ref else []
    # two-sided: each layer switched back to FP32 in the all-`c` graph too (see the module doc)
    back = [(n, c) for c in others for n in layers] if len(layers) > 1 else []
    picks = [reference] + [reference | {n: c} for n, c in variants] + [{n: c for n in layers} for c in others] \
        + [{m: (c if m != n else "fp32") for m in layers} for n, c in back]
    graphs = deploy_graphs(model, picks, calib, example, input_names)
    ms = time_graphs(graphs, feed, threads, rounds)
    nbytes = [weight_bytes(g) for g in graphs]  # each graph parsed once
    # a candidate a layer does not accept (W4 weight-only on a Conv, say) is left out of that layer's entries
    lat: dict[str, dict[str, float]] = {n: {reference[n]: 0.0} for n in layers}
    size: dict[str, dict[str, float]] = {n: {reference[n]: 0.0} for n in layers}
    for i, (n, c) in enumerate(variants, start=1):
        lat[n][c] = ms[i] - ms[0]
        size[n][c] = float(nbytes[i] - nbytes[0])
    table = CostTable(key, layers, cands, ms[0], nbytes[0], lat, size, None if not ref else dict(reference))
    table.measured = [({n: c for n, c in p.items() if c != "fp32"}, t, b) for p, t, b in zip(picks, ms, nbytes)]
    alone = {c: table.predict({n: c for n in layers})[0] for c in others}  # one-sided, from the FP32 graph
    top = {c: ms[1 + len(variants) + j] for j, c in enumerate(others)}
    for j, (n, c) in enumerate(back):
        i = 1 + len(variants) + len(others) + j
        lat[n][c] = 0.5 * (lat[n][c] + (top[c] - ms[i]))
    for j, c in enumerate(others):
        i = 1 + len(variants) + j
        pred_ms, pred_b = table.predict({n: c for n in layers})
        table.additivity[f"all {c}"] = {"predicted_ms": pred_ms, "measured_ms": ms[i], "predicted_bytes": pred_b,
                                        "measured_bytes": float(nbytes[i]),
                                        "latency_rel_error": (pred_ms - ms[i]) / ms[i],
                                        "one_sided_predicted_ms": alone[c],
                                        "one_sided_rel_error": (alone[c] - ms[i]) / ms[i]}
    table.seconds = time.perf_counter() - t0
    if cache:
        p = cache_path(key)
        p.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(p, table.to_json())
    return table
