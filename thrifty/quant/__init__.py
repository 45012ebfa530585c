"""Quantization: slot quantizers and the post-training quantization (PTQ) pipeline (Hubara et al.).

Example:
    >>> import torch, torch.nn as nn
    >>> from thrifty.quant import PTQ, quantize
    >>> model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    >>> res = quantize(model, PTQ(w_bits=4, pipeline="advanced", adaquant_iters=20, bias_iters=5),
    ...                torch.randn(64, 8), progress=False)
    >>> sorted(res.losses)
    ['adaquant', 'bias tuning', 'rtn']
"""
from thrifty.quant.adaquant import adaquant, adaquant_layer, reconstruction_error
from thrifty.quant.bitalloc import Allocation, allocate_bits, exhaustive_allocation
from thrifty.quant.calib import as_batches
from thrifty.quant.config import PTQ, QuantConfig
from thrifty.quant.fold import fold_bn
from thrifty.quant.io import load_quantized, save_quantized
from thrifty.quant.pipeline import QuantResult, calibrate_inputs, quantize
from thrifty.quant.quantizer import UniformQuantizer
from thrifty.quant.tuning import bias_tune, bn_tune
from thrifty.quant.accum import AccumConfig
from thrifty.quant.train8 import Train8, prepare_train8

__all__ = [
    "UniformQuantizer", "QuantConfig", "PTQ", "QuantResult", "quantize", "calibrate_inputs", "fold_bn",
    "adaquant", "adaquant_layer", "reconstruction_error", "allocate_bits", "exhaustive_allocation", "Allocation",
    "bn_tune", "bias_tune", "as_batches", "save_quantized", "load_quantized", "Train8", "prepare_train8",
    "AccumConfig",
]
