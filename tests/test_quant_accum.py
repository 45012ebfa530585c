"""thrifty.quant.accum: the LowBitAccumulator slot (linear, conv), its backward modes, config and recipe."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import TensorDataset

import thrifty.core as core
from thrifty.nn import gemm_layers, wrap
from thrifty.ops.accum import FloatFormat, accumulate, round_to_format
from thrifty.quant.accum import AccumConfig, LowBitAccumulator, finetune_accumulators, set_underflow
from tolerance import assert_within, gamma, sum_bound

F47 = FloatFormat(4, 7)


def test_linear_forward_is_accumulate_plus_bias():
    torch.manual_seed(0)
    lin = nn.Linear(23, 5)
    layer = wrap(lin).add("accumulator", LowBitAccumulator(F47, F47, chunk=4))
    x = torch.randn(2, 3, 23)
    want = accumulate(x.reshape(6, 23), lin.weight, F47, F47, 4).reshape(2, 3, 5) + lin.bias
    assert torch.equal(layer(x), want)


@pytest.mark.parametrize("kw", [dict(stride=1, padding=1), dict(stride=2, padding=0, dilation=2),
                                dict(stride=1, padding="same", groups=2)])
def test_conv_forward_equals_unfolded_accumulation(kw):
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, bias=True, **kw)
    layer = wrap(conv).add("accumulator", LowBitAccumulator(F47, None, chunk=5))
    x = torch.randn(2, 4, 7, 7)
    y = layer(x)
    assert y.shape == F.conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups).shape
    # reference: per output position, accumulate the (c, kh, kw)-ordered patch against the filter
    pad = (1, 1) if kw.get("padding") in (1, "same") else (0, 0)
    cols = F.unfold(x, 3, dilation=kw.get("dilation", 1), padding=pad, stride=kw["stride"])
    g = kw.get("groups", 1)
    kg, og = cols.shape[1] // g, 6 // g
    outs = []
    for gi in range(g):
        c = cols[:, gi * kg:(gi + 1) * kg].transpose(1, 2).reshape(-1, kg)
        outs.append(accumulate(c, conv.weight[gi * og:(gi + 1) * og].reshape(og, kg), F47, None, 5))
    ref = torch.cat(outs, 1).reshape(2, -1, 6).permute(0, 2, 1).reshape(y.shape) + conv.bias.view(1, -1, 1, 1)
    assert torch.equal(y, ref)


def test_ste_backward_is_exact_float32_backward():
    torch.manual_seed(0)
    lin = nn.Linear(10, 4)
    ref = nn.Linear(10, 4)
    ref.load_state_dict(lin.state_dict())
    layer = wrap(lin).add("accumulator", LowBitAccumulator(FloatFormat(3, 2), chunk=3, backward="ste"))
    x = torch.randn(5, 10, requires_grad=True)
    xr = x.detach().clone().requires_grad_()
    dy = torch.randn(5, 4)
    layer(x).backward(dy)
    ref(xr).backward(dy)
    assert torch.equal(x.grad, xr.grad) and torch.equal(lin.weight.grad, ref.weight.grad)


def _naive_keep(x, w, fmt, chunk):
    """keep[n, o, k] by brute force: is the partial sum changed by term k (and the product not underflowed)?"""
    N, K = x.shape
    O = w.shape[0]
    keep = torch.ones(N, O, K, dtype=torch.bool)
    for n in range(N):
        for o in range(O):
            t = torch.zeros(())
            for c0 in range(0, K, chunk):
                s = torch.zeros(())
                for k in range(c0, min(c0 + chunk, K)):
                    raw = x[n, k] * w[o, k]
                    new = round_to_format((s + raw).reshape(1), fmt)[0]
                    if raw != 0 and new == s:
                        keep[n, o, k] = False
                    s = new
                new_t = round_to_format((t + s).reshape(1), fmt)[0]
                if s != 0 and new_t == t:
                    keep[n, o, c0:c0 + chunk] = False
                t = new_t
            if t.abs() >= fmt.max:
                keep[n, o] = False
    return keep


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_fine_backward_matches_brute_force_masked_gradient(kind):
    torch.manual_seed(1)
    fmt = FloatFormat(3, 2)  # coarse: many swamped terms, some saturation
    if kind == "linear":
        mod = nn.Linear(11, 3, bias=False)
        x = torch.randn(4, 11) * 2
    else:
        mod = nn.Conv2d(2, 3, 2, bias=False)
        x = torch.randn(1, 2, 3, 3) * 2
    layer = wrap(mod).add("accumulator", LowBitAccumulator(fmt, None, chunk=4, backward="fine"))
    xg = x.clone().requires_grad_()
    y = layer(xg)
    dy = torch.randn_like(y)
    y.backward(dy)
    w = mod.weight.detach()
    if kind == "linear":
        keep = _naive_keep(x, w, fmt, 4).float()
        dx = torch.einsum("no,nok,ok->nk", dy, keep, w)
        dw = torch.einsum("no,nok,nk->ok", dy, keep, x)
        # sums of 0/1-masked products: within gamma(K) of the same sums of magnitudes, K the summed dimension
        bx = 2 * gamma(dy.shape[1] + 2) * torch.einsum("no,nok,ok->nk", dy.abs(), keep, w.abs())
        bw = 2 * gamma(dy.shape[0] + 2) * torch.einsum("no,nok,nk->ok", dy.abs(), keep, x.abs())
    else:
        cols = F.unfold(x, 2).transpose(1, 2).reshape(-1, 8)
        w2 = w.reshape(3, 8)
        keep = _naive_keep(cols, w2, fmt, 4).float()
        d = dy.reshape(1, 3, 4).permute(0, 2, 1).reshape(4, 3)
        dcols = torch.einsum("no,nok,ok->nk", d, keep, w2)
        dx = F.fold(dcols.reshape(1, 4, 8).permute(0, 2, 1), (3, 3), 2)
        dw = torch.einsum("no,nok,nk->ok", d, keep, cols).reshape(w.shape)
        # the fold adds up to 4 overlapping columns: K = 3 outputs x 4 positions
        bx = 2 * gamma(12 + 2) * F.fold(torch.einsum("no,nok,ok->nk", d.abs(), keep, w2.abs()).reshape(1, 4, 8)
                                         .permute(0, 2, 1), (3, 3), 2)
        bw = 2 * gamma(4 + 2) * torch.einsum("no,nok,nk->ok", d.abs(), keep, cols.abs()).reshape(w.shape)
    assert 0 < keep.mean() < 1  # the test exercises both kept and lost terms
    assert_within(xg.grad, dx, bx, "dX")
    assert_within(mod.weight.grad, dw, bw, "dW")
    assert len(layer.slots.accumulator._traces) == 0  # the trace was consumed by backward


def test_fine_backward_recomputes_when_trace_missing_and_equals_exact_for_wide_format():
    torch.manual_seed(0)
    lin = nn.Linear(9, 4)
    acc = LowBitAccumulator(FloatFormat(7, 22, bias=63), chunk=3, backward="fine")
    layer = wrap(lin).add("accumulator", acc)
    x = torch.randn(3, 9, requires_grad=True)
    y = layer(x)
    acc._traces.clear()
    y.sum().backward()
    assert_within(x.grad, lin.weight.sum(0).expand(3, 9), sum_bound(lin.weight, 0), "dX")  # dY = 1: column sums


def test_config_apply_yaml_and_validation():
    cfg = AccumConfig(exp_bits=5, man_bits=6, chunk=8, backward="fine", chunk_bias=True)
    assert core.from_yaml(core.to_yaml(cfg)) == cfg
    assert cfg.formats()[0].bias_value == 15 - 3 and cfg.bits == 12
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    core.apply(model, cfg)
    assert sum(isinstance(l.slots.accumulator, LowBitAccumulator) for _, l in gemm_layers(model)) == 2
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 3)
    with pytest.raises(ValueError, match="mantissa"):
        AccumConfig(man_bits=0)
    with pytest.raises(ValueError, match="backward"):
        AccumConfig(backward="magic")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        LowBitAccumulator("e4m3")  # type: ignore[arg-type]


def test_two_stage_finetuning_switches_underflow():
    from thrifty.train import TrainConfig

    torch.manual_seed(0)
    x = torch.randn(64, 8)
    y = (x[:, 0] > 0).long()
    ds = TensorDataset(x, y)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    out = finetune_accumulators(model, AccumConfig(4, 5, chunk=4), ds, ds,
                                TrainConfig(optim={"steps": 4, "batch_size": 16, "lr": 1e-2, "weight_decay": 0.0},
                                            optimizer="adamw"))
    assert out["steps"] == [2, 2] and 0 <= out["test_acc"] <= 1
    accs = [l.slots.accumulator for _, l in gemm_layers(model)]
    assert all(a.acc.underflow for a in accs)
    assert set_underflow(model, False) == 2 and not accs[0].acc.underflow
