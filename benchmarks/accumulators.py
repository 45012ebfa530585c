"""Cost of the simulated low-bit accumulator vs a float32 layer of the same shape (measured side by side).

Linear layer, batch 64, 512 -> 512, chunk 16, 12-bit (e4m7) accumulator; variants: products rounded to the
accumulator format (the default), float32 products, and with the fine-grained trace recorded (training).
Writes results/bench_accumulators.{json,md}.

    python benchmarks/accumulators.py [--repeats 7] [--threads 1]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from thrifty.ops.accum import FloatFormat, accumulate  # noqa: E402
from thrifty.utils import atomic_write_text  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--features", type=int, default=512)
    p.add_argument("--chunk", type=int, default=16)
    p.add_argument("--out", default=str(ROOT / "results"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    n, k = args.batch, args.features
    x = torch.randn(n, k)
    w = torch.randn(k, k) / k**0.5
    b = torch.zeros(k)
    f = FloatFormat(4, 7)
    cases = {
        "float32 nn.functional.linear": lambda: F.linear(x, w, b),
        "12-bit acc, 12-bit products (default)": lambda: accumulate(x, w, f, f, args.chunk),
        "12-bit acc, float32 products": lambda: accumulate(x, w, f, None, args.chunk),
        "12-bit acc + fine-grained trace": lambda: accumulate(x, w, f, f, args.chunk, trace=True),
    }
    times = {c: [] for c in cases}
    for fn in cases.values():
        fn()  # warm-up
    for _ in range(args.repeats):  # interleaved, so load changes hit every case alike
        for c, fn in cases.items():
            t = time.perf_counter()
            fn()
            times[c].append(time.perf_counter() - t)
    base = statistics.median(times["float32 nn.functional.linear"])
    rows = [{"case": c, "median_ms": 1e3 * statistics.median(ts), "min_ms": 1e3 * min(ts),
             "ratio_vs_fp32": statistics.median(ts) / base} for c, ts in times.items()]
    res = {"shape": {"batch": n, "in": k, "out": k, "chunk": args.chunk}, "threads": args.threads,
           "repeats": args.repeats, "torch": torch.__version__, "rows": rows,
           "command": "python benchmarks/accumulators.py"}
    out = Path(args.out)
    atomic_write_text(out / "bench_accumulators.json", json.dumps(res, indent=1))
    md = ["# Simulated accumulator cost", "",
          f"Linear {n}x{k} -> {k}, chunk {args.chunk}, {args.threads} CPU thread(s), median of {args.repeats} "
          f"interleaved runs. Command: `{res['command']}`.", "",
          "| case | median ms | min ms | x float32 |", "|---|---|---|---|"]
    md += [f"| {r['case']} | {r['median_ms']:.2f} | {r['min_ms']:.2f} | {r['ratio_vs_fp32']:.0f} |" for r in rows]
    md += ["", "Each product and each partial sum is rounded (about 8 elementwise tensor operations each) and the "
           "chunk's additions are sequential, so the simulation does ~20 memory-bound passes per product where "
           "float32 does one fused multiply-add in an MKL kernel: the issue's <= 8x target is not met on CPU."]
    atomic_write_text(out / "bench_accumulators.md", "\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
