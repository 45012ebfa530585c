"""Training-step time with N:M gradient pruning (MVUE 2:4 / 1:2 on all GEMMs) vs dense, side by side.

Every variant is a deep copy of the same model; steps are interleaved (dense, mvue, dense, mvue, ...)
so that load on a shared machine hits all variants alike, and the ratio of medians is reported.
This measures the *simulation* cost on CPU (the masks are extra work here; the speed-up the paper
targets needs sparse tensor cores). On CPU the masks run as compiled single-pass kernels
(thrifty/ops/_mvue_kernel.py); the table of the mask alone also times the torch reference path.

    python benchmarks/grad_sparsity.py            # full (about 2 minutes)
    python benchmarks/grad_sparsity.py --quick    # a few steps (results/bench_grad_sparsity_quick.*)
Writes results/bench_grad_sparsity.{json,md}.
"""
from __future__ import annotations

import copy
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F

import thrifty
import thrifty.ops.mvue as mvue_mod
from thrifty.bench.experiment import Experiment, table
from thrifty.data import load_dataset
from thrifty.ops.mvue import mse_nm, mvue_nm
from thrifty.sparse.actgrad import ActNM, GradNM
from thrifty.train.io import model_kwargs_for

VARIANTS = {
    "dense": [],
    "grad 2:4 MVUE (dX and dW)": [GradNM(2, 4, "mvue")],
    "grad 1:2 MVUE (dX and dW)": [GradNM(1, 2, "mvue")],
    "grad 2:4 MVUE (dW only)": [GradNM(2, 4, "mvue", gemms=("weight",))],
    "act 2:4 MSE + grad 2:4 MVUE": [ActNM(2, 4), GradNM(2, 4, "mvue")],
}


def _setup(model_name: str, dataset: str, batch: int):
    splits = load_dataset(dataset, seed=0)
    torch.manual_seed(0)
    base = thrifty.models.create(model_name, **model_kwargs_for(model_name, splits.input_shape, splits.num_classes))
    x, y = splits.train.tensors[0][:batch], splits.train.tensors[1][:batch]
    models = {}
    for name, cfgs in VARIANTS.items():
        m = copy.deepcopy(base)
        for cfg in cfgs:
            thrifty.apply(m, cfg)
        models[name] = (m, torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9))
    return models, x, y


def _step(model, opt, x, y) -> tuple[float, float]:
    """Wall and CPU (this thread's) seconds of one training step."""
    t, c = time.perf_counter(), time.thread_time()
    opt.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    opt.step()
    return time.perf_counter() - t, time.thread_time() - c


def bench_model(model_name: str, dataset: str, batch: int, reps: int, warmup: int) -> dict:
    models, x, y = _setup(model_name, dataset, batch)
    times: dict[str, list[float]] = {k: [] for k in models}
    cpu: dict[str, list[float]] = {k: [] for k in models}
    for r in range(warmup + reps):
        for name, (m, opt) in models.items():
            dt, dc = _step(m, opt, x, y)
            if r >= warmup:
                times[name].append(dt)
                cpu[name].append(dc)
    dense, dense_cpu = statistics.median(times["dense"]), statistics.median(cpu["dense"])
    rows = []
    for name, ts in times.items():
        med, med_cpu = statistics.median(ts), statistics.median(cpu[name])
        rows.append({"variant": name, "median_ms": 1000 * med, "min_ms": 1000 * min(ts),
                     "ratio_vs_dense": med / dense, "cpu_median_ms": 1000 * med_cpu,
                     "cpu_ratio_vs_dense": med_cpu / dense_cpu, "reps": len(ts)})
    return {"model": model_name, "dataset": dataset, "batch": batch, "rows": rows}


def _torch_path(f):
    """Run ``f`` on the pure-torch reference path of thrifty.ops.mvue (compiled kernels off)."""
    def g(d):
        old, mvue_mod._KERNEL = mvue_mod._KERNEL, False
        try:
            return f(d)
        finally:
            mvue_mod._KERNEL = old
    return g


def bench_ops(reps: int) -> list[dict]:
    """The mask alone on a ResNet-20 stage-1 sized dY (64 x 16 x 32 x 32), per grouping dim: the compiled
    kernel (the default on CPU) and the torch reference path, interleaved."""
    g = torch.randn(64, 16, 32, 32)
    gen = torch.Generator().manual_seed(0)
    base = {"mvue 2:4": lambda d: mvue_nm(g, 2, 4, d, gen), "mvue 1:2": lambda d: mvue_nm(g, 1, 2, d, gen),
            "mse 2:4": lambda d: mse_nm(g, 2, 4, d)}
    ops = {}
    for name, f in base.items():
        ops[name] = f
        ops[name + " (torch reference path)"] = _torch_path(f)
    ops["copy (reference)"] = lambda d: g.clone()
    rows = []
    for dim, label in ((1, "channels (dX)"), (0, "batch (dW)")):
        ts: dict[str, list[float]] = {k: [] for k in ops}
        for f in ops.values():
            f(dim)
        for _ in range(reps):
            for name, f in ops.items():
                t = time.perf_counter()
                f(dim)
                ts[name].append(time.perf_counter() - t)
        rows += [{"op": name, "dim": label, "median_ms": 1000 * statistics.median(v)} for name, v in ts.items()]
    return rows


def science(args) -> dict:
    reps, warmup = (4, 1) if args.quick else (25, 3)
    load0 = os.getloadavg()[0]
    return {
        "quick": args.quick, "threads": args.threads, "torch": torch.__version__, "machine": platform.machine(),
        "models": [bench_model("resnet20", "digits32", 64, reps, warmup),
                   bench_model("mlp", "mnist1d", 128, reps * 4, warmup)],
        "ops": bench_ops(reps * 2),
        "loadavg_1min": [load0, os.getloadavg()[0]],
    }


def render(results: dict) -> str:
    lines = ["# Gradient N:M pruning: training-step time vs dense (CPU simulation)", "",
             f"torch {results['torch']}, {results['threads']} thread(s), {'quick' if results['quick'] else 'full'} "
             "run; interleaved steps, medians. Target: MVUE 2:4 on all GEMMs <= 1.5x dense. On a loaded machine "
             "steps of about 1 ms (the MLP) are dominated by scheduler preemption: compare their mins. "
             "The CPU columns count this thread's CPU time only (robust to preemption, not to cache "
             f"sharing). 1-minute load average {results['loadavg_1min'][0]:.1f} at the start, "
             f"{results['loadavg_1min'][1]:.1f} at the end (2 cores).", ""]
    for mres in results["models"]:
        lines += [f"## {mres['model']} on {mres['dataset']} (batch {mres['batch']})", "",
                  table(mres["rows"], {"variant": "variant", "median_ms": "median step (ms)", "min_ms": "min (ms)",
                                       "ratio_vs_dense": "x dense", "cpu_median_ms": "CPU median (ms)",
                                       "cpu_ratio_vs_dense": "CPU x dense"},
                        digits={"median_ms": 1, "min_ms": 1, "cpu_median_ms": 1}, align="lrrrrr")]
    lines += ["## The mask alone (dY of 64 x 16 x 32 x 32 = 1M values)", "",
              table(results["ops"], {"op": "op", "dim": "grouping", "median_ms": "median (ms)"}, align="llr")]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    return Experiment("bench_grad_sparsity", __doc__).run(science, render, argv=argv)


if __name__ == "__main__":
    raise SystemExit(main())
