"""``thrifty merge``: merge saved models (same architecture, different tasks / inits) into one model.

Each model's task data is the dataset recorded in its yaml (or ``--data``, one per model; bundled names
or .pt/.npz/folder paths), optionally restricted to some labels with ``--classes`` (one comma list per
model, e.g. ``0,1,2,3,4 5,6,7,8,9``). Only ``--data-per-task`` unlabeled training inputs per task are
used. Prints per-task test accuracy of the originals and of the merged model, and writes
``<out>/model.safetensors`` + ``model.yaml`` (loadable by ``thrifty eval`` / ``load_model``; its head
concatenates the task heads, ``task_slices`` in the yaml), ``merge.json`` and ``config.yaml``.

Example:
    thrifty merge --models runs/a/model runs/b/model --method fs-merge --data-per-task 100 --out runs/merged
"""
from __future__ import annotations

import argparse
import json
import sys

from thrifty.cli import _common
from thrifty.cli._fields import add_config_flags, config_from_args

METHODS = ("fs-merge", "average", "permute", "zip", "distill")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("merge", help="merge models trained on different tasks (FS-Merge and baselines)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", required=True, help="saved model stems or .safetensors paths (>= 2)")
    p.add_argument("--method", choices=METHODS, default="fs-merge")
    p.add_argument("--data", nargs="+", default=None, help="one dataset per model (default: each model's yaml)")
    p.add_argument("--classes", nargs="+", default=None, help="one comma-separated label list per model")
    p.add_argument("--data-per-task", type=_common.positive_int, default=100, help="unlabeled training inputs per task")
    p.add_argument("--seed", type=int, default=0, help="which few-shot samples, and the method's seed")
    p.add_argument("--out", default="runs/merged", help="output folder")
    _common.add_overwrite_option(p)
    classes = _method_classes()
    title = "merge method: the fields of each --method's config (" + ", ".join(
        f"{k}: {c.__name__}" for k, c in classes.items()) + "); another method's flag is refused"
    add_config_flags(p, "merge", *classes.values(), title=title,
                     on_load=lambda cfg: {"method": next(k for k, c in classes.items() if c is type(cfg))})
    p.set_defaults(func=run)


def _method_classes() -> dict:
    from thrifty.merge import AverageMerge, DistillMerge, FSMerge, PermuteMerge, ZipMerge

    return {"fs-merge": FSMerge, "average": AverageMerge, "permute": PermuteMerge, "zip": ZipMerge,
            "distill": DistillMerge}


def build_configs(args: argparse.Namespace) -> dict:
    """The configs the flags (and ``--config``) ask for: ``{"merge": <--method's config>}``."""
    return {"merge": config_from_args(args, "merge", _method_classes()[args.method])}


def _task_splits(args: argparse.Namespace, metas: list[dict], models: list) -> list:
    import torch
    from torch.utils.data import TensorDataset

    from thrifty.data import load_dataset

    k = len(models)
    names = args.data or [m.get("dataset") for m in metas]
    if len(names) != k:
        raise ValueError(f"--data needs one dataset per model ({k}), got {len(names)}")
    if args.classes is not None and len(args.classes) != k:
        raise ValueError(f"--classes needs one label list per model ({k}), got {len(args.classes)}")
    tasks = []
    for i, name in enumerate(names):
        if not name:
            raise ValueError(f"{args.models[i]}: no dataset recorded in its yaml; pass --data")
        s = load_dataset(name, seed=0)
        if args.classes is not None:
            classes = _common.int_list(args.classes[i])
            outside = sorted({c for c in classes if not 0 <= c < s.num_classes})
            if outside or not classes or len(set(classes)) != len(classes):
                raise ValueError(f"--classes {args.classes[i]!r} (model {i}): labels must be distinct and in "
                                 f"0..{s.num_classes - 1} of dataset {name!r}" + (f"; not there: {outside}"
                                                                                  if outside else ""))
            renumber = models[i].head.out_features == len(classes)
            if not renumber and max(classes) >= models[i].head.out_features:
                raise ValueError(f"--classes {args.classes[i]!r}: model {args.models[i]} has "
                                 f"{models[i].head.out_features} outputs, fewer than label {max(classes)} needs")

            def pick(ds: TensorDataset, classes: list[int] = classes, renumber: bool = renumber) -> TensorDataset:
                x, y = ds.tensors
                keep = torch.isin(y, torch.tensor(classes))
                if not keep.any():
                    raise ValueError(f"dataset {name!r} has no samples with labels {classes}")
                yk = y[keep]
                if renumber:
                    yk = torch.searchsorted(torch.tensor(sorted(classes)), yk)
                return TensorDataset(x[keep], yk)

            tasks.append((name, pick(s.train), pick(s.test)))
        else:
            tasks.append((name, s.train, s.test))
    return tasks


def run(args: argparse.Namespace) -> int:
    from thrifty.core import to_dict
    from thrifty.core import strip
    from thrifty.merge import evaluate_tasks, few_shot, merge, zoo_kwargs
    from thrifty.nn import is_gemm
    from thrifty.train import save_model
    from thrifty.utils import fmt_acc

    if len(args.models) < 2:
        raise ValueError(f"--models needs at least 2 saved models, got {len(args.models)}")
    configs = build_configs(args)  # validates the method's fields before any work
    cfg = configs["merge"]
    if args.data_per_task < 2:
        raise ValueError(f"--data-per-task must be >= 2, got {args.data_per_task}")
    out = _common.check_out_dir(args.out, args.overwrite)
    with _common.step(f"loading {len(args.models)} models"):
        loaded = [_common.resolve_model(p, option=f"--models {p}", command="merge")[:2] for p in args.models]
    models, metas = [m for m, _ in loaded], [meta for _, meta in loaded]
    for i, m in enumerate(models):
        if any(is_gemm(x) for x in m.modules()):
            print(f"thrifty merge: {args.models[i]} has wrapped (quantized / sparse) layers; merging its plain "
                  "weights (transforms baked in)", file=sys.stderr)
            models[i] = strip(m)
    tasks = _task_splits(args, metas, models)
    for i, (name, tr, _) in enumerate(tasks):
        if len(tr) < args.data_per_task:
            raise ValueError(f"task {i} ({name}) has only {len(tr)} training samples; --data-per-task "
                             f"{args.data_per_task} is too many")
    few = [few_shot(tr, args.data_per_task, seed=args.seed + i) for i, (_, tr, _) in enumerate(tasks)]
    tests = [te for _, _, te in tasks]
    progress = _common.show_progress()
    with _common.step(f"merging with {args.method}"):
        merged = merge(models, cfg, few, progress=progress)
    orig = [evaluate_tasks(m, [te], [(0, m.head.out_features)])[0] for m, te in zip(models, tests)]
    acc = evaluate_tasks(merged, tests)
    print(f"{'task':<6}{'data':<12}{'original':>10}{'merged':>10}{'relative':>10}")
    for i, ((name, _, _), o, a) in enumerate(zip(tasks, orig, acc)):
        print(f"{i:<6}{name:<12}{fmt_acc(o):>10}{fmt_acc(a):>10}{a / max(o, 1e-12):>10.3f}")
    names = {name for name, _, _ in tasks}
    meta = {"model": metas[0]["model"], "model_kwargs": zoo_kwargs(merged),
            "dataset": tasks[0][0] if len(names) == 1 else None, "task_slices": [list(s) for s in merged.task_slices],
            "tasks": [{"source": str(p), "dataset": n, "classes": (args.classes[i] if args.classes else None)}
                      for i, (p, (n, _, _)) in enumerate(zip(args.models, tasks))],
            "merge": to_dict(cfg), "per_task_acc": acc, "original_acc": orig}
    save_model(merged, out / "model", meta, provenance=_common.provenance(
        args, parents=[str(m.get("path", p)) for m, p in zip(metas, args.models)]))
    from thrifty.utils import atomic_write_text

    atomic_write_text(out / "merge.json", json.dumps({"method": args.method, "per_task_acc": acc,
                                                       "original_acc": orig, "data_per_task": args.data_per_task,
                                                       "config": to_dict(cfg)}, indent=1))
    _common.write_resolved_config(out, args, configs=configs)
    print(f"saved {out / 'model.safetensors'} (+ model.yaml)")
    return 0
