"""FS-Merge vs. baselines: merge models trained on different tasks from different random inits.

Tasks are label splits of bundled data (digits 0-4 vs 5-9, labels renumbered per task; a 3-task split
0-2 / 3-5 / 6-9; and MNIST-1D 0-4 vs 5-9 as a harder MLP case). Each original model is trained from its
own random init on its own task with its own head. Merging methods see only a few unlabeled training
inputs per task (16 or 100) plus augmented copies (24 per sample at 16, 4 at 100; the same for KD).
Per-task accuracy uses each task's own logits (task_slices).

    python experiments/merge.py --quick    # CI-sized (MLP + small ViT, fewer steps)
    python experiments/merge.py            # full: writes results/merge.json and results/merge.md
"""
from __future__ import annotations

import time

import torch
from torch.utils.data import TensorDataset

from thrifty.bench.experiment import Experiment, table
from thrifty.data import load_dataset
from thrifty.merge import (
    DistillMerge, Ensemble, FSMerge, PermuteMerge, average, distill_merge, evaluate_tasks, few_shot, fs_merge,
    permute_and_average, zip_merge,
)
from thrifty.models import create
from thrifty.train import TrainConfig, cache_dir, fit, load_checkpoint, save_checkpoint
from thrifty.train.checkpoint import CheckpointError
from thrifty.utils import seed_everything

SPLIT2 = [(0, 1, 2, 3, 4), (5, 6, 7, 8, 9)]
SPLIT3 = [(0, 1, 2), (3, 4, 5), (6, 7, 8, 9)]


def arch_setup(arch: str, quick: bool) -> dict:
    if arch == "mlp1d":
        return dict(dataset="mnist1d", model=dict(name="mlp", in_features=40, hidden=[256, 256]),
                    train=TrainConfig(epochs=60, optim={"lr": 2e-3, "weight_decay": 0.05, "batch_size": 128},
                                      optimizer="adamw"),
                    fs_steps=300)
    if arch == "mlp":
        return dict(dataset="digits", model=dict(name="mlp", in_features=64, hidden=[128, 128]),
                    train=TrainConfig(epochs=30, optim={"lr": 0.05, "batch_size": 64}), fs_steps=120 if quick else 300)
    depth = 2 if quick else 3
    return dict(dataset="digits32", model=dict(name="vit", img_size=32, patch_size=8, dim=64, depth=depth, heads=4),
                train=TrainConfig(epochs=15 if quick else 40, optim={"lr": 1e-3, "weight_decay": 0.05,
                                                                     "batch_size": 64}, optimizer="adamw", warmup=20),
                fs_steps=60 if quick else 300)


def task_sets(ds: TensorDataset, classes: tuple[int, ...]) -> TensorDataset:
    x, y = ds.tensors
    keep = torch.isin(y, torch.tensor(classes))
    remap = torch.full((10,), -1, dtype=torch.long)
    remap[list(classes)] = torch.arange(len(classes))
    return TensorDataset(x[keep], remap[y[keep]])


def originals(arch: str, setup: dict, splits: list, tasks: list, quick: bool) -> list[torch.nn.Module]:
    models = []
    for i, (classes, (tr, te)) in enumerate(zip(splits, tasks)):
        kw = {k: v for k, v in setup["model"].items() if k != "name"}
        seed = 1000 + 17 * i + len(splits)  # a different random init for every model
        seed_everything(seed)
        model = create(setup["model"]["name"], num_classes=len(classes), **kw)
        tag = "".join(map(str, classes))
        path = cache_dir() / "merge" / f"{arch}_{tag}_{'quick' if quick else 'full'}_{seed}.safetensors"
        try:
            load_checkpoint(path, model)
        except CheckpointError:
            fit(model, setup["train"].replace(seed=seed), tr, te, progress=False)
            save_checkpoint(path, model, None, step=0, extra={"classes": list(classes)})
        models.append(model.eval())
    return models


def run(arch: str, splits: list, quick: bool, sizes: tuple[int, ...], methods: tuple[str, ...]) -> list[dict]:
    setup = arch_setup(arch, quick)
    data = load_dataset(setup["dataset"], seed=0)
    tasks = [(task_sets(data.train, c), task_sets(data.test, c)) for c in splits]
    tests = [te for _, te in tasks]
    t0 = time.perf_counter()
    models = originals(arch, setup, splits, tasks, quick)
    orig = [evaluate_tasks(m, [te], [(0, m.head.out_features)])[0] for m, te in zip(models, tests)]
    rows = [dict(arch=arch, k=len(splits), method="original (each its own model)", samples=None, acc=orig,
                 seconds=round(time.perf_counter() - t0, 1))]

    def record(name: str, n: int | None, fn) -> None:
        before = [{k: v.clone() for k, v in m.state_dict().items()} for m in models]
        t = time.perf_counter()
        merged = fn()
        secs = time.perf_counter() - t
        for m, sd in zip(models, before):  # the inputs must come back untouched
            assert all(torch.equal(sd[k], v) for k, v in m.state_dict().items()), f"{name} modified an input model"
        acc = evaluate_tasks(merged, tests)
        rows.append(dict(arch=arch, k=len(splits), method=name, samples=n, acc=acc, seconds=round(secs, 1)))
        print(f"  {arch} K={len(splits)} {name:<28} n={str(n):>4}  acc={[round(a, 3) for a in acc]}  "
              f"rel={sum(a / o for a, o in zip(acc, orig)) / len(acc):.3f}  {secs:.1f}s", flush=True)

    print(f"{arch} K={len(splits)} originals: {[round(a, 3) for a in orig]}", flush=True)
    steps = setup["fs_steps"]
    if "ensemble" in methods:
        record("ensemble (upper bound)", None, lambda: Ensemble(models))
    if "average" in methods:
        record("weight averaging", None, lambda: average(models))
    for n in sizes:
        few = [few_shot(tr, n, seed=i) for i, (tr, _) in enumerate(tasks)]
        aug = max(4, round(400 / n))  # augmented copies: about 400 inputs per task, same for KD and FS-Merge
        if "perm" in methods:
            if arch == "mlp":
                record("permute+avg (weights)", n, lambda: permute_and_average(models, PermuteMerge("weight"), few))
            record("permute+avg (activations)", n, lambda: permute_and_average(models, PermuteMerge(), few))
            if arch.startswith("mlp") and len(models) == 2:
                record("ZipIt-style zip", n, lambda: zip_merge(models, data=few))
        if "kd" in methods:
            kd = DistillMerge(optim={"steps": steps, "lr": 1e-3}, augment=aug)
            record("distillation (KD)", n, lambda: distill_merge(models, kd, few))
        for mode in ("global", "local"):
            if f"fs-{mode}" in methods:
                cfg = FSMerge(mode=mode, optim={"steps": steps}, augment=aug)
                record(f"FS-Merge ({mode})", n, lambda cfg=cfg: fs_merge(models, cfg, few))
        if "fs-permute" in methods:
            cfg = FSMerge(init="permute", optim={"steps": steps}, augment=aug)
            record("FS-Merge (global, permute init)", n, lambda cfg=cfg: fs_merge(models, cfg, few))
        for param in ("diagonal", "lowrank", "full"):
            if f"fs-{param}" in methods:
                cfg = FSMerge(param=param, optim={"steps": steps}, augment=aug)
                record(f"FS-Merge (global, {param})", n, lambda cfg=cfg: fs_merge(models, cfg, few))
        for wm in (0.5, 2.0):
            if f"fs-width{wm}" in methods:
                cfg = FSMerge(width_mult=wm, optim={"steps": steps}, augment=aug)
                record(f"FS-Merge (global, width x{wm})", n, lambda cfg=cfg: fs_merge(models, cfg, few))
    for r in rows:
        r["rel"] = [round(a / o, 4) for a, o in zip(r["acc"], orig)]
        r["mean_rel"] = round(sum(r["rel"]) / len(r["rel"]), 4)
        r["acc"] = [round(a, 4) for a in r["acc"]]
    return rows


def to_markdown(rows: list[dict], quick: bool) -> str:
    out = [f"# Model merging (FS-Merge vs. baselines){' — quick mode' if quick else ''}", "",
           "Digits label splits, each original trained from its own random init; merged models see only the "
           "given number of unlabeled samples per task (+24 augmented copies each at 16, +4 at 100; KD gets the "
           "same). Accuracy is per task on its own "
           "logits; rel = merged / original accuracy of that task, averaged over tasks.", ""]
    for (arch, k) in dict.fromkeys((r["arch"], r["k"]) for r in rows):
        sub = [r for r in rows if r["arch"] == arch and r["k"] == k]
        tasks = {f"task{i}": f"task {i + 1} acc" for i in range(k)}
        out += [f"## {arch.upper()}, {k} tasks", "",
                table([{**r, **dict(zip(tasks, r["acc"]))} for r in sub],
                      {"method": "method", "samples": "samples/task", **tasks, "mean_rel": "mean rel",
                       "seconds": "seconds"}, digits=3, formats={"seconds": str})]
    return "\n".join(out)


def science(args, exp: Experiment) -> dict:
    core = ("ensemble", "average", "perm", "kd", "fs-global", "fs-local", "fs-permute")
    rows = []
    if args.quick:
        rows += run("mlp", SPLIT2, True, (16, 100), core)
        rows += run("vit", SPLIT2, True, (100,), ("ensemble", "average", "perm", "kd", "fs-global"))
    else:
        rows += run("mlp", SPLIT2, False, (16, 100),
                    core + ("fs-diagonal", "fs-lowrank", "fs-full", "fs-width0.5", "fs-width2.0"))
        rows += run("vit", SPLIT2, False, (16, 100), core)
        rows += run("mlp", SPLIT3, False, (16, 100), ("ensemble", "average", "perm", "kd", "fs-global", "fs-permute"))
        rows += run("mlp1d", SPLIT2, False, (16, 100), core)
    return {"quick": args.quick, "seconds": exp.seconds(), "torch_threads": args.threads,
            "rows": rows}


def render(res: dict) -> str:
    return to_markdown(res["rows"], res["quick"]) + f"\nTotal time: {res['seconds']:.0f} s.\n"


def main(argv=None) -> int:
    exp = Experiment("merge", __doc__)  # one thread by default: the machine is shared
    return exp.run(lambda args: science(args, exp), render, argv=argv)


if __name__ == "__main__":
    raise SystemExit(main())
