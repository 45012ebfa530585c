"""``thrifty train`` options from the quantization package: ``--recipe train8`` (8-bit training, Range BN).

``--recipe train8`` swaps BatchNorm for Range BN and trains with 8-bit weights, activations and gradients
(stochastic rounding; bifurcated 16-bit weight-gradient GEMM). ``--recipe rangebn`` only swaps BatchNorm.
Every field of :class:`thrifty.quant.Train8` is a ``--train8-<field>`` flag. After training, Range BN layers
are converted back to nn.BatchNorm with identical eval output and the quantized weights are baked in
(:func:`thrifty.strip`), so the saved model loads as a plain registry model.

Example:
    thrifty train --model resnet20 --dataset digits32 --recipe train8 --out runs/r20-train8
"""
from __future__ import annotations

import argparse
from typing import Any, Optional

from torch import nn

from thrifty.train.options import TrainingOption, register_training_option


def _add(p: argparse.ArgumentParser) -> None:
    from thrifty.cli._fields import Alias, add_config_flags
    from thrifty.quant.train8 import Train8

    p.add_argument("--recipe", choices=["none", "train8", "rangebn"], default="none",
                   help="train8: 8-bit W/A/G training with Range BN (the --train8-* flags); rangebn: Range BN only")
    add_config_flags(p, "train8", Train8, prefix="train8-", zero_is_none=("wgrad_bits",),
                     title="8-bit training, --recipe train8 (thrifty.quant.Train8 fields)",
                     aliases={"--train8-no-bifurcation": Alias(("bifurcation",), const=False)},
                     on_load=lambda cfg: {"recipe": "train8"})


def train8_config(args: argparse.Namespace) -> Optional[Any]:
    """The Train8 config of ``--recipe train8`` (None for another recipe).

    ``--train8-bits`` alone sets the activation bits too (as before ``--train8-act-bits`` existed).
    """
    from thrifty.cli._fields import UNSET, changed_flags, config_from_args
    from thrifty.quant.train8 import Train8

    if getattr(args, "recipe", "none") != "train8":
        if changed_flags(args, "train8"):
            raise ValueError(f"{changed_flags(args, 'train8')[0]} applies to --recipe train8 only (got --recipe "
                             f"{getattr(args, 'recipe', 'none')}); it would be ignored")
        return None
    bits = getattr(args, "train8_bits", UNSET)
    base = Train8() if bits is UNSET or bits is None else Train8(bits=bits, act_bits=bits)
    return config_from_args(args, "train8", base=base)


def _prepare(model: nn.Module, args: argparse.Namespace, configs: dict) -> Optional[dict]:
    recipe = getattr(args, "recipe", "none")
    if recipe == "none":
        return None
    from thrifty.core import to_dict
    from thrifty.nn import convert_to_range_bn
    from thrifty.quant.train8 import prepare_train8

    if recipe == "rangebn":
        convert_to_range_bn(model)
        return {"recipe": "rangebn"}
    cfg = configs["train8"]
    prepare_train8(model, cfg)
    return {"recipe": "train8", "config": to_dict(cfg)}


def _finalize(model: nn.Module, args: argparse.Namespace) -> None:
    if getattr(args, "recipe", "none") == "none":
        return
    from thrifty.core import strip
    from thrifty.quant.train8 import convert_to_batchnorm

    convert_to_batchnorm(model)
    strip(model)


register_training_option(TrainingOption("quant-recipe", _add, prepare=_prepare, finalize=_finalize,
                                        configs=lambda args: {"train8": train8_config(args)}))
