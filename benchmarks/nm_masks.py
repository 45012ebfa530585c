"""Benchmark: N:M / transposable N:M mask computation on a 4096 x 4096 float32 weight, 2 threads.

Every timing is taken in the same run, side by side with a plain copy of the same tensor (the memory
bandwidth bound), and reported as seconds, the weight's bytes per second, and the ratio to the copy.
The reference-style greedy (one Python loop per tile, as in the public reference code) is timed on a
sample of tiles and extrapolated linearly to all tiles; it is labelled as such.

Usage:
    python benchmarks/nm_masks.py            # full: 4096 x 4096, 3 repeats
    python benchmarks/nm_masks.py --quick    # 1024 x 1024, 1 repeat

Writes results/bench_nm_masks.json and results/bench_nm_masks.md (``--name`` changes the stem, e.g.
``--threads 1 --name bench_nm_masks_1thread``).
"""
from __future__ import annotations

import os
import platform
import statistics
import time

import torch

from thrifty.bench.experiment import Experiment, table
from thrifty.ops import nm


def _time(fn, repeats: int) -> float:
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def reference_greedy_tile(tile: torch.Tensor, n: int) -> torch.Tensor:
    """Per-tile greedy b-matching in a Python loop (what a straightforward implementation does)."""
    m = tile.shape[0]
    order = torch.argsort(tile.flatten(), descending=True)
    rows, cols = [0] * m, [0] * m
    keep = torch.zeros(m * m, dtype=torch.bool)
    for p in order.tolist():
        r, c = divmod(p, m)
        if rows[r] < n and cols[c] < n:
            keep[p] = True
            rows[r] += 1
            cols[c] += 1
    return keep.view(m, m)


def main(argv: list[str] | None = None) -> int:
    exp = Experiment("bench_nm_masks", __doc__, threads=2)
    exp.parser.add_argument("--size", type=int, default=None)
    exp.parser.add_argument("--repeats", type=int, default=None)
    return exp.run(science, render, argv=argv)


def science(args) -> dict:
    size = args.size or (1024 if args.quick else 4096)
    repeats = args.repeats or (1 if args.quick else 3)
    w = torch.randn(size, size)
    nbytes = w.numel() * w.element_size()
    cases = [
        ("plain copy (w.clone())", lambda: w.clone()),
        ("N:M 2:4 magnitude", lambda: nm.nm_mask(w, 2, 4)),
        ("N:M 4:8 magnitude", lambda: nm.nm_mask(w, 4, 8)),
        ("transposable 2:4 exact (90-pattern matmul)", lambda: nm.transposable_mask(w, 2, 4, "exact")),
        ("transposable 2:4 2-approx (greedy)", lambda: nm.transposable_mask(w, 2, 4, "approx")),
        ("transposable 4:8 2-approx (greedy)", lambda: nm.transposable_mask(w, 4, 8, "approx")),
        ("transposable 4:8 exact (min-cost flow)", lambda: nm.transposable_mask(w, 4, 8, "exact")),
    ]
    targets = {"transposable 2:4 exact (90-pattern matmul)": 0.5, "transposable 4:8 2-approx (greedy)": 1.0,
               "transposable 4:8 exact (min-cost flow)": 10.0}
    nm.transposable_mask(w[:64, :64].contiguous(), 4, 8, "exact")  # warm imports (OR-tools) outside timings
    rows = []
    copy_s = None
    for name, fn in cases:
        reps = 1 if "min-cost" in name else repeats
        s = _time(fn, reps)
        copy_s = s if copy_s is None else copy_s
        rows.append({"case": name, "seconds": s, "GB_per_s": nbytes / s / 1e9, "x_copy_time": s / copy_s,
                     "target_s": targets.get(name) if size == 4096 else None, "repeats": reps})
        print(f"{name:46s} {s:8.3f} s  {nbytes / s / 1e9:8.3f} GB/s  {s / copy_s:9.1f}x copy", flush=True)
    # reference-style per-tile Python loop, timed on a sample and extrapolated
    tiles = w[:64, :].reshape(8, 8, size // 8, 8).permute(0, 2, 1, 3).reshape(-1, 8, 8).abs()[:512]
    t0 = time.perf_counter()
    for t in tiles:
        reference_greedy_tile(t, 4)
    per_tile = (time.perf_counter() - t0) / len(tiles)
    total_tiles = (size // 8) ** 2
    ext = per_tile * total_tiles
    rows.append({"case": "transposable 4:8 greedy, Python loop per tile (extrapolated from 512 tiles)",
                 "seconds": ext, "GB_per_s": nbytes / ext / 1e9, "x_copy_time": ext / copy_s, "target_s": None,
                 "repeats": 1})
    print(f"{'per-tile Python greedy (extrapolated)':46s} {ext:8.3f} s", flush=True)
    # the vectorised greedy must equal the per-tile reference exactly
    vec = nm.solve_tiles(tiles, 4, "greedy")
    same = all(torch.equal(vec[i], reference_greedy_tile(tiles[i], 4)) for i in range(64))
    env = {"threads": args.threads, "size": size, "bytes": nbytes, "torch": torch.__version__,
           "python": platform.python_version(), "cpu": platform.processor() or platform.machine(),
           "cpu_count": os.cpu_count(), "loadavg_1min": os.getloadavg()[0],
           "vectorised_greedy_equals_per_tile_reference": same}
    out = {"env": env, "rows": rows}
    return out


def render(out: dict) -> str:
    env, size = out["env"], out["env"]["size"]

    def target(r: dict) -> str:
        return f"<= {r['target_s']} s" + (" ✓" if r["seconds"] <= r["target_s"] else " ✗") if r["target_s"] else ""

    md = [f"# N:M mask benchmark ({size} x {size} float32, {env['threads']} threads)", "",
          f"Machine: {env['cpu_count']} CPUs visible, 1-min load average {env['loadavg_1min']:.1f} at the end "
          f"(shared machine: other jobs inflate every row, the copy included). torch {env['torch']}.", "",
          table([{**r, "target": target(r)} for r in out["rows"]],
                {"case": "case", "seconds": "seconds", "GB_per_s": "GB/s of weight", "x_copy_time": "time vs copy",
                 "target": "target"}, digits={"seconds": 3, "GB_per_s": 3},
                formats={"x_copy_time": lambda v: f"{v:.1f}x"}, align="lrrrr"),
          f"Vectorised greedy identical to the per-tile reference loop on 64 tiles: "
          f"{env['vectorised_greedy_equals_per_tile_reference']}."]
    return "\n".join(md) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
