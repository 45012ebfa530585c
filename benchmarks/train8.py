"""8-bit training step vs float32 step (ResNet-20, digits 32x32, batch 64), measured side by side.

One step = forward, cross-entropy, backward, SGD update. Variants: FP32 + BN (baseline), FP32 + Range BN,
8-bit W/A/G + Range BN with bifurcation (the train8 recipe), and without bifurcation. Writes
results/bench_train8.{json,md}.

    python benchmarks/train8.py [--repeats 15] [--threads 1]
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from thrifty.models import create  # noqa: E402
from thrifty.nn import convert_to_range_bn  # noqa: E402
from thrifty.quant.train8 import Train8, prepare_train8  # noqa: E402
from thrifty.utils import atomic_write_text  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--out", default=str(ROOT / "results"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    base = create("resnet20", in_chans=1, num_classes=10)
    models = {
        "FP32 + BN": copy.deepcopy(base),
        "FP32 + Range BN": convert_to_range_bn(copy.deepcopy(base)),
        "8-bit W/A/G + Range BN (train8)": prepare_train8(copy.deepcopy(base), Train8()),
        "8-bit W/A/G + Range BN, no bifurcation": prepare_train8(copy.deepcopy(base), Train8(bifurcation=False)),
    }
    opts = {k: torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9) for k, m in models.items()}
    x = torch.randn(args.batch, 1, args.size, args.size)
    y = torch.randint(0, 10, (args.batch,))

    def step(k):
        m, o = models[k], opts[k]
        loss = F.cross_entropy(m(x), y)
        o.zero_grad(set_to_none=True)
        loss.backward()
        o.step()

    for _ in range(2):  # warm-up (numba loads its compiled kernels on first use)
        for k in models:
            step(k)
    times = {k: [] for k in models}
    for _ in range(args.repeats):
        for k in models:
            t = time.perf_counter()
            step(k)
            times[k].append(time.perf_counter() - t)
    ref = statistics.median(times["FP32 + BN"])
    rows = [{"case": k, "median_ms": 1e3 * statistics.median(ts), "min_ms": 1e3 * min(ts),
             "ratio_vs_fp32": statistics.median(ts) / ref} for k, ts in times.items()]
    res = {"batch": args.batch, "input": [1, args.size, args.size], "threads": args.threads, "repeats": args.repeats,
           "torch": torch.__version__, "rows": rows, "command": "python benchmarks/train8.py"}
    out = Path(args.out)
    atomic_write_text(out / "bench_train8.json", json.dumps(res, indent=1))
    md = ["# 8-bit training step cost", "",
          f"ResNet-20, batch {args.batch} of 1x{args.size}x{args.size}, forward + backward + SGD step, "
          f"{args.threads} CPU thread(s), median of {args.repeats} interleaved runs. Command: `{res['command']}`.",
          "", "| case | median ms | min ms | x FP32 + BN |", "|---|---|---|---|"]
    md += [f"| {r['case']} | {r['median_ms']:.1f} | {r['min_ms']:.1f} | {r['ratio_vs_fp32']:.2f} |" for r in rows]
    md += ["", "Quantization is simulated (fake-quantize in float32), so 8-bit adds work instead of saving it; the "
           "ratio measures the simulation overhead. Each weight/activation quantizer is one range pass (amin/amax) "
           "plus one numba pass, and each dY is quantized to 8 bit (stochastic rounding, counter-based hash "
           "uniforms) and 16 bit from one read; Range BN runs a fused forward and a two-pass analytic backward."]
    atomic_write_text(out / "bench_train8.md", "\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
