"""``thrifty sparsify``: make a trained model N:M sparse (optionally transposable, optionally with AdaPrune).

``--model`` is a saved model (``<stem>.safetensors`` + ``<stem>.yaml`` or a run folder) or a
registry name, in which case the cached pretrained baseline for ``--dataset`` is used. Masks are magnitude
masks (exact or greedy for transposable ones); ``--adaprune`` fits every pruned layer to the dense layer's
output on a small unlabelled calibration set; BatchNorm statistics are then re-estimated on that set
(``--no-bn`` skips it); ``--finetune-epochs`` trains with the masks fixed.

Writes to ``--out``: ``model.safetensors`` + ``model.yaml`` (the masked model, masks included: read back by
``thrifty.load`` and every command given the run folder), ``model.plain.safetensors`` (plain state_dict, zeros
in place), ``model.nm.safetensors`` (compressed: kept values + bit-packed indices), ``report.json`` and
``config.yaml``.

Example:
    thrifty sparsify --model resnet20 --dataset digits32 --nm 4:8 --transposable --adaprune --out runs/r20-t48
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from thrifty.cli import _common
from thrifty.cli._fields import add_config_flags, config_from_args


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("sparsify", help="N:M / transposable N:M weight sparsity (AdaPrune, compressed save)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="saved model (file or run folder), or a registry name (uses the pretrained one)")
    p.add_argument("--dataset", default=None, help="dataset (default: the one recorded with the saved model)")
    p.add_argument("--nm", default="2:4", help="pattern N:M, e.g. 2:4 or 4:8 (the n and m fields of NM)")
    p.add_argument("--filter", action="append", default=None, metavar="GLOB",
                   help="only layers whose qualified name matches (repeatable); default: every Linear/Conv2d")
    p.add_argument("--adaprune", action="store_true", help="per-layer reconstruction on calibration data")
    p.add_argument("--adaprune-steps", type=_common.nonneg_int, default=200)
    p.add_argument("--adaprune-lr", type=float, default=1e-3)
    p.add_argument("--remask-every", type=_common.positive_int, default=1,
                   help="AdaPrune re-masks every this many steps")
    p.add_argument("--calib-per-class", type=_common.positive_int, default=10,
                   help="calibration images per class (unlabelled use)")
    p.add_argument("--no-bn", action="store_true", help="skip BatchNorm re-estimation")
    p.add_argument("--finetune-epochs", type=float, default=0.0, help="fixed-mask fine-tuning epochs afterwards")
    p.add_argument("--finetune-lr", type=float, default=0.01)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="output folder (default runs/<model>-nm<N>x<M>)")
    _common.add_overwrite_option(p)
    from thrifty.sparse import NM

    add_config_flags(p, "sparsity", NM, skip=("n", "m"), title="N:M mask (thrifty.sparse.NM fields)",
                     on_load=lambda c: {"nm": f"{c.n}:{c.m}"})
    p.set_defaults(func=run)


def build_configs(args: argparse.Namespace) -> dict:
    """The configs the flags (and ``--config``) ask for: ``{"sparsity": NM}`` (the plan of every layer)."""
    from thrifty.sparse import NM
    from thrifty.sparse.weights import parse_nm_text

    return {"sparsity": config_from_args(args, "sparsity", base=NM(*parse_nm_text(args.nm)))}


def run(args: argparse.Namespace) -> int:
    import torch

    from thrifty.core import to_dict
    from thrifty.data import calibration_subset, load_dataset
    from thrifty.ops import nm as nmops
    from thrifty.sparse import NM, adaprune, nm_masks, reestimate_bn, save_sparse, sparsify
    from thrifty.train import TrainConfig, evaluate, fit, save_model
    from thrifty.utils import atomic_write_text, fmt_acc, seed_everything

    configs = build_configs(args)
    cfg: NM = configs["sparsity"]
    n, m = cfg.n, cfg.m
    for name in ("adaprune_steps", "calib_per_class"):
        if getattr(args, name) < (0 if name == "adaprune_steps" else 1):
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.finetune_epochs < 0:
        raise ValueError(f"--finetune-epochs must be >= 0, got {args.finetune_epochs}")
    out = _common.check_out_dir(
        args.out or f"runs/{Path(str(args.model)).name}-nm{n}x{m}{'t' if cfg.transposable else ''}", args.overwrite)
    model, meta, dataset = _common.load_model_arg(args)
    if not dataset:
        raise ValueError(f"{args.model}: no dataset recorded; pass --dataset")
    splits = load_dataset(dataset, seed=0)
    _common.check_model_data(model, splits, str(args.model), dataset)
    seed_everything(args.seed)
    dense_acc = evaluate(model, splits.test)["acc"]
    calib = calibration_subset(splits.train, per_class=args.calib_per_class, seed=args.seed)
    xcal = torch.stack([calib[i][0] for i in range(len(calib))])
    flt = args.filter
    report: dict = {"dense_acc": dense_acc, "pattern": cfg.label, "method": cfg.method, "dataset": dataset}
    if args.adaprune:
        with _common.step(f"AdaPrune {cfg.label} ({args.adaprune_steps} steps per layer, {len(calib)} images)"):
            report["adaprune"] = adaprune(model, cfg, calib, steps=args.adaprune_steps, lr=args.adaprune_lr,
                                          filter=flt, bn=not args.no_bn, remask_every=args.remask_every,
                                          progress=_common.show_progress(),
                                          seed=args.seed)
    else:
        with _common.step(f"magnitude {cfg.label} masks"):
            sparsify(model, cfg, flt)
            if not args.no_bn:
                reestimate_bn(model, xcal)
    report["acc_after_masking"] = evaluate(model, splits.test)["acc"]
    if args.finetune_epochs > 0:
        tc = TrainConfig(epochs=args.finetune_epochs, optim={"batch_size": 64, "lr": args.finetune_lr}, seed=args.seed)
        fit(model, tc, splits.train, progress=_common.show_progress())
        report["acc_after_finetune"] = evaluate(model, splits.test)["acc"]
    layers = {}
    for name, layer, mk in nm_masks(model):
        w = layer.effective_weight()
        g = layer.op.gemm_weight(w)  # blocks run along the GEMM reduction, whatever the stored layout
        ok = nmops.is_transposable(g, n, m) if cfg.transposable else nmops.is_nm(g, n, m)
        if not ok:
            raise AssertionError(f"internal error: layer {name!r} lost its {cfg.label} pattern")
        layers[name] = round(float(w.ne(0).float().mean()), 4)
    report["layer_density"] = layers
    out.mkdir(parents=True, exist_ok=True)
    report["storage"] = save_sparse(model, out / "model.nm.safetensors")
    final_acc = report.get("acc_after_finetune", report["acc_after_masking"])
    save_meta = {k: v for k, v in meta.items() if k not in ("path",)}
    save_meta.update({"dataset": dataset, "test_acc": final_acc,
                      "sparsity": {"config": to_dict(cfg), "adaprune": bool(args.adaprune),
                                   "finetune_epochs": args.finetune_epochs}})
    save_model(model, out / "model", save_meta, provenance=_common.provenance(args, meta))
    atomic_write_text(out / "report.json", json.dumps(report, indent=2))
    _common.write_resolved_config(out, args, configs=configs)
    st = report["storage"]
    print(f"{cfg.label} ({cfg.method}{', AdaPrune' if args.adaprune else ''}) on {len(layers)} layers: "
          f"test acc {fmt_acc(dense_acc)} dense -> {fmt_acc(report['acc_after_masking'])}"
          + (f" -> {fmt_acc(report['acc_after_finetune'])} after fine-tuning" if "acc_after_finetune" in report else "")
          + f"; weights {st['dense_bytes']} B dense -> {st['stored_bytes']} B stored "
          f"({st['stored_bytes'] / st['dense_bytes']:.3f}x) -> {out}")
    return 0
