"""Training regimes on resnet20 / digits32: batch augmentation and mixed-size training (Mix & Match).

Part A (batch augmentation): the baseline (standard augmentation, m=1) vs BatchAugment m=2,4,8 with the
same learning-rate schedule and the same number of steps; reports final accuracy and the first evaluated
step at which each run reaches the baseline's final test accuracy. A no-augmentation run is listed too.
Part B (mixed size): the m=1 model trained at 32x32 ("fixed") vs MixedSize B+ and D+ models (default
schedule 16/24/32/48 with p .2/.3/.3/.2, same steps), evaluated at test sizes 16..48 with and without BN
recalibration, with forward FLOPs per image at each size.

    python experiments/regimes.py --quick    # CI-sized, about a minute: results/regimes_quick.{json,md}
    python experiments/regimes.py            # full (~15 CPU-minutes): results/regimes.{json,md} + plots

Small data: 1258 training and 539 test images (one test image = 0.19 points), one seed by default
(--seeds 0 1 for more); read differences of a few tenths of a point as noise.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import TensorDataset

from thrifty.core import to_dict
from thrifty.data import load_dataset
from thrifty.models import create
from thrifty.train import (BatchAugment, MixedSize, TrainConfig, evaluate, fit, model_kwargs_for, recalibrate_bn,
                           recipe)
from thrifty.utils import atomic_write_text, seed_everything

ROOT = Path(__file__).resolve().parents[1]


def flops_per_image(model: nn.Module, size: int, in_chans: int = 1) -> int:
    """Forward multiply-accumulates x2 of Conv2d and Linear layers for one size x size image."""
    total = 0

    def hook(m, inp, out):
        nonlocal total
        if isinstance(m, nn.Conv2d):
            total += 2 * out.numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]
        elif isinstance(m, nn.Linear):
            total += 2 * out.numel() * m.in_features

    hs = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    was = model.training
    model.eval()
    with torch.no_grad():
        model(torch.zeros(1, in_chans, size, size))
    model.train(was)
    for h in hs:
        h.remove()
    return total


def train_one(name: str, regime, splits, kwargs, cfg, seed: int, log: dict) -> nn.Module:
    seed_everything(seed)
    model = create("resnet20", **kwargs)
    t0 = time.perf_counter()
    hist = fit(model, splits.train, splits.test, cfg, regime=regime, progress=sys.stderr.isatty())
    secs = time.perf_counter() - t0
    curve = [(r["step"], r["test_acc"]) for r in hist.records]
    log[name] = {"seed": seed, "final_acc": hist.final["test_acc"], "curve": curve, "train_seconds": round(secs, 1),
                 "regime": regime.describe() if regime is not None else None}
    print(f"  {name:>10s} seed {seed}: final test acc {100 * hist.final['test_acc']:.2f}% ({secs:.0f} s)",
          file=sys.stderr, flush=True)
    return model


def steps_to_reach(curve: list, target: float) -> int | None:
    return next((s for s, a in curve if a >= target - 1e-12), None)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--out", default=str(ROOT / "results"))
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 on a shared machine)")
    ap.add_argument("--steps", type=int, default=None, help="override the number of training steps")
    ap.add_argument("--parts", default="ab", help="a = batch augmentation, b = mixed size (b needs a's m=1 model)")
    ap.add_argument("--tag", default="", help="suffix for the results files, e.g. _steps60")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    q = args.quick
    t_start = time.perf_counter()
    splits = load_dataset("digits32", seed=0)
    extra, base_cfg = recipe("resnet20", "digits32")
    kwargs = model_kwargs_for("resnet20", splits.input_shape, splits.num_classes, **extra)
    if q:  # CI-sized smoke run: few steps, small batches, a slice of the test set
        splits = dataclasses.replace(splits, test=TensorDataset(*(t[:160] for t in splits.test.tensors)))
    # full: 150 steps at batch 32 (about 4 epochs; lr scaled linearly from the recipe's 0.1 at batch 64) keeps
    # m=8 affordable on a shared 2-core machine
    steps = args.steps or (20 if q else 150)
    cfg = TrainConfig(**{**{k: v for k, v in to_dict(base_cfg).items() if k != "kind"},
                         "steps": steps, "batch_size": 16 if q else 32, "lr": 0.05, "eval_steps": 10})
    ms = [1, 2] if q else [1, 2, 4, 8]
    sizes = [16, 24, 32] if q else [16, 20, 24, 28, 32, 40, 48]
    calib = 3 if q else 20

    runs: dict[str, dict] = {}
    ba_rows, ms_rows = [], []
    for seed in args.seeds:
        cfg_s = TrainConfig(**{**{k: v for k, v in to_dict(cfg).items() if k != "kind"}, "seed": seed})
        log: dict[str, dict] = {}
        print(f"[regimes] part A: batch augmentation, {steps} steps, seed {seed}", file=sys.stderr)
        if not q:
            train_one("no-aug", None, splits, kwargs, cfg_s, seed, log)
        models = {m: train_one(f"m={m}", BatchAugment(m=m), splits, kwargs, cfg_s, seed, log) for m in ms}
        base_final = log["m=1"]["final_acc"]
        for name, r in log.items():
            ba_rows.append({"seed": seed, "run": name, "final_acc": r["final_acc"],
                            "steps_to_baseline": steps_to_reach(r["curve"], base_final), "total_steps": steps,
                            "train_seconds": r["train_seconds"]})
        if "b" not in args.parts:
            runs[str(seed)] = log
            continue
        print(f"[regimes] part B: mixed size, seed {seed}", file=sys.stderr)
        mixed = {"fixed-32": models[1]}
        for mode in ("B+", "D+"):
            mixed[mode] = train_one(mode, MixedSize(mode=mode, seed=seed), splits, kwargs, cfg_s, seed, log)
        for name, model in mixed.items():
            for s in sizes:
                plain = evaluate(model, splits.test, size=s)["acc"]
                cal = evaluate(recalibrate_bn(copy.deepcopy(model), splits.train, size=s, batches=calib), splits.test,
                               size=s)["acc"]
                ms_rows.append({"seed": seed, "model": name, "size": s, "acc": plain, "acc_bn_calibrated": cal,
                                "mflops": flops_per_image(model, s) / 1e6})
        runs[str(seed)] = log

    cmd = " ".join(["python", "experiments/regimes.py"] + (sys.argv[1:] if argv is None else list(argv)))
    res = {"mode": "quick" if q else "full", "command": cmd,
           "seeds": args.seeds, "train_config": to_dict(cfg), "batch_augment": ba_rows, "mixed_size": ms_rows,
           "runs": runs, "test_images": len(splits.test), "threads": torch.get_num_threads(),
           "seconds": round(time.perf_counter() - t_start, 1)}
    out = Path(args.out)
    stem = ("regimes_quick" if q else "regimes") + args.tag
    atomic_write_text(out / f"{stem}.json", json.dumps(res, indent=1))
    atomic_write_text(out / f"{stem}.md", markdown(res, stem))
    plots(res, out, stem)
    print(markdown(res, stem))
    return 0


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def markdown(res: dict, stem: str) -> str:
    seeds = res["seeds"]
    L = [f"# Training regimes on resnet20 / digits32 ({res['mode']}, seeds {seeds})", "",
         f"`{res['command']}` - {res['seconds']:.0f} s on {res['threads']} threads. Same schedule and number of "
         f"steps ({res['train_config']['steps']}, batch {res['train_config']['batch_size']} per step before "
         f"duplication) for every run; {res.get('test_images', 539)} test images, so one image = "
         f"{100 / res.get('test_images', 539):.2f} points.", "",
         "## Batch augmentation", "",
         "| run | final test acc (%) | steps to reach the m=1 final acc | fraction of steps | train s |",
         "|---|---|---|---|---|"]
    runs = sorted({r["run"] for r in res["batch_augment"]}, key=lambda n: (n != "no-aug", len(n), n))
    for name in runs:
        rows = [r for r in res["batch_augment"] if r["run"] == name]
        acc = _mean([r["final_acc"] for r in rows])
        st = [r["steps_to_baseline"] for r in rows]
        st_txt = "/".join("never" if s is None else str(s) for s in st)
        frac = _mean([s / r["total_steps"] if s is not None else None for s, r in zip(st, rows)])
        L.append(f"| {name} | {100 * acc:.2f} | {st_txt} | {'-' if frac is None else f'{frac:.2f}'} | "
                 f"{_mean([r['train_seconds'] for r in rows]):.0f} |")
    L += ["", "Steps are measured on an evaluation grid of every 10 steps.", ""]
    if not res["mixed_size"]:
        return "\n".join(L + [f"![batch augmentation]({stem}_batch_aug.png)", ""])
    L += ["## Mixed size (Mix & Match)", "",
          "Test accuracy (%) at each test size; `+BN` = BN statistics recalibrated at that size "
          "(cumulative average over training batches).", ""]
    models = list(dict.fromkeys(r["model"] for r in res["mixed_size"]))
    sizes = sorted({r["size"] for r in res["mixed_size"]})
    L.append("| size | MFLOPs/img | " + " | ".join(f"{m} | {m} +BN" for m in models) + " |")
    L.append("|---|---|" + "---|---|" * len(models))
    for s in sizes:
        cells = []
        for m in models:
            rows = [r for r in res["mixed_size"] if r["model"] == m and r["size"] == s]
            cells += [f"{100 * _mean([r['acc'] for r in rows]):.2f}",
                      f"{100 * _mean([r['acc_bn_calibrated'] for r in rows]):.2f}"]
        mf = next(r["mflops"] for r in res["mixed_size"] if r["size"] == s)
        L.append(f"| {s} | {mf:.1f} | " + " | ".join(cells) + " |")
    L += ["", "Drop from size 32 to size 24 (points, best of plain/+BN at each size):", ""]
    for m in models:
        def best(s):
            rows = [r for r in res["mixed_size"] if r["model"] == m and r["size"] == s]
            return 100 * max(_mean([r["acc"] for r in rows]), _mean([r["acc_bn_calibrated"] for r in rows]))
        if 24 in sizes and 32 in sizes:
            L.append(f"- {m}: {best(32):.2f} -> {best(24):.2f} ({best(24) - best(32):+.2f})")
    L += ["", f"![batch augmentation]({stem}_batch_aug.png) ![mixed size]({stem}_mixed_size.png)", ""]
    return "\n".join(L)


def plots(res: dict, out: Path, stem: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seed = str(res["seeds"][0])
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for name, r in res["runs"][seed].items():
        if name.startswith("m=") or name == "no-aug":
            ax.plot([s for s, _ in r["curve"]], [100 * a for _, a in r["curve"]], marker=".", label=name)
    base = res["runs"][seed]["m=1"]["final_acc"]
    ax.axhline(100 * base, color="gray", ls=":", label="m=1 final")
    ax.set(xlabel="step", ylabel="test accuracy (%)", ylim=(max(0, 100 * base - 15), 100.5),
           title=f"batch augmentation (seed {seed})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / f"{stem}_batch_aug.png", dpi=110)
    plt.close(fig)

    rows = [r for r in res["mixed_size"] if str(r["seed"]) == seed]
    if not rows:
        return
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.8))
    for m in dict.fromkeys(r["model"] for r in rows):
        rs = [r for r in rows if r["model"] == m]
        for key, ls in (("acc", "--"), ("acc_bn_calibrated", "-")):
            lab = f"{m}{' +BN' if key != 'acc' else ''}"
            ax[0].plot([r["size"] for r in rs], [100 * r[key] for r in rs], ls, marker="o", label=lab)
            ax[1].plot([r["mflops"] for r in rs], [100 * r[key] for r in rs], ls, marker="o", label=lab)
    ax[0].set(xlabel="test image size", ylabel="test accuracy (%)", title="accuracy vs test size")
    ax[1].set(xlabel="forward MFLOPs per image", ylabel="test accuracy (%)", xscale="log",
              title="accuracy vs compute")
    for a in ax:
        a.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / f"{stem}_mixed_size.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
