"""``thrifty quantize``: post-training quantization (AdaQuant, ILP bit allocation, BN and bias tuning).

``--model`` is a saved model (``<stem>.safetensors`` + ``<stem>.yaml``, or the run folder of ``thrifty train``,
``sparsify``, ``merge`` or ``demo``) or a registry name, in which case the cached pretrained baseline for
``--dataset`` is used (trained first, with a notice, when it is not cached yet). Calibration uses
``--calib-per-class`` training samples per class. ``--budget`` (fraction of the FP32 size, or of the FP32
bit-operations with ``--budget-kind bops``) turns on the integer-programming bit allocation over
``--candidate-bits``.

Writes to ``--out``: ``model.safetensors`` + ``model.yaml`` (quantized model with its quantizer parameters,
read back by ``thrifty.load`` and by every command given the run folder), ``model.plain.safetensors`` (the
plain state_dict of the original architecture), ``report.json`` and ``config.yaml``.

``--data-free bns`` calibrates (ranges, AdaQuant, BN and bias tuning) on samples synthesised from the model's
own BatchNorm statistics: no real training data is read. ``--distill-steps N`` then fine-tunes the quantized
model to the FP model's soft outputs on the same samples (distillation, still no labels).

Example:
    thrifty quantize --model resnet20 --dataset digits32 --bits 4 --budget 0.13 --pipeline advanced
    thrifty quantize --model resnet20 --dataset digits32 --bits 4 --data-free bns --distill-steps 100
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from thrifty.cli import _common


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("quantize", help="post-training quantization (AdaQuant, bit allocation, BN/bias tuning)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="saved model (file or run folder), or a registry name (uses the pretrained one)")
    p.add_argument("--dataset", default=None, help="dataset (default: the one recorded with the saved model)")
    p.add_argument("--bits", type=int, default=4, help="weight bits (2..16)")
    p.add_argument("--a-bits", type=int, default=8, help="activation bits (2..16); 0 keeps activations in FP32")
    p.add_argument("--first-last-bits", type=int, default=8, help="bits of the first and last layer; 0 = FP32")
    p.add_argument("--pipeline", choices=["rtn", "adaquant", "light", "advanced"], default="advanced")
    p.add_argument("--budget", type=float, default=None, help="bit allocation budget, fraction of FP32 (e.g. 0.13)")
    p.add_argument("--budget-kind", choices=["size", "bops"], default="size")
    p.add_argument("--candidate-bits", type=_common.int_list, default=[2, 3, 4, 8], help="e.g. 2,3,4,8")
    p.add_argument("--adaquant-mode", choices=["sequential", "parallel"], default="sequential")
    p.add_argument("--adaquant-iters", type=_common.nonneg_int, default=200)
    p.add_argument("--bias-iters", type=_common.nonneg_int, default=100)
    p.add_argument("--estimator", choices=["minmax", "sample_minmax", "percentile", "mse"], default="mse",
                   help="range estimator for weights and activations")
    p.add_argument("--calib-per-class", type=_common.positive_int, default=10)
    p.add_argument("--data-free", choices=["bns", "gaussian", "inception"], default=None,
                   help="calibrate on samples synthesised from the model itself instead of real data "
                        "(same count as --calib-per-class x classes)")
    p.add_argument("--synth-steps", type=_common.positive_int, default=None,
                   help="optimisation steps for --data-free bns/inception (default: thrifty.datafree.Synth's)")
    p.add_argument("--distill-steps", type=_common.nonneg_int, default=0,
                   help="after PTQ, fine-tune the quantized model this many steps to match the FP model's logits "
                        "on the calibration samples (KL; synthetic ones with --data-free)")
    p.add_argument("--filter", action="append", default=None, metavar="GLOB",
                   help="only layers whose qualified name matches (repeatable); default: every Linear/Conv2d")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="output folder (default runs/<model>-w<bits>a<a-bits>-<pipeline>)")
    _common.add_overwrite_option(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from thrifty.data import calibration_subset, load_dataset
    from thrifty.quant import PTQ, quantize, save_quantized
    from thrifty.train import evaluate
    from thrifty.utils import atomic_write_text, fmt_acc, seed_everything

    cfg = PTQ(w_bits=args.bits, a_bits=args.a_bits or None, first_last_bits=args.first_last_bits or None,
              pipeline=args.pipeline, budget=args.budget, budget_kind=args.budget_kind,
              candidate_bits=tuple(args.candidate_bits), adaquant_mode=args.adaquant_mode,
              adaquant_iters=args.adaquant_iters, bias_iters=args.bias_iters, w_estimator=args.estimator,
              a_estimator=args.estimator, seed=args.seed)  # validates everything before any work
    if args.synth_steps is not None and args.data_free not in ("bns", "inception"):
        raise ValueError(f"--synth-steps applies to --data-free bns or inception only (got --data-free "
                         f"{args.data_free}); it would be ignored")
    if args.budget is None and args.budget_kind != "size":
        raise ValueError(f"--budget-kind {args.budget_kind} needs --budget (it would be ignored)")
    out = _common.check_out_dir(args.out or f"runs/{Path(str(args.model)).name}-w{args.bits}a{args.a_bits}-"
                                f"{args.pipeline}" + (f"-b{args.budget}" if args.budget else ""), args.overwrite)
    model, meta, dataset = _common.load_model_arg(args)
    if not dataset:
        raise ValueError(f"{args.model}: no dataset recorded; pass --dataset")
    if dataset == "text":
        raise ValueError("thrifty quantize evaluates classifiers; for MiniLM use thrifty.quant.quantize in Python "
                         "(see experiments/ptq.py)")
    splits = load_dataset(dataset, seed=0)
    _common.check_model_data(model, splits, str(args.model), dataset)
    seed_everything(args.seed)
    calib = calibration_subset(splits.train, per_class=args.calib_per_class, seed=args.seed)
    if args.data_free:
        from thrifty.datafree import synthesize

        with _common.step(f"synthesising {len(calib)} {args.data_free} samples (no real data)"):
            steps = {} if args.synth_steps is None else {"steps": args.synth_steps}
            calib = synthesize(model, n=len(calib), method=args.data_free, input_shape=splits.input_shape,
                               seed=args.seed, progress=_common.show_progress(), **steps)
    fp_acc = evaluate(model, splits.test)["acc"]
    with _common.step(f"PTQ {args.pipeline} W{args.bits}A{args.a_bits or 32} on {len(calib)} calibration samples"):
        res = quantize(model, cfg, calib, filter=args.filter, progress=_common.show_progress())
    if args.distill_steps:
        from thrifty.datafree import distill

        with _common.step(f"distilling from the FP model ({args.distill_steps} steps on the calibration samples)"):
            kd = distill(res.model, model, data=calib, steps=args.distill_steps, seed=args.seed,
                         progress=_common.show_progress())
        if res.loss_kind == "kl":  # the same KL(FP || quantized) as the other stages' losses
            res.losses["distill"] = kd["kl_after"]
    else:
        kd = None
    acc = evaluate(res.model, splits.test)["acc"]
    out.mkdir(parents=True, exist_ok=True)
    save_meta = {k: v for k, v in meta.items() if k not in ("path",)}
    save_meta.update({"dataset": dataset, "test_acc": acc, "fp32_test_acc": fp_acc})
    save_quantized(res, out / "model", save_meta, provenance=_common.provenance(args, meta))
    report = {"fp32_test_acc": fp_acc, "test_acc": acc, "bits": res.bits, "size_fraction": res.size_fraction,
              "model_size_fraction": res.model_size_fraction, "bops_fraction": res.bops_fraction,
              "losses": res.losses, "loss_kind": res.loss_kind, "predicted_loss": res.predicted_loss,
              "measured_loss": res.measured_loss, "skipped": res.skipped, "folded": res.folded,
              "timings": res.timings, "distill": kd}
    atomic_write_text(out / "report.json", json.dumps(report, indent=2))
    _common.write_resolved_config(out, args)
    print(f"{res.summary()}\ntest acc {fmt_acc(fp_acc)} FP32 -> {fmt_acc(acc)} quantized; saved to {out}/")
    return 0
