"""The hardware-aware planner against uniform choices: per-layer FP32/int8 under a measured latency budget.

For each workload: the per-layer cost table is measured on ONNX Runtime (in context, at the batch size and
thread count given; boundary-aware: a pair term for every producer -> consumer pair of layers), sensitivities
after the PTQ pipeline, then ``thrifty.plan.report.plan_report`` plans under a latency budget half way between
the fastest graph the table timed and FP32 (and a sweep of other budgets), and
compares every plan with all FP32, all int8, all W4A8 and ONNX Runtime's quantize_static, all timed in the same
interleaved rounds and scored on the same samples. The chosen plan is also run by the LoadGen harness.

Workloads and their metric: ``mlp-digits`` (quick) and ``resnet20-digits32``, top-1 on the digits test split;
``minilm-text`` (the real all-MiniLM-L6-v2 on the bundled sentences, ``input_ids`` + ``attention_mask`` of
``--seq-len`` tokens), the mean cosine of its sentence embeddings to the FP32 graph's; ``tinyllama-lm`` (the causal
LM of experiments/causal_lm.py, ``thrifty.train.lm.pretrained_lm``), next-token perplexity on held-out
``--seq-len``-byte windows (``input_ids`` and an all-ones ``attention_mask``; lower is better; the planner's
predicted loss is the PTQ calibration loss, the KL divergence of the next-token distributions from FP32's),
calibrated on random training windows.

Latencies measured on a loaded machine are noisy; rerun the full experiment on a quiet one (the report gives
the machine's load average and each timing's noise). ``--clock cpu`` times by the process's CPU time, which at
one thread leaves out the time the process waited for a core on a shared machine.

    python experiments/plan.py --quick     # CI-sized (MLP on digits, RTN): results/plan_quick.{json,md,png}
    python experiments/plan.py             # full (ResNet-20, MiniLM, tinyllama; AdaQuant): results/plan.{json,md,png}
    python experiments/plan.py --only resnet20-digits32   # one workload: results/plan_resnet20-digits32.*
    python experiments/plan.py --quick --only minilm-text --layers 2 ...  # a small run of one workload's full path
    python experiments/plan.py --quick --render           # rewrite the .md and .png from the saved .json only
    python experiments/plan.py --combine   # results/plan.* from the saved plan_<workload>.json of --only runs
    python experiments/plan.py --only resnet20-digits32 --candidates fp32,int8,int7,int8-2:4 --size-frac 0.5
                                           # also a size budget that only N:M storage meets: plan_<workload>-size.*

The committed results/plan_resnet20-digits32.* ran ``--only resnet20-digits32 --clock cpu --pipeline rtn --sweep 2
--rounds 9 --loadgen-s 1``: 27.5 min wall, 8.4 min CPU on a shared 2-core machine (load ~20), of which the cost
table (82 graphs, each exported with its own residual calibration: since then a table calibrates once, see
benchmarks/plan_graphs.py) was 12 min wall; AdaQuant and 15 rounds cost more.

``--threads`` is ONNX Runtime's intra-op thread count (what is timed); PTQ and the sensitivities run on one
torch thread whatever it is.
"""
from __future__ import annotations

import os
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from thrifty.bench.api import calibration_data, load_workload
from thrifty.bench.experiment import Experiment
from thrifty.plan.cost import measure_costs
from thrifty.plan.planner import plan_layers
from thrifty.plan.solve import min_total
from thrifty.plan.report import markdown, plan_report, plot_pareto

# (name, model, dataset, pipeline, max samples)
QUICK = [("mlp-digits", "mlp", "digits", "rtn", 256)]
FULL = [("resnet20-digits32", "resnet20", "digits32", "adaquant", 1024),
        ("minilm-text", "minilm", "text", "adaquant", 512),
        ("tinyllama-lm", "tinyllama", "lm", "adaquant", 256)]
WORKLOADS = {w[0]: w for w in QUICK + FULL}
# how each workload is scored: top-1 (digits), mean cosine to the FP32 sentence embeddings (MiniLM, as the
# bench workload scores it), next-token perplexity on held-out windows (the causal LM)
METRIC = {"mlp-digits": "top1", "resnet20-digits32": "top1", "minilm-text": "cosine", "tinyllama-lm": "perplexity"}


def _workload(model_name: str, dataset: str, max_samples: int, args):
    """(Workload, calibration data) of one row of QUICK/FULL."""
    from thrifty.train import pretrained

    if model_name == "tinyllama":  # 10 x calib_per_class random training windows, as causal_lm.py calibrates
        wl = load_workload("tinyllama", "lm", seq_len=args.seq_len or 128, max_samples=max_samples)
        return wl, calibration_data(wl, per_class=args.calib_per_class)
    model = pretrained(model_name, dataset, seed=0) if model_name in ("mlp", "resnet20", "cnn1d") else model_name
    wl = load_workload(model, dataset, max_samples=max_samples, **({"seq_len": args.seq_len} if args.seq_len else {}))
    return wl, calibration_data(wl, per_class=args.calib_per_class)


def run_workload(name: str, model_name: str, dataset: str, pipeline: str, max_samples: int, args) -> dict:
    load = [os.getloadavg()[0]]  # a shared machine's timings are noisy: the report says how busy it was
    wl, calib = _workload(model_name, dataset, args.max_samples or max_samples, args)
    if args.batch > len(wl.samples):
        raise ValueError(f"--batch {args.batch} is larger than the workload's {len(wl.samples)} samples")
    example = tuple(torch.from_numpy(a) for a in wl.samples.batch([0, 1]))
    feed = wl.samples.batch(range(args.batch))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        layers = plan_layers(wl.model, calib)
        if args.layers:  # plan the first N GEMMs only (the others stay FP32): a small run of the full path
            layers = layers[:args.layers]
        table = measure_costs(wl.model, calib, example, feed, layers, tuple(args.candidates), threads=args.threads,
                              rounds=args.rounds, input_names=wl.input_names, clock=args.clock)
    size_mb = None
    if args.size_frac is not None:  # between the smallest plan and all int8 (stored bytes: exact per layer)
        smallest = table.base_bytes + min_total(table.bytes)
        int8 = table.predict({n: "int8" if "int8" in table.bytes[n] else "fp32" for n in table.layers})[1]
        size_mb = (smallest + args.size_frac * (int8 - smallest)) / 1e6
    # between the fastest graph the table timed within the size budget (a budget some plan is known to meet) and
    # FP32
    timed = [ms for _, ms, b in table.measured if size_mb is None or b <= size_mb * 1e6]
    fastest = min(timed or [ms for _, ms, _ in table.measured])
    budget = fastest + args.budget_frac * max(table.base_ms - fastest, 0.0)
    t = time.perf_counter()
    _, report = plan_report(wl.model, calib, example, wl.samples, latency_ms=budget, size_mb=size_mb, batch=args.batch,
                            threads=args.threads, rounds=args.rounds, sweep=args.sweep, pipeline=pipeline,
                            adaquant_iters=args.adaquant_iters, candidates=tuple(args.candidates),
                            input_names=wl.input_names, loadgen_dir=args.work / name, loadgen_s=args.loadgen_s,
                            clock=args.clock, max_rounds=args.max_rounds, layers=layers, metric=METRIC[name])
    load.append(os.getloadavg()[0])
    report.update(workload=name, model=model_name, dataset=dataset, seconds=time.perf_counter() - t,
                  planned_layers=f"first {len(layers)}" if args.layers else "all",
                  machine={"cores": os.cpu_count(), "load_start": load[0], "load_end": load[1]})
    return report


def science(args) -> dict:
    """``{workload: report}`` for every workload of the run (``--only``: one)."""
    torch.set_num_threads(1)  # the torch side (PTQ, sensitivities) on one thread; --threads is ONNX Runtime's
    args.candidates = [c for c in args.candidates.split(",") if c]
    args.rounds = args.rounds or (41 if args.quick else 15)  # the MLP's 0.1 ms runs are cheap to repeat
    args.calib_per_class = args.calib_per_class or (4 if args.quick else 10)
    args.loadgen_s = args.loadgen_s if args.loadgen_s is not None else (0.5 if args.quick else 5.0)
    reports = {}
    if args.only and args.only not in WORKLOADS:
        raise SystemExit(f"--only {args.only!r}: no such workload; known: {', '.join(WORKLOADS)}")
    # --only picks from every workload (--quick then only sets the quick defaults: rounds, calibration...)
    for wl in [WORKLOADS[args.only]] if args.only else (QUICK if args.quick else FULL):
        wl = (*wl[:3], args.pipeline or wl[3], wl[4])
        reports[wl[0]] = run_workload(*wl, args)
        print(markdown(reports[wl[0]], wl[0]), flush=True)
    return reports


def combine(out: Path) -> dict:
    """``{workload: report}`` of every full workload with a saved ``plan_<workload>.json`` in ``out``, each
    report carrying the command that produced it."""
    import json

    result = {}
    for name, *_ in FULL:
        for stem, key in ((name, name), (f"{name}-size", f"{name} (size budget)")):
            f = out / f"plan_{stem}.json"
            if f.is_file():
                saved = json.loads(f.read_text())
                result[key] = {**saved[name], "command": saved.get("command")}
    if not result:
        raise SystemExit(f"--combine: no plan_<workload>.json in {out} for {', '.join(w[0] for w in FULL)}; run "
                         "them with --only first")
    return result


def _reports(result: dict) -> dict:
    return {k: r for k, r in result.items() if k not in ("environment", "command")}


def _machine(r: dict) -> str:
    m = r.get("machine")
    if not m:
        return ""
    busy = "Machine shared (more runnable jobs than cores), load" if max(m["load_start"], m["load_end"]) > m["cores"] \
        else "Machine load"
    return (f"{busy} {m['load_start']:.1f} at the start and {m['load_end']:.1f} at the end of this "
            f"workload (1-minute load average, {m['cores']} cores); {r['seconds']:.0f} s wall for the plans, the "
            "uniform points and their comparison (the cost table's time is above).\n")


def _scope(r: dict) -> str:
    n = r.get("planned_layers", "all")
    return "" if n == "all" else (f"Planned layers: the {n} GEMMs only (the rest stay FP32 in every point, the "
                                  "uniform ones included): a small run of the workload's path, not its result.\n")


def _markdown(result: dict, quick: bool) -> str:
    md = "\n".join(markdown(r, f"thrifty plan: {k}") + _scope(r) + _machine(r)
                   + (f"Produced by `{r['command']}`.\n" if r.get("command") else "")
                   for k, r in _reports(result).items())
    cmd = result.get("command") or f"python experiments/plan.py{' --quick' if quick else ''}"
    return f"<!-- {cmd} -->\n" + md


def main(argv=None) -> int:
    exp = Experiment("plan", __doc__)
    p = exp.parser
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--rounds", type=int, default=None, help="interleaved timing rounds (default 41 quick, 15 full)")
    p.add_argument("--sweep", type=int, default=3)
    p.add_argument("--budget-frac", type=float, default=0.5)
    p.add_argument("--size-frac", type=float, default=None,
                   help="also a size budget, this fraction of the way from the smallest plan to all int8 (with "
                        "--only, the stem becomes plan_<workload>-size)")
    p.add_argument("--adaquant-iters", type=int, default=100)
    p.add_argument("--calib-per-class", type=int, default=None)
    p.add_argument("--loadgen-s", type=float, default=None)
    p.add_argument("--candidates", default="fp32,int8")
    p.add_argument("--max-rounds", type=int, default=3, help="plans measured at most while refitting the cost model")
    p.add_argument("--clock", default="wall", choices=("wall", "cpu"),
                   help="time by the wall clock (default) or by the process's CPU time (one thread on a shared machine)")
    p.add_argument("--only", default=None,
                   help=f"run only this workload ({', '.join(WORKLOADS)}); the stem becomes plan_<workload>")
    p.add_argument("--pipeline", default=None, help="override the workloads' PTQ pipeline (rtn, adaquant, ...)")
    p.add_argument("--layers", type=int, default=None,
                   help="plan only the first N GEMMs of the model (the rest stay FP32): a small run of the full path")
    p.add_argument("--max-samples", type=int, default=None, help="evaluation samples (default: the workload's)")
    p.add_argument("--seq-len", type=int, default=None,
                   help="token window of MiniLM / the causal LM (default 128 for both)")
    p.add_argument("--work", type=Path, default=Path("runs") / "plan", help="LoadGen logs")
    p.add_argument("--combine", action="store_true",
                   help="write results/plan.{json,md,png} from the saved one-workload results (plan_<workload>.json, "
                        "each run with --only and its own command), without running anything")
    args = exp.start(argv)
    for k in ("layers", "max_samples", "seq_len"):
        if getattr(args, k) is not None and getattr(args, k) < 1:
            p.error(f"--{k.replace('_', '-')} must be a positive integer, got {getattr(args, k)}")
    if args.only and args.name == exp.name:  # one workload never overwrites the results of all of them
        args.name = f"plan_{args.only}" + ("-size" if args.size_frac is not None else "")
    if args.combine:
        result = {**combine(exp.out), "command": exp.command}
        exp.write_json(result)
    elif not args.render:
        result = science(args)
        result["command"] = exp.command
        exp.write_json(result)
    result = exp.read_json()  # a fresh run renders from its JSON too, as --render does
    print(exp.write_markdown(_markdown(result, args.quick)).read_text(), end="")
    plot_pareto({f"thrifty plan: {k}": r for k, r in _reports(result).items()}, exp.path(".png"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
