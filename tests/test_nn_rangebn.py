"""thrifty.nn.rangebn: gradients vs numerical, agreement with BN on Gaussian data, running stats, conversion."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn

from thrifty.nn import RangeBatchNorm1d, RangeBatchNorm2d, convert_to_range_bn
from thrifty.nn.rangebn import expected_gaussian_range, range_constant
from tolerance import assert_within, bn_eval_bound, gamma, gamma_prob, matmul_bound, sum_bound, unit_roundoff


@pytest.mark.parametrize("cls,shape", [(RangeBatchNorm2d, (6, 3, 3, 2)), (RangeBatchNorm1d, (10, 4)),
                                       (RangeBatchNorm1d, (5, 2, 3))])
@pytest.mark.parametrize("correction", ["gaussian", "paper"])
def test_gradcheck_float64(cls, shape, correction):
    torch.manual_seed(0)
    bn = cls(shape[1], num_chunks=3, correction=correction).double()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-1, 1)
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    # float64 central differences: truncation ~eps^2 and rounding ~u64 / eps, far below gradcheck's atol
    assert torch.autograd.gradcheck(lambda t: bn(t), (x,), eps=1e-6, atol=1e-5)


def test_matches_batchnorm_for_gaussian_activations_and_error_shrinks_with_n():
    torch.manual_seed(0)
    errs = []
    for batch in (4, 64, 512):  # n = batch * 64 / 16 elements per chunk
        x = torch.randn(batch, 4, 8, 8) * 3 + 1
        a = nn.BatchNorm2d(4)(x)
        b = RangeBatchNorm2d(4)(x)
        errs.append(float((a - b).detach().norm() / a.detach().norm()))
    assert errs[-1] < 0.04 and errs[-1] < errs[0]
    x = torch.randn(512, 4, 8, 8)
    with torch.no_grad():
        paper = RangeBatchNorm2d(4, correction="paper")(x)
        ratio = float(paper.std() / nn.BatchNorm2d(4)(x).std())
    assert 0.4 < ratio < 0.7  # the closed form C(n) = 1/sqrt(2 ln n) measures ~2 sigma


def test_expected_range_closed_form_and_monte_carlo():
    # trapezoid rule, step h = 5e-4 on [-12, 12]: error <= 24 h^2 / 12 max|f''| ~ 5e-7 for n = 2
    assert expected_gaussian_range(2) == pytest.approx(2 / math.sqrt(math.pi), rel=1e-6)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20000, 50, generator=g)
    r = (x.amax(1) - x.amin(1)).double()
    # Monte Carlo: within 5 standard errors of the sample mean
    assert expected_gaussian_range(50) == pytest.approx(float(r.mean()), rel=0, abs=5 * float(r.std()) / 20000**0.5)
    assert range_constant(1000, "paper") == pytest.approx(1 / math.sqrt(2 * math.log(1000)))
    with pytest.raises(ValueError):
        range_constant(1)
    with pytest.raises(ValueError, match="correction"):
        RangeBatchNorm2d(3, correction="exact")  # type: ignore[arg-type]


def test_running_stats_and_eval_mode():
    torch.manual_seed(0)
    bn = RangeBatchNorm2d(2, momentum=None)
    xs = [torch.randn(16, 2, 4, 4) * 2 + 3 for _ in range(3)]
    stats = [bn.batch_stats(x) for x in xs]
    for x in xs:
        bn(x)
    # cumulative averages: three updates of 3 roundings each, and the test's mean of 3 (each <= u of max|stat|)
    for i, name in enumerate(("running_mean", "running_scale")):
        st = torch.stack([s[i] for s in stats])
        assert_within(getattr(bn, name), st.mean(0), 16 * unit_roundoff() * st.abs().amax(0), name)
    assert int(bn.num_batches_tracked) == 3
    bn.eval()
    x = torch.randn(3, 2, 4, 4)
    want = (x - bn.running_mean.view(1, -1, 1, 1)) / (bn.running_scale.view(1, -1, 1, 1) + bn.eps)
    assert_within(bn(x), want, bn_eval_bound(x, None, None, bn.running_mean, bn.running_scale + bn.eps), "eval")
    bn2 = RangeBatchNorm1d(3, momentum=0.5)
    bn2(torch.ones(4, 3) * torch.arange(4.0)[:, None])
    assert torch.equal(bn2.running_mean, torch.full((3,), 0.75))  # 0.5 * mean(0, 1, 2, 3): exact in binary


def test_convert_preserves_eval_output_and_shares_parameters():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 8),
                          nn.BatchNorm1d(8))
    model.train()
    for _ in range(3):
        model(torch.randn(16, 1, 8, 8))
    model.eval()
    x = torch.randn(5, 1, 8, 8)
    seen: dict[int, torch.Tensor] = {}
    hooks = [model[i].register_forward_pre_hook(lambda m, a, i=i: seen.__setitem__(i, a[0].detach()))
             for i in (1, 5)]
    before = model(x)
    for h in hooks:
        h.remove()
    bns = {i: model[i] for i in (1, 5)}
    w = model[1].weight
    convert_to_range_bn(model)
    assert isinstance(model[1], RangeBatchNorm2d) and isinstance(model[5], RangeBatchNorm1d)
    assert model[1].weight is w and not model[1].training
    with torch.no_grad():
        for i, bn in bns.items():  # the same affine map, computed in another order
            assert_within(model[i](seen[i]), bn(seen[i]),
                          bn_eval_bound(seen[i], bn.weight, bn.bias, bn.running_mean, (bn.running_var + bn.eps) ** 0.5),
                          f"layer {i}")
    # end to end the layer-1 differences pass through ReLU (1-Lipschitz) and the Linear (|W| times them, plus
    # the Linear's own rounding on each side), then layer 5 scales them by |weight / (scale + eps)|
    d1 = bn_eval_bound(seen[1], w, model[1].bias, model[1].running_mean, model[1].running_scale + model[1].eps)
    lin = model[4]
    with torch.no_grad():
        h = model[3](model[2](model[1](seen[1])))
    d4 = d1.flatten(1) @ lin.weight.detach().double().abs().t() + matmul_bound(h, lin.weight.t(), extra=1)
    a5 = (model[5].weight / (model[5].running_scale + model[5].eps)).detach().double().abs()
    tol = d4 * a5 + bn_eval_bound(seen[5], model[5].weight, model[5].bias, model[5].running_mean,
                                  model[5].running_scale + model[5].eps)
    assert_within(model(x), before, tol, "output")
    assert isinstance(convert_to_range_bn(nn.BatchNorm1d(3)), RangeBatchNorm1d)
    with pytest.raises(TypeError):
        convert_to_range_bn("model")  # type: ignore[arg-type]


def test_bad_input_and_quantized_variant():
    bn = RangeBatchNorm2d(3)
    with pytest.raises(ValueError, match="4-D"):
        bn(torch.randn(4, 3))
    with pytest.raises(ValueError, match="channels"):
        bn(torch.randn(4, 2, 3, 3))
    with pytest.raises(ValueError, match="more than 1 value"):
        RangeBatchNorm1d(3)(torch.randn(1, 3))
    with pytest.raises(ValueError):
        RangeBatchNorm1d(3, bits=1)
    torch.manual_seed(0)
    x = torch.randn(32, 3, 4, 4, requires_grad=True)
    q = RangeBatchNorm2d(3, bits=8)(x)
    assert float((q - RangeBatchNorm2d(3)(x)).detach().abs().max()) < 0.05
    q.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_chunks_are_batch_major_groups():
    torch.manual_seed(0)
    bn = RangeBatchNorm2d(3, num_chunks=4)
    for b in (8, 6):  # 8 % 4 == 0: chunks are sample groups; 6: chunks split samples
        x = torch.randn(b, 3, 2, 5)
        mean, scale = bn.batch_stats(x)
        flat = x.transpose(0, 1).reshape(3, -1)
        n = flat.shape[1] // 4
        blocks = flat[:, : 4 * n].reshape(3, 4, n)
        want = (blocks.amax(-1) - blocks.amin(-1)).mean(-1) * range_constant(n)
        assert_within(mean, flat.mean(1), sum_bound(flat, 1, extra=1) / flat.shape[1], "mean")
        # max and min are exact; the mean of 4 ranges and the constant: a few roundings of their magnitude
        assert_within(scale, want, 2 * gamma(8) * (blocks.amax(-1) - blocks.amin(-1)).sum(-1) * range_constant(n),
                      "scale")


# ------------------------------------------------------------------- the fused CPU path vs the autograd reference
def _pair(bn: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(bn, a copy forced onto the reference path: batch_stats + broadcast ops differentiated by autograd)."""
    ref = copy.deepcopy(bn)
    ref._fast_layout = lambda x: None
    return bn, ref


def _grad_bound(bn, x: torch.Tensor, g: torch.Tensor, which: str = "input") -> torch.Tensor:
    """Bound on the difference of two float computations of Range BN's training-mode gradient.

    Per channel (m elements, k chunks of n, batch-major): dX = a (g - mean(g)), plus, at a chunk's maxima and
    minima, -+ a (sum g x_hat) C(n) / k, with a = weight / (s + eps), x_hat = (x - mean) / (s + eps). Each side
    rounds sums of m terms plus a few operations, relative to the magnitudes |a| (|g| + mean|g|) and, at the
    extremes, |a| n C(n) mean|g x_hat| (gamma_prob: the sums are long). dweight = sum g x_hat, dbias = sum g.
    """
    c = x.shape[1]
    xd, gd = x.detach().double(), g.double()
    dims = [d for d in range(x.dim()) if d != 1]
    shape = (1, -1) + (1,) * (x.dim() - 2)
    m = x.numel() // c
    k = min(bn.num_chunks, m // 2)
    n = m // k
    with torch.no_grad():
        mean, scale = bn.batch_stats(xd)
    inv = 1.0 / (scale + bn.eps)
    xhat = ((xd - mean.view(shape)) * inv.view(shape)).abs()
    tol = 2 * gamma_prob(m + 8, x.dtype)
    if which == "weight":
        return tol * (gd.abs() * xhat).sum(dims)
    if which == "bias":
        return tol * gd.abs().sum(dims)
    flat = xd.transpose(0, 1).reshape(c, -1)
    blocks = flat[:, :k * n].reshape(c, k, n)
    ext = (blocks == blocks.amax(-1, keepdim=True)) | (blocks == blocks.amin(-1, keepdim=True))
    ext = torch.cat([ext.reshape(c, -1), torch.zeros(c, m - k * n, dtype=torch.bool)], 1)
    ext = ext.reshape((c, x.shape[0]) + tuple(x.shape[2:])).transpose(0, 1)
    a = inv * (bn.weight.detach().double().abs() if bn.affine else 1.0)
    mag = gd.abs() + gd.abs().mean(dims).view(shape) + ext * n * range_constant(n, bn.correction) * (
        (gd.abs() * xhat).mean(dims).view(shape))
    return tol * a.view(shape) * mag


FAST_CASES = [(RangeBatchNorm2d, (64, 16, 8, 8), 16), (RangeBatchNorm2d, (6, 3, 3, 2), 3),
              (RangeBatchNorm2d, (9, 4, 1, 1), 4), (RangeBatchNorm1d, (10, 4), 3), (RangeBatchNorm1d, (64, 10), 16),
              (RangeBatchNorm1d, (8, 3, 5), 4)]


@pytest.mark.parametrize("cls,shape,chunks", FAST_CASES)
@pytest.mark.parametrize("affine", [True, False])
def test_fused_path_same_forward_and_running_stats_gradients_within_rounding(cls, shape, chunks, affine):
    torch.manual_seed(0)
    bn, ref = _pair(cls(shape[1], num_chunks=chunks, affine=affine, momentum=None))
    if affine:
        with torch.no_grad():
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-1, 1)
        bn, ref = _pair(bn)
    assert bn._fast_layout(torch.zeros(shape)) is not None  # these shapes take the fused path
    seen = []
    for _ in range(2):
        x = (torch.randn(shape) * 2 + 0.5).requires_grad_()
        x2 = x.detach().clone().requires_grad_()
        y, y2 = bn(x), ref(x2)
        torch.testing.assert_close(y, y2, rtol=0, atol=0)  # forward: the same float32 ops
        g = torch.randn(shape)
        seen.append((x2.detach(), g))
        y.backward(g)
        y2.backward(g)
        assert_within(x.grad, x2.grad, _grad_bound(ref, x2, g), "dX")
    torch.testing.assert_close(bn.running_mean, ref.running_mean, rtol=0, atol=0)
    torch.testing.assert_close(bn.running_scale, ref.running_scale, rtol=0, atol=0)
    if affine:
        # sums over both steps of g * x_hat and of g
        bw = sum(_grad_bound(ref, xs, gs, "weight") for xs, gs in seen)
        assert_within(bn.weight.grad, ref.weight.grad, bw, "dweight")
        assert_within(bn.bias.grad, ref.bias.grad, sum(_grad_bound(ref, xs, gs, "bias") for xs, gs in seen), "dbias")


@pytest.mark.parametrize("cls,shape", [(RangeBatchNorm2d, (6, 3, 3, 2)), (RangeBatchNorm1d, (12, 4)),
                                       (RangeBatchNorm1d, (9, 2, 3))])  # 9 samples, 4 chunks: a leftover sample
def test_fused_path_gradcheck_float64(cls, shape):
    torch.manual_seed(1)
    bn = cls(shape[1], num_chunks=4 if shape[0] == 9 else 3).double()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    assert bn._fast_layout(x) is not None
    assert torch.autograd.gradcheck(lambda t: bn(t), (x,), eps=1e-6, atol=1e-5)
    w, b = bn.weight.detach().clone().requires_grad_(), bn.bias.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda t, w, b: torch.func.functional_call(bn, {"weight": w, "bias": b}, (t,)),
                                    (x, w, b), eps=1e-6, atol=1e-5)


def test_fused_path_shares_a_tied_max_evenly_like_amax():
    # integer-valued inputs tie at the chunk max/min: each tied element gets an equal share of the range gradient
    torch.manual_seed(0)
    x = torch.randint(-3, 4, (8, 2, 3, 3)).double().requires_grad_()
    bn = RangeBatchNorm2d(2, num_chunks=4).double()
    g = torch.randn(x.shape, dtype=torch.float64)
    bn(x).backward(g)
    x2 = x.detach().clone().requires_grad_()
    flat = x2.transpose(0, 1).reshape(2, 4, -1)
    mean = x2.mean((0, 2, 3))
    scale = (flat.amax(-1) - flat.amin(-1)).mean(-1) * range_constant(flat.shape[-1])
    y = (x2 - mean.view(1, -1, 1, 1)) / (scale.view(1, -1, 1, 1) + bn.eps)
    y.backward(g)
    assert_within(x.grad, x2.grad, _grad_bound(bn, x2, g), "dX")


def test_fused_path_layout_conditions_and_non_contiguous_input():
    bn = RangeBatchNorm2d(3, num_chunks=16)
    assert bn._fast_layout(torch.zeros(64, 3, 4, 4)) == (16, 16, 4)
    assert bn._fast_layout(torch.zeros(10, 3, 4, 4)) is None  # 160 // 16 = 10 elements: chunks split samples
    assert bn._fast_layout(torch.zeros(64, 3, 4, 4, dtype=torch.float16)) is None
    assert RangeBatchNorm2d(3, bits=8)._fast_layout(torch.zeros(64, 3, 4, 4)) is None
    torch.manual_seed(0)
    x = torch.randn(32, 3, 4, 4).to(memory_format=torch.channels_last).requires_grad_()
    bn, ref = _pair(RangeBatchNorm2d(3, num_chunks=8))
    x2 = x.detach().contiguous().requires_grad_()  # the fused path reads a contiguous copy
    y, y2 = bn(x), ref(x2)
    torch.testing.assert_close(y, y2, rtol=0, atol=0)
    y.sum().backward()
    y2.sum().backward()
    assert_within(x.grad, x2.grad, _grad_bound(ref, x2, torch.ones_like(y2)), "dX")
    with torch.no_grad():  # no graph: the fused forward alone
        torch.testing.assert_close(bn(x), y, rtol=0, atol=0)


def test_conversions_keep_the_models_dtype():
    """Regression: both conversions built float32 buffers, so a float64 model's statistics were rounded to float32
    (and convert_to_batchnorm's BatchNorm then refused the float64 input)."""
    from thrifty.quant.train8 import convert_to_batchnorm

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)).double()
    model(torch.randn(8, 3, dtype=torch.float64))
    model.eval()
    var = model[1].running_var.clone()
    convert_to_range_bn(model)
    assert model[1].running_scale.dtype == torch.float64 and model[1].weight.dtype == torch.float64
    convert_to_batchnorm(model)
    assert model[1].running_var.dtype == torch.float64
    # sqrt(var + eps) - eps and back: a few float64 roundings of var + eps, nothing of float32's
    assert_within(model[1].running_var, var, 8 * unit_roundoff(torch.float64) * (var + model[1].eps), "running_var")
    model(torch.randn(2, 3, dtype=torch.float64))
