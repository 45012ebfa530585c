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
    thrifty quantize --model resnet20 --dataset digits32 --w-bits 4 --budget 0.13 --pipeline advanced
    thrifty quantize --model resnet20 --dataset digits32 --w-bits 4 --data-free bns --distill-steps 100
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from thrifty.cli import _common
from thrifty.cli._fields import UNSET, Alias, add_config_flags, changed_flags, config_from_args


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("quantize", help="post-training quantization (AdaQuant, bit allocation, BN/bias tuning)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="saved model (file or run folder), or a registry name (uses the pretrained one)")
    p.add_argument("--dataset", default=None, help="dataset (default: the one recorded with the saved model)")
    p.add_argument("--calib-per-class", type=_common.positive_int, default=10)
    p.add_argument("--data-free", choices=["bns", "gaussian", "inception"], default=None,
                   help="calibrate on samples synthesised from the model itself instead of real data "
                        "(same count as --calib-per-class x classes); the --synth-* flags are Synth's fields")
    p.add_argument("--filter", action="append", default=None, metavar="GLOB",
                   help="only layers whose qualified name matches (repeatable); default: every Linear/Conv2d")
    p.add_argument("--out", default=None, help="output folder (default runs/<model>-w<w-bits>a<a-bits>-<pipeline>)")
    _common.add_overwrite_option(p)
    from thrifty.datafree import Distill, Synth
    from thrifty.quant import PTQ

    add_config_flags(p, "ptq", PTQ, title="PTQ (thrifty.quant.PTQ fields)", zero_is_none=("a_bits", "first_last_bits"),
                     aliases={"--bits": Alias(("w_bits",)), "--estimator": Alias(("w_estimator", "a_estimator"))})
    add_config_flags(p, "synth", Synth, prefix="synth-", dests={"method": "data_free"},
                     title="synthetic calibration data, with --data-free (thrifty.datafree.Synth fields)")
    add_config_flags(p, "distill", Distill, prefix="distill-",
                     title="after PTQ, fine-tune the quantized model to the FP model's logits on the calibration "
                           "samples, with --distill-steps N > 0 (thrifty.datafree.Distill fields)")
    p.set_defaults(func=run)


def build_configs(args: argparse.Namespace) -> dict:
    """The configs the flags (and ``--config``) ask for: ``ptq`` (PTQ), ``synth`` (Synth, with ``--data-free``)
    and ``distill`` (Distill, with ``--distill-steps`` > 0); None where off. The seeds default to PTQ's."""
    from thrifty.datafree import Distill, Synth

    ptq = config_from_args(args, "ptq")
    synth = None
    if args.data_free:
        synth = config_from_args(args, "synth", base=Synth(method=args.data_free, seed=ptq.seed))
        if synth.method == "gaussian" and synth.optim.steps != Synth().optim.steps:
            raise ValueError(f"--synth-optim.steps applies to --data-free bns or inception only (got --data-free "
                             f"{synth.method}); it would be ignored")
    elif changed_flags(args, "synth"):
        raise ValueError(f"{changed_flags(args, 'synth')[0]} applies to --data-free bns or inception only (no "
                         "--data-free given); it would be ignored")
    distill = None
    if getattr(args, "distill_steps", UNSET) not in (UNSET, 0):  # 0: off, as before Distill had flags
        distill = config_from_args(args, "distill", base=Distill(seed=ptq.seed))
    elif [f for f in changed_flags(args, "distill") if f != "--distill-steps"]:
        raise ValueError(f"{changed_flags(args, 'distill')[0]} needs --distill-steps N > 0 (it would be ignored)")
    return {"ptq": ptq, "synth": synth, "distill": distill}


def run(args: argparse.Namespace) -> int:
    from thrifty.data import calibration_subset, load_dataset
    from thrifty.quant import PTQ, quantize, save_quantized
    from thrifty.train import evaluate
    from thrifty.utils import atomic_write_text, fmt_acc, seed_everything

    configs = build_configs(args)  # validates everything before any work
    cfg: PTQ = configs["ptq"]
    synth_cfg, distill_cfg = configs["synth"], configs["distill"]
    if cfg.budget is None and cfg.budget_kind != "size":
        raise ValueError(f"--budget-kind {cfg.budget_kind} needs --budget (it would be ignored)")
    out = _common.check_out_dir(args.out or f"runs/{Path(str(args.model)).name}-w{cfg.w_bits}a{cfg.a_bits or 0}-"
                                f"{cfg.pipeline}" + (f"-b{cfg.budget}" if cfg.budget else ""), args.overwrite)
    model, meta, dataset = _common.load_model_arg(args)
    if not dataset:
        raise ValueError(f"{args.model}: no dataset recorded; pass --dataset")
    if dataset == "text":
        raise ValueError("thrifty quantize evaluates classifiers; for MiniLM use thrifty.quant.quantize in Python "
                         "(see experiments/ptq.py)")
    splits = load_dataset(dataset, seed=0)
    _common.check_model_data(model, splits, str(args.model), dataset)
    seed_everything(cfg.seed)
    calib = calibration_subset(splits.train, per_class=args.calib_per_class, seed=cfg.seed)
    if synth_cfg is not None:
        from thrifty.datafree import synthesize

        with _common.step(f"synthesising {len(calib)} {synth_cfg.method} samples (no real data)"):
            calib = synthesize(model, synth_cfg, len(calib), input_shape=splits.input_shape,
                               progress=_common.show_progress())
    fp_acc = evaluate(model, splits.test)["acc"]
    with _common.step(f"PTQ {cfg.pipeline} W{cfg.w_bits}A{cfg.a_bits or 32} on {len(calib)} calibration samples"):
        res = quantize(model, cfg, calib, filter=args.filter, progress=_common.show_progress())
    if distill_cfg is not None:
        from thrifty.datafree import distill

        with _common.step(f"distilling from the FP model ({distill_cfg.steps} steps on the calibration samples)"):
            kd = distill(res.model, model, distill_cfg, calib, progress=_common.show_progress())
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
    _common.write_resolved_config(out, args, configs=configs)
    print(f"{res.summary()}\ntest acc {fmt_acc(fp_acc)} FP32 -> {fmt_acc(acc)} quantized; saved to {out}/")
    return 0
