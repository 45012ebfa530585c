"""Cost of the simulated low-bit accumulator vs a float32 layer of the same shape (measured side by side).

Linear layer, batch 64, 512 -> 512, chunk 16, 12-bit (e4m7) accumulator; variants: products rounded to the
accumulator format (the default), float32 products, and with the fine-grained trace recorded (training), each
with the compiled numba kernel (``backend="numba"``, the default on CPU) and the vectorised torch path
(``backend="torch"``); plus the fine-grained backward (masked dX and dW) vs the float32 backward GEMMs. All
cases are interleaved in one process, at each thread count. Writes results/bench_accumulators.{json,md}.

    python benchmarks/accumulators.py [--repeats 9] [--threads 1 2]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from thrifty.ops.accum import FloatFormat, accumulate, trace_grads  # noqa: E402
from thrifty.utils import atomic_write_text  # noqa: E402

BASE = "float32 nn.functional.linear"
BASE_BWD = "float32 backward GEMMs (dX, dW)"


def cases(x, w, b, dy, chunk):
    f = FloatFormat(4, 7)
    _, tr = accumulate(x, w, f, f, chunk, trace=True)
    out = {BASE: (None, lambda: F.linear(x, w, b))}
    for label, prod, trace in (("12-bit acc, 12-bit products (default)", f, False),
                               ("12-bit acc, float32 products", None, False),
                               ("12-bit acc + fine-grained trace", f, True)):
        for backend in ("numba", "torch"):
            out[f"{label} [{backend}]"] = (BASE, lambda p=prod, t=trace, be=backend:
                                           accumulate(x, w, f, p, chunk, trace=t, backend=be))
    out[BASE_BWD] = (None, lambda: (dy @ w, dy.t() @ x))
    for backend in ("numba", "torch"):
        out[f"fine-grained backward (masked dX, dW) [{backend}]"] = (
            BASE_BWD, lambda be=backend: trace_grads(tr, x, w, dy, dy, backend=be))
    return out


def measure(threads: int, args) -> list[dict]:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    n, k = args.batch, args.features
    x, w, b = torch.randn(n, k), torch.randn(k, k) / k**0.5, torch.zeros(k)
    dy = torch.randn(n, k)
    cs = cases(x, w, b, dy, args.chunk)
    times: dict[str, list[float]] = {c: [] for c in cs}
    cpu: dict[str, list[float]] = {c: [] for c in cs}
    for _, fn in cs.values():
        fn()  # warm-up (and numba compile or cache load)
    for _ in range(args.repeats):  # interleaved, so load changes hit every case alike
        for c, (_, fn) in cs.items():
            t, tc = time.perf_counter(), time.thread_time()
            fn()
            times[c].append(time.perf_counter() - t)
            cpu[c].append(time.thread_time() - tc)
    rows = []
    for c, (base, _) in cs.items():
        med, ref = statistics.median(times[c]), statistics.median(times[base or c])
        row = {"case": c, "threads": threads, "median_ms": 1e3 * med, "min_ms": 1e3 * min(times[c]),
               "baseline": base or c, "ratio_vs_fp32": med / ref,
               "min_ratio_vs_fp32": min(times[c]) / min(times[base or c])}
        if threads == 1:  # all work runs on the calling thread: its CPU time ignores time spent preempted
            row["cpu_ms"] = 1e3 * statistics.median(cpu[c])
            row["cpu_ratio_vs_fp32"] = statistics.median(cpu[c]) / statistics.median(cpu[base or c])
        rows.append(row)
    for r in rows:  # kernel speed-up over the torch path, same thread count
        if r["case"].endswith("[numba]"):
            twin = next(q for q in rows if q["case"] == r["case"].replace("[numba]", "[torch]"))
            r["speedup_vs_torch_path"] = twin["median_ms"] / r["median_ms"]
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--features", type=int, default=512)
    p.add_argument("--chunk", type=int, default=16)
    p.add_argument("--out", default=str(ROOT / "results"))
    args = p.parse_args(argv)
    n, k = args.batch, args.features
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    rows = [r for t in args.threads for r in measure(t, args)]
    cmd = "python benchmarks/accumulators.py" + (f" --threads {' '.join(map(str, args.threads))}"
                                                 if args.threads != [1, 2] else "")
    res = {"shape": {"batch": n, "in": k, "out": k, "chunk": args.chunk}, "threads": args.threads,
           "repeats": args.repeats, "torch": torch.__version__, "rows": rows, "command": cmd,
           "loadavg": round(load, 2)}
    out = Path(args.out)
    atomic_write_text(out / "bench_accumulators.json", json.dumps(res, indent=1))
    md = ["# Simulated accumulator cost", "",
          f"Linear {n}x{k} -> {k}, chunk {args.chunk}, 12-bit e4m7 accumulator, median (and min) of {args.repeats} "
          f"interleaved runs per thread count. `[numba]`: the compiled kernel (the default on CPU); `[torch]`: the "
          f"vectorised tensor-op path it replaces (identical bits). Ratios are to float32 at the same thread count "
          f"(forward cases to `{BASE}`, backward cases to `{BASE_BWD}`). CPU ms (1 thread only): median CPU time of "
          f"the calling thread, which excludes time the process spent preempted on a shared machine. Load average "
          f"at the start: {res['loadavg']}. Command: `{cmd}`.", "",
          "| threads | case | median ms | min ms | CPU ms | x float32 (median) | x float32 (min) | x float32 (CPU) "
          "| kernel speed-up |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        sp = f"{r['speedup_vs_torch_path']:.0f}x" if "speedup_vs_torch_path" in r else ""
        c_ms, c_x = (f"{r['cpu_ms']:.2f}", f"{r['cpu_ratio_vs_fp32']:.1f}") if "cpu_ms" in r else ("", "")
        md.append(f"| {r['threads']} | {r['case']} | {r['median_ms']:.2f} | {r['min_ms']:.2f} | {c_ms} | "
                  f"{r['ratio_vs_fp32']:.1f} | {r['min_ratio_vs_fp32']:.1f} | {c_x} | {sp} |")
    md += ["", "The kernel keeps each output row's partial sums in a length-O buffer and, per term k, does one SIMD "
           "pass over the outputs: multiply, round to the product format, add, round to the accumulator format "
           "(each rounding ~8 vector integer/float ops on the float32 bits), so it is compute bound at roughly "
           "18 vector ops per product where float32 does one fused multiply-add. The torch path does the same "
           "math as ~20 memory-bound passes over an (n_chunks, N, O) buffer per term."]
    atomic_write_text(out / "bench_accumulators.md", "\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
