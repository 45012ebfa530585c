"""Layer fits on too few calibration rows are judged on held-out samples (thrifty.core.revert.holdout_rows)."""
from __future__ import annotations

import copy
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from thrifty import PTQ, quantize
from thrifty.core.revert import holdout_rows
from thrifty.nn import wrap
from thrifty.quant import UniformQuantizer, adaquant_layer, reconstruction_error
from thrifty.sparse import NM, adaprune, sparsify

CHECK = [3, 7, 11, 15]  # every 4th of 16 samples


def test_holdout_rows_only_when_the_rows_are_few_for_the_fan_in():
    fit, chk = holdout_rows(16, 16, 32)
    assert chk.tolist() == CHECK and sorted(fit.tolist() + chk.tolist()) == list(range(16))
    assert holdout_rows(16, 63, 32) is not None and holdout_rows(16, 64, 32) is None  # the ratio is 2
    assert holdout_rows(1, 1, 32) is None  # nothing to hold out
    assert holdout_rows(3, 3, 32)[1].tolist() == [2]


def test_adaprune_judges_a_thin_layer_on_the_samples_it_did_not_fit():
    torch.manual_seed(0)
    dense = nn.Linear(32, 10)
    x = torch.randn(16, 32)
    model = copy.deepcopy(dense)
    rep = adaprune(model, NM(2, 4), x, steps=100, lr=1e-2, progress=False)
    (r,) = rep.values()
    assert r["held_out"] == 4
    mag = sparsify(copy.deepcopy(dense), NM(2, 4))
    with torch.no_grad():
        y = dense(x[CHECK])
        e_mag, e_kept = float(F.mse_loss(mag(x[CHECK]), y)), float(F.mse_loss(model(x[CHECK]), y))
    # the report's MSEs are those of the held-out samples: magnitude pruning's before, the kept model's after
    # (the same 40 float32 squares summed in another order: relative error <= 40 * 2**-24 < 1e-5)
    assert abs(r["mse_before"] - e_mag) <= 1e-5 * r["mse_before"]
    assert abs(r["mse_after"] - e_kept) <= 1e-5 * r["mse_before"]
    assert r["mse_after"] <= r["mse_before"]
    # enough rows (128 >= 2 * 32): every sample is fitted and judged, as before
    rep = adaprune(copy.deepcopy(dense), NM(2, 4), torch.randn(128, 32), steps=5, progress=False)
    assert [v["held_out"] for v in rep.values()] == [0]


def test_adaquant_layer_judges_a_thin_layer_on_the_samples_it_did_not_fit():
    torch.manual_seed(0)
    fp = nn.Linear(32, 10)
    layer = wrap(copy.deepcopy(fp))
    layer.add("weight", UniformQuantizer(3, per_channel=True, learnable=True).init_from(layer.weight))
    x = torch.randn(16, 32)
    y = fp(x).detach()
    start = reconstruction_error(layer, [x[CHECK]], [y[CHECK]])
    before, after = adaquant_layer(layer, [x], [y], iters=50)
    assert before == start  # measured on the held-out samples, not on all 16
    assert after == reconstruction_error(layer, [x[CHECK]], [y[CHECK]]) and after <= before


def test_bias_tuning_is_skipped_when_the_outputs_are_fewer_than_the_biases():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 2)).eval()  # 66 biases
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = quantize(m, PTQ(w_bits=4, a_bits=8, pipeline="advanced", adaquant_iters=2, bias_iters=5),
                       torch.randn(16, 8), progress=False)  # 16 samples x 2 outputs = 32 values < 66
    assert "bias tuning" not in res.losses
    assert any("bias tuning skipped: 16 calibration samples give 32 output values for 66 biases; give at least "
               "33 samples" in str(w.message) for w in caught)
    res = quantize(m, PTQ(w_bits=4, a_bits=8, pipeline="advanced", adaquant_iters=2, bias_iters=5),
                   torch.randn(40, 8), progress=False)  # 80 values: tuned on 30 samples, judged on 10
    assert "bias tuning" in res.losses
