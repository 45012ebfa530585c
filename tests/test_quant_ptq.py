"""PTQ pipeline: BN folding, AdaQuant vs RTN, ILP vs exhaustive search, BN/bias tuning, quantize(), bad input."""
import copy
import itertools
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

from thrifty.core import apply, from_yaml, to_yaml
from thrifty.nn import wrap
from thrifty.ops import quant as Q
from thrifty.quant import (PTQ, QuantConfig, UniformQuantizer, adaquant_layer, allocate_bits, exhaustive_allocation,
                           fold_bn, quantize, reconstruction_error)
from thrifty.quant.tuning import bn_tune, channel_stats
from thrifty.quant.calib import as_batches, relu_fed
from tolerance import assert_within, gamma, gamma_prob, matmul_bound, unit_roundoff


class TinyNet(nn.Module):
    """conv-BN-ReLU x2 (one conv without bias), pool, linear-BN1d, head: BN after both conv and linear."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 8, 3, stride=2, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 12)
        self.bn3 = nn.BatchNorm1d(12)
        self.head = nn.Linear(12, 3)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        x = x.mean((2, 3))
        return self.head(torch.relu(self.bn3(self.fc(x))))


def _tiny(seed=0):
    torch.manual_seed(seed)
    m = TinyNet()
    with torch.no_grad():  # non-trivial BN statistics and affine parameters
        for bn in (m.bn1, m.bn2, m.bn3):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    return m.eval()


def _data(n=64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 3, (n,), generator=g)


def _abs_layer(layer: nn.Module) -> nn.Module:
    """A copy with |W| and no bias: applied to |x| it gives the magnitudes sum |w||x| of the layer's sums."""
    out = copy.deepcopy(layer)
    with torch.no_grad():
        out.weight.abs_()
        if out.bias is not None:
            out.bias.zero_()
    return out


def test_bn_folding_is_exact_and_finds_pairs():
    m = _tiny()
    orig = copy.deepcopy(m)
    x, _ = _data()
    seen: dict[str, torch.Tensor] = {}
    hooks = [getattr(orig, n).register_forward_pre_hook(lambda mod, a, n=n: seen.__setitem__(n, a[0]))
             for n in ("conv1", "conv2", "fc")]
    with torch.no_grad():
        orig(x)
    for h in hooks:
        h.remove()
    pairs = fold_bn(m, x[:8])
    assert pairs == [("conv1", "bn1"), ("conv2", "bn2"), ("fc", "bn3")]
    assert isinstance(m.bn1, nn.Identity) and m.conv1.bias is not None
    with torch.no_grad():
        for name, bn_name in pairs:
            layer, bn, xin = getattr(orig, name), getattr(orig, bn_name), seen[name]
            shape = (1, -1) + (1,) * (xin.dim() - 2)
            # folded: (W a) x + (b - mean) a + beta with a = gamma / sqrt(var + eps); unfolded: BN(W x + b). Each
            # side rounds a sum of K products and ~8 other operations, relative to these magnitudes
            a = (bn.weight / (bn.running_var + bn.eps).sqrt()).abs().view(shape)
            bias = 0 if layer.bias is None else layer.bias.abs()
            mag = a * (_abs_layer(layer)(xin.abs()) + (bias + bn.running_mean.abs()).view(shape)) + \
                bn.bias.abs().view(shape)
            k = layer.weight[0].numel()
            assert_within(getattr(m, name)(xin), bn(layer(xin)), 2 * gamma(k + 8) * mag, name)
    assert fold_bn(m, x[:8]) == []  # nothing left to fold


def test_bn_folding_refuses_when_conv_output_is_reused():
    class Reuse(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 3)
            self.bn = nn.BatchNorm2d(2)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y  # the conv output is used outside its BN

    m = Reuse().eval()
    with torch.no_grad():
        m.bn.running_var.fill_(4.0)
    before = copy.deepcopy(m.state_dict())
    with pytest.raises(ValueError, match="changed the model output"):
        fold_bn(m, torch.randn(2, 1, 5, 5))
    assert isinstance(m.bn, nn.BatchNorm2d) and all(torch.equal(before[k], v) for k, v in m.state_dict().items())


def _quantized_linear(w_bits: int) -> tuple[torch.Tensor, torch.Tensor, nn.Module]:
    """(x, FP targets y, a wrapped copy of the FP layer with a learnable per-channel weight quantizer)."""
    torch.manual_seed(0)
    fp = nn.Linear(32, 16)
    # correlated inputs (as real activations are): RTN is then not output-optimal
    x = torch.relu(torch.randn(512, 8) @ torch.randn(8, 32) + 0.5)
    y = fp(x).detach()
    layer = wrap(copy.deepcopy(fp))
    layer.add("weight", UniformQuantizer(w_bits, per_channel=True, learnable=True).init_from(layer.weight))
    return x, y, layer


def test_adaquant_lowers_layer_reconstruction_error_vs_rtn():
    x, y, layer = _quantized_linear(3)
    layer.add("input", UniformQuantizer(4, learnable=True).init_from(x))
    rtn = reconstruction_error(layer, [x], [y])
    before, after = adaquant_layer(layer, [x[:256], x[256:]], [y[:256], y[256:]], iters=150)
    assert before == pytest.approx(rtn, rel=0, abs=_mse_tol(layer, x, y))  # the same error in two batches
    assert after < 0.7 * rtn
    assert reconstruction_error(layer, [x], [y]) == pytest.approx(after, rel=0, abs=_mse_tol(layer, x, y))
    # the result is still on the weight quantizer's grid
    wq = layer.slots.weight
    codes = layer.effective_weight() / wq.scale[:, None] + torch.round(wq.zero_point)[:, None]
    _assert_on_grid(codes, torch.round(wq.zero_point)[:, None])


def _mse_tol(layer: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Bound on the difference of two float32 evaluations of mean((layer(x) - y)^2), batched differently.

    Each output may round differently (matmul_bound of the quantized operands), which moves e^2 by at most
    2 |e| d + d^2; the sum of n squares then rounds within gamma_prob(n) of itself.
    """
    with torch.no_grad():
        xin, w = layer.slots.input(x), layer.effective_weight()
        e = (layer(x) - y).double().abs()
        d = matmul_bound(xin, w.t(), extra=2)  # + the bias and the subtraction of y
        return float((2 * e * d + d * d).mean() + 2 * gamma_prob(e.numel() + 2) * (e * e).mean())


def _assert_on_grid(codes: torch.Tensor, zero_point: torch.Tensor) -> None:
    """``codes = w / scale + zero_point`` of an on-grid weight ``w = (q - zero_point) scale`` is the integer q up
    to three roundings: the product and the division (u of |q - zero_point| each), the addition (u of |codes|)."""
    zp = zero_point.detach().abs()
    tol = 3 * unit_roundoff(codes.dtype) * (codes.detach().abs() + zp)
    assert_within(codes, codes.round(), tol, "integer codes")


def _random_instance(rng, n_layers, bits=(2, 4, 8)):
    sens = {f"l{i}": {b: (0.0 if b == max(bits) else float(rng.uniform(0, 1) * (9 - b))) for b in bits}
            for i in range(n_layers)}
    size = {f"l{i}": int(rng.integers(10, 100)) for i in range(n_layers)}
    cost = {n: {b: size[n] * b / 8 for b in bits} for n in sens}
    return sens, cost


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 10_000), st.integers(1, 6), st.floats(0.0, 1.0))
def test_ilp_matches_exhaustive_search(seed, n_layers, frac):
    rng = np.random.default_rng(seed)
    sens, cost = _random_instance(rng, n_layers)
    lo = sum(min(c.values()) for c in cost.values())
    hi = sum(max(c.values()) for c in cost.values())
    budget = lo + frac * (hi - lo)
    ilp, ex = allocate_bits(sens, cost, budget), exhaustive_allocation(sens, cost, budget)
    # optimal means equal: two selections of equal value differ only by the rounding of float64 sums of
    # n_layers terms; the budget check allows the allocator's documented 1e-9 slack
    top = sum(max(v.values()) for v in sens.values())
    tol = 2 * gamma(n_layers, torch.float64) * top
    assert ilp.predicted_increase == pytest.approx(ex.predicted_increase, rel=0, abs=tol)
    assert ilp.cost <= budget + 1e-9
    assert sum(cost[n][b] for n, b in ilp.bits.items()) == pytest.approx(ilp.cost)


def test_ilp_infeasible_budget_names_smallest_feasible():
    sens, cost = _random_instance(np.random.default_rng(0), 3)
    lo = sum(min(c.values()) for c in cost.values())
    with pytest.raises(ValueError, match=f"smallest feasible budget is {lo:.6g}"):
        allocate_bits(sens, cost, lo * 0.9)
    assert allocate_bits(sens, cost, lo).cost == pytest.approx(lo)


def test_bn_tune_matches_fp_statistics_and_stays_on_grid():
    torch.manual_seed(0)
    fp = nn.Sequential(nn.Conv2d(3, 4, 3)).eval()
    q = copy.deepcopy(fp)
    layer = wrap(q[0])
    q[0] = layer
    layer.add("weight", UniformQuantizer(2, per_channel=True).init_from(layer.weight))
    x = torch.randn(32, 3, 6, 6) + 1.0
    from thrifty.quant.calib import as_batches
    bn_tune(q, fp, ["0"], as_batches(x, 16), progress=False)
    mq, vq = channel_stats(q(x), 1)
    mf, vf = channel_stats(fp(x), 1)
    # exact in real arithmetic (the weight and its grid scaled by a = sqrt((vf + eps) / (vq + eps)), the bias
    # moved): each output rounds within d of its magnitudes (a conv of K products, then the stats' own float32
    # rounding); a mean moves by at most max d, a variance by 2 std max d + d^2, plus bn_tune's eps = 1e-8
    with torch.no_grad():
        mag = _abs_layer(layer)(x.abs()) + layer.bias.abs().view(1, -1, 1, 1)
        d = (2 * gamma(layer.weight[0].numel() + 8) * mag).amax((0, 2, 3))
    u = unit_roundoff()
    assert_within(mq, mf, d + 2 * u * mf.abs(), "channel means")
    assert_within(vq, vf, 2 * vf.sqrt() * d + d * d + 1e-8 + 2 * u * vf, "channel variances")
    wq = layer.slots.weight
    codes = layer.effective_weight() / wq.scale.reshape(-1, 1, 1, 1) + wq.zero_point.reshape(-1, 1, 1, 1)
    _assert_on_grid(codes, wq.zero_point.reshape(-1, 1, 1, 1))


@pytest.mark.parametrize("pipeline", ["rtn", "light", "adaquant", "advanced"])
def test_quantize_pipelines_on_tiny_bn_net(pipeline):
    m = _tiny()
    x, y = _data(96)
    before = copy.deepcopy(m.state_dict())
    cfg = PTQ(w_bits=4, a_bits=4, pipeline=pipeline, adaquant_iters=30, bias_iters=20, batch_size=32)
    res = quantize(m, cfg, torch.utils.data.TensorDataset(x, y), progress=False)
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())  # user model untouched
    assert isinstance(m.bn1, nn.BatchNorm2d)
    assert res.loss_kind == "kl" and res.folded == [("conv1", "bn1"), ("conv2", "bn2"), ("fc", "bn3")]
    assert res.bits == {"conv1": (8, 8), "conv2": (4, 4), "fc": (4, 4), "head": (8, 8)}
    assert 0 < res.size_fraction < 1 and res.bops_fraction is not None
    losses = list(res.losses.values())
    assert all(np.isfinite(losses))
    # a stage that does not lower the loss undoes itself, which must be recorded (a final loss <= the first
    # holds by construction and would say nothing)
    for (_, prev), (stage, cur) in zip(res.losses.items(), list(res.losses.items())[1:]):
        assert cur < prev or (cur == prev and stage in res.reverted), (stage, prev, cur, res.reverted)
    out = res.model(x)
    assert out.shape == (96, 3) and torch.isfinite(out).all()
    # the quantized layer's weights lie on their integer grids
    w = res.model.conv2.effective_weight()
    wq = res.model.conv2.slots.weight
    codes = w / wq.scale.reshape(-1, 1, 1, 1) + torch.round(wq.zero_point).reshape(-1, 1, 1, 1)
    _assert_on_grid(codes, torch.round(wq.zero_point).reshape(-1, 1, 1, 1))
    assert codes.min() > -0.5 and codes.max() < 15.5


def test_quantize_bit_allocation_budget_and_prediction():
    m = _tiny()
    x, y = _data(64)
    res = quantize(m, PTQ(pipeline="light", a_bits=8, budget=0.2, candidate_bits=(2, 4, 8)), (x, y), progress=False)
    assert res.size_fraction <= 0.2 + 1e-9
    assert set(res.sensitivity) == {"conv2", "fc"} and all(s[8] == 0.0 for s in res.sensitivity.values())
    assert res.predicted_loss is not None and res.measured_loss is not None
    with pytest.raises(ValueError, match="smallest feasible budget is 0.1"):
        quantize(m, PTQ(pipeline="light", budget=0.05, candidate_bits=(2, 4, 8)), (x, y), progress=False)
    # bit-operations budget (fraction of FP32 x FP32 BOPs): W8A8 everywhere would be 1/16
    res = quantize(m, PTQ(pipeline="rtn", a_bits=8, budget=0.05, budget_kind="bops", candidate_bits=(2, 4, 8)),
                   (x, y), progress=False)
    assert res.bops_fraction <= 0.05 + 1e-9 and any(w < 8 for w, _ in res.bits.values())


def test_bad_inputs_leave_model_unchanged():
    m = _tiny()
    state = copy.deepcopy(m.state_dict())
    x, _ = _data(16)
    with pytest.raises(ValueError, match="2..16"):
        PTQ(w_bits=1)
    with pytest.raises(ValueError, match="2..16"):
        PTQ(a_bits=17)
    with pytest.raises(ValueError, match="budget"):
        PTQ(budget=1.5)
    with pytest.raises(ValueError, match="empty"):
        quantize(m, PTQ(), torch.empty(0, 1, 8, 8))
    with pytest.raises(ValueError, match="does not fit the model"):
        quantize(m, PTQ(), torch.randn(4, 3, 8, 8))
    with pytest.raises(ValueError, match="inputs but .* labels"):
        quantize(m, PTQ(), [(x, torch.zeros(3))])
    with pytest.raises(TypeError, match="calibration data"):
        quantize(m, PTQ(), "images")
    with pytest.raises(ValueError, match="no quantizable"):
        quantize(nn.Sequential(nn.ReLU()), PTQ(), torch.randn(4, 3))
    assert all(torch.equal(state[k], v) for k, v in m.state_dict().items())


def test_unquantizable_layers_are_warned():
    class WithEmb(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 8)
            self.mha = nn.MultiheadAttention(8, 2, batch_first=True)
            self.fc1, self.fc2, self.fc3 = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 2)
            self.unused = nn.Linear(8, 8)

        def forward(self, ids):
            h = self.emb(ids)
            h = self.mha(h, h, h)[0]
            return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(h))))).mean(1)

    ids = torch.randint(0, 10, (8, 5))
    with pytest.warns(UserWarning) as rec:
        res = quantize(WithEmb(), PTQ(pipeline="rtn", w_bits=4), ids, progress=False)
    msg = str(rec[0].message)
    for name in ("emb (Embedding", "unused (not executed"):
        assert name in msg
    assert "mha" not in msg  # its projections are GEMMs of a GemmMultiheadAttention now
    assert set(res.bits) == {"mha.in_proj", "mha.out_proj", "fc1", "fc2", "fc3"}


def test_quant_config_handler_and_yaml_round_trip():
    m = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 2))
    x = torch.randn(8, 6)
    ref = m(x)
    apply(m, QuantConfig(w_bits=8, a_bits=8))
    assert m[0].slots.weight.mode == "frozen" and m[0].slots.input.mode == "dynamic"
    assert (m(x) - ref).abs().max() < 0.05
    for cfg in (QuantConfig(w_bits=3, a_bits=None), PTQ(w_bits=2, budget=0.2, candidate_bits=(2, 8))):
        assert from_yaml(to_yaml(cfg)) == cfg
    with pytest.raises(ValueError):
        QuantConfig(w_estimator="magic")


def test_save_load_round_trip(tmp_path):
    from thrifty.quant import load_quantized, save_quantized

    m = _tiny()
    x, y = _data(48)
    res = quantize(m, PTQ(w_bits=3, a_bits=4, pipeline="adaquant", adaquant_iters=10), (x, y), progress=False)
    stem = tmp_path / "q"
    save_quantized(res, stem, {"note": "tiny"})
    assert (tmp_path / "q.safetensors").is_file() and (tmp_path / "q.yaml").is_file()
    with pytest.raises(ValueError, match="pass the FP model"):
        load_quantized(stem)
    m2, meta = load_quantized(stem, model=m)
    assert isinstance(m.bn1, nn.BatchNorm2d)  # the FP model passed in is not modified
    assert torch.equal(m2(x), res.model(x))
    assert meta["quantization"]["config"] == res.config and meta["note"] == "tiny"
    assert m2.conv2.slots.weight.bits == 3 and m2.conv2.slots.input.mode == "frozen"
    # a failed save leaves an existing file untouched; a corrupt file is a clear error
    before = (tmp_path / "q.yaml").read_text()
    with pytest.raises(ValueError, match="no quantized"):
        save_quantized(_tiny(), stem)
    assert (tmp_path / "q.yaml").read_text() == before
    (tmp_path / "q.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="corrupt"):
        load_quantized(stem, model=m)
    with pytest.raises(FileNotFoundError):
        load_quantized(tmp_path / "missing", model=m)


def test_cli_quantize_saved_model(tmp_path, capsys):
    from thrifty.cli import main
    from thrifty.models import create
    from thrifty.quant import load_quantized
    from thrifty.train import save_model

    torch.manual_seed(0)
    m = create("mlp", in_features=64, num_classes=10)
    meta = {"model": "mlp", "model_kwargs": {"in_features": 64, "num_classes": 10}, "dataset": "digits"}
    save_model(m, tmp_path / "fp", meta)
    out = tmp_path / "q"
    rc = main(["quantize", "--model", str(tmp_path / "fp"), "--w-bits", "4", "--pipeline", "light", "--budget", "0.2",
               "--candidate-bits", "2,4,8", "--calib-per-class", "3", "--out", str(out)])
    assert rc == 0 and "quantized" in capsys.readouterr().out
    for f in ("model.safetensors", "model.yaml", "report.json", "config.yaml"):
        assert (out / f).is_file()
    q, qmeta = load_quantized(out / "model")
    assert qmeta["quantization"]["config"].budget == 0.2 and qmeta["dataset"] == "digits"
    assert q(torch.randn(2, 64)).shape == (2, 10)
    assert main(["quantize", "--model", str(tmp_path / "fp"), "--w-bits", "1", "--out", str(out)]) != 0


def test_every_revert_is_recorded():
    # A bias learning rate far too large makes bias tuning raise the calibration loss: the pipeline undoes it
    # and must say so (it used to restore silently).
    m = _tiny()
    x, y = _data(64)
    cfg = PTQ(w_bits=4, a_bits=4, pipeline="light", bias_tune=True, bias_iters=5, bias_lr=50.0)
    res = quantize(m, cfg, (x, y), progress=False)
    assert "bias tuning" in res.reverted
    assert res.losses["bias tuning"] == res.losses["bn tuning"] == res.final_loss
    tuned = {k: v for k, v in res.model.state_dict().items() if k.endswith("bias")}
    ref = quantize(m, PTQ(w_bits=4, a_bits=4, pipeline="light"), (x, y), progress=False)
    assert all(torch.equal(v, ref.model.state_dict()[k]) for k, v in tuned.items())
    # a useful bias tuning is kept and not reported
    res = quantize(m, PTQ(w_bits=4, a_bits=4, pipeline="light", bias_tune=True, bias_iters=20), (x, y),
                   progress=False)
    assert "bias tuning" not in res.reverted and res.losses["bias tuning"] <= res.losses["bn tuning"]
    # AdaQuant layers that could not be improved are restored and reported one by one
    res = quantize(m, PTQ(w_bits=8, a_bits=8, pipeline="adaquant", adaquant_iters=2, lr_weight=1e3, lr_bias=1e3,
                          lr_w_scale=1e3, lr_a_scale=1e3), (x, y), progress=False)
    undone = [n for n, (b, a) in res.adaquant_errors.items() if a == b]
    assert undone and [f"adaquant {n}" for n in undone] == [r for r in res.reverted if r.startswith("adaquant ")]


def test_relu_fed_finds_layers_whose_negatives_vanish():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.Linear(8, 3)).eval()
    b = as_batches(torch.randn(16, 4))[0]
    assert relu_fed(m, ["0", "2", "3"], b) == frozenset({"0"})

    class Res(nn.Module):  # relu(conv1) feeds conv2; conv2's output is added to the input before the ReLU
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            return torch.relu(self.b(torch.relu(self.a(x))) + x)

    assert relu_fed(Res().eval(), ["a", "b"], b) == frozenset({"a"})


def test_adaquant_relu_loss_and_max_shift():
    x, y, layer = _quantized_linear(2)
    out = layer(x).detach()
    # the error after a ReLU ignores entries where both outputs are negative (brute force)
    both_neg = (out < 0) & (y < 0)
    manual = float(torch.where(both_neg, torch.zeros_like(out), (out.clamp(min=0) - y.clamp(min=0)) ** 2).mean())
    # same layer output, a different sum of n non-negative squares: each sum is within gamma_prob(n) of exact
    assert reconstruction_error(layer, [x], [y], relu=True) == pytest.approx(manual, rel=2 * gamma_prob(out.numel()))
    assert reconstruction_error(layer, [x], [y], relu=True) < reconstruction_error(layer, [x], [y])
    w0, s0 = layer.weight.detach().clone(), layer.slots.weight.scale.detach().clone()
    before, after = adaquant_layer(layer, [x], [y], iters=60, lr_weight=0.2, max_shift=0.5, relu=True)
    assert after < before
    shift = (layer.weight.detach() - w0).abs() / s0[:, None]
    # w0 +- 0.5 s0 is one float32 rounding away from exact: relative to s0 that is u * |w0 +- 0.5 s0| / s0
    slack = float((unit_roundoff() * (w0.abs() + 0.5 * s0[:, None]) / s0[:, None]).max())
    assert shift.max() <= 0.5 + 2 * slack and shift.max() > 0.25  # bounded, and the bound was reached
    with pytest.raises(ValueError, match="max_shift"):
        adaquant_layer(layer, [x], [y], iters=1, max_shift=0.0)
    with pytest.raises(ValueError, match="lr_weight"):
        PTQ(lr_weight=-1.0)


def test_adaquant_keeps_exact_zeros_of_a_stripped_sparse_model():
    # A model whose pruned weights were baked in (no mask left): AdaQuant with a large weight learning rate
    # moves latent weights by more than half a step, yet the zeros must stay zeros.
    m = _tiny()
    with torch.no_grad():
        for layer in (m.conv2, m.fc):
            layer.weight.mul_((torch.arange(layer.weight.numel()) % 2).reshape(layer.weight.shape))
    x, y = _data(64)
    res = quantize(m, PTQ(w_bits=4, a_bits=8, pipeline="adaquant", adaquant_iters=40, lr_weight=0.5), (x, y),
                   progress=False)
    for name in ("conv2", "fc"):
        zero = getattr(m, name).weight == 0
        assert torch.all(getattr(res.model, name).effective_weight()[zero] == 0), name
