"""Offline throughput, FP32 PyTorch vs FP32 / int8 ONNX Runtime, interleaved over several rounds.

The machine is shared, so one measurement per variant is noisy; this alternates the variants (LoadGen Offline,
each in its own subprocess, 2 workers x 1 thread) ``--rounds`` times and reports per-round ratios and their
median. Models: resnet20 (digits32, batch 64) and MiniLM (sequence length 128, batch 64), int8 = the cached
PTQ W8A8 models of experiments/bench.py (run that first).

    python benchmarks/bench_int8.py --rounds 3     # writes results/bench_int8.{json,md}
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from thrifty.bench import BenchSettings, run  # noqa: E402
from thrifty.bench.api import load_workload  # noqa: E402
from thrifty.utils import atomic_write_text  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--min-duration", type=float, default=2.0)
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    cache = ROOT / ".cache" / "thrifty" / "bench"
    r20 = load_workload("resnet20")
    mini = load_workload("minilm", seq_len=128, max_samples=256)
    models = {"resnet20": (r20, torch.load(cache / "resnet20_w8a8_rtn.pt", weights_only=False)),
              "minilm": (mini, torch.load(cache / "minilm_w8a8_rtn.pt", weights_only=False))}
    s = BenchSettings(min_duration_s=args.min_duration, max_batch=64)
    out: dict = {"rounds": args.rounds, "workers": s.n_workers(), "threads": s.threads, "results": {}}
    t0 = time.perf_counter()
    for fam, (wl, q) in models.items():
        rows: dict[str, list[float]] = {"fp32_torch": [], "fp32_ort": [], "int8_ort": []}
        for k in range(args.rounds):
            for var, model, be in (("fp32_torch", wl.model, "torch"), ("fp32_ort", wl.model, "onnxruntime"),
                                   ("int8_ort", q, "onnxruntime")):
                r = run(model, wl.samples, scenarios=["Offline"], backend=be, settings=s, accuracy=False,
                        reference=None, outdir=ROOT / "reports" / "bench_int8", variant=f"{fam}_{var}")
                o = r["scenarios"]["Offline"]
                rows[var].append(o["value"] if o["valid"] else float("nan"))
                print(f"[{time.strftime('%H:%M:%S')}] {fam} round {k} {var}: {o['value']:.1f} samples/s "
                      f"{'VALID' if o['valid'] else 'INVALID ' + '; '.join(o['reasons'])}", flush=True)
        ratio = [i / f for i, f in zip(rows["int8_ort"], rows["fp32_torch"])]
        ratio_ort = [i / f for i, f in zip(rows["int8_ort"], rows["fp32_ort"])]
        out["results"][fam] = {"samples_per_s": rows, "int8_ort_over_fp32_torch": ratio,
                               "int8_ort_over_fp32_ort": ratio_ort,
                               "median_int8_ort_over_fp32_torch": statistics.median(ratio),
                               "median_int8_ort_over_fp32_ort": statistics.median(ratio_ort)}
    out["seconds"] = round(time.perf_counter() - t0, 1)
    md = [f"# int8 ONNX Runtime vs FP32, Offline (LoadGen), {args.rounds} interleaved rounds", "",
          f"{out['workers']} SUT workers x {out['threads']} thread, batch 64, min_duration {args.min_duration} s; "
          f"resnet20 on digits32, MiniLM at sequence length 128. Shared 2-core machine: rounds differ.", "",
          "| model | FP32 PyTorch samples/s | FP32 ORT samples/s | int8 ORT samples/s | int8 ORT / FP32 PyTorch "
          "(median) | int8 ORT / FP32 ORT (median) |", "|---|---|---|---|---|---|"]
    for fam, r in out["results"].items():
        f = lambda xs: ", ".join(f"{x:.1f}" for x in xs)  # noqa: E731
        md.append(f"| {fam} | {f(r['samples_per_s']['fp32_torch'])} | {f(r['samples_per_s']['fp32_ort'])} | "
                  f"{f(r['samples_per_s']['int8_ort'])} | {f(r['int8_ort_over_fp32_torch'])} "
                  f"(**{r['median_int8_ort_over_fp32_torch']:.2f}x**) | {f(r['int8_ort_over_fp32_ort'])} "
                  f"(**{r['median_int8_ort_over_fp32_ort']:.2f}x**) |")
    md += ["", f"Total {out['seconds']} s."]
    atomic_write_text(ROOT / "results" / "bench_int8.json", json.dumps(out, indent=1))
    atomic_write_text(ROOT / "results" / "bench_int8.md", "\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
