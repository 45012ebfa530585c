"""The bad-input contract through the Python API (docs/bad-input.md): each kind of bad input gets a
ValueError/TypeError naming the argument, layer or file, and leaves the caller's model and files as they were."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from thrifty.datafree import Synth, synthesize


def _bn_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 8 * 8, 3)).eval()


def test_synthesize_refuses_a_method_that_conflicts_with_cfg():
    net = _bn_net()
    with pytest.raises(ValueError, match=r"method='gaussian' conflicts with cfg.method='bns'"):
        synthesize(net, 4, "gaussian", cfg=Synth(), input_shape=(1, 8, 8), progress=False)
    # agreeing arguments are fine, and the method actually used is the one asked for
    ds = synthesize(net, 4, "gaussian", cfg=Synth(method="gaussian"), input_shape=(1, 8, 8), progress=False)
    assert ds.tensors[0].shape == (4, 1, 8, 8)
    with pytest.raises(TypeError, match="cfg must be a Synth"):
        synthesize(net, 4, cfg={"method": "bns"}, input_shape=(1, 8, 8), progress=False)
    with pytest.raises(ValueError, match="n must be a positive integer"):
        synthesize(net, True, "gaussian", input_shape=(1, 8, 8), progress=False)
