"""ActNM / GradNM in the Gemm layers: routing to the intended GEMMs, grouping dims, composition, configs."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import thrifty
from thrifty.core import from_yaml, to_yaml
from thrifty.nn import GradTransform, wrap
from thrifty.ops.mvue import mse_nm, mvue_nm
from thrifty.sparse.actgrad import ActNM, GradNM, GradNMTransform, _layer_seed, parse_nm
from tolerance import assert_within, gamma, matmul_bound, sum_bound



def _linear_grads(layer, x, g):
    x = x.clone().requires_grad_(True)
    layer.zero_grad()
    (layer(x) * g).sum().backward()  # dY = g exactly
    return x.grad, layer.weight.grad.clone(), layer.bias.grad.clone()


@pytest.mark.parametrize("gemms", [("input",), ("weight",), ("input", "weight")])
def test_linear_grads_flow_only_through_chosen_gemms(gemms):
    torch.manual_seed(0)
    lin = nn.Linear(12, 8)
    x, g = torch.randn(16, 12), torch.randn(16, 8)
    layer = thrifty.apply(copy.deepcopy(nn.Sequential(lin)), GradNM(2, 4, method="mse", gemms=gemms))[0]
    dx, dw, db = _linear_grads(layer, x, g)
    gx = mse_nm(g, 2, 4, dim=-1) if "input" in gemms else g  # dX = dY W: blocks along out features
    gw = mse_nm(g, 2, 4, dim=0) if "weight" in gemms else g  # dW = dY^T X: blocks along the batch
    assert_within(dx, gx @ lin.weight, matmul_bound(gx, lin.weight), "dX")
    assert_within(dw, gw.t() @ x, matmul_bound(gw.t(), x), "dW")
    assert_within(db, gw.sum(0), sum_bound(gw, 0), "db")
    if gemms == ("weight",):
        assert torch.equal(dx, g @ lin.weight)  # untouched GEMM: exactly the dense gradient


@pytest.mark.parametrize("gemms", [("input",), ("weight",), ("input", "weight")])
def test_conv_grads_flow_only_through_chosen_gemms(gemms):
    torch.manual_seed(1)
    conv = nn.Conv2d(4, 8, 3, padding=1)
    x, g = torch.randn(4, 4, 8, 8), torch.randn(4, 8, 8, 8)
    layer = thrifty.apply(nn.Sequential(copy.deepcopy(conv)), GradNM(2, 4, method="mse", gemms=gemms))[0]
    xr = x.clone().requires_grad_(True)
    (layer(xr) * g).sum().backward()
    gx = mse_nm(g, 2, 4, dim=1) if "input" in gemms else g  # out channels
    gw = mse_nm(g, 2, 4, dim=0) if "weight" in gemms else g  # 4 samples of the batch at one (channel, pixel)
    ref_dx = torch.nn.grad.conv2d_input(x.shape, conv.weight, gx, padding=1)
    ref_dw = torch.nn.grad.conv2d_weight(x, conv.weight.shape, gw, padding=1)
    # the same sums over |W|, |dY|, |X| bound the rounding (K: 8 out channels x 9 taps; 4 x 8 x 8 positions)
    bx = 2 * gamma(8 * 9 + 2) * torch.nn.grad.conv2d_input(x.shape, conv.weight.abs(), gx.abs(), padding=1)
    bw = 2 * gamma(4 * 64 + 2) * torch.nn.grad.conv2d_weight(x.abs(), conv.weight.shape, gw.abs(), padding=1)
    assert_within(xr.grad, ref_dx, bx, "dX")
    assert_within(layer.weight.grad, ref_dw, bw, "dW")
    assert_within(layer.bias.grad, gw.sum((0, 2, 3)), 2 * gamma(4 * 64) * gw.abs().sum((0, 2, 3)), "db")


def test_mvue_transform_is_seeded_per_layer_and_matches_the_op():
    t = GradNMTransform(2, 4, "mvue", ("input", "weight"), input_dim=-1, weight_dim=-2, seed=5)
    g = torch.randn(8, 16)
    gx, gw = t(g)
    ref = torch.Generator().manual_seed(5)
    assert torch.equal(gx, mvue_nm(g, 2, 4, -1, ref))
    assert torch.equal(gw, mvue_nm(g, 2, 4, -2, ref))  # independent second draw along the batch
    assert ((gx.view(8, 4, 4) != 0).sum(-1) <= 2).all()
    assert ((gw.view(2, 4, 16) != 0).sum(1) <= 2).all()
    same = GradNMTransform(2, 4, "mvue", ("input", "weight"), input_dim=1, weight_dim=-1, seed=5)
    a, b = same(g)
    assert a is b  # one grouping dim: one draw serves both GEMMs
    assert _layer_seed(0, "layer1.0.conv1") != _layer_seed(0, "layer1.0.conv2")


def test_mvue_weight_gradient_is_unbiased_over_steps():
    torch.manual_seed(2)
    lin = nn.Linear(6, 4)
    x, g = torch.randn(8, 6), torch.randn(8, 4)
    layer = thrifty.apply(nn.Sequential(copy.deepcopy(lin)), GradNM(1, 2))[0]
    runs = 1500
    dxs, dws = zip(*[_linear_grads(layer, x, g)[:2] for _ in range(runs)])
    for draws, dense in ((torch.stack(dws).double(), g.t() @ x), (torch.stack(dxs).double(), g @ lin.weight)):
        se = draws.std(0) / runs**0.5
        # 4 standard errors, plus the float32 rounding of each draw's GEMM (K = 8 or 4)
        rounding = 2 * gamma(8 + 2) * (g.abs().t() @ x.abs()).abs().max()
        assert ((draws.mean(0) - dense.double()).abs() <= 4 * se + rounding).all()
        assert (se > 0).any()  # the draws do vary


def test_biased_mse_weight_gradient_is_not_dense():
    torch.manual_seed(3)
    lin = nn.Linear(6, 4)
    x, g = torch.randn(8, 6), torch.randn(8, 4)
    layer = thrifty.apply(nn.Sequential(copy.deepcopy(lin)), GradNM(1, 2, method="mse"))[0]
    _, dw, _ = _linear_grads(layer, x, g)
    assert not torch.allclose(dw, g.t() @ x, atol=1e-3)


def test_act_nm_forward_and_masked_input_grad():
    torch.manual_seed(4)
    lin = nn.Linear(8, 3)
    x = torch.randn(5, 8, requires_grad=True)
    layer = thrifty.apply(nn.Sequential(copy.deepcopy(lin)), ActNM(2, 4))[0]
    y = layer(x)
    xp = mse_nm(x.detach(), 2, 4)
    assert_within(y, lin(xp), matmul_bound(xp, lin.weight.t(), extra=1), "output")
    y.sum().backward()
    keep = xp != 0
    ones = torch.ones(5, 3)
    assert_within(x.grad, (ones @ lin.weight) * keep, matmul_bound(ones, lin.weight), "dX")
    assert_within(layer.weight.grad, ones.t() @ xp, matmul_bound(ones.t(), xp), "dW")
    conv = thrifty.apply(nn.Sequential(nn.Conv2d(8, 2, 1)), ActNM(1, 2))[0]
    xc = torch.randn(2, 8, 3, 3)
    xcp = mse_nm(xc, 1, 2, dim=1)
    mag = F.conv2d(xcp.abs(), conv.weight.abs()) + conv.bias.abs().view(1, -1, 1, 1)
    assert_within(conv(xc), F.conv2d(xcp, conv.weight, conv.bias), 2 * gamma(8 + 1) * mag, "conv output")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_act_nm_input_grad_is_the_masked_gradient_exactly(dtype):
    """ActNM: forward = mse_nm, backward = g * mse_mask(x) bit for bit, with the zeros, ties and NaN
    blocks of the mask, in float32 (compiled kernel) and float16 (torch path)."""
    from thrifty.ops.mvue import mse_mask
    from thrifty.sparse.actgrad import ActNMMask

    x = torch.tensor([[0.0, 0.0, 0.0, 1.0, 2.0, -2.0, 2.0, 0.5, float("nan"), 1.0, 0.0, 3.0, 1.0, 4.0]]).to(dtype)
    x = x.repeat(3, 1).requires_grad_(True)
    g = torch.randn(3, 14).to(dtype)
    for dim, tail in ((-1, "pad"), (-1, "dense"), (0, "pad")):
        x.grad = None
        y = ActNMMask(2, 4, dim, tail)(x)
        assert y.dtype == dtype
        assert torch.equal(y.nan_to_num(), mse_nm(x.detach(), 2, 4, dim, tail).nan_to_num())
        y.backward(g)
        assert torch.equal(x.grad, g * mse_mask(x.detach(), 2, 4, dim, tail))


class _FixedMask(nn.Module):
    """A weight transform: multiply by a fixed mask (stands in for a transposable N:M weight mask)."""

    def __init__(self, mask):
        super().__init__()
        self.register_buffer("mask", mask)

    def forward(self, w):
        return w * self.mask


def test_composes_with_8bit_quant_and_transposable_weight_mask():
    from thrifty.ops.nm import is_transposable, transposable_mask
    from thrifty.quant.config import QuantConfig

    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 8))
    thrifty.apply(model, QuantConfig(w_bits=8, a_bits=8))
    for layer in (model[0], model[2]):
        mask = transposable_mask(layer.weight.detach(), 4, 8).float()
        assert is_transposable(mask, 4, 8)
        layer.add("weight", _FixedMask(mask))
    thrifty.apply(model, ActNM(2, 4))
    thrifty.apply(model, GradNM(2, 4))
    l0 = model[0]
    assert [type(m).__name__ for m in l0.slots.input] == ["UniformQuantizer", "ActNMMask"]
    x, g = torch.randn(8, 16), torch.randn(8, 8)
    x_eff = l0.slots.input(x)
    assert ((x_eff.view(8, 4, 4) != 0).sum(-1) <= 2).all()
    (model(x) * g).sum().backward()
    w_eff = l0.effective_weight()
    assert ((w_eff != 0).float() <= l0.slots.weight[1].mask).all()  # masked weights stay masked
    for layer in (model[0], model[2]):
        assert torch.isfinite(layer.weight.grad).all() and layer.weight.grad.abs().sum() > 0
        assert layer.slots.grad_output.calls == 1
    # the weight mask's zeros get no gradient through the STE of the mask
    assert (model[0].weight.grad[l0.slots.weight[1].mask == 0] == 0).all()


def test_chained_after_a_bifurcating_grad_transform():
    class Halve(GradTransform):
        def forward(self, dy):
            return dy, dy * 0.5

    lin = nn.Linear(4, 8)
    layer = wrap(copy.deepcopy(lin))
    layer.add("grad_output", Halve())
    layer.add("grad_output", GradNMTransform(1, 2, "mse", ("weight",), -1, -2))
    x, g = torch.randn(6, 4), torch.randn(6, 8)
    dx, dw, _ = _linear_grads(layer, x, g)
    gw = mse_nm(g * 0.5, 1, 2, dim=0)
    assert_within(dx, g @ lin.weight, matmul_bound(g, lin.weight), "dX")
    assert_within(dw, gw.t() @ x, matmul_bound(gw.t(), x), "dW")


def test_tiny_resnet_like_training_runs_and_is_reproducible():
    def run():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                              nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))
        thrifty.apply(model, GradNM(2, 4))
        thrifty.apply(model, ActNM(2, 4), filter="2")
        x, y = torch.randn(12, 1, 8, 8), torch.randint(0, 3, (12,))
        losses = []
        for _ in range(3):  # plain SGD by hand (torch.optim's first use imports torch._dynamo: seconds)
            model.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            with torch.no_grad():
                for p in model.parameters():
                    p -= 0.1 * p.grad
            losses.append(loss.item())
        return losses

    a, b = run(), run()
    assert a == b and all(torch.isfinite(torch.tensor(a)))


def test_configs_roundtrip_and_validate():
    for cfg in (GradNM(1, 2, gemms=("weight",), seed=None), ActNM(2, 4, dim=1), GradNM(2, 4, method="mse")):
        assert from_yaml(to_yaml(cfg)) == cfg
    assert GradNM(gemms="input").gemms == ("input",)
    with pytest.raises(ValueError, match="GradNM.method"):
        GradNM(method="topk")
    with pytest.raises(ValueError, match="GradNM.gemms"):
        GradNM(gemms=("bias",))
    with pytest.raises(ValueError, match="1 <= n <= m"):
        ActNM(3, 2)
    with pytest.raises(ValueError, match="ActNM.method"):
        ActNM(2, 4, method="mvue")
    with pytest.raises(TypeError, match="GradNM.seed"):
        GradNM(seed="1")
    assert parse_nm("2:4") == (2, 4)
    for bad in ("2-4", "4:2", "a:b", "0:4"):
        with pytest.raises(ValueError, match="--grad-nm"):
            parse_nm(bad, "--grad-nm")


def test_bad_grouping_dim_names_the_layer():
    model = nn.Sequential(nn.Linear(4, 8))
    thrifty.apply(model, GradNM(2, 4, input_dim=3))
    with pytest.raises(ValueError, match="layer '0'"):
        model(torch.randn(2, 4)).sum().backward()
    model = nn.Sequential(nn.Linear(4, 6))
    thrifty.apply(model, GradNM(2, 4, tail="error", gemms=("input",)))
    with pytest.raises(ValueError, match="not a multiple of m=4"):
        model(torch.randn(2, 4)).sum().backward()


def test_composes_with_8bit_training_gradients():
    """Train8 (8-bit W/A, stochastic 8-bit dY, bifurcated 16-bit dW stream) then GradNM in the same layers."""
    from thrifty.quant.train8 import Train8

    class Spy(GradTransform):  # Chain calls it once per stream once they differ: with dX's, then dW's
        def forward(self, dy):
            self.seen = getattr(self, "seen", []) + [dy]
            return dy, dy

    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 8))
    thrifty.apply(model, Train8())
    thrifty.apply(model, GradNM(2, 4))
    spies = [Spy(), Spy()]
    for layer, spy in zip((model[0], model[2]), spies):
        layer.add("grad_output", spy)
        assert [type(m).__name__ for m in layer.slots.grad_output] == ["GradQuant", "GradNMTransform", "Spy"]
    (model(torch.randn(8, 16)) * torch.randn(8, 8)).sum().backward()
    gx, gw = spies[1].seen  # the two streams of the last layer after quantization and pruning
    assert ((gx.view(8, 2, 4) != 0).sum(-1) <= 2).all()  # dX stream: 2:4 along output features
    assert ((gw.view(2, 4, 8) != 0).sum(1) <= 2).all()  # dW stream: 2:4 along the batch
    assert torch.isfinite(model[0].weight.grad).all() and model[0].weight.grad.abs().sum() > 0
