"""``thrifty demo``: the main job (what ``make demo`` runs).

Trains resnet20 on digits32 to >= 95% test accuracy (under 3 minutes on 2 cores), evaluates it, runs
every registered demo stage (`thrifty.demo.demo_stage`) and writes a report folder: results.json,
summary.md, training_curve.png, config.yaml.

Example:
    thrifty demo --out reports/demo
"""
from __future__ import annotations

import argparse
import sys

from thrifty.cli import _common


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("demo", help="train resnet20 on digits32, run all demo stages, write a report",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="reports/demo", help="report folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=float, default=None, help="override the recipe's epochs")
    p.add_argument("--only", type=lambda s: [t for t in s.split(",") if t], default=None,
                   help="comma-separated stage names to run (default: all)")
    p.add_argument("--quick", action="store_true", help="smoke test: a few training steps")
    _common.add_overwrite_option(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from thrifty.demo import TARGET_ACC, TARGET_SECONDS, run_demo
    from thrifty.utils import fmt_acc, fmt_value

    _common.check_out_dir(args.out, args.overwrite)
    res = run_demo(args.out, quick=args.quick, seed=args.seed, epochs=args.epochs, only=args.only,
                   progress=_common.show_progress(), config=_common.resolved(args))
    acc = res["train"]["test_acc"]
    print(f"demo: {res['train']['model']} on {res['train']['dataset']}: test acc {fmt_acc(acc)} "
          f"in {res['total_seconds']:.1f} s; report in {args.out}/ (summary.md, results.json, training_curve.png, "
          f"model.safetensors)")
    for name, r in res["stages"].items():
        print(f"  stage {name}: " + ("FAILED " + r["error"] if "error" in r else
                                     ", ".join(f"{k}={fmt_value(k, v)}" for k, v in r.items()
                                               if isinstance(v, (int, float, str)) and k != "markdown")))
    if not args.quick and res["total_seconds"] >= TARGET_SECONDS:
        print(f"demo: took {res['total_seconds']:.1f} s, over the {TARGET_SECONDS:.0f} s target (see summary.md)",
              file=sys.stderr)
    if res["failed_stages"]:
        print(f"demo: failed stages: {', '.join(res['failed_stages'])}", file=sys.stderr)
        return 1
    if not args.quick and acc < TARGET_ACC:
        print(f"demo: test accuracy {fmt_acc(acc)} is below the {fmt_acc(TARGET_ACC)} target", file=sys.stderr)
        return 1
    return 0
