"""The planner's report: its plans over a sweep of latency budgets against the uniform choices, side by side.

Uniform choices: all FP32, all int8 and W4A8 (first and last layers int8, PTQ's usual policy), and every other
candidate on every layer that takes it (int7, W4 weight-only on the Linears, int8 2:4...) when it is a candidate
(thrifty's PTQ with the plan's pipeline, exported by :func:`thrifty.plan.config.export_plan`), and ONNX Runtime's
own ``quantize_static`` (QDQ, uint8 activations, int8 per-channel weights: its fastest layout on VNNI CPUs) on
the FP32 graph with the same calibration data. Every graph is timed in the
same interleaved rounds (:func:`thrifty.plan.timing.time_graphs`) and scored on the same samples by ONNX Runtime
(top-1 with labels, else cosine to the FP32 outputs). The chosen plan is also run end to end by the LoadGen
harness. :func:`pareto_front` marks the points no other point beats on both axes.

Example:
    >>> pareto_front([{"name": "a", "x": 1, "y": 0.9}, {"name": "b", "x": 2, "y": 0.8}], "x", "y")
    ['a']
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch.nn as nn

from thrifty.plan.config import candidate, export_plan, plan_from_picks, quantize_plan
from thrifty.plan.cost import measure_costs, weight_bytes
from thrifty.plan.timing import time_beside
from thrifty.plan.planner import PlanResult, make_plan
from thrifty.plan.quality import METRICS, _pct, next_token_nll, paired_se, sample_scores, targets
from thrifty.utils import atomic_savefig, atomic_write_text

__all__ = ["pareto_front", "ort_quantize_static", "evaluate_graph", "loadgen_latency", "plan_report",
           "markdown", "plot_pareto", "write_report", "next_token_nll", "targets"]


def pareto_front(points: Sequence[dict[str, Any]], cost: str, quality: str) -> list[str]:
    """Names of the points not dominated (another point with cost <= and quality >=, one of them strict)."""
    front = []
    for p in points:
        if not any(q[cost] <= p[cost] and q[quality] >= p[quality] and (q[cost] < p[cost] or q[quality] > p[quality])
                   for q in points):
            front.append(p["name"])
    return front


def ort_quantize_static(fp32: bytes, feeds: list[dict[str, np.ndarray]]) -> bytes:
    """ONNX Runtime's ``quantize_static`` of an FP32 graph (after ``quant_pre_process``): QDQ, uint8 activations,
    int8 per-channel weights."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class _Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter(feeds)

        def get_next(self):  # noqa: ANN201 (ORT's interface)
            return next(self.it, None)

    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory() as d:
        src, pre, dst = Path(d) / "fp32.onnx", Path(d) / "pre.onnx", Path(d) / "ort_static.onnx"
        src.write_bytes(fp32)
        # ORT's recommended pre-processing (BatchNorms folded into the convs, shapes inferred): without it the
        # BatchNormalization weights are quantized too and fewer convs fuse
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        quantize_static(str(pre), str(dst), _Reader(), quant_format=QuantFormat.QDQ,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True)
        return dst.read_bytes()


def _outputs(graph: bytes, samples: Any, threads: int, batch: int = 64) -> np.ndarray:
    from thrifty.bench.backends import OrtBackend

    be = OrtBackend(graph, threads=threads)
    n = len(samples)
    return np.concatenate([np.asarray(be(samples.batch(range(i, min(i + batch, n))))).reshape(min(batch, n - i), -1)
                           for i in range(0, n, batch)])


def evaluate_graph(graph: bytes, samples: Any, threads: int = 1, reference: Optional[np.ndarray] = None,
                   metric: str = "auto") -> float:
    """The quality of an ONNX graph on ``samples`` (``thrifty.bench.Samples``). ``metric``: ``"top1"`` (class
    labels), ``"cosine"`` (mean cosine similarity of the outputs to ``reference``), ``"perplexity"`` (a causal
    LM: next-token perplexity of its logits on its own first input, the token ids) or ``"auto"``: top-1 when
    the samples carry class labels the outputs score, else cosine."""
    if metric not in ("auto", *METRICS):
        raise ValueError(f"evaluate_graph: metric must be 'auto' or one of {sorted(METRICS)}, got {metric!r}")
    out = _outputs(graph, samples, threads)
    if metric == "top1" and _metric_of(samples, out, "auto") != "top1":
        raise ValueError("evaluate_graph: metric 'top1' needs class labels the outputs score (one output per class)")
    metric = _metric_of(samples, out, metric)
    if metric == "cosine" and reference is None:
        raise ValueError("evaluate_graph: the samples have no class labels; pass reference outputs")
    return _scores_of(out, samples, reference, metric)[0]


def _scores_of(out: np.ndarray, samples: Any, reference: Optional[np.ndarray], metric: str
               ) -> tuple[float, np.ndarray]:
    """Outputs' metric value and per-sample scores (:func:`thrifty.plan.quality.sample_scores`)."""
    ids = samples.inputs[0] if metric == "perplexity" else None
    return sample_scores(out, metric, samples.labels, reference, ids)


def _metric_of(samples: Any, out: np.ndarray, metric: str) -> str:
    """The metric ``"auto"`` resolves to on these samples (``out``: the FP32 outputs)."""
    if metric != "auto":
        return metric
    from thrifty.bench.accuracy import score_outputs

    has_top1 = samples.labels is not None and "top1" in score_outputs({i: out[i] for i in range(min(len(out), 8))},
                                                                       samples.labels[:8])
    return "top1" if has_top1 else "cosine"


def loadgen_latency(graph: bytes, samples: Any, threads: int, batch: int, outdir: Path,
                    min_duration_s: float = 1.0) -> dict[str, Any]:
    """Median and p90 query latency (ms) of ``graph`` under LoadGen: SingleStream at batch 1, else MultiStream
    with ``batch`` samples per query (one SUT worker with ``threads`` ONNX Runtime threads)."""
    from thrifty.bench.backends import OrtBackend
    from thrifty.bench.harness import calibrate, run_loadgen
    from thrifty.bench.settings import BenchConfig

    outdir.mkdir(parents=True, exist_ok=True)
    path = outdir / "model.onnx"
    path.write_bytes(graph)
    be = OrtBackend(path, threads=threads)
    s = BenchConfig(scenario="SingleStream" if batch == 1 else "MultiStream", multistream_samples=max(batch, 1),
                    max_batch=max(batch, 1), workers=1, threads=threads, min_duration_s=min_duration_s,
                    min_query_count=32, performance_sample_count=min(len(samples), 1024))
    r = run_loadgen(be, samples, s, outdir / "loadgen", calibrate(be, samples, s, budget_s=0.3))
    pct = {float(k): v for k, v in r["percentiles_ms"].items()}
    near = lambda q: pct[min(pct, key=lambda k: abs(k - q))]  # noqa: E731
    return {"scenario": s.scenario, "valid": bool(r.get("valid")), "median_ms": near(50.0), "p90_ms": near(90.0)}


def plan_report(model: nn.Module, calib: Any, example: tuple, samples: Any, *, latency_ms: Optional[float],
                size_mb: Optional[float], batch: int = 32, threads: int = 1, rounds: int = 7, sweep: int = 3,
                pipeline: str = "rtn", adaquant_iters: int = 200, candidates: Sequence[str] = ("fp32", "int8"),
                input_names: Optional[Sequence[str]] = None, loadgen_dir: Optional[Path] = None,
                loadgen_s: float = 1.0, cache: bool = True, clock: str = "wall",
                max_rounds: int = 3, layers: Optional[Sequence[str]] = None,
                metric: str = "auto") -> tuple[PlanResult, dict[str, Any]]:
    """Plan under the budgets, sweep ``sweep`` more latency budgets, and compare with the uniform choices.

    Returns the plan for the user's budgets and the report (JSON-able): every point's measured latency, bytes
    and accuracy, the Pareto fronts, predicted vs measured latency and loss of each plan, the cost table's
    additivity check and, with ``loadgen_dir``, the chosen plan's LoadGen latency.

    ``layers``: the GEMMs to plan (default every layer the PTQ pipeline quantizes; the uniform points quantize
    the same ones). ``metric``: how every point is scored (:func:`evaluate_graph`; ``"perplexity"`` for a causal
    LM, lower is better, which the Pareto fronts follow). Samples are fed to ONNX Runtime as they are: several
    inputs (``input_ids``, ``attention_mask``) in ``input_names`` order, integer token ids included.
    """
    if metric not in ("auto", *METRICS):
        raise ValueError(f"plan_report: metric must be 'auto' or one of {sorted(METRICS)}, got {metric!r}")
    from thrifty.bench.export import export_onnx
    from thrifty.bench.int8_graph import onnx_feeds
    from thrifty.quant.calib import as_batches

    feed = samples.batch(range(min(batch, len(samples))))
    main = make_plan(model, calib, example, feed, latency_ms=latency_ms, size_mb=size_mb, candidates=candidates,
                     pipeline=pipeline, adaquant_iters=adaquant_iters, threads=threads, rounds=rounds,
                     input_names=input_names, cache=cache, clock=clock, max_rounds=max_rounds, layers=layers)
    layers, table, sens = list(main.picks), main.table, main.sensitivity
    plans: dict[str, PlanResult] = {"plan (budget)": main}
    skipped: list[float] = []
    # the sweep solves on the all-FP32 table (cached by the first make_plan), not on a re-linearised one
    base = measure_costs(model, calib, example, feed, layers, candidates, threads=threads, rounds=rounds,
                         input_names=input_names, cache=cache, clock=clock) if table.ref else table
    if sweep:
        fastest = base.fastest()[0]
        for i, lat in enumerate(np.linspace(fastest, base.base_ms, sweep + 2)[1:-1]):
            try:
                plans[f"plan {i + 1}"] = make_plan(model, calib, example, feed, latency_ms=float(lat), size_mb=size_mb,
                                                   candidates=candidates, pipeline=pipeline,
                                                   adaquant_iters=adaquant_iters, threads=threads, rounds=rounds,
                                                   input_names=input_names, layers=layers, table=base, sens=sens,
                                                   max_rounds=min(max_rounds, 2), cache=cache, clock=clock)
            except ValueError:  # the size budget rules this latency out: recorded, not plotted
                skipped.append(float(lat))
    graphs: dict[str, bytes] = {}
    with tempfile.TemporaryDirectory() as d:
        graphs["fp32"] = export_onnx(model, example, Path(d) / "fp32.onnx", input_names=input_names).read_bytes()
        mods = dict(model.named_modules())
        # uniform points: all int8; W4A8 with PTQ's usual 8-bit first and last layers (a plan gives every layer
        # exactly its config, so the policy is spelled out); every layer that takes it for the other candidates
        uni = {"int8": {n: "int8" for n in layers},
               "w4a8": {n: "int8" if n in (layers[0], layers[-1]) else "w4a8" for n in layers}}
        uni |= {c: {n: c for n in layers if candidate(c).accepts(mods[n])} for c in candidates
                if c not in ("fp32", "int8", "w4a8")}
        chosen: dict[str, frozenset] = {"fp32": frozenset()}  # what each point quantizes, to find copies
        for name, picks in uni.items():
            plan = plan_from_picks(picks, pipeline, adaquant_iters)
            res = quantize_plan(model, plan, calib)
            if res is None:  # no layer takes the candidate
                continue
            chosen[name] = frozenset((n, c) for n, c in picks.items() if c != "fp32")
            graphs[name] = export_plan(res.model, plan, example, Path(d) / "uniform.onnx", input_names=input_names,
                                       calib=calib).read_bytes()
    names = list(input_names or [f"input_{i}" for i in range(len(example))])
    skipped_points: dict[str, str] = {}
    try:
        graphs["ort quantize_static"] = ort_quantize_static(graphs["fp32"], onnx_feeds(as_batches(calib), names))
    except Exception as e:  # ORT's quantizer on a graph it does not handle: the report says so, the rest stands
        skipped_points["ort quantize_static"] = f"{type(e).__name__}: {e}"[:300]
    uniform = list(graphs)
    graphs.update({k: p.onnx for k, p in plans.items()})
    # a plan that quantizes exactly what an earlier point does is that point: one graph, timed and scored once
    # (separate sessions of one graph differ by more than one session's timing noise)
    same_as: dict[str, str] = {}
    for k, p in plans.items():
        mine = frozenset((n, c) for n, c in p.picks.items() if c != "fp32")
        match = next((o for o, c in chosen.items() if c == mine), None)
        if match is None:
            chosen[k] = mine
        else:
            same_as[k] = match
    keys = [k for k in graphs if k not in same_as]
    # sessions of the FP32 graph anchor the rounds (keys[0] is "fp32")
    t, se = time_beside(graphs["fp32"], [graphs[k] for k in keys[1:]], feed, threads, rounds, clock=clock)
    ms, noise = dict(zip(keys, t)), dict(zip(keys, se))
    ref = _outputs(graphs["fp32"], samples, threads)
    metric = _metric_of(samples, ref, metric)
    sign = 1.0 if METRICS[metric] else -1.0
    scores: dict[str, tuple[float, np.ndarray]] = {}
    points = []
    for k in graphs:
        src = same_as.get(k, k)
        ms[k], noise[k] = ms[src], noise[src]
        if src not in scores:
            scores[src] = _scores_of(_outputs(graphs[src], samples, threads), samples, ref, metric)
        acc = scores[src][0]
        pt: dict[str, Any] = {"name": k, "kind": "uniform" if k in uniform else "planner", "latency_ms": ms[k],
                              "noise": noise[k], "bytes": weight_bytes(graphs[k]), "accuracy": acc,
                              "quality": sign * acc}
        if k in same_as:
            pt["same_as"] = src
        if k in plans:
            p = plans[k]
            pt.update(predicted_latency_ms=p.predicted["latency_ms"], predicted_loss=p.predicted["loss"],
                      measured_loss=p.measured["loss"], quantized=sum(c != "fp32" for c in p.picks.values()),
                      picks=p.picks,
                      latency_budget_ms=p.budgets["latency_ms"],
                      # the prediction is at the table's FP32 latency; this run's FP32 graph sets the scale
                      latency_rel_error=(p.predicted["latency_ms"] * ms["fp32"] / base.base_ms - ms[k]) / ms[k],
                      latency_rel_error_raw=(p.predicted["latency_ms"] - ms[k]) / ms[k])
        points.append(pt)
    report: dict[str, Any] = {
        "budgets": {"latency_ms": latency_ms, "size_mb": size_mb}, "batch": len(feed[0]), "threads": threads,
        "rounds": rounds, "clock": clock, "pipeline": pipeline, "candidates": list(candidates), "layers": len(layers),
        "samples": len(samples), "metric": metric, "higher_is_better": METRICS[metric], "points": points,
        # paired standard errors of the quality differences, planner point -> uniform point
        "quality_se": {k: {u: paired_se(scores[same_as.get(k, k)][1], scores[u][1], metric) for u in uniform}
                       for k in plans},
        "pareto_latency": pareto_front(points, "latency_ms", "quality"),
        "pareto_size": pareto_front(points, "bytes", "quality"),
        "sweep_infeasible_ms": skipped, "points_skipped": skipped_points,
        "plan": {"picks": main.picks, "predicted": main.predicted, "measured": main.measured,
                 "rounds": main.rounds, "timings": main.timings,
                 "meets_latency": latency_ms is None or ms["plan (budget)"] * base.base_ms / ms["fp32"] <= latency_ms,
                 "meets_latency_raw": latency_ms is None or ms["plan (budget)"] <= latency_ms,
                 "meets_size": size_mb is None or weight_bytes(main.onnx) <= size_mb * 1e6},
        "cost_table": {"base_ms": base.base_ms, "base_bytes": base.base_bytes, "additivity": base.additivity,
                       "seconds": base.seconds, "key": base.key, "noise": base.noise, "pairs": len(base.pairs),
                       "graphs": len(base.measured), "mix_check": base.mix_check, "load": base.load,
                       "twins": base.twins, "twin_offset": base.twin_offset},
    }
    if loadgen_dir is not None:
        report["plan"]["loadgen"] = loadgen_latency(main.onnx, samples, threads, len(feed[0]), Path(loadgen_dir),
                                                    loadgen_s)
    return main, report


_METRIC_LABEL = {"top1": "accuracy", "cosine": "cosine to FP32", "perplexity": "perplexity (lower is better)"}


def _budget(v: Optional[float], unit: str) -> str:
    return "none" if v is None else f"{v:.4g} {unit}"


def markdown(report: dict[str, Any], title: str) -> str:
    """The report as a Markdown section: the points table, the chosen plan, LoadGen and the cost model's check."""
    b, p, ct = report["budgets"], report["plan"], report["cost_table"]
    metric = _METRIC_LABEL.get(report.get("metric", "top1"), "accuracy")
    lines = [f"# {title}", "",
             f"Budgets: latency {_budget(b['latency_ms'], 'ms')} per batch of {report['batch']} at {report['threads']} "
             f"thread(s), size {_budget(b['size_mb'], 'MB')}; pipeline {report['pipeline']}; candidates {', '.join(report['candidates'])}; "
             f"{report['layers']} layers; {metric} on {report['samples']} samples; medians of {report['rounds']} "
             f"interleaved rounds ({report.get('clock', 'wall')} clock). Predicted latencies are at the cost table's "
             "FP32 latency; the error compares them with the measured ones scaled by the FP32 graph timed in the same rounds (raw: unscaled); "
             "noise: the median's relative standard error.", "",
             f"| point | kind | layers quantized | measured ms | noise | predicted ms | error (raw) | MB | {metric} | "
             "predicted loss | measured loss | Pareto (latency / size) |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    f = lambda v, nd=4: "-" if v is None else (f"{v:.{nd}g}" if isinstance(v, float) else str(v))  # noqa: E731
    for pt in report["points"]:
        err = pt.get("latency_rel_error")
        e = "-" if err is None else f"{_pct(err)} ({_pct(pt.get('latency_rel_error_raw'))})"
        noise = "-" if pt.get("noise") is None else f"±{100 * pt['noise']:.1f}%"
        kind = pt["kind"] + (f" (= {pt['same_as']})" if pt.get("same_as") else "")
        lines.append(f"| {pt['name']} | {kind} | {f(pt.get('quantized'))} | {pt['latency_ms']:.3f} | "
                     f"{noise} | "
                     f"{f(pt.get('predicted_latency_ms'))} | {e} | "
                     f"{pt['bytes'] / 1e6:.3f} | {pt['accuracy']:.4f} | {f(pt.get('predicted_loss'))} | "
                     f"{f(pt.get('measured_loss'))} | {'yes' if pt['name'] in report['pareto_latency'] else 'no'} / "
                     f"{'yes' if pt['name'] in report['pareto_size'] else 'no'} |")
    for k, why in report.get("points_skipped", {}).items():
        lines.append(f"\n{k}: not measured ({why})")
    measured = [r for r in p["rounds"] if "measured" in r]
    lines += ["", f"Chosen plan: meets latency {p['meets_latency']} (raw {p.get('meets_latency_raw', '-')}), meets size "
              f"{p['meets_size']}; {len(measured)} plan(s) measured (after the first, the cost model is refitted to "
              "the plans measured before; \"uniform\": a uniform choice predicted to fit, measured beside them; "
              "kept: the lowest measured loss within the budgets):"]
    for i, r in enumerate(p["rounds"]):
        if "infeasible" in r:
            lines.append(f"- round {i + 1} ({r['reference']}): no plan within the budgets ({r['infeasible']})")
            continue
        m = r["measured"]
        raw = (f", raw {m['raw_ms']:.4g} ms beside FP32 {m['fp32_ms']:.4g} ms, noise ±{100 * m['noise']:.1f}%"
               if "raw_ms" in m else "")
        kept = " (kept)" if r["picks"] == p["picks"] else ""
        lines.append(f"- round {i + 1} ({r['reference']}{kept}): {sum(c != 'fp32' for c in r['picks'].values())} layers "
                     f"quantized, latency predicted {r['predicted']['latency_ms']:.4g} ms, measured "
                     f"{m['latency_ms']:.4g} ms ({_pct(r['latency_rel_error'])}{raw}); loss predicted "
                     f"{r['predicted']['loss']:.4g}, measured {m['loss']:.4g}")
    if "loadgen" in p:
        lg = p["loadgen"]
        lines.append(f"LoadGen {lg['scenario']}: median {lg['median_ms']:.3f} ms, p90 {lg['p90_ms']:.3f} ms per query "
                     f"(valid: {lg['valid']}).")
    if "graphs" in ct:
        lines.append(f"Cost table: {ct['graphs']} graphs timed, {ct['pairs']} layer pairs with interaction terms, "
                     f"timing noise ±{100 * ct['noise']:.1f}% (median standard error of one graph's median), "
                     f"{ct['seconds']:.0f} s" + (f", machine load {ct['load'][0]:.1f} -> {ct['load'][1]:.1f}"
                                                 if len(ct.get("load") or []) == 2 else "") + ".")
    for k, a in ct["additivity"].items():
        lines.append(f"Model check, {k}: predicted {a['predicted_ms']:.3f} ms, measured {a['measured_ms']:.3f} ms "
                     f"({_pct(a['latency_rel_error'])}; additive from the FP32 side {_pct(a['one_sided_rel_error'])}); "
                     f"bytes predicted {a['predicted_bytes']:.0f}, measured {a['measured_bytes']:.0f}.")
    for c, o in (ct.get("twins") or {}).items():
        off = (ct.get("twin_offset") or {}).get(c, 0.0)
        lines.append(f"Candidates {o} and {c} deploy to graphs of one structure (the same kernels): one latency "
                     f"term per layer and pair for both, {c} {off:+.3f} ms per layer.")
    if ct.get("mix_check"):
        mc = ct["mix_check"]
        lines.append(f"Model check on {mc['graphs']} random mixes before they joined the fit: median error "
                     f"{100 * mc['median_abs_rel_error']:.1f} %, largest {100 * mc['max_abs_rel_error']:.1f} %, mean "
                     f"{_pct(mc['mean_rel_error'])}.")
    lines += ["", "Targets (quality: the metric, negated when lower is better; \"beyond the noise\": a latency "
              "difference over twice the timing noise, a quality difference over twice the standard error of the "
              "paired per-sample differences; \"(= x)\": the same choices as point x, one graph):", *targets(report)]
    return "\n".join(lines) + "\n"


def plot_pareto(reports: dict[str, dict[str, Any]], path: str | Path) -> Path:
    """One row per report: accuracy vs measured latency and accuracy vs size, Pareto fronts dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(reports), 2, figsize=(11, 4.2 * len(reports)), squeeze=False)
    for row, (title, report) in zip(axes, reports.items()):
        for ax, key, scale, label, front in ((row[0], "latency_ms", 1.0, "measured latency (ms per batch)",
                                              report["pareto_latency"]),
                                             (row[1], "bytes", 1e-6, "ONNX size (MB)", report["pareto_size"])):
            for kind, marker in (("uniform", "s"), ("planner", "o")):
                pts = [p for p in report["points"] if p["kind"] == kind]
                ax.scatter([p[key] * scale for p in pts], [p["accuracy"] for p in pts], marker=marker, label=kind)
                for p in pts:
                    ax.annotate(p["name"], (p[key] * scale, p["accuracy"]), fontsize=7)
            fr = sorted((p for p in report["points"] if p["name"] in front), key=lambda p: p[key])
            ax.plot([p[key] * scale for p in fr], [p["accuracy"] for p in fr], "k--", lw=0.8, label="Pareto front")
            ax.set_xlabel(label)
            ax.set_ylabel(_METRIC_LABEL.get(report.get("metric", "top1"), "accuracy"))
            ax.set_title(title, fontsize=9)
            ax.legend(fontsize=7)
    fig.tight_layout()
    out = atomic_savefig(fig, path)
    plt.close(fig)
    return out


def write_report(report: dict[str, Any], outdir: str | Path, stem: str = "report", title: str = "thrifty plan") -> list[Path]:
    """Write ``<stem>.json``, ``<stem>.md`` and ``<stem>.png`` (accuracy vs latency and vs size) to ``outdir``."""
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    return [atomic_write_text(out / f"{stem}.json", json.dumps(report, indent=1)),
            atomic_write_text(out / f"{stem}.md", markdown(report, title)),
            plot_pareto({title: report}, out / f"{stem}.png")]
