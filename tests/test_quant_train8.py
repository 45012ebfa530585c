"""thrifty.quant.train8: unbiased stochastic gradient rounding, bifurcation routing, Range BN swap, CLI recipe."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import thrifty.core as core
from thrifty.ops.quant import qparams_from_range
from thrifty.nn import RangeBatchNorm1d, RangeBatchNorm2d, gemm_layers, wrap
from thrifty.quant.train8 import (ActQuant, GradQuant, Train8, convert_to_batchnorm, fake_quantize_minmax,
                                  prepare_train8)
from tolerance import assert_within, bn_eval_bound, matmul_bound, sum_bound, unit_roundoff


def test_stochastic_rounding_is_unbiased_and_nearest_is_not():
    torch.manual_seed(0)
    dy = torch.randn(4, 50) * torch.tensor([[1.0], [1e-3], [10.0], [0.1]])
    q = GradQuant(4, bifurcation=False)  # 4 bits: coarse grid so a bias would be visible
    draws = 3000
    acc = torch.zeros_like(dy)
    for _ in range(draws):
        acc += q(dy)[0]
    mean = acc / draws
    step, zp = qparams_from_range(dy.amin(1), dy.amax(1), 4)
    step, zp = step[:, None], zp[:, None]
    # the integer zero point can leave an extreme value just outside the grid (clipped): test inside the grid
    inside = (dy >= -zp * step) & (dy <= (15 - zp) * step)
    assert inside.float().mean() > 0.9
    # |mean - dy| within 5 standard errors (the variance of one draw is at most step^2 / 4)
    assert ((mean - dy).abs() <= 5 * step / 2 / draws**0.5 + 1e-7)[inside].all()
    near = GradQuant(4, bifurcation=False, rounding="nearest")(dy)[0]
    assert float(((near - dy).abs() / step).max()) > 0.3  # deterministic rounding keeps its error


def test_per_sample_grid_and_bifurcation_precision():
    torch.manual_seed(0)
    dy = torch.randn(3, 1000) * torch.tensor([[1.0], [1e-4], [100.0]])
    gx, gw = GradQuant(8, bifurcation=True, wgrad_bits=16)(dy)
    for i in range(3):
        assert gx[i].unique().numel() <= 256
        rng = float(dy[i].max() - dy[i].min())
        assert float((gw[i] - dy[i]).abs().max()) <= rng / 65535 / 2 * 1.01 + 1e-12
        assert float((gx[i] - dy[i]).abs().max()) <= rng / 255 * 1.01
    gx, gw = GradQuant(8, bifurcation=True, wgrad_bits=None)(dy)
    assert gw is dy
    gx, gw = GradQuant(8, bifurcation=False)(dy)
    assert gw is gx


def test_train8_routes_8bit_dy_to_input_grad_and_16bit_to_weight_grad():
    torch.manual_seed(0)
    lin = nn.Linear(6, 5)
    core.apply(lin_model := nn.Sequential(lin), Train8(grad_rounding="nearest"))
    layer = lin_model[0]
    x = torch.randn(4, 6, requires_grad=True)
    y = layer(x)
    dy = torch.randn(4, 5)
    y.backward(dy)
    wq = layer.effective_weight()
    xq = fake_quantize_minmax(x.detach(), 8)
    g8 = fake_quantize_minmax(dy, 8, axis=0)
    g16 = fake_quantize_minmax(dy, 16, axis=0)
    # the quantized operands are the same tensors by construction; only the products' rounding order may differ
    assert_within(x.grad, g8 @ wq, matmul_bound(g8, wq), "dX")
    assert_within(layer.weight.grad, g16.t() @ xq, matmul_bound(g16.t(), xq), "dW")
    assert_within(layer.bias.grad, g16.sum(0), sum_bound(g16, 0), "db")
    assert wq.unique().numel() <= 256


def test_act_quant_is_straight_through():
    x = torch.randn(10, 3, requires_grad=True)
    y = ActQuant(8)(x)
    assert y.unique().numel() <= 256 and float((y - x).detach().abs().max()) <= float(x.detach().max() - x.detach().min()) / 255
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


def test_prepare_train8_trains_a_small_convnet_and_converts_back():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 2))
    prepare_train8(model)
    assert isinstance(model[1], RangeBatchNorm2d) and isinstance(model[6], RangeBatchNorm1d)
    assert len(list(gemm_layers(model))) == 3
    x = torch.randn(64, 1, 6, 6)
    y = (x.mean((1, 2, 3)) > 0).long()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    losses = []
    for _ in range(30):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
    model.eval()
    seen: dict[int, torch.Tensor] = {}
    hooks = [model[i].register_forward_pre_hook(lambda m, a, i=i: seen.__setitem__(i, a[0].detach()))
             for i in (1, 6)]
    with torch.no_grad():
        before = model(x)
    for h in hooks:
        h.remove()
    range_bns = {i: model[i] for i in (1, 6)}
    model64 = copy.deepcopy(model).double()
    convert_to_batchnorm(model)
    assert isinstance(model[1], nn.BatchNorm2d) and isinstance(model[6], nn.BatchNorm1d)
    with torch.no_grad():
        for i, rb in range_bns.items():
            assert_within(model[i](seen[i]), rb(seen[i]),
                          bn_eval_bound(seen[i], rb.weight, rb.bias, rb.running_mean, rb.running_scale + rb.eps),
                          f"layer {i}")
    # End to end the 8-bit input quantizers turn a rounding-level change into a whole step when a value sits
    # within that change of a rounding midpoint (in float32 one of the ~1500 quantized values does so about
    # once in ten runs, so there is no useful float32 bound). In float64 the changes are ~1e-16 relative, a flip
    # has probability ~1e-10, and what remains is rounding: ~100 roundings of magnitudes <= 10 * |output|.
    x64 = x.double()
    with torch.no_grad():
        before64 = model64(x64)
        after64 = convert_to_batchnorm(model64)(x64)
    assert_within(after64, before64, 100 * 10 * unit_roundoff(torch.float64) * float(before64.abs().max()), "output")
    assert all(torch.equal(a.double(), b) for a, b in zip(model.parameters(), model64.parameters()))  # same model


def test_config_validation_and_yaml():
    cfg = Train8(bifurcation=False, wgrad_bits=None)
    assert core.from_yaml(core.to_yaml(cfg)) == cfg
    with pytest.raises(ValueError):
        Train8(bits=1)
    with pytest.raises(ValueError):
        Train8(wgrad_bits=32)
    with pytest.raises(ValueError, match="grad_rounding"):
        Train8(grad_rounding="up")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        prepare_train8(nn.Linear(2, 2), core.to_dict(cfg))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="NaN"):
        fake_quantize_minmax(torch.tensor([1.0, float("nan")]), 8)
    layer = wrap(nn.Linear(2, 2))
    with pytest.raises(TypeError):
        layer.add("grad_output", ActQuant(8))


def test_cli_recipe_train8(tmp_path):
    from thrifty.cli import main
    from thrifty.train import load_model

    out = tmp_path / "run"
    rc = main(["train", "--model", "mlp", "--dataset", "digits", "--optim.steps", "3", "--recipe", "train8",
               "--out", str(out)])
    assert rc == 0
    model, meta = load_model(out / "model")
    assert meta["options"]["quant-recipe"]["recipe"] == "train8"
    assert not any(True for _ in gemm_layers(model))
