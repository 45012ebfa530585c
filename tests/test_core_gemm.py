"""The wrapped GEMM layer: exactness with empty slots, slot semantics, composition."""
import copy

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

from thrifty.nn import Accumulator, Chain, GemmConv2d, GemmLinear, GradTransform, gemm_layers, wrap
from thrifty.ops import ste
from tolerance import assert_within, gamma, matmul_bound


class Identity2(GradTransform):
    """Forces the custom autograd Function path while changing nothing."""

    def forward(self, dy):
        return dy, dy


class Copies(GradTransform):
    """Two distinct tensors: exercises the separate dX / dW backward calls."""

    def forward(self, dy):
        return dy.clone(), dy.clone()


class Scale(GradTransform):
    def __init__(self, sx, sw):
        super().__init__()
        self.sx, self.sw = sx, sw

    def forward(self, dy):
        return dy * self.sx, dy * self.sw


class ExactAcc(Accumulator):
    def forward(self, op, x, w, bias):
        return op(x, w, bias)


def _run(layer, x, dy):
    x = x.detach().clone().requires_grad_()
    y = layer(x)
    y.backward(dy)
    return y.detach(), x.grad, layer.weight.grad, None if layer.bias is None else layer.bias.grad


def _grad_bounds(ref, x, dy, scale):
    """Bounds on |scale * grad - grad of (scale * dy)| for dX, dW, db (dy scaled once or twice): each side is a
    sum of products rounded in some order, within gamma(K + 2) of its magnitude (the same sums over |x|, |W|,
    |dy|; K <= numel)."""
    absref = copy.deepcopy(ref)
    with torch.no_grad():
        for p in absref.parameters():
            p.abs_()
    k = max(x.numel(), dy.numel(), ref.weight.numel())
    return [None if m is None else 2 * scale * gamma(k + 2) * m for m in _run(absref, x.abs(), dy.abs())[1:]]


LAYERS = [
    (lambda: nn.Linear(7, 5), (3, 7)),
    (lambda: nn.Linear(7, 5), (2, 3, 7)),
    (lambda: nn.Linear(6, 4, bias=False), (4, 6)),
    (lambda: nn.Conv2d(4, 6, 3, stride=2, padding=1), (2, 4, 9, 9)),
    (lambda: nn.Conv2d(4, 8, 3, padding=2, dilation=2, groups=2), (2, 4, 7, 8)),
    (lambda: nn.Conv2d(4, 4, 1, bias=False, groups=4), (1, 4, 5, 5)),
    (lambda: nn.Conv2d(3, 4, 3, padding="same"), (2, 3, 6, 6)),
    (lambda: nn.Conv2d(3, 6, (3, 5), stride=(2, 1), padding=(0, 2), groups=3), (2, 3, 8, 11)),
]


@pytest.mark.parametrize("make,shape", LAYERS)
@pytest.mark.parametrize("grad_t", [None, Identity2, Copies])
def test_empty_slots_bit_identical(make, shape, grad_t):
    torch.manual_seed(0)
    ref = make()
    g = wrap(copy.deepcopy(ref))
    if grad_t is not None:
        g.add("grad_output", grad_t())
    x = torch.randn(*shape)
    dy = torch.randn_like(ref(x))
    # empty slots call the same torch ops on the same tensors: bit-identical by construction, on any CPU
    for a, b in zip(_run(ref, x, dy), _run(g, x, dy)):
        assert (a is None and b is None) or torch.equal(a, b)


@settings(max_examples=25, deadline=None)
@given(
    cin=st.integers(1, 3), cout=st.integers(1, 3), groups=st.sampled_from([1, 2]),
    k=st.integers(1, 3), stride=st.integers(1, 2), pad=st.integers(0, 2), hw=st.integers(3, 7),
    bias=st.booleans(),
)
def test_conv_exact_property(cin, cout, groups, k, stride, pad, hw, bias):
    cin, cout = cin * groups, cout * groups
    torch.manual_seed(1)
    ref = nn.Conv2d(cin, cout, k, stride, pad, groups=groups, bias=bias)
    g = wrap(copy.deepcopy(ref)).add("grad_output", Copies())
    x = torch.randn(2, cin, hw, hw)
    dy = torch.randn_like(ref(x))
    for a, b in zip(_run(ref, x, dy), _run(g, x, dy)):
        assert (a is None and b is None) or torch.equal(a, b)


def test_wrap_shares_parameters_and_keeps_isinstance():
    lin = nn.Linear(3, 2)
    g = wrap(lin)
    assert isinstance(g, nn.Linear) and isinstance(g, GemmLinear)
    assert g.weight is lin.weight and g.bias is lin.bias
    assert wrap(g) is g
    assert set(g.state_dict()) == {"weight", "bias"}


def test_wrap_rejects_other_layers_naming_them():
    with pytest.raises(TypeError, match=r"BatchNorm2d \(layer 'blocks.0'\)"):
        wrap(nn.BatchNorm2d(3), "blocks.0")
    with pytest.raises(TypeError, match="padding_mode"):
        wrap(nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect"), "c")
    with pytest.raises(TypeError, match="even effective kernel"):
        wrap(nn.Conv2d(2, 2, 2, padding="same"), "c")


def test_weight_and_input_slots_use_their_own_backward():
    torch.manual_seed(0)
    g = wrap(nn.Linear(4, 3, bias=False))
    g.add("weight", _Round()).add("input", _Mul(3.0))
    x = torch.randn(5, 4, requires_grad=True)
    y = g(x)
    wq, xin = torch.round(g.weight.detach()), 3.0 * x.detach()
    assert_within(y, xin @ wq.t(), matmul_bound(xin, wq.t()), "output")
    dy = torch.randn(5, 3)
    y.backward(dy)
    # weight slot: straight through the rounding, so dW = dY^T (transformed input), as for the plain layer
    assert_within(g.weight.grad, dy.t() @ xin, matmul_bound(dy.t(), xin), "dW")
    # input slot: its own backward (d(3x)/dx = 3) after dY W_q; without the slot's backward dX would be dY W_q
    assert_within(x.grad, 3.0 * (dy @ wq), 3.0 * matmul_bound(dy, wq, extra=1), "dX")


class _Round(nn.Module):
    def forward(self, w):
        return ste(w, torch.round(w))


class _Mul(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c = c

    def forward(self, t):
        return t * self.c


def test_chain_composes_in_order():
    g = wrap(nn.Linear(2, 2, bias=False))
    with torch.no_grad():
        g.weight.copy_(torch.tensor([[0.3, 1.4], [2.6, -0.2]]))
    g.add("weight", _Mul(10.0)).add("weight", _Round())
    assert isinstance(g.slots.weight, Chain)
    assert torch.equal(g.effective_weight(), torch.round(g.weight.detach() * 10))


def test_grad_output_streams_reach_the_right_gemm():
    torch.manual_seed(0)
    for make, shape in LAYERS[:2] + LAYERS[3:5]:
        ref = make()
        g = wrap(copy.deepcopy(ref)).add("grad_output", Scale(2.0, 3.0))
        x = torch.randn(*shape)
        dy = torch.randn_like(ref(x))
        _, dx0, dw0, db0 = _run(ref, x, dy)
        _, dx1, dw1, db1 = _run(g, x, dy)
        assert_within(dx1, 2 * dx0, _grad_bounds(ref, x, dy, 2.0)[0], "dX")
        bx, bw, bb = _grad_bounds(ref, x, dy, 3.0)
        assert_within(dw1, 3 * dw0, bw, "dW")
        assert_within(db1, 3 * db0, bb, "db")


def test_grad_chain_threads_both_streams():
    g = wrap(nn.Linear(3, 2)).add("grad_output", Scale(2.0, 3.0)).add("grad_output", Scale(5.0, 7.0))
    ref = copy.deepcopy(nn.Linear(3, 2))
    ref.load_state_dict({k: v for k, v in g.state_dict().items() if not k.startswith("slots")})
    x = torch.randn(4, 3)
    dy = torch.randn(4, 2)
    _, dx0, dw0, _ = _run(ref, x, dy)
    _, dx1, dw1, _ = _run(g, x, dy)
    assert_within(dx1, 10 * dx0, _grad_bounds(ref, x, dy, 10.0)[0], "dX")
    assert_within(dw1, 21 * dw0, _grad_bounds(ref, x, dy, 21.0)[1], "dW")


def test_accumulator_slot_forward_and_default_backward():
    torch.manual_seed(0)
    for make, shape in LAYERS:
        ref = make()
        g = wrap(copy.deepcopy(ref)).add("accumulator", ExactAcc())
        x = torch.randn(*shape)
        dy = torch.randn_like(ref(x))
        for a, b in zip(_run(ref, x, dy), _run(g, x, dy)):
            assert (a is None and b is None) or torch.equal(a, b)


def test_slot_type_errors():
    g = wrap(nn.Linear(2, 2))
    with pytest.raises(TypeError, match="GradTransform"):
        g.add("grad_output", nn.Identity())
    with pytest.raises(TypeError, match="Accumulator"):
        g.add("accumulator", nn.Identity())
    with pytest.raises(ValueError, match="unknown slot"):
        g.add("bias", nn.Identity())


def test_gemm_layers_and_constructors():
    m = nn.Sequential(GemmLinear(3, 3), nn.ReLU(), GemmConv2d(1, 1, 1))
    assert [n for n, _ in gemm_layers(m)] == ["0", "2"]
    assert GemmConv2d(1, 2, 3)(torch.randn(1, 1, 4, 4)).shape == (1, 2, 2, 2)
