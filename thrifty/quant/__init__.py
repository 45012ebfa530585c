"""Quantization: slot quantizers and the post-training quantization (PTQ) pipeline.

Example:
    >>> from thrifty.quant import UniformQuantizer
    >>> UniformQuantizer(4, per_channel=True).bits
    4
"""
from thrifty.quant.quantizer import UniformQuantizer

__all__ = ["UniformQuantizer"]
