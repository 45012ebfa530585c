"""Time BNS synthesis of 256 samples for resnet20 (target: under 60 s on 2 cores), next to one training epoch.

    python benchmarks/datafree.py [--steps 200]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import thrifty as th
from thrifty.datafree import bn_similarity, synthesize
from thrifty.utils import atomic_write_text

RESULTS = Path(__file__).resolve().parents[1] / "results"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--n", type=int, default=256)
    args = ap.parse_args()
    splits = th.data.load_dataset("digits32")
    model = th.train.pretrained("resnet20", "digits32")
    rows = []
    for batch in (128, 256):
        t0 = time.perf_counter()
        ds = synthesize(model, args.n, "bns", input_shape=splits.input_shape, steps=args.steps, batch_size=batch,
                        progress=False)
        rows.append({"batch_size": batch, "seconds": time.perf_counter() - t0,
                     "bn_distance": bn_similarity(model, ds)})
    # reference on the same machine in the same run: one epoch of resnet20 training on digits32
    m = th.models.create("resnet20", in_chans=1, num_classes=10)
    t0 = time.perf_counter()
    th.train.fit(m, splits.train, None, th.train.TrainConfig(epochs=1, batch_size=64), progress=False)
    epoch = time.perf_counter() - t0
    out = {"n": args.n, "steps": args.steps, "threads": torch.get_num_threads(), "rows": rows,
           "train_epoch_seconds": epoch}
    md = ["# BNS synthesis speed (resnet20, digits32 statistics)", "",
          f"{args.n} samples, {args.steps} Adam steps, {torch.get_num_threads()} threads; target < 60 s.", "",
          "| batch size | seconds | x one training epoch | BN distance of the samples |", "|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['batch_size']} | {r['seconds']:.1f} | {r['seconds'] / epoch:.1f} | {r['bn_distance']:.3f} |")
    md += ["", f"One training epoch of resnet20 on digits32 (1258 images, batch 64) in the same run: {epoch:.1f} s.", ""]
    RESULTS.mkdir(exist_ok=True)
    atomic_write_text(RESULTS / "bench_datafree.json", json.dumps(out, indent=2))
    atomic_write_text(RESULTS / "bench_datafree.md", "\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
