"""``thrifty train`` options from the quantization package: ``--recipe train8`` (8-bit training, Range BN).

``--recipe train8`` swaps BatchNorm for Range BN and trains with 8-bit weights, activations and gradients
(stochastic rounding; bifurcated 16-bit weight-gradient GEMM). ``--recipe rangebn`` only swaps BatchNorm.
After training, Range BN layers are converted back to nn.BatchNorm with identical eval output and the
quantized weights are baked in (:func:`thrifty.strip`), so the saved model loads as a plain registry model.

Example:
    thrifty train --model resnet20 --dataset digits32 --recipe train8 --out runs/r20-train8
"""
from __future__ import annotations

import argparse
from typing import Any, Optional

from torch import nn

from thrifty.train.options import TrainingOption, register_training_option


def _add(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("quantized training (thrifty.quant)")
    g.add_argument("--recipe", choices=["none", "train8", "rangebn"], default="none",
                   help="train8: 8-bit W/A/G training with Range BN; rangebn: Range BN only")
    g.add_argument("--train8-bits", type=int, default=8, help="weight/activation bits for --recipe train8")
    g.add_argument("--train8-grad-bits", type=int, default=8, help="bits of dY for the input-gradient GEMM")
    g.add_argument("--train8-wgrad-bits", type=int, default=16,
                   help="bits of dY for the weight-gradient GEMM (bifurcation); 0 = float32")
    g.add_argument("--train8-no-bifurcation", action="store_true", help="use the 8-bit dY for both GEMMs")


def _config(args: argparse.Namespace) -> Any:
    from thrifty.quant.train8 import Train8

    return Train8(bits=args.train8_bits, act_bits=args.train8_bits, grad_bits=args.train8_grad_bits,
                  bifurcation=not args.train8_no_bifurcation, wgrad_bits=args.train8_wgrad_bits or None)


def _prepare(model: nn.Module, args: argparse.Namespace) -> Optional[dict]:
    recipe = getattr(args, "recipe", "none")
    if recipe == "none":
        return None
    from thrifty.core import to_dict
    from thrifty.nn import convert_to_range_bn
    from thrifty.quant.train8 import prepare_train8

    if recipe == "rangebn":
        convert_to_range_bn(model)
        return {"recipe": "rangebn"}
    cfg = _config(args)
    prepare_train8(model, cfg)
    return {"recipe": "train8", "config": to_dict(cfg)}


def _finalize(model: nn.Module, args: argparse.Namespace) -> None:
    if getattr(args, "recipe", "none") == "none":
        return
    from thrifty.core import strip
    from thrifty.quant.train8 import convert_to_batchnorm

    convert_to_batchnorm(model)
    strip(model)


register_training_option(TrainingOption("quant-recipe", _add, prepare=_prepare, finalize=_finalize))
