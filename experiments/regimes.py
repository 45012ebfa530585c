"""Training regimes: batch augmentation (parts a, c) and mixed-size training, Mix & Match (part b).

Part a (batch augmentation, experiments/regimes_batch_aug.py): resnet20/digits32 and mlp/mnist1d, m=1 (the
baseline, same augmentation) vs m=2,4,8 with the same lr schedule and number of steps, 3 seeds, curves averaged
over seeds; steps each run needs to reach the baseline's final accuracy (see that file for the protocol).
Part c: m=1 and m=4 with the whole schedule compressed into 0.4x / 0.6x of the steps.
Part b (mixed size, resnet20/digits32): a model trained at 32x32 ("fixed-32", plain augmentation, 150 steps of
batch 32) vs MixedSize B+ and D+ models (default schedule 16/24/32/48 with p .2/.3/.3/.2, same steps),
evaluated at test sizes 16..48 with and without BN recalibration, with forward FLOPs per image at each size.

    python experiments/regimes.py --quick          # CI-sized, about a minute: results/regimes_quick.{json,md}
    python experiments/regimes.py                  # full (~25 CPU-minutes on a quiet machine): results/regimes.*
    python experiments/regimes.py --parts a --tasks digits32 --seeds 1 --merge-seeds
                                                   # one part / task / seed per process (parallel runs); results
                                                   # are merged into results/regimes.json, other parts are kept
    python experiments/regimes.py --parts a --schedule step
                                                   # protocol B: part a under the paper's step schedule (x0.1 at
                                                   # 50% and 75%), plus the long digits32 task (~70 CPU-minutes)
    python experiments/regimes.py --render         # re-render results/regimes.md and the plots from the json

Small data: digits32 has 1258 training and 539 test images (one test image = 0.19 points); read
differences of a few tenths of a point as noise.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import sys
import time

import torch
from torch import nn
from torch.utils.data import TensorDataset

import regimes_batch_aug as ba  # the sibling script (this folder is on sys.path when a script here runs)
from thrifty.bench.experiment import Experiment, fmt, table
from thrifty.data import load_dataset
from thrifty.models import create
from thrifty.train import (BatchAugment, MixedSize, TrainConfig, evaluate, fit, flat_train_config, model_kwargs_for,
                           recalibrate_bn, recipe)
from thrifty.utils import seed_everything

BA_KEYS = ("batch_augment", "batch_augment_step")  # part a under the cosine protocol / the paper's step schedule


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
    hist = fit(model, cfg, splits.train, splits.test, regime=regime, progress=sys.stderr.isatty())
    secs = time.perf_counter() - t0
    curve = [(r["step"], r["test_acc"]) for r in hist.records]
    log[name] = {"seed": seed, "final_acc": hist.final["test_acc"], "curve": curve, "train_seconds": round(secs, 1),
                 "regime": regime.describe() if regime is not None else None}
    print(f"  {name:>10s} seed {seed}: final test acc {100 * hist.final['test_acc']:.2f}% ({secs:.0f} s)",
          file=sys.stderr, flush=True)
    return model


def mixed_size_config(base: TrainConfig, steps: int, quick: bool) -> TrainConfig:
    """Part b's recipe: the resnet20 recipe at ``steps`` steps of batch 32 (16 quick), lr 0.05, evaluated every 10."""
    return base.replace(optim={"steps": steps, "batch_size": 16 if quick else 32, "lr": 0.05}, eval_steps=10)


def part_b(q: bool, seeds: list[int], steps: int | None) -> dict:
    """Mixed size: fixed-32 (plain augmentation) vs B+ and D+, test sizes 16..48, with/without BN recalibration."""
    splits = load_dataset("digits32", seed=0)
    extra, base_cfg = recipe("resnet20", "digits32")
    kwargs = model_kwargs_for("resnet20", splits.input_shape, splits.num_classes, **extra)
    if q:  # CI-sized smoke run: few steps, small batches, a slice of the test set
        splits = dataclasses.replace(splits, test=TensorDataset(*(t[:160] for t in splits.test.tensors)))
    # 150 steps at batch 32 (about 4 epochs; lr scaled linearly from the recipe's 0.1 at batch 64)
    steps = steps or (20 if q else 150)
    cfg = mixed_size_config(base_cfg, steps, q)
    sizes = [16, 24, 32] if q else [16, 20, 24, 28, 32, 40, 48]
    calib = 3 if q else 20
    rows, runs = [], {}
    for seed in seeds:
        print(f"[regimes] part b: mixed size, seed {seed}", file=sys.stderr)
        cfg_s = dataclasses.replace(cfg, seed=seed)
        log: dict[str, dict] = {}
        mixed = {"fixed-32": train_one("fixed-32", BatchAugment(m=1), splits, kwargs, cfg_s, seed, log)}
        for mode in ("B+", "D+"):
            mixed[mode] = train_one(mode, MixedSize(mode=mode, seed=seed), splits, kwargs, cfg_s, seed, log)
        for name, model in mixed.items():
            for s in sizes:
                plain = evaluate(model, splits.test, size=s)["acc"]
                cal = evaluate(recalibrate_bn(copy.deepcopy(model), splits.train, size=s, batches=calib), splits.test,
                               size=s)["acc"]
                rows.append({"seed": seed, "model": name, "size": s, "acc": plain, "acc_bn_calibrated": cal,
                             "mflops": flops_per_image(model, s) / 1e6})
        runs[str(seed)] = log
    return {"seeds": seeds, "train_config": flat_train_config(cfg), "rows": rows, "runs": runs,
            "test_images": len(splits.test)}


def main(argv: list[str] | None = None) -> int:
    exp = Experiment("regimes", __doc__)  # one thread by default: the machine is shared
    ap = exp.parser
    ap.add_argument("--seeds", type=int, nargs="+", default=None,
                    help="part a: default 0 1 2 (0 with --quick); part b: default 0")
    ap.add_argument("--steps", type=int, default=None,
                    help="override the number of training steps (part b; part a: pilots, evaluated every 1%%)")
    ap.add_argument("--parts", default="abc", help="a = batch augmentation curves, b = mixed size, c = batch "
                    "augmentation on compressed schedules; 'none' (or --render) only re-renders the .md and plots")
    ap.add_argument("--merge-seeds", action="store_true",
                    help="part a: pool these seeds with the stored ones of the same task and protocol (one process "
                         "per seed); otherwise the task's stored results are replaced")
    ap.add_argument("--runs", nargs="+", default=None,
                    help="part a: only these runs (e.g. m=1+gna4), to pool with stored ones via --merge-seeds")
    ap.add_argument("--schedule", choices=("cosine", "step"), default="cosine",
                    help="part a: the lr schedule of every run; 'step' = the paper's (x0.1 at 50%% and 75%% of the "
                         "steps), stored apart from the cosine protocol (key batch_augment_step)")
    ap.add_argument("--tasks", nargs="+", default=None,
                    help="parts a/c: only the tasks whose name contains one of these (e.g. digits32 mnist1d); a "
                         "full task name ('resnet20 / digits32') selects that task only")
    args = exp.start(argv)
    if not args.render:
        run_parts(args, exp)
    res = exp.read_json()  # a fresh run renders from its JSON too, as --render does
    print(exp.write_markdown(markdown(res, exp.stem)).read_text(), end="")
    plots(res, exp)
    return 0


def run_parts(args, exp: Experiment) -> dict:
    """Run the parts asked for, merging each into this experiment's json as it finishes."""
    q = args.quick
    cmd = exp.command
    res = _drop_legacy(exp.read_json()) if exp.path(".json").exists() else {}
    res.update({"mode": "quick" if q else "full", "threads": args.threads})
    seeds_ac = args.seeds or ([0] if q else [0, 1, 2])
    todo = [t for t in ba.tasks(q) if not args.tasks or any(_matches(k, t.name, q) for k in args.tasks)]
    key_a = "batch_augment" if args.schedule == "cosine" else "batch_augment_step"
    if "a" in args.parts:
        for task in (t for t in todo if args.schedule in t.schedules):
            task = ba.with_schedule(task, args.schedule)
            if args.steps:  # pilots: same task on another budget (write them to another --out)
                task = dataclasses.replace(task, train=dataclasses.replace(
                    task.train, steps=args.steps, eval_steps=max(1, args.steps // 100)))
            print(f"[regimes] part a: batch augmentation, {task.name}, seeds {seeds_ac}", file=sys.stderr)
            t0 = time.perf_counter()
            r = ba.run_task(task, seeds_ac, progress=sys.stderr.isatty(), only=args.runs)
            r.update(summary=ba.summarize(r) if "m=1" in r["raw"] else None, command=cmd,
                     seconds=round(time.perf_counter() - t0, 1), merge_seeds=args.merge_seeds)
            res = _save(exp, res, key_a, r)
    if "c" in args.parts:
        for task in (t for t in todo if "cosine" in t.schedules):
            print(f"[regimes] part c: compressed schedules, {task.name}, seeds {seeds_ac}", file=sys.stderr)
            t0 = time.perf_counter()
            r = ba.run_budgets(task, seeds_ac)
            r.update(command=cmd, seconds=round(time.perf_counter() - t0, 1))
            res = _save(exp, res, "batch_augment_budget", r)
    if "b" in args.parts:
        t0 = time.perf_counter()
        entry = {"command": cmd, **part_b(q, args.seeds or [0], args.steps),
                 "seconds": round(time.perf_counter() - t0, 1)}
        res = _save(exp, res, "mixed_size", entry)
    return _save(exp, res, None, None)


def _matches(key: str, name: str, quick: bool) -> bool:
    """--tasks: a task's full name selects that task only; any other text selects every task containing it."""
    names = [t.name for t in ba.tasks(quick)]
    return key == name if key in names else key in name


def _save(exp: Experiment, res: dict, key: str | None, entry: dict | None) -> dict:
    """Write ``entry`` under ``key`` into the results json, re-reading it first: parts and tasks may run as
    separate processes at the same time. Task-based parts (a, c) are merged task by task."""
    latest = _drop_legacy(exp.read_json()) if exp.path(".json").exists() else {}
    merged = {**latest, "mode": res["mode"], "threads": res["threads"]}
    if key == "mixed_size":
        merged[key] = entry
    elif key is not None:
        prev = next((t for t in latest.get(key, {}).get("tasks", []) if t.get("task") == entry["task"]), None)
        if key in BA_KEYS and prev is not None and entry.get("merge_seeds") and all(
                prev.get(k) == json.loads(json.dumps(entry[k]))
                for k in ("train_config", "augment", "test_images", "model_kwargs")):
            # same protocol run for other seeds (e.g. one process per seed): pool the seeds
            runs = list(dict.fromkeys([*prev["raw"], *entry["raw"]]))
            raw = {run: {**prev["raw"].get(run, {}), **entry["raw"].get(run, {})} for run in runs}
            every = set.intersection(*(set(per) for per in raw.values()))  # seeds that every run has
            seeds = sorted(int(k) for k in every)
            cmds = [c for c in (prev.get("command", ""), entry["command"]) if c]
            entry = {**entry, "raw": raw, "seeds": seeds, "command": " + ".join(dict.fromkeys(cmds)),
                     "seconds": prev.get("seconds", 0) + entry["seconds"]}
            entry["summary"] = ba.summarize(entry) if "m=1" in raw and seeds else None
        old = [t for t in latest.get(key, {}).get("tasks", []) if t.get("task") != entry["task"]]
        order = [t.name for t in ba.tasks(res["mode"] == "quick")]
        tasks = sorted(old + [entry], key=lambda t: order.index(t["task"]) if t["task"] in order else len(order))
        merged[key] = {"tasks": tasks}
    exp.write_json(merged)
    return merged


def _drop_legacy(res: dict) -> dict:
    """Keep only this layout's keys; files from the older single-seed layout (one top-level run log, a list of
    batch-augmentation rows) are not comparable, so their parts are dropped rather than mixed in."""
    res = {k: v for k, v in res.items()
           if k in ("mode", "threads", *BA_KEYS, "mixed_size", "batch_augment_budget")}
    return {k: v for k, v in res.items() if k in ("mode", "threads") or isinstance(v, dict)}


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def markdown(res: dict, stem: str) -> str:
    L = [f"# Training regimes ({res['mode']})", ""]
    a, b = res.get("batch_augment"), res.get("mixed_size")
    if a and isinstance(a, dict) and any(t.get("summary") for t in a["tasks"]):
        L += ba.markdown(a["tasks"])
        c = res.get("batch_augment_budget")
        if c and isinstance(c, dict):
            L += ba.budget_markdown(c["tasks"], a["tasks"])
        L += [f"![batch augmentation]({stem}_batch_aug.png)", ""]
    a_step = res.get("batch_augment_step")
    if a_step and isinstance(a_step, dict) and any(t.get("summary") for t in a_step["tasks"]):
        L += ba.markdown(a_step["tasks"], schedule="step")
        L += [f"![batch augmentation, step schedule]({stem}_batch_aug_step.png)", ""]
    if not b or not isinstance(b, dict) or not b.get("rows"):
        return "\n".join(L)
    tc = b["train_config"]
    L += ["## Mixed size (Mix & Match)", "",
          f"`{b['command']}` (part b) - {b['seconds']:.0f} s; resnet20 / digits32, seeds {b['seeds']}, "
          f"{tc['steps']} steps of batch {tc['batch_size']} (before B+/D+ rescaling), lr {tc['lr']} "
          f"{tc['schedule']}; {b['test_images']} test images. Test accuracy (%) at each test size; `+BN` = BN "
          "statistics recalibrated at that size (cumulative average over training batches).", ""]
    ms = b["rows"]
    models = list(dict.fromkeys(r["model"] for r in ms))
    sizes = sorted({r["size"] for r in ms})
    cols = {"size": "size", "mflops": "MFLOPs/img"}
    for m in models:
        cols.update({m: m, f"{m} +BN": f"{m} +BN"})
    table_rows = []
    for s in sizes:
        row = {"size": s, "mflops": next(r["mflops"] for r in ms if r["size"] == s)}
        for m in models:
            rows = [r for r in ms if r["model"] == m and r["size"] == s]
            row[m], row[f"{m} +BN"] = _mean([r["acc"] for r in rows]), _mean([r["acc_bn_calibrated"] for r in rows])
        table_rows.append(row)
    pct = lambda v: fmt(v, percent=True)  # noqa: E731
    L.append(table(table_rows, cols, digits={"mflops": 1}, formats={c: pct for c in list(cols)[2:]}).rstrip("\n"))
    L += ["", "Drop from size 32 to size 24 (points, best of plain/+BN at each size):", ""]
    for m in models:
        def best(s):
            rows = [r for r in ms if r["model"] == m and r["size"] == s]
            return 100 * max(_mean([r["acc"] for r in rows]), _mean([r["acc_bn_calibrated"] for r in rows]))
        if 24 in sizes and 32 in sizes:
            L.append(f"- {m}: {best(32):.2f} -> {best(24):.2f} ({best(24) - best(32):+.2f})")
    L += ["", f"![mixed size]({stem}_mixed_size.png)", ""]
    return "\n".join(L)


def plots(res: dict, exp: Experiment) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if isinstance(res.get("batch_augment"), dict):
        ba.plot(res["batch_augment"]["tasks"], exp.path("_batch_aug.png"))
    if isinstance(res.get("batch_augment_step"), dict):
        ba.plot(res["batch_augment_step"]["tasks"], exp.path("_batch_aug_step.png"))
    b = res.get("mixed_size")
    if not b or not isinstance(b, dict) or not b.get("rows"):
        return
    seed = b["seeds"][0]
    rows = [r for r in b["rows"] if r["seed"] == seed]
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
    exp.savefig(fig, "_mixed_size.png")


if __name__ == "__main__":
    raise SystemExit(main())
