"""Cost of a planner cost table's graphs: residual calibration once per table vs once per graph, side by side.

Every graph of ``thrifty.plan.measure_costs``' table is exported as the plan will be (``export_onnx`` with the
residual Adds made integer). Calibrating those Adds' new output quantizers runs the float graph on the
calibration set; ``iter_graphs(reuse_ranges=True)`` (the default) calibrates every Add tensor once, on the
first graph that needs it, and reuses the ranges for the others (timing and bytes do not depend on them).
This script builds the same list of graphs both ways, interleaved (``--repeats`` rounds, the order alternating,
after one untimed warm-up), and reports the wall and CPU seconds of each way, the calibration passes it ran and
the time they took, and whether the two ways give the same nodes and initializer sizes graph for graph.

The graphs are a table's single-layer switches and their two-sided counterparts: all FP32, each of the first
``--layers`` planned layers alone in int8, all of them int8, and all of them int8 but one.

    python benchmarks/plan_graphs.py                  # resnet20 (digits32), 8 layers: results/bench_plan_graphs.*
    python benchmarks/plan_graphs.py --quick          # the MLP (no residual Adds) and resnet20, 3 layers each
"""
from __future__ import annotations

import os
import statistics
import time
import warnings

import torch

from thrifty.bench.experiment import Experiment, table


def _picks(layers: list[str]) -> list[dict[str, str]]:
    every = {n: "int8" for n in layers}
    return [{}] + [{n: "int8"} for n in layers] + [every] + [every | {n: "fp32"} for n in layers]


def _signature(graph: bytes) -> tuple:
    import onnx

    m = onnx.load_from_string(graph)
    return tuple(n.op_type for n in m.graph.node), tuple(sorted((i.name, tuple(i.dims)) for i in m.graph.initializer))


def run_workload(model_name: str, dataset: str, n_layers: int, repeats: int) -> dict:
    import thrifty.bench.int8_graph as ig
    from thrifty.bench.api import calibration_data, load_workload
    from thrifty.plan.cost import iter_graphs
    from thrifty.plan.planner import plan_layers
    from thrifty.train import pretrained

    wl = load_workload(pretrained(model_name, dataset, seed=0), dataset, max_samples=64)
    calib = calibration_data(wl, per_class=10)
    example = tuple(torch.from_numpy(a) for a in wl.samples.batch([0, 1]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        layers = plan_layers(wl.model, calib)[:n_layers]
    picks = _picks(layers)
    calls = {"n": 0, "s": 0.0}
    inner = ig._calibrate

    def counted(*a, **k):  # how many calibration passes each way runs, and their time
        t = time.perf_counter()
        try:
            return inner(*a, **k)
        finally:
            calls["n"] += 1
            calls["s"] += time.perf_counter() - t

    with warnings.catch_warnings():  # warm-up, not timed: the first export pays for imports and lazy setup
        warnings.simplefilter("ignore")
        list(iter_graphs(wl.model, picks[:2], calib, example, wl.input_names))
    ig._calibrate = counted
    res: dict = {True: [], False: []}
    sigs: dict = {}
    try:
        for r in range(repeats):
            for reuse in ((False, True) if r % 2 == 0 else (True, False)):
                calls.update(n=0, s=0.0)
                w, c = time.perf_counter(), time.process_time()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    graphs = list(iter_graphs(wl.model, picks, calib, example, wl.input_names, reuse_ranges=reuse))
                res[reuse].append({"wall_s": time.perf_counter() - w, "cpu_s": time.process_time() - c,
                                   "calibrations": calls["n"], "calibration_s": calls["s"]})
                sigs[reuse] = [_signature(g) for g in graphs]
    finally:
        ig._calibrate = inner
    med = lambda rows, k: statistics.median(x[k] for x in rows)  # noqa: E731
    out = {"model": model_name, "dataset": dataset, "layers": len(layers), "graphs": len(picks),
           "same_graphs": sigs[True] == sigs[False]}
    for reuse, name in ((False, "per graph"), (True, "once per table")):
        out[name] = {k: med(res[reuse], k) for k in ("wall_s", "cpu_s", "calibrations", "calibration_s")}
        out[name]["runs"] = res[reuse]
    out["cpu_ratio"] = out["per graph"]["cpu_s"] / out["once per table"]["cpu_s"]
    return out


def science(args, exp) -> dict:
    torch.set_num_threads(1)
    load = os.getloadavg()[0]
    todo = [("mlp", "digits", 3), ("resnet20", "digits32", 3)] if args.quick else \
        [("resnet20", "digits32", args.layers)]
    rows = [run_workload(m, d, k, args.repeats) for m, d, k in todo]
    return {"rows": rows, "command": exp.command, "loadavg": [round(load, 2), round(os.getloadavg()[0], 2)],
            "cores": os.cpu_count()}


def render(result: dict) -> str:
    rows = []
    for r in result["rows"]:
        for name in ("per graph", "once per table"):
            m = r[name]
            rows.append({"model": r["model"], "graphs": r["graphs"], "residual calibration": name,
                         "wall s": f"{m['wall_s']:.1f}", "CPU s": f"{m['cpu_s']:.1f}",
                         "calibration passes": m["calibrations"], "calibration s": f"{m['calibration_s']:.1f}",
                         "CPU ratio": f"{r['cpu_ratio']:.2f}x" if name == "once per table" else "",
                         "same nodes and sizes": r["same_graphs"]})
    lo, hi = result["loadavg"]
    busy = "machine shared, " if max(lo, hi) > result["cores"] else ""
    return (f"<!-- {result['command']} -->\n# Cost-table graphs: residual calibration per graph vs once per table\n\n"
            f"Medians of {len(result['rows'][0]['per graph']['runs'])} interleaved runs per way ({busy}load "
            f"{lo:.1f} -> {hi:.1f} on {result['cores']} cores; the ratio is side by side, the seconds are not "
            "a quiet machine's).\n\n" + table(rows) + "\n")


def main(argv=None) -> int:
    exp = Experiment("bench_plan_graphs", __doc__)
    exp.parser.add_argument("--repeats", type=int, default=3)
    exp.parser.add_argument("--layers", type=int, default=8, help="planned layers of resnet20 whose graphs are built")
    return exp.run(lambda args: science(args, exp), render, argv=argv)


if __name__ == "__main__":
    raise SystemExit(main())
