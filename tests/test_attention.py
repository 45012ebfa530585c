"""nn.MultiheadAttention as GemmMultiheadAttention, and the attention matmuls (Q K^T, P V) as GemmMatmul.

Empty slots: bit-identical to torch, forward and backward, for every configuration nn.MultiheadAttention
takes; apply/strip round trips into the original architecture; each slot of a matmul means what it means
for a Linear (checked against the op written out by hand).
"""
import copy
import warnings

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

from thrifty.core import apply, layer_status, strip
from thrifty.nn import GemmMatmul, GemmMultiheadAttention, GemmOp, is_gemm
from thrifty.ops.mvue import mse_mask
from thrifty.quant.accum import AccumConfig, accumulator_from_config
from thrifty.quant.train8 import Train8
from thrifty.sparse import NM
from thrifty.sparse.actgrad import ActNM, GradNM

from test_core_gemm import Copies, Identity2
from tolerance import assert_within, matmul_bound

CONFIGS = [dict(batch_first=True), dict(), dict(bias=False, batch_first=True),
           dict(add_bias_kv=True, add_zero_attn=True), dict(kdim=6, vdim=5), dict(batch_first=True, kdim=6, vdim=6)]
B, L, S, E = 3, 5, 7, 8


def _inputs(kw, mode, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (lambda n, e: (B, n, e)) if kw.get("batch_first") else (lambda n, e: (n, B, e))
    q = torch.randn(shape(S if mode == "self" else L, E), generator=g)
    k = q if mode == "self" else torch.randn(shape(S, kw.get("kdim", E)), generator=g)
    v = k if mode != "qkv" else torch.randn(shape(S, kw.get("vdim", E)), generator=g)
    return q, k, v


def _run(m, params, q, k, v, **kw):
    leaves = {id(t): t.detach().clone().requires_grad_() for t in (q, k, v)}
    q, k, v = leaves[id(q)], leaves[id(k)], leaves[id(v)]
    for p in params:
        p.grad = None
    out, w = m(q, k, v, **kw)
    (out.sin().sum() + (0 if w is None else w.cos().sum())).backward()
    return [out, w] + [t.grad for t in leaves.values()] + [p.grad for p in params]


def _same(a, b):
    return all((x is None and y is None) or torch.equal(x, y) for x, y in zip(a, b, strict=True))


def _pair(kw, seed=0):
    torch.manual_seed(seed)
    ref = nn.MultiheadAttention(E, 2, **kw)
    if ref.in_proj_bias is not None:  # torch initialises the biases to 0: make them count
        with torch.no_grad():
            ref.in_proj_bias.normal_()
            ref.out_proj.bias.normal_()
    twin = copy.deepcopy(ref)
    return ref, twin, GemmMultiheadAttention.from_mha(twin)


# (kdim/vdim configurations take distinct key and value tensors only)
CASES = [(kw, mode) for kw in CONFIGS for mode in ("self", "kv", "qkv") if mode == "qkv" or "kdim" not in kw]


@pytest.mark.parametrize("kw,mode", CASES, ids=str)
@pytest.mark.parametrize("need_weights", [True, False])
def test_empty_slots_bit_identical_forward_and_backward(kw, mode, need_weights):
    ref, twin, g = _pair(kw)
    q, k, v = _inputs(kw, mode)
    kpm = torch.zeros(B, S, dtype=torch.bool)
    kpm[1, 4:] = True
    n_q = q.shape[1] if kw.get("batch_first") else q.shape[0]
    am = torch.randn(n_q, S)
    for extra in ({}, dict(key_padding_mask=kpm), dict(attn_mask=am, key_padding_mask=kpm.float() * -1e4),
                  dict(attn_mask=am > 1, average_attn_weights=False)):
        a = _run(ref, list(ref.parameters()), q, k, v, need_weights=need_weights, **extra)
        b = _run(g, list(twin.parameters()), q, k, v, need_weights=need_weights, **extra)
        assert _same(a, b), (extra.keys(), need_weights)


@pytest.mark.parametrize("grad_t", [Identity2, Copies])
def test_custom_backward_of_the_projections_is_bit_identical(grad_t):
    # the autograd Function path (a grad_output slot that changes nothing), on row ranges of the packed weight too
    for kw, mode in ((dict(batch_first=True), "kv"), (dict(), "qkv"), (dict(kdim=6, vdim=5), "qkv"), ({}, "self")):
        ref, twin, g = _pair(kw)
        for _, layer in g.named_children():
            if is_gemm(layer):
                layer.add("grad_output", grad_t())
        q, k, v = _inputs(kw, mode, seed=1)
        assert _same(_run(ref, list(ref.parameters()), q, k, v), _run(g, list(twin.parameters()), q, k, v))


def test_unbatched_causal_and_dropout_match_torch():
    ref, twin, g = _pair(dict(batch_first=True))
    x = torch.randn(S, E)
    causal = nn.Transformer.generate_square_subsequent_mask(S)
    for kw in (dict(), dict(attn_mask=causal, is_causal=True, need_weights=False),
               dict(attn_mask=causal, is_causal=True), dict(key_padding_mask=torch.arange(S) > 5)):
        assert _same(_run(ref, list(ref.parameters()), x, x, x, **kw), _run(g, list(twin.parameters()), x, x, x, **kw))
    ref.dropout = g.dropout = 0.5
    xb = torch.randn(B, S, E)
    torch.manual_seed(3)
    a = _run(ref, list(ref.parameters()), xb, xb, xb)
    torch.manual_seed(3)
    assert _same(a, _run(g, list(twin.parameters()), xb, xb, xb))


def test_transformer_encoder_layer_trains_bit_identically_and_strips_into_the_original():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True)
    ref = copy.deepcopy(layer)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no GEMM is left out
        apply(layer, NM(2, 4), filter="self_attn.*")
    attn = layer.self_attn
    assert isinstance(attn, GemmMultiheadAttention) and attn.in_proj_weight is attn.in_proj.weight
    x = torch.randn(2, 6, 16)
    # same weights in the reference, then the two must agree bit for bit (module path: training mode)
    with torch.no_grad():
        ref.self_attn.in_proj_weight.copy_(attn.in_proj.effective_weight())
        ref.self_attn.out_proj.weight.copy_(attn.out_proj.effective_weight())
    assert torch.equal(layer(x), ref(x))
    plain = strip(copy.deepcopy(layer))
    assert type(plain.self_attn) is nn.MultiheadAttention
    assert type(plain.self_attn.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
    fresh = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True)
    fresh.load_state_dict(plain.state_dict(), strict=True)
    assert float(fresh.self_attn.in_proj_weight.eq(0).float().mean()) == 0.5
    assert torch.equal(fresh(x), layer(x))


def test_bare_attention_is_converted_in_place_and_restored_on_failure():
    torch.manual_seed(0)
    m = nn.MultiheadAttention(8, 2, kdim=4, vdim=4)
    params = dict(m.named_parameters())
    with pytest.raises(ValueError, match="cannot take 2:8"):
        apply(m, NM(2, 8), filter=["k_proj", "q_proj"])  # k_proj: reduction 4 < M = 8
    assert type(m) is nn.MultiheadAttention and dict(m.named_parameters()) == params
    assert set(m._modules) == {"out_proj"}
    apply(m, NM(2, 4), filter=["k_proj", "q_proj"])
    assert type(m) is GemmMultiheadAttention and m.v_proj.slots.empty()
    plain = strip(m)
    assert type(plain) is nn.MultiheadAttention and set(plain.state_dict()) == set(params)
    assert float(plain.k_proj_weight.eq(0).float().mean()) == 0.5 and plain.in_proj_bias is params["in_proj_bias"]


def test_matmuls_are_opt_in_by_name():
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 4, 32, batch_first=True), 1, enable_nested_tensor=False)
    assert not any(n.endswith((".qk", ".pv")) for n, _, _ in layer_status(enc))
    apply(enc, Train8(), filter=None)
    attn = enc.layers[0].self_attn
    assert attn.qk.slots.empty() and attn.pv.slots.empty()
    with pytest.raises(ValueError, match="no nn.Linear"):
        apply(nn.Sequential(nn.MultiheadAttention(8, 2)), Train8(), filter=lambda m, n: isinstance(m, GemmMatmul))
    apply(enc, Train8(), filter=["*.qk", "*.pv"])
    assert attn.qk.slots.input is not None and attn.pv.slots.grad_output is not None
    x = torch.randn(2, 5, 16)
    enc(x).square().mean().backward()
    assert torch.isfinite(attn.in_proj.weight.grad).all()
    assert type(strip(enc).layers[0].self_attn) is nn.MultiheadAttention


# ------------------------------------------------------------------ GemmMatmul, the slots' meaning


def _mm_run(fn, a, b, dy):
    a, b = a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    y = fn(a, b)
    y.backward(dy)
    return y.detach(), a.grad, b.grad


@given(st.integers(1, 3), st.integers(1, 6), st.integers(1, 6), st.integers(1, 9), st.integers(0, 2**16))
@settings(max_examples=20, deadline=None)
def test_matmul_exact_when_empty_and_custom_backward_within_rounding(bat, m, n, k, seed):
    g = torch.Generator().manual_seed(seed)
    a, b, dy = torch.randn(bat, 2, m, k, generator=g), torch.randn(bat, 2, n, k, generator=g), torch.randn(
        bat, 2, m, n, generator=g)
    mm = GemmMatmul()
    ref = _mm_run(lambda x, w: torch.matmul(x, w.transpose(-2, -1)), a, b, dy)
    assert _same(ref, _mm_run(mm, a, b, dy))
    mask = torch.randn(bat * 2, m, n, generator=g)
    a3, b3, dy3 = a.flatten(0, 1), b.flatten(0, 1), dy.flatten(0, 1)
    ref3 = _mm_run(lambda x, w: torch.baddbmm(mask, x, w.transpose(-2, -1)), a3, b3, dy3)
    assert _same(ref3, _mm_run(lambda x, w: mm(x, w, mask, op="bmm"), a3, b3, dy3))
    mm.add("grad_output", Copies())  # dA = dY B, dB = dY^T A by hand: another summation order at most
    y, da, db = _mm_run(mm, a, b, dy)
    assert torch.equal(y, ref[0])
    assert_within(da, ref[1], matmul_bound(dy, b))
    assert_within(db, ref[2], matmul_bound(dy.transpose(-2, -1), a))


def test_matmul_slots_mean_what_they_mean_for_a_linear():
    torch.manual_seed(0)
    q, k, dy = torch.randn(4, 5, 8), torch.randn(4, 6, 8), torch.randn(4, 5, 6)
    mm = GemmMatmul()
    apply(nn.ModuleDict({"qk": mm}), ActNM(2, 4), filter="qk")  # input: the left operand, blocks along K
    keep = mse_mask(q, 2, 4, dim=-1)
    assert torch.equal(mm(q, k), torch.matmul(q * keep, k.transpose(-2, -1)))
    mm2 = GemmMatmul()
    apply(nn.ModuleDict({"pv": mm2}), GradNM(2, 4, gemms=("weight",), method="mse"), filter="pv")
    b = k.detach().clone().requires_grad_()
    mm2(q, b).backward(dy)  # dB = dY^T A, dY pruned 2:4 along its reduction M (dim -2)
    pruned = dy * mse_mask(dy, 2, 4, dim=-2)
    assert_within(b.grad, torch.matmul(pruned.transpose(-2, -1), q), matmul_bound(pruned.transpose(-2, -1), q))
    assert mm2.op.weight_grad_dim == -2 and GemmOp("linear").weight_grad_dim == 0


def test_matmul_accumulator_is_the_linear_accumulator_per_batch_entry():
    torch.manual_seed(0)
    p, vt = torch.rand(3, 4, 16), torch.randn(3, 5, 16)
    cfg = AccumConfig(exp_bits=4, man_bits=3, chunk=4)
    mm = GemmMatmul()
    apply(nn.ModuleDict({"pv": mm}), cfg, filter="*pv")
    acc = accumulator_from_config(cfg)
    want = torch.stack([acc(GemmOp("linear"), p[i], vt[i], None) for i in range(3)])
    got = mm(p, vt)
    assert torch.equal(got, want) and not torch.equal(got, torch.matmul(p, vt.transpose(-2, -1)))
    a = p.clone().requires_grad_()
    mm(a, vt).sum().backward()  # the straight-through backward: the exact one
    assert_within(a.grad, torch.ones(3, 4, 5) @ vt, matmul_bound(torch.ones(3, 4, 5), vt))
    with pytest.raises(ValueError, match="no weight to prune"):
        apply(nn.ModuleDict({"pv": GemmMatmul()}), NM(2, 4), filter="pv")


def test_quantize_save_load_and_adaprune_reach_the_attention_projections(tmp_path):
    from thrifty.quant import PTQ, load_quantized, quantize, save_quantized
    from thrifty.sparse.adaprune import adaprune

    torch.manual_seed(0)
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True), 1,
                                enable_nested_tensor=False).eval()
    x = torch.randn(8, 6, 16)
    cfg = PTQ(pipeline="rtn", w_bits=4, a_bits=8, w_estimator="minmax", a_estimator="minmax")
    res = quantize(copy.deepcopy(enc), cfg, x, filter="*.in_proj", progress=False)
    assert set(res.bits) == {"layers.0.self_attn.in_proj"}
    save_quantized(res, tmp_path / "q")
    back, _ = load_quantized(tmp_path / "q", enc)
    with torch.no_grad():
        assert torch.equal(back(x), res.model(x))
    report = adaprune(copy.deepcopy(enc), NM(2, 4), x, steps=2, progress=False)  # before: KeyError on in_proj
    assert {"layers.0.self_attn.in_proj", "layers.0.self_attn.out_proj"} <= set(report)
