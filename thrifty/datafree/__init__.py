"""Data-free calibration: synthetic samples from a model's own BN statistics (and baselines).

Example:
    >>> from thrifty.datafree import synthesize, bn_similarity   # doctest: +SKIP
    >>> calib = synthesize(model, 256, "bns", input_shape=(1, 32, 32))  # doctest: +SKIP
    >>> distill(quantized, model, Distill(steps=100), calib)             # doctest: +SKIP
"""
from thrifty.datafree.distill import Distill, distill
from thrifty.datafree.synth import Synth, bn_layers, bn_similarity, bns_loss, gaussian_kl, synthesize

__all__ = ["Synth", "Distill", "synthesize", "bn_similarity", "bn_layers", "bns_loss", "gaussian_kl", "distill"]
