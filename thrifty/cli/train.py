"""``thrifty train``: train a registry model on a bundled dataset with the one loop.

Writes ``<out>/model.safetensors`` + ``model.yaml`` (see `thrifty.train.io`), ``history.json``,
``config.yaml`` (the resolved options) and ``ckpt/last.safetensors`` (for ``--resume``). Runs under
``torchrun --nproc_per_node=2 -m thrifty.cli train ...`` as DDP (only rank 0 writes). Extra flags
(``--regime`` ...) come from `thrifty.train.options` plugins.

Example:
    thrifty train --model resnet20 --dataset digits32 --epochs 8 --out runs/r20
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from thrifty.cli import _common
from thrifty.cli._fields import UNSET, Alias, add_config_flags, config_from_args


def register(subparsers: argparse._SubParsersAction) -> None:
    from thrifty.train.options import training_options

    p = subparsers.add_parser("train", help="train a model (one loop; checkpoints; resume; DDP under torchrun)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet20", help="registry name (thrifty.models.list_models())")
    p.add_argument("--dataset", default="digits32",
                   help="digits (64 features), digits32 (1x32x32 images), mnist1d (40-long signals), or a "
                        ".pt/.npz/folder path; the image models (resnet20, vit) take digits32 only. A model that "
                        "cannot take the dataset is refused before training, naming the datasets that fit it")
    p.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE", type=_model_arg,
                   help="extra model keyword argument, YAML-parsed (repeatable), e.g. --model-arg width=8")
    p.add_argument("--out", default=None, help="output folder (default runs/<model>-<dataset>)")
    p.add_argument("--resume", action="store_true", help="continue exactly from <out>/ckpt/last.safetensors")
    _common.add_overwrite_option(p)
    p.add_argument("--quick", action="store_true", help="smoke test: 5 steps")
    from thrifty.train import TrainConfig

    add_config_flags(p, "train", TrainConfig, title="training (thrifty.train.TrainConfig fields; unset: the "
                     "pretrained recipe's)", aliases={"--workers": Alias(("num_workers",))})
    for opt in training_options():
        opt.add_arguments(p)
    p.set_defaults(func=run)


def build_configs(args: argparse.Namespace) -> dict:
    """The configs the flags (and ``--config``) ask for: ``train`` (TrainConfig over the pretrained recipe of
    ``--model``/``--dataset``) and each training option's (``train8``, ``grad``, ``act``; None when off)."""
    from thrifty.train import recipe
    from thrifty.train.options import option_configs

    _, base = recipe(args.model, args.dataset)
    cfg = config_from_args(args, "train", base=dataclasses.replace(base, seed=0, num_workers=0))
    if args.quick:
        steps = getattr(args, "optim.steps", UNSET)
        if steps not in (UNSET, 0):  # 0 (a config file's default) means "use epochs"
            raise ValueError(f"--quick (5 steps) and --optim.steps {steps} contradict each other: give one of them")
        cfg = cfg.replace(optim={"steps": 5})
    # the options draw their seeds from the run's (GradNM's, a regime's), resolved here
    return {"train": cfg, **option_configs(argparse.Namespace(**{**vars(args), "seed": cfg.seed}))}


def _model_arg(text: str | list | tuple) -> tuple[str, object]:
    """``"width=8"`` -> ("width", 8) (values parsed as YAML); YAML config files may give [key, value] pairs."""
    import yaml

    if isinstance(text, (list, tuple)):
        return str(text[0]), text[1]
    key, sep, value = str(text).partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--model-arg expects KEY=VALUE, got {text!r}")
    return key.strip(), yaml.safe_load(value)


_model_arg.accepts_list = True  # type: ignore[attr-defined]

# one sample's shape and the class count of each bundled classification dataset (without loading it)
_BUNDLED_SHAPES = {"digits": ((64,), 10), "digits32": ((1, 32, 32), 10), "mnist1d": ((40,), 10)}


def _fitting_datasets(model_name: str) -> list[str]:
    """Bundled datasets whose input shape ``model_name`` takes (a forward pass on zeros)."""
    import torch

    from thrifty.models import create
    from thrifty.train import model_kwargs_for

    fits = []
    for name, (shape, classes) in _BUNDLED_SHAPES.items():
        try:
            m = create(model_name, **model_kwargs_for(model_name, shape, classes)).eval()
            with torch.no_grad():
                m(torch.zeros(2, *shape))
        except Exception:  # any failure means "does not fit"; the reason was reported for the asked dataset
            continue
        fits.append(name)
    return fits


def run(args: argparse.Namespace) -> int:
    from thrifty.core import to_dict
    from thrifty.data import load_dataset
    from thrifty.models import create
    from thrifty.train import dist, evaluate, fit, model_kwargs_for, recipe, save_model
    from thrifty.train.options import build_regime, finalize_model, prepare_model, training_options
    from thrifty.utils import atomic_write_text, fmt_acc, seed_everything

    out = Path(args.out or f"runs/{args.model}-{Path(str(args.dataset)).name}")
    configs = build_configs(args)  # validates every config before any work
    cfg = configs["train"]
    args = argparse.Namespace(**{**vars(args), "seed": cfg.seed})  # the options' seeds follow the run's
    if args.resume and args.overwrite:
        raise ValueError("--resume continues the run in --out and --overwrite replaces it: give one of them")
    if not args.resume:
        _common.check_out_dir(out, args.overwrite, hint=" (or --resume to continue its training)")
    splits = load_dataset(args.dataset, seed=0)
    extra_kw, _ = recipe(args.model, args.dataset)
    kwargs = model_kwargs_for(args.model, splits.input_shape, splits.num_classes,
                              **{**extra_kw, **dict(_model_arg(a) for a in args.model_arg)})
    seed_everything(args.seed)
    try:
        model = create(args.model, **kwargs)
    except (TypeError, ValueError) as e:
        raise type(e)(f"--model {args.model} with keyword arguments {kwargs} (--model-arg): {e}") from None
    _common.check_model_data(model, splits, args.model, str(args.dataset), shape_hint=lambda: (
        f"; bundled datasets that fit --model {args.model}: {', '.join(_fitting_datasets(args.model)) or 'none'}"))
    option_meta = prepare_model(model, args, configs)
    regime = build_regime(args)  # validates regime arguments against the model before training starts
    show = _common.show_progress()
    hist = fit(model, cfg, splits.train, splits.test, regime=regime, ckpt_dir=out / "ckpt", resume=args.resume,
               progress=show)
    finalize_model(model, args)
    rank, _ = dist.rank_world()
    if rank != 0:
        return 0
    if any(o.finalize for o in training_options(discover=False)) or "test_acc" not in hist.final:
        ev = evaluate(model, splits.test)  # finalize may have changed the model: measure what is saved
    else:
        ev = {"acc": hist.final["test_acc"], "loss": hist.final["test_loss"]}
    meta = {"model": args.model, "model_kwargs": kwargs, "dataset": str(args.dataset), "seed": args.seed,
            "train_config": to_dict(cfg), "test_acc": ev["acc"], "test_loss": ev["loss"],
            "train_seconds": round(hist.seconds, 2), "options": option_meta,
            "regime": regime.describe() if hasattr(regime, "describe") else None}
    save_model(model, out / "model", meta, provenance=_common.provenance(args))
    atomic_write_text(out / "history.json", json.dumps(hist.to_dict(), indent=1))
    # effective values (recipe defaults filled in; --quick's 5 steps in train.steps), so
    # `--config <out>/config.yaml` repeats this run
    _common.write_resolved_config(out, argparse.Namespace(**{**vars(args), "quick": False}), configs=configs)
    print(f"{args.model} on {args.dataset}: test acc {fmt_acc(ev['acc'])} (loss {ev['loss']:.4f}) after "
          f"{hist.final.get('step', 0)} steps in {hist.seconds:.1f} s -> {out}/model.safetensors")
    return 0
