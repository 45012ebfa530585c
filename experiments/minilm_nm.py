"""One-shot N:M pruning of the pretrained all-MiniLM-L6-v2 with unlabelled sentences (issue 16 target).

The calibration data is the tokenizer's output (``input_ids`` + ``attention_mask``, padded per batch), given
as is to :func:`thrifty.sparse.adaprune`; no labels. Metric: mean (and minimum) cosine between the pruned and
the FP32 sentence embeddings on held-out sentences (disjoint from the calibration ones).

Methods, each for 2:4 and transposable 4:8 on every nn.Linear of the encoder:
* magnitude: the N:M mask of the pretrained weights, nothing fitted;
* AdaPrune layer-wise: each layer fitted to its dense output on the whole model (block-free path);
* AdaPrune block-wise: the same fits one transformer layer at a time, then each pruned block fitted as a
  whole to the FP block output (``block_steps``).

Usage: python experiments/minilm_nm.py [--quick] [--out results/minilm_nm]
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from thrifty.data.text import load_texts  # noqa: E402
from thrifty.models import create  # noqa: E402
from thrifty.sparse import NM, adaprune, sparsify  # noqa: E402


def tokenize(model, texts: list[str], batch_size: int) -> list[dict[str, torch.Tensor]]:
    return [model.tokenize(texts[i:i + batch_size], max_length=128) for i in range(0, len(texts), batch_size)]


@torch.no_grad()
def embed(model, batches: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    return torch.cat([model(**b) for b in batches])


def cosine(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    c = torch.nn.functional.cosine_similarity(a, b, dim=1)
    return {"cos_mean": float(c.mean()), "cos_min": float(c.min())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="64 calibration / 64 held-out sentences, fewer steps")
    ap.add_argument("--out", default="results/minilm_nm", help="output path without extension (.json, .md)")
    ap.add_argument("--calib", type=int, default=None, help="calibration sentences (default 512, quick 64)")
    ap.add_argument("--test", type=int, default=None, help="held-out sentences (default 256, quick 64)")
    ap.add_argument("--steps", type=int, default=None, help="AdaPrune steps per layer (default 200, quick 50)")
    ap.add_argument("--block-steps", type=int, default=None, help="steps per block (default 300, quick 60)")
    ap.add_argument("--block-lr", type=float, default=1e-4)
    ap.add_argument("--patterns", default="2:4,4:8T", help="comma list; T = transposable")
    ap.add_argument("--methods", default="magnitude,layer,block", help="comma list of magnitude, layer, block")
    ap.add_argument("--remask-every", type=int, default=10, help="AdaPrune re-masks every that many steps")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    n_cal = args.calib or (64 if args.quick else 512)
    n_test = args.test or (64 if args.quick else 256)
    steps = args.steps if args.steps is not None else (50 if args.quick else 200)
    block_steps = args.block_steps if args.block_steps is not None else (60 if args.quick else 300)
    torch.manual_seed(args.seed)

    texts = load_texts(n_cal + n_test, seed=args.seed)
    dense = create("minilm")
    calib = tokenize(dense, texts[:n_cal], 32)
    test = tokenize(dense, texts[n_cal:], 64)
    ref = embed(dense, test)
    rows: list[dict] = []
    for pat in args.patterns.split(","):
        n, m = (int(v) for v in pat.rstrip("T").split(":"))
        cfg = NM(n, m, transposable=pat.endswith("T"))
        label = cfg.label
        t0 = time.perf_counter()
        methods = args.methods.split(",")
        if "magnitude" in methods:
            mag = sparsify(copy.deepcopy(dense), cfg, "bert.encoder.*")
            rows.append({"pattern": label, "method": "magnitude", **cosine(embed(mag, test), ref),
                         "seconds": time.perf_counter() - t0})
            print(rows[-1], flush=True)
        runs = {"layer": ("AdaPrune layer-wise", {}),
                "block": ("AdaPrune block-wise + block fit", {"blocks": "auto", "block_steps": block_steps,
                                                              "block_lr": args.block_lr})}
        for method, kw in (runs[k] for k in methods if k in runs):
            model = copy.deepcopy(dense)
            t0 = time.perf_counter()
            report = adaprune(model, cfg, calib, steps=steps, lr=1e-3, batch_size=64, filter="bert.encoder.*", progress=False,
                              seed=args.seed, remask_every=args.remask_every, **kw)
            rows.append({"pattern": label, "method": method, **cosine(embed(model, test), ref),
                         "seconds": time.perf_counter() - t0,
                         "layers_reverted": sum(bool(r.get("reverted")) for r in report.values())})
            print(rows[-1], flush=True)
    res = {"calib_sentences": n_cal, "test_sentences": n_test, "steps": steps, "block_steps": block_steps,
           "block_lr": args.block_lr, "remask_every": args.remask_every, "seed": args.seed, "torch_threads": torch.get_num_threads(),
           "command": "python experiments/minilm_nm.py " + " ".join(sys.argv[1:]), "rows": rows,
           "target": "mean cosine to FP32 >= 0.85 for 2:4 (issue 16)"}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(res, indent=2))
    os.replace(tmp, out.with_suffix(".json"))
    md = [f"# One-shot N:M on all-MiniLM-L6-v2 ({n_cal} unlabelled calibration sentences, {n_test} held out)", "",
          f"`{res['command']}`; AdaPrune {steps} steps per layer, block fit {block_steps} steps per block "
          f"(lr {args.block_lr}), re-mask every {args.remask_every} steps; {torch.get_num_threads()} torch threads.", "",
          "| pattern | method | mean cosine to FP32 | min cosine | seconds |", "|---|---|---|---|---|"]
    md += [f"| {r['pattern']} | {r['method']} | {r['cos_mean']:.4f} | {r['cos_min']:.4f} | {r['seconds']:.0f} |"
           for r in rows]
    tmp = out.with_suffix(".md.tmp")
    tmp.write_text("\n".join(md) + "\n")
    os.replace(tmp, out.with_suffix(".md"))


if __name__ == "__main__":
    main()
