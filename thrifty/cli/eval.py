"""``thrifty eval``: evaluate a saved model (``<stem>.safetensors`` + ``<stem>.yaml``, or a run folder) on its dataset.

``--sizes 16,24,32`` evaluates image models at several input sizes (resized bilinearly);
``--calibrate-bn`` first recalibrates BatchNorm statistics at each size on training batches.
Writes ``eval.json`` and ``config.yaml`` to ``--out`` (default: next to the model).

Example:
    thrifty eval runs/r20 --sizes 16,24,32,40,48 --calibrate-bn
"""
from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

from thrifty.cli import _common


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("eval", help="evaluate a saved model (optionally at several input sizes)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_path", nargs="?", default=None,
                   help="saved model: stem, .safetensors/.yaml file or run folder (or a registry name with --dataset)")
    p.add_argument("--model-path", dest="model_path_opt", default=None, help="same as the positional argument")
    p.add_argument("--dataset", default=None, help="override the dataset recorded in the model's yaml")
    p.add_argument("--split", choices=["test", "train"], default="test")
    p.add_argument("--batch-size", type=_common.positive_int, default=512)
    p.add_argument("--sizes", type=_common.int_list, default=None, help="comma-separated input sizes, e.g. 16,24,32")
    p.add_argument("--calibrate-bn", action="store_true", help="recalibrate BN statistics at each size first")
    p.add_argument("--calib-batches", type=_common.positive_int, default=50,
                   help="training batches used for BN recalibration")
    p.add_argument("--out", default=None, help="output folder (default: <model folder>/eval)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from thrifty.data import load_dataset
    from thrifty.train import evaluate
    from thrifty.utils import atomic_write_text, fmt_acc

    path = args.model_path or args.model_path_opt
    if not path:
        raise ValueError("give the saved model path (positional or --model-path)")
    if args.sizes and min(args.sizes) < 1:
        raise ValueError(f"--sizes must be positive, got {args.sizes}")
    if args.calibrate_bn and not args.sizes:
        raise ValueError("--calibrate-bn recalibrates BN at each of --sizes; give --sizes (it would do nothing)")
    model, meta, dataset = _common.resolve_model(path, args.dataset, option="model", command="eval")
    if not dataset:
        raise ValueError(f"{path}: no dataset recorded in the model yaml; pass --dataset")
    splits = load_dataset(dataset, seed=0)
    _common.check_model_data(model, splits, str(path), dataset)
    ds = splits.test if args.split == "test" else splits.train
    rows = []
    for size in _common.progress(args.sizes or [None], desc="sizes"):
        m = model
        if args.calibrate_bn and size is not None:
            from thrifty.train.bn import recalibrate_bn

            m = recalibrate_bn(copy.deepcopy(model), splits.train, size=size, batches=args.calib_batches)
        r = evaluate(m, ds, batch_size=args.batch_size, size=size)
        rows.append({"size": size, "acc": r["acc"], "loss": r["loss"], "n": r["n"],
                     "bn_calibrated": bool(args.calibrate_bn and size is not None)})
        print(f"{meta['model']} on {dataset} [{args.split}]" + (f" size {size}" if size else "")
              + f": acc {fmt_acc(r['acc'])} loss {r['loss']:.4f}")
    out = Path(args.out) if args.out else Path(meta["path"]).parent / "eval"
    atomic_write_text(out / "eval.json", json.dumps({"model": meta["model"], "dataset": dataset, "rows": rows},
                                                     indent=1))
    _common.write_resolved_config(out, args)
    return 0
