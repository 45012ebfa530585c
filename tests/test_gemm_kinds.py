"""Every GEMM kind thrifty wraps: Conv1d, ConvTranspose1d/2d, GPT-2 Conv1D, Embedding.

Exactness with empty slots (forward and backward), the meaning of each slot in each weight layout
(checked against an equivalent Linear / Conv2d or by brute force), clear refusals, strip.
"""
import copy
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import thrifty as th
from thrifty.core import apply, strip
from thrifty.models import create
from thrifty.nn import GemmOp, SlotRefused, gemm_like, is_gemm, why_not_wrappable, wrap
from thrifty.quant.accum import AccumConfig
from thrifty.quant.config import QuantConfig
from thrifty.quant.train8 import Train8
from thrifty.sparse import NM
from thrifty.sparse.actgrad import ActNM, GradNM

from test_core_gemm import Copies, Identity2  # GradTransforms that force the custom autograd path

Conv1D = pytest.importorskip("transformers.pytorch_utils").Conv1D


def _gpt2_conv1d(nf, nx):
    torch.manual_seed(0)
    m = Conv1D(nf, nx)
    with torch.no_grad():
        m.bias.normal_()
    return m


LAYERS = [
    (lambda: nn.Conv1d(4, 6, 3, stride=2, padding=1), (2, 4, 9)),
    (lambda: nn.Conv1d(4, 8, 3, padding=2, dilation=2, groups=2), (2, 4, 11)),
    (lambda: nn.Conv1d(3, 4, 5, padding="same", bias=False), (2, 3, 7)),
    (lambda: nn.Conv1d(3, 4, 3), (3, 10)),  # unbatched
    (lambda: nn.ConvTranspose1d(4, 6, 3, stride=2, padding=1, output_padding=1), (2, 4, 7)),
    (lambda: nn.ConvTranspose1d(4, 6, 3, stride=3, groups=2, dilation=2, bias=False), (2, 4, 5)),
    (lambda: nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1), (2, 4, 5, 5)),
    (lambda: nn.ConvTranspose2d(4, 8, (3, 2), stride=(2, 1), groups=2, dilation=(1, 2)), (2, 4, 4, 6)),
    (lambda: nn.ConvTranspose2d(3, 4, 3), (3, 5, 5)),  # unbatched
    (lambda: _gpt2_conv1d(5, 7), (2, 3, 7)),
    (lambda: _gpt2_conv1d(5, 7), (4, 7)),
]


def _run(layer, x, dy, **kw):
    x = x.detach().clone().requires_grad_()
    y = layer(x, **kw)
    y.backward(dy)
    return [y.detach(), x.grad, layer.weight.grad, None if layer.bias is None else layer.bias.grad]


@pytest.mark.parametrize("grad_t", [None, Identity2, Copies])
@pytest.mark.parametrize("make,shape", LAYERS)
def test_empty_slots_bit_identical_forward_and_backward(make, shape, grad_t):
    torch.manual_seed(1)
    ref_layer = make()
    layer = wrap(copy.deepcopy(ref_layer))
    assert is_gemm(layer)
    if grad_t is not None:  # the custom autograd Function: aten's own backward, the same ops
        layer.add("grad_output", grad_t())
    x = torch.randn(shape)
    dy = torch.randn_like(ref_layer(x))
    for a, b in zip(_run(ref_layer, x, dy), _run(layer, x, dy)):
        assert (a is None and b is None) or torch.equal(a, b)


def test_conv_transpose_output_size_and_embedding_exact():
    torch.manual_seed(0)
    ct = nn.ConvTranspose2d(3, 4, 3, stride=2)
    w = wrap(copy.deepcopy(ct))
    x = torch.randn(2, 3, 5, 5)
    dy = torch.randn(2, 4, 12, 12)
    for a, b in zip(_run(ct, x, dy, output_size=[12, 12]), _run(w, x, dy, output_size=[12, 12])):
        assert torch.equal(a, b)
    emb = nn.Embedding(11, 6, padding_idx=0, scale_grad_by_freq=True)
    we = wrap(copy.deepcopy(emb))
    ids = torch.tensor([[0, 3, 3, 10], [1, 2, 0, 3]])
    ya, yb = emb(ids), we(ids)
    g = torch.randn_like(ya)
    ya.backward(g)
    yb.backward(g)
    assert torch.equal(ya, yb) and torch.equal(emb.weight.grad, we.weight.grad)


@settings(max_examples=25, deadline=None)
@given(cin=st.sampled_from([2, 4]), cout=st.sampled_from([2, 6]), groups=st.sampled_from([1, 2]),
       k=st.integers(1, 4), stride=st.integers(1, 3), pad=st.integers(0, 2), dil=st.integers(1, 2),
       length=st.integers(4, 9), transposed=st.booleans())
def test_1d_kinds_exact_property(cin, cout, groups, k, stride, pad, dil, length, transposed):
    torch.manual_seed(0)
    if transposed:
        if (length - 1) * stride - 2 * pad + dil * (k - 1) + min(stride, dil) < 1:
            return  # no output: torch refuses the layer itself
        ref = nn.ConvTranspose1d(cin, cout, k, stride, pad, output_padding=min(stride, dil) - 1, groups=groups,
                                 dilation=dil)
    else:
        if length + 2 * pad < dil * (k - 1) + 1:
            return
        ref = nn.Conv1d(cin, cout, k, stride, pad, dil, groups)
    layer = wrap(copy.deepcopy(ref))
    layer.add("grad_output", Copies())
    x = torch.randn(2, cin, length)
    dy = torch.randn_like(ref(x))
    for a, b in zip(_run(ref, x, dy), _run(layer, x, dy)):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------------------ slot meaning

def _linear_from_gpt2(c):
    lin = nn.Linear(c.weight.shape[0], c.weight.shape[1])
    with torch.no_grad():
        lin.weight.copy_(c.weight.t())
        lin.bias.copy_(c.bias)
    return lin


@pytest.mark.parametrize("transposable", [False, True])
def test_gpt2_conv1d_slots_mean_what_they_mean_for_the_equivalent_linear(transposable):
    c = _gpt2_conv1d(8, 12)
    lin = _linear_from_gpt2(c)
    mc, ml = nn.Sequential(copy.deepcopy(c)), nn.Sequential(lin)
    th.sparsify(mc, NM(2, 4, transposable=transposable))
    th.sparsify(ml, NM(2, 4, transposable=transposable))
    assert torch.equal(mc[0].effective_weight().t(), ml[0].effective_weight())  # blocks along `in`: dim 0 here
    qc, ql = nn.Sequential(copy.deepcopy(c)), nn.Sequential(_linear_from_gpt2(c))
    apply(qc, QuantConfig(w_bits=4, a_bits=None, per_channel=True))
    apply(ql, QuantConfig(w_bits=4, a_bits=None, per_channel=True))
    assert qc[0].slots.weight.axis == 1  # one scale per output feature nf
    torch.testing.assert_close(qc[0].effective_weight().t(), ql[0].effective_weight(), rtol=0, atol=0)
    g = nn.Sequential(copy.deepcopy(c))
    apply(g, GradNM(2, 4, seed=0))
    assert g[0].slots.grad_output.input_dim == -1  # dX = dY W^T reduces over the output features


def test_conv1d_slots_match_the_equivalent_height_one_conv2d():
    torch.manual_seed(0)
    c1 = nn.Conv1d(8, 8, 3, padding=1, groups=2)
    c2 = nn.Conv2d(8, 8, (1, 3), padding=(0, 1), groups=2)
    with torch.no_grad():
        c2.weight.copy_(c1.weight.unsqueeze(2))
        c2.bias.copy_(c1.bias)
    m1, m2 = nn.Sequential(c1), nn.Sequential(c2)
    th.sparsify(m1, NM(2, 4, transposable=True))
    th.sparsify(m2, NM(2, 4, transposable=True))
    assert torch.equal(m1[0].effective_weight().unsqueeze(2), m2[0].effective_weight())
    acc = AccumConfig(exp_bits=4, man_bits=3, chunk=4, backward="fine")
    apply(m1, acc)
    apply(m2, acc)
    x = torch.randn(2, 8, 9)
    x1, x2 = x.clone().requires_grad_(), x.unsqueeze(2).clone().requires_grad_()
    y1, y2 = m1(x1), m2(x2)
    assert torch.equal(y1.unsqueeze(2), y2)  # the same low-bit accumulation, in the same order
    assert not torch.equal(y1, F.conv1d(x, m1[0].effective_weight(), c1.bias, 1, 1, 1, 2))  # it did round
    dy = torch.randn_like(y1)
    y1.backward(dy)
    y2.backward(dy.unsqueeze(2))
    assert torch.equal(x1.grad.unsqueeze(2), x2.grad) and torch.equal(m1[0].weight.grad.unsqueeze(2), m2[0].weight.grad)


def test_gpt2_conv1d_accumulator_matches_the_equivalent_linear():
    c = _gpt2_conv1d(6, 10)
    mc, ml = nn.Sequential(c), nn.Sequential(_linear_from_gpt2(c))
    acc = AccumConfig(exp_bits=4, man_bits=3, chunk=4, backward="fine")
    apply(mc, acc)
    apply(ml, acc)
    x = torch.randn(3, 5, 10)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = mc(xa), ml(xb)
    assert torch.equal(ya, yb)
    ya.sum().backward()
    yb.sum().backward()
    assert torch.equal(xa.grad, xb.grad) and torch.equal(mc[0].weight.grad.t(), ml[0].weight.grad)


@pytest.mark.parametrize("groups", [1, 2])
def test_conv_transpose_gemm_weight_is_the_equivalent_conv_weight(groups):
    # stride-1 transposed conv == conv of the (k-1)-padded input with the flipped GEMM weight
    torch.manual_seed(0)
    ct = nn.ConvTranspose2d(4, 6, (3, 2), groups=groups, bias=False)
    op = wrap(ct).op
    gw = op.gemm_weight(ct.weight)
    assert tuple(gw.shape) == (6, 4 // groups, 3, 2)
    assert torch.equal(op.from_gemm_weight(gw, ct.weight.shape), ct.weight)
    x = torch.randn(2, 4, 5, 5)
    ref = F.conv2d(F.pad(x, (1, 1, 2, 2)), gw.flip(-1, -2), groups=groups)
    torch.testing.assert_close(ct(x), ref, rtol=0, atol=8 * torch.finfo(torch.float32).eps * 4 * 6 * x.abs().max())


@pytest.mark.parametrize("groups,transposable", [(1, False), (2, False), (1, True)])
def test_conv_transpose_nm_blocks_run_along_input_channels(groups, transposable):
    torch.manual_seed(0)
    ct = nn.ConvTranspose2d(16, 8, 3, stride=2, groups=groups)
    m = nn.Sequential(ct)
    th.sparsify(m, NM(2, 4, transposable=transposable))
    mask = m[0].effective_weight().ne(0)  # stored [in, out/g, kh, kw]
    cig = 16 // groups
    for g in range(groups):  # brute force: every 4 consecutive input channels of a group, at each (out, tap)
        blk = mask[g * cig:(g + 1) * cig].reshape(cig // 4, 4, -1)
        assert torch.all(blk.sum(1) == 2)
    if transposable:  # and every 4 consecutive output channels at each (in, tap)
        assert torch.all(mask.reshape(16, 2, 4, 9).sum(2) == 2)
    x = torch.randn(2, 16, 4, 4)
    y = m(x)
    plain = strip(m)
    assert type(plain[0]) is nn.ConvTranspose2d and torch.equal(plain(x), y)


def test_refused_slots_name_the_layer():
    model = nn.Sequential(nn.Linear(4, 4), nn.ConvTranspose1d(4, 4, 3))
    with pytest.raises(SlotRefused, match=r"AccumConfig on layer '1': GemmConvTranspose1d has no accumulator slot"):
        apply(model, AccumConfig())
    assert type(model[1]) is nn.ConvTranspose1d  # restored
    grouped = nn.Sequential(nn.ConvTranspose2d(4, 4, 3, groups=2))
    with pytest.raises(SlotRefused, match=r"layer '0'.*no single output-channel axis"):
        apply(grouped, QuantConfig(w_bits=8, a_bits=8, per_channel=True))
    apply(grouped, QuantConfig(w_bits=8, a_bits=8, per_channel=False))
    emb = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 4))
    for cfg, slot in [(ActNM(2, 4), "input"), (GradNM(2, 4), "grad_output"), (AccumConfig(), "accumulator"),
                      (Train8(), "input"), (Train8(act_bits=None), "grad_output")]:
        with pytest.raises(SlotRefused, match=rf"layer '0'.*no {slot} slot: nn.Embedding is a table lookup"):
            apply(emb, cfg, filter="0")
        assert type(emb[0]) is nn.Embedding
    with pytest.raises(ValueError, match=r"layer '0' cannot take 2:4 sparsity: .*table lookup"):
        th.sparsify(emb, NM(2, 4), filter="0")
    e = wrap(nn.Embedding(10, 8))
    e.slots.input = nn.Identity()  # set behind add()'s back: refused at the forward
    with pytest.raises(SlotRefused, match="no input slot"):
        e(torch.tensor([1]))
    assert why_not_wrappable(nn.Embedding(5, 4, max_norm=1.0)).startswith("Embedding with max_norm")


def test_embedding_is_wrapped_only_when_named_and_quantized_per_row():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(20, 8), nn.Linear(8, 4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # not a refused GEMM: nothing to warn about
        apply(copy.deepcopy(model), GradNM(2, 4))
    m = apply(copy.deepcopy(model), GradNM(2, 4))
    assert type(m[0]) is nn.Embedding and is_gemm(m[1])
    q = apply(copy.deepcopy(model), QuantConfig(w_bits=4, a_bits=8), filter=["0", "1"])
    wq = q[0].slots.weight
    assert q[0].slots.input is None and wq.axis == 0 and wq.scale.numel() == 20  # one scale per table row
    assert q[1].slots.input is not None
    ids = torch.randint(0, 20, (3, 5))
    levels = [len(torch.unique(r)) for r in q[0].effective_weight()]
    assert max(levels) <= 16
    out, looked_up = q(ids), q[0](ids)
    plain = strip(q)
    assert type(plain[0]) is nn.Embedding and torch.equal(plain[0].weight, wq(model[0].weight))
    assert torch.equal(plain[0](ids), looked_up)  # (the Linear's input quantizer is dropped by strip)
    assert out.shape == (3, 5, 4)


def test_strip_gives_back_the_original_classes():
    c = _gpt2_conv1d(8, 8)
    model = nn.Sequential(c, nn.Conv1d(8, 8, 3, padding=1), nn.ConvTranspose1d(8, 8, 3, padding=1))
    x = torch.randn(2, 8, 8)

    def run(m):
        return m[2](m[1](m[0](x)))

    th.sparsify(model, NM(2, 4))
    with torch.no_grad():
        y = run(model)
    plain = strip(model)
    assert [type(m) for m in plain] == [Conv1D, nn.Conv1d, nn.ConvTranspose1d]
    assert plain[0].nf == 8 and plain[0].nx == 8 and plain[0].bias is c.bias
    with torch.no_grad():
        assert torch.equal(run(plain), y)
    assert float(plain[0].weight.eq(0).float().mean()) == 0.5


def test_cnn1d_gets_all_its_convs_wrapped():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = apply(create("cnn1d"), GradNM(2, 4))
    assert {n for n, m in model.named_modules() if is_gemm(m)} == {"conv1", "conv2", "conv3", "head"}
    assert all(model.get_submodule(n).slots.grad_output.input_dim == 1 for n in ("conv1", "conv2", "conv3"))


def test_op_layout_helpers():
    op = GemmOp("linear_t")
    w = torch.randn(3, 5)
    assert op.out_axis == 1 and torch.equal(op.from_gemm_weight(op.gemm_weight(w), w.shape), w)
    assert GemmOp("conv_transpose2d", groups=2).out_axis is None and GemmOp("embedding").out_axis == 0
    with pytest.raises(SlotRefused, match="no plain-GEMM accumulation order"):
        GemmOp("conv_transpose1d").canonical()


def _w8a8_bound(n_gemms: int, bits: int = 8, crest: float = 4.0) -> float:
    # Each GEMM rounds two operands to steps of range/(2^b - 1) with range <= 2 * crest * rms (min-max ranges of
    # these random-init tensors); a rounding error is ~uniform (rms step/sqrt(12)) and independent roundings add
    # in quadrature through the network.
    return (2 * n_gemms) ** 0.5 * 2 * crest / (2**bits - 1) / 12**0.5


def _coverage(model):
    gemms = [m for m in model.modules() if gemm_like(m) or is_gemm(m)]
    return sum(map(is_gemm, gemms)), len(gemms)


def test_transformers_gpt2_and_whisper_encoder_get_every_gemm_quantized():
    tf = pytest.importorskip("transformers")
    from transformers.models.whisper.modeling_whisper import WhisperEncoder
    from thrifty.quant import PTQ, quantize

    torch.manual_seed(0)
    cfg = PTQ(w_bits=8, a_bits=8, pipeline="rtn", w_estimator="minmax", a_estimator="minmax")
    gpt = tf.GPT2LMHeadModel(tf.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=64, n_positions=16)).eval()
    ids = torch.randint(0, 64, (2, 8))
    enc = WhisperEncoder(tf.WhisperConfig(d_model=64, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=128,
                                          num_mel_bins=16, max_source_positions=16)).eval()
    feats = torch.randn(2, 16, 32)
    for model, batch, n in [(gpt, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, 9),
                            (enc, {"input_features": feats}, 14)]:
        assert _coverage(model) == (0, n)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the embeddings stay FP (named in a warning)
            res = quantize(model, cfg, [batch], progress=False)
        assert _coverage(res.model) == (n, n)  # GPT-2's Conv1D and Whisper's Conv1d included
        with torch.no_grad():
            ref, out = model(**batch)[0], res.model(**batch)[0]
        assert float((out - ref).norm() / ref.norm()) <= _w8a8_bound(n)


def test_save_sparse_round_trips_transposed_layouts(tmp_path):
    from thrifty.sparse.storage import load_sparse, save_sparse

    model = nn.Sequential(_gpt2_conv1d(8, 16), nn.ConvTranspose1d(16, 8, 3, groups=2))
    th.sparsify(model, NM(2, 4))
    info = save_sparse(model, tmp_path / "m.nm.safetensors")  # before: "not 2:4 sparse" (blocks on the wrong dim)
    assert info["stored_bytes"] < info["dense_bytes"]
    plain = strip(copy.deepcopy(model))
    sd = load_sparse(tmp_path / "m.nm.safetensors")
    assert all(torch.equal(sd[k], v) for k, v in plain.state_dict().items())


def test_a_named_layer_thrifty_cannot_wrap_gets_the_reason():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Embedding(8, 4, max_norm=1.0))
    with pytest.raises(TypeError, match=r"layer '1' cannot be wrapped: LayerNorm is not supported: GEMM slots support"):
        apply(model, GradNM(2, 4), filter=["0", "1"])
    with pytest.raises(TypeError, match=r"layer '2' cannot be wrapped: Embedding with max_norm"):
        apply(model, QuantConfig(w_bits=8, a_bits=None), filter=["0", "2"])


def test_cnn1d_quantizes_its_convs_with_batchnorm_folded():
    from thrifty.quant import PTQ, quantize

    torch.manual_seed(0)
    model, x = create("cnn1d", channels=(8, 8)), torch.randn(16, 1, 24)
    with torch.no_grad():
        model(x)  # running statistics that are not the identity
    model.eval()
    cfg = PTQ(w_bits=8, a_bits=8, pipeline="rtn", w_estimator="minmax", a_estimator="minmax")
    res = quantize(model, cfg, x, progress=False)
    assert res.folded == [("conv1", "bn1"), ("conv2", "bn2")]  # before: Conv1d + BatchNorm1d were never folded
    assert {n for n, m in res.model.named_modules() if is_gemm(m)} == {"conv1", "conv2", "head"}
    with torch.no_grad():
        ref, out = model(x), res.model(x)
    assert float((out - ref).norm() / ref.norm()) <= _w8a8_bound(3)


def test_quantize_a_named_embedding_and_load_it_back(tmp_path):
    tf = pytest.importorskip("transformers")
    from thrifty.quant import PTQ, load_quantized, quantize, save_quantized

    torch.manual_seed(0)
    gpt = tf.GPT2Model(tf.GPT2Config(n_layer=1, n_embd=32, n_head=4, vocab_size=64, n_positions=16)).eval()
    ids = torch.randint(0, 64, (2, 8))
    cfg = PTQ(w_bits=4, a_bits=8, pipeline="rtn", w_estimator="minmax", a_estimator="minmax")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the layers left out are named
        res = quantize(gpt, cfg, [{"input_ids": ids}], filter=["wte", "h.0.attn.c_attn", "h.0.mlp.c_fc"],
                       progress=False)
    wte = res.model.wte
    assert is_gemm(wte) and wte.slots.input is None and wte.slots.weight.scale.numel() == 64  # per row
    save_quantized(res, tmp_path / "q", {})
    back, _ = load_quantized(tmp_path / "q", gpt)
    assert is_gemm(back.wte)
    with torch.no_grad():
        assert torch.equal(back(input_ids=ids)[0], res.model(input_ids=ids)[0])
