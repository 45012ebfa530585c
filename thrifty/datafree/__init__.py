"""Data-free calibration: synthetic samples from a model's own BN statistics (and baselines).

Example (a small untrained CNN; the same calls work on a trained model):
    >>> import torch.nn as nn, thrifty
    >>> model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(144, 3))
    >>> calib = synthesize(model, Synth(method="bns", optim={"steps": 5}), 16, input_shape=(1, 8, 8), progress=False)
    >>> calib.tensors[0].shape
    torch.Size([16, 1, 8, 8])
    >>> quantized = thrifty.quant.quantize(model.eval(), thrifty.PTQ(pipeline="rtn"), calib, progress=False).model
    >>> sorted(distill(quantized, model, Distill(steps=5), calib, progress=False))
    ['kept', 'kl_after', 'kl_before', 'steps']
"""
from thrifty.datafree.distill import Distill, distill
from thrifty.datafree.synth import Synth, bn_layers, bn_similarity, bns_loss, gaussian_kl, synthesize

__all__ = ["Synth", "Distill", "synthesize", "bn_similarity", "bn_layers", "bns_loss", "gaussian_kl", "distill"]
