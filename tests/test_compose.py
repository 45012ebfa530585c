"""Methods compose: 8-bit W/A/G + transposable 4:8 weights + MVUE 2:4 gradients + a 12-bit accumulator in one layer.

Every expectation is recomputed by hand from the pure ops (thrifty.ops.quant / nm / mvue / accum) on the same
tensors, with the same random streams, and compared with what the wrapped layers compute.

Order of application (what the code promises, checked below): ``thrifty.apply`` appends to a slot, so the
weight chain runs in the order the configs were applied.

* ``Train8`` then ``NM``: W_eff = mask(q(W)) * q(W): the mask is chosen on the *quantized* weights (the NM
  handler feeds the existing chain's output to the mask) and applied after quantization.
* ``NM`` then ``Train8``: W_eff = q(mask(W) * W): the quantizer's range is taken over the masked weights.

Both keep the transposable N:M pattern, because every thrifty weight quantizer represents 0 exactly (asymmetric
ranges are widened to include 0 and the zero point is an integer).
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from thrifty.core import apply, strip
from thrifty.models import create
from thrifty.nn import GemmConv2d, GemmLinear, GradTransform, gemm_layers
from thrifty.ops import accum as A
from thrifty.ops import nm as nmops
from thrifty.ops import quant as Q
from thrifty.ops.mvue import nm_prune
from thrifty.quant import PTQ, QuantConfig, quantize
from thrifty.quant.accum import AccumConfig
from thrifty.quant.train8 import GradQuant, Train8
from thrifty.sparse import NM, GradNM, GradNMTransform, NMMask, sparsify
from tolerance import assert_within, gamma, matmul_bound, sum_bound, unit_roundoff

ACC = AccumConfig(exp_bits=4, man_bits=7, chunk=16)  # 12-bit accumulator (1 + 4 + 7), products in the same format


def _small() -> nn.Sequential:
    # conv: out 16, reduction 8*3*3 = 72; linear: out 16, reduction 16*4*4 = 256 -> both take transposable 4:8
    return nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(256, 16))


class _Record(GradTransform):
    """Appended last to a grad_output chain: records the two dY streams the GEMMs actually use."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[torch.Tensor] = []

    def forward(self, dy):  # type: ignore[override]
        self.seen.append(dy.clone())
        return dy, dy


def _compose_all(model: nn.Module) -> nn.Module:
    apply(model, Train8())                      # weight: 8-bit, input: 8-bit, grad_output: 8-bit SR (+16-bit dW)
    apply(model, NM(4, 8, transposable=True))   # weight: ... then transposable 4:8 mask
    apply(model, GradNM(2, 4, method="mvue"))   # grad_output: ... then MVUE 2:4
    apply(model, ACC)                           # accumulator: 12-bit float
    return model


# --------------------------------------------------------------------------------------- by hand, pure ops
def _q_minmax(t: torch.Tensor, bits: int, axis=None, rounding="nearest") -> torch.Tensor:
    if axis is None:
        lo, hi = t.min(), t.max()
    else:
        flat = t.reshape(t.shape[0], -1)
        lo, hi = flat.amin(1), flat.amax(1)
    s, zp = Q.qparams_from_range(lo, hi, bits)
    return Q.fake_quantize(t, s, zp, bits, axis=axis, rounding=rounding)


def _w_eff(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    qw = _q_minmax(w.detach(), 8)
    mask = nmops.transposable_mask(qw, 4, 8)
    return qw * mask, mask


def _acc_gemm(x2: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    fmt = A.FloatFormat(4, 7)
    return A.accumulate(x2, w2, fmt, fmt, chunk=16, outer="same")


def _forward_by_hand(model: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    conv, lin = model[0], model[3]
    wc, _ = _w_eff(conv.weight)
    xq = _q_minmax(x, 8)
    cols = F.unfold(xq, 3, padding=1)                                  # (B, 72, 16)
    B, K, L = cols.shape
    y = _acc_gemm(cols.transpose(1, 2).reshape(B * L, K), wc.reshape(16, K))
    y = y.reshape(B, L, 16).permute(0, 2, 1).reshape(B, 16, 4, 4) + conv.bias.detach().view(1, -1, 1, 1)
    h = _q_minmax(F.relu(y).flatten(1), 8)
    wl, _ = _w_eff(lin.weight)
    return _acc_gemm(h, wl) + lin.bias.detach()


def _grad_streams_by_hand(dy: torch.Tensor, rng: torch.Tensor, seed: int,
                          in_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Train8's bifurcated dY (8-bit stochastic / 16-bit nearest, per sample) then MVUE 2:4 on each stream.

    Once Train8 has split dY into two streams, the chain hands GradNM the pair (GradTransform.pair), so it
    draws once on the 8-bit stream for dX, then once on the 16-bit stream for dW: no discarded draws.
    """
    torch.set_rng_state(rng)
    # Train8 draws its stochastic-rounding key from the global RNG (counter-based uniforms, one read of dY)
    gx, gw = Q.fake_quantize_minmax(dy, 8, axis=0, rounding="stochastic", also_bits=16)
    torch.testing.assert_close(gw, _q_minmax(dy, 16, axis=0), rtol=0, atol=0)
    gen = torch.Generator().manual_seed(seed)
    dx_stream = nm_prune(gx, 2, 4, "mvue", in_dim, gen)
    dw_stream = nm_prune(gw, 2, 4, "mvue", 0, gen)
    return dx_stream, dw_stream


# ------------------------------------------------------------------------------------------------- (a)
def test_four_slots_in_one_linear_and_one_conv_forward_and_backward_match_pure_ops():
    torch.manual_seed(0)
    model = _compose_all(_small())
    conv, lin = model[0], model[3]
    assert isinstance(conv, GemmConv2d) and isinstance(lin, GemmLinear)
    for layer in (conv, lin):
        kinds = [type(t).__name__ for t in layer.slots.weight]
        assert kinds == ["ActQuant", "NMMask"]
        assert [type(t) for t in layer.slots.grad_output] == [GradQuant, GradNMTransform]
        assert layer.slots.input is not None and layer.slots.accumulator is not None
        layer.add("grad_output", _Record())

    x = torch.randn(8, 8, 4, 4, requires_grad=True)
    # forward: bit-exact against the hand composition (same rounding, same chunk order)
    out = model(x)
    torch.testing.assert_close(out, _forward_by_hand(model, x.detach()), rtol=0, atol=0)

    # effective weights: 8-bit grid values under a transposable 4:8 mask
    for layer in (conv, lin):
        w_eff, mask = _w_eff(layer.weight)
        torch.testing.assert_close(layer.effective_weight(), w_eff, rtol=0, atol=0)
        assert nmops.is_transposable(layer.effective_weight().ne(0), 4, 8)

    # backward: capture the GEMM inputs, the upstream dY and the global RNG state each layer's backward starts with
    saved: dict[str, dict] = {"conv": {}, "lin": {}}
    acts: dict[str, torch.Tensor] = {}
    conv.register_forward_hook(lambda m, a, o: acts.update(conv_out=o))
    lin.register_forward_pre_hook(lambda m, a: acts.update(lin_in=a[0]))
    out = model(x)
    acts["lin_in"].retain_grad()

    def grab(key):
        def hook(g):
            saved[key].update(dy=g.detach().clone(), rng=torch.get_rng_state())
        return hook
    out.register_hook(grab("lin"))
    acts["conv_out"].register_hook(grab("conv"))
    r = torch.randn_like(out)
    x.grad = None
    (out * r).sum().backward()

    for key, layer, in_dim in (("lin", lin, -1), ("conv", conv, 1)):
        rec = layer.slots.grad_output[-1]
        dy_x, dy_w = rec.seen[-2], rec.seen[-1]  # the chain passes the dX stream first, then the dW stream
        seed = layer.slots.grad_output[1].seed
        hx, hw = _grad_streams_by_hand(saved[key]["dy"], saved[key]["rng"], seed, in_dim)
        torch.testing.assert_close(dy_x, hx, rtol=0, atol=0)
        torch.testing.assert_close(dy_w, hw, rtol=0, atol=0)
        # the pruned streams are 2:4 along each GEMM's reduction dim (out channels for dX, batch for dW)
        assert (dy_x.movedim(in_dim, -1).reshape(-1, 4).ne(0).sum(-1) <= 2).all()
        assert (dy_w.movedim(0, -1).reshape(-1, 4).ne(0).sum(-1) <= 2).all()
        for p in (layer.weight, layer.bias):
            assert p.grad is not None and torch.isfinite(p.grad).all()

    # dX = dY' W_eff (masked + quantized W; the 12-bit accumulator's default backward is the exact one)
    w_lin, m_lin = _w_eff(lin.weight)
    dy_x, dy_w = lin.slots.grad_output[-1].seen[-2:]
    # the operands are the same tensors; the GEMMs may round in another order (gamma(K) of their magnitudes)
    assert_within(acts["lin_in"].grad, dy_x @ w_lin, matmul_bound(dy_x, w_lin), "linear dX")
    hq = _q_minmax(acts["lin_in"].detach(), 8)
    assert_within(lin.weight.grad, m_lin * (dy_w.t() @ hq), matmul_bound(dy_w.t(), hq), "linear dW")
    assert_within(lin.bias.grad, dy_w.sum(0), sum_bound(dy_w, 0), "linear db")

    w_conv, m_conv = _w_eff(conv.weight)
    dy_x, dy_w = conv.slots.grad_output[-1].seen[-2:]
    k_x = dy_x.shape[1] * conv.weight[0, 0].numel()  # dX sums over out channels x taps
    bx = 2 * gamma(k_x + 2) * torch.nn.grad.conv2d_input(x.shape, w_conv.abs(), dy_x.abs(), padding=1)
    assert_within(x.grad, torch.nn.grad.conv2d_input(x.shape, w_conv, dy_x, padding=1), bx, "conv dX")
    xq = _q_minmax(x.detach(), 8)
    dw = torch.nn.grad.conv2d_weight(xq, conv.weight.shape, dy_w, padding=1)
    k_w = dy_w.numel() // dy_w.shape[1]  # dW sums over the batch x positions
    bw = 2 * gamma(k_w + 2) * torch.nn.grad.conv2d_weight(xq.abs(), conv.weight.shape, dy_w.abs(), padding=1)
    assert_within(conv.weight.grad, m_conv * dw, bw, "conv dW")
    # the input-gradient GEMM sees a transposable mask: W_eff^T is 4:8 along *its* reduction too
    assert nmops.is_nm(w_lin.t().ne(0), 4, 8)


def test_order_of_application_train8_then_nm_vs_nm_then_train8():
    torch.manual_seed(1)
    base = nn.Sequential(nn.Linear(32, 16))
    a = apply(apply(copy.deepcopy(base), Train8()), NM(4, 8, transposable=True))
    b = apply(apply(copy.deepcopy(base), NM(4, 8, transposable=True)), Train8())
    w = base[0].weight.detach()
    assert [type(t) for t in a[0].slots.weight] == [type(a[0].slots.weight[0]), NMMask]
    assert isinstance(b[0].slots.weight[0], NMMask)

    qw = _q_minmax(w, 8)
    mask_a = nmops.transposable_mask(qw, 4, 8)          # chosen on the quantized weights
    torch.testing.assert_close(a[0].effective_weight(), qw * mask_a, rtol=0, atol=0)
    mask_b = nmops.transposable_mask(w, 4, 8)           # chosen on the float weights
    torch.testing.assert_close(b[0].effective_weight(), _q_minmax(w * mask_b, 8), rtol=0, atol=0)
    for m in (a, b):
        we = m[0].effective_weight()
        assert nmops.is_transposable(we.ne(0), 4, 8)
        # on an 8-bit grid (its own range) as well: requantizing moves a value by a few roundings of the grid
        # arithmetic, relative to |value| + the range's ends
        assert_within(we, _q_minmax(we, 8), 8 * unit_roundoff() * (we.abs() + we.abs().max()), "requantized")
    # both orders train: gradients reach the kept weights only (fixed masks)
    for m, mask in ((a, mask_a), (b, mask_b)):
        m(torch.randn(8, 32)).sum().backward()
        assert (m[0].weight.grad[~mask] == 0).all() and m[0].weight.grad[mask].abs().sum() > 0


def test_sparse_training_mask_follows_the_quantized_weights():
    # recompute_every > 0 (straight-through) after Train8: every refresh is chosen on q(W)
    torch.manual_seed(2)
    m = apply(apply(nn.Sequential(nn.Linear(32, 16)), Train8()), NM(4, 8, transposable=True, recompute_every=1))
    opt = torch.optim.SGD(m.parameters(), lr=0.5)
    for _ in range(3):
        opt.zero_grad()
        m(torch.randn(8, 32)).pow(2).sum().backward()
        opt.step()
    m(torch.randn(8, 32))  # refreshes from the updated weights
    qw = _q_minmax(m[0].weight.detach(), 8)
    torch.testing.assert_close(m[0].effective_weight(), qw * nmops.transposable_mask(qw, 4, 8), rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------- (b)
def _roundtrip(model: nn.Module, run, filter=None) -> None:
    model.eval()
    apply(model, QuantConfig(w_bits=4, a_bits=None, w_estimator="minmax"), filter)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")                 # layers too small for 2:4 are skipped with a warning
        sparsify(model, NM(2, 4), filter)
    assert any(True for _ in gemm_layers(model))
    with torch.no_grad():
        wrapped = run(model)
    plain = strip(model)
    assert not any(True for _ in gemm_layers(plain))
    with torch.no_grad():
        # strip bakes each effective weight into a plain layer, which then runs the same op on the same tensors
        torch.testing.assert_close(run(plain), wrapped, rtol=0, atol=0)


def test_apply_strip_roundtrip_resnet20():
    torch.manual_seed(0)
    x = torch.randn(4, 1, 16, 16)
    _roundtrip(create("resnet20", in_chans=1, num_classes=10, width=8), lambda m: m(x))


def test_apply_strip_roundtrip_vit():
    torch.manual_seed(0)
    x = torch.randn(3, 1, 32, 32)
    _roundtrip(create("vit", num_classes=10, dim=32, depth=2, heads=4), lambda m: m(x))


def test_apply_strip_roundtrip_minilm():
    model = create("minilm")
    enc = model.tokenize(["Composition is one layer.", "A second, somewhat longer sentence for padding."])
    # two encoder layers keep the test fast; the filter is how any subset is selected
    _roundtrip(model, lambda m: m(**enc), filter=["*layer.0.*", "*layer.5.*"])


# ------------------------------------------------------------------------------------------------- (c)
def _sparse_bn_model() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                      nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                      nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 8))
    m(torch.randn(64, 8, 6, 6))  # non-trivial BN statistics
    m.eval()
    sparsify(m, NM(4, 8, transposable=True))
    return m, torch.randn(64, 8, 6, 6)


def _ptq(model: nn.Module, x: torch.Tensor, pipeline: str) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = quantize(model, PTQ(w_bits=4, a_bits=8, pipeline=pipeline, adaquant_iters=40, bias_iters=5), x,
                       progress=False)
    return res.model


def _assert_transposable_4_8(model: nn.Module) -> None:
    for name, layer in gemm_layers(model):
        keep = layer.effective_weight().ne(0)
        assert nmops.is_transposable(keep, 4, 8), f"layer {name}: density {keep.float().mean():.3f}"


@pytest.mark.parametrize("pipeline", ["rtn", "advanced"])
def test_sparsify_strip_then_ptq_keeps_nm(pipeline):
    """Stripping first bakes the zeros into the weights; every PTQ stage keeps them.

    BN folding scales whole output channels, RTN maps 0 to 0 (0 is on every grid), and AdaQuant's relative
    learning rate moves a zero latent weight by far less than half a quantization step, so it still rounds to 0.
    """
    m, x = _sparse_bn_model()
    q = _ptq(strip(copy.deepcopy(m)), x, pipeline)
    _assert_transposable_4_8(q)


@pytest.mark.parametrize("pipeline", ["rtn", "advanced"])
def test_ptq_of_a_sparsified_model_keeps_its_masks(pipeline):
    m, x = _sparse_bn_model()
    q = _ptq(m, x, pipeline)
    _assert_transposable_4_8(q)


def test_quantconfig_after_nm_keeps_the_mask():
    torch.manual_seed(0)
    m = sparsify(nn.Sequential(nn.Linear(32, 16)), NM(2, 4))
    apply(m, QuantConfig(w_bits=8, a_bits=None, w_estimator="minmax"))
    assert nmops.is_nm(m[0].effective_weight().ne(0), 2, 4)


def test_quantconfig_before_nm_composes():
    # the supported order for RTN slots: quantizer first, then the mask chained after it
    torch.manual_seed(0)
    m = apply(nn.Sequential(nn.Linear(32, 16)), QuantConfig(w_bits=8, a_bits=None, w_estimator="minmax"))
    sparsify(m, NM(2, 4))
    we = m[0].effective_weight()
    assert nmops.is_nm(we.ne(0), 2, 4)
    torch.testing.assert_close(we, m[0].slots.weight[0](m[0].weight.detach()) * m[0].slots.weight[1].mask,
                               rtol=0, atol=0)
