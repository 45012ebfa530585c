"""Silent wrong results of the layer walker: fused paths, shared modules, tied weights, one wrappability rule."""
import copy
import sys
import warnings
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
import torch
import torch.nn as nn
import torch.nn.functional as F

from thrifty.core import (Config, apply, iter_selected, layer_status, register_config, register_handler, strip,
                          uncalled_layers, wrap_layers)
from thrifty.models import create
from thrifty.nn import GemmLinear, gemm_like, is_gemm, why_not_wrappable, wrap
from thrifty.quant import PTQ, quantize
from thrifty.sparse import NM, GradNM, sparsify


def _encoder(layers: int = 2) -> nn.TransformerEncoder:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    return nn.TransformerEncoder(layer, layers, enable_nested_tensor=True).eval()


def _eval_both_ways(model: nn.Module, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval output without gradients (where torch takes its fused paths) and with (module path)."""
    model.eval()
    with torch.no_grad():
        fast = model(*args, **kwargs)
    with torch.enable_grad():
        slow = model(*args, **kwargs).detach()
    return fast, slow


def _tol(ref: torch.Tensor, k: int = 32) -> float:
    # Fused and module paths compute the same math in another summation order (reductions of length <= k,
    # layer-normed outputs, two layers); the bypass this guards against changed outputs by ~0.3-0.7.
    return 64 * torch.finfo(torch.float32).eps * k ** 0.5 * float(ref.abs().max())


# ------------------------------------------------------------------ fused transformer paths

def test_quantized_transformer_encoder_is_quantized_at_inference():
    enc, x = _encoder(), torch.randn(4, 5, 16)
    with torch.no_grad():
        ref = enc(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every GEMM, the attention projections too, is quantized
        res = quantize(enc, PTQ(w_bits=2, a_bits=2, pipeline="rtn"), x, progress=False)
    assert {"layers.0.self_attn.in_proj", "layers.1.self_attn.out_proj"} <= set(res.bits)
    fast, slow = _eval_both_ways(res.model, x)
    assert (fast - slow).abs().max() <= _tol(slow)  # before: the no-grad output was the FP32 output exactly
    assert (fast - ref).abs().max() > 100 * _tol(ref)


@pytest.mark.parametrize("padding", [False, True])
def test_nm_transformer_encoder_matches_stripped_model_in_eval(padding):
    enc, x = _encoder(), torch.randn(4, 6, 16)
    kw = {}
    if padding:  # the nested-tensor path of TransformerEncoder
        mask = torch.zeros(4, 6, dtype=torch.bool)
        mask[1, 4:] = mask[3, 2:] = True
        kw = {"src_key_padding_mask": mask}
    apply(enc, NM(2, 4))
    assert float(enc.layers[1].self_attn.in_proj.effective_weight().eq(0).float().mean()) == 0.5
    fast, slow = _eval_both_ways(enc, x, **kw)
    keep = ~kw["src_key_padding_mask"] if padding else torch.ones(4, 6, dtype=torch.bool)
    assert (fast - slow)[keep].abs().max() <= _tol(slow)
    plain = strip(copy.deepcopy(enc)).eval()
    with torch.no_grad():
        ref = plain(x, **kw)
    assert (fast - ref)[keep].abs().max() <= _tol(ref)


def test_quantize_refuses_a_forward_that_bypasses_wrapped_layers(monkeypatch):
    # Without keep_module_path the encoder's fused path reads the weights directly: the guard must name them.
    monkeypatch.setattr(sys.modules["thrifty.core.apply"], "keep_module_path", lambda model: None)
    enc, x = _encoder(1), torch.randn(4, 5, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match=r"bypasses the wrapped layers \['layers.0.self_attn.in_proj', "
                           r"'layers.0.self_attn.out_proj', 'layers.0.linear1', 'layers.0.linear2'\]"):
            quantize(enc, PTQ(w_bits=4, a_bits=8, pipeline="rtn", first_last_bits=4), x, progress=False)


class _Fused(nn.Module):
    """Reads fc.weight unless a hook is attached, as torch's fused encoder path does."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        if self.fc._forward_hooks or self.fc._forward_pre_hooks:
            return self.fc(x)
        return F.linear(x, self.fc.weight, self.fc.bias)


class _WithAux(nn.Module):
    def __init__(self):
        super().__init__()
        self.body, self.head, self.aux = _Fused(), nn.Linear(8, 4), nn.Linear(8, 4)

    def forward(self, x):
        h = self.body(x)
        return (self.head(h), self.aux(h)) if self.training else self.head(h)


def test_apply_probe_names_a_bypassed_layer_and_restores_the_model():
    m, x = _WithAux(), torch.randn(3, 8)
    with pytest.raises(ValueError, match=r"reads the weights of the wrapped layers \['body.fc'\] without calling"):
        apply(m, NM(2, 4), probe=x)
    assert type(m.body.fc) is nn.Linear and type(m.head) is nn.Linear and m.training
    with pytest.raises(ValueError, match=r"\['body.fc'\]"):
        sparsify(m, NM(2, 4), probe=x)
    assert type(m.body.fc) is nn.Linear
    apply(m, NM(2, 4), filter=["head", "aux"], probe=x)  # aux neither runs nor is read in eval: fine
    assert is_gemm(m.head) and is_gemm(m.aux) and m.training
    assert "forward" not in m.head.__dict__ and "forward" not in m.__dict__


def test_quantize_refuses_a_hook_sensitive_bypass():
    m = nn.Sequential(nn.Linear(8, 8), _Fused(), nn.Linear(8, 2))
    with pytest.raises(ValueError, match=r"bypasses the wrapped layers \['1.fc'\]"):
        quantize(m, PTQ(w_bits=4, a_bits=8, pipeline="rtn"), torch.randn(16, 8), progress=False)


def test_uncalled_layers_counts_without_hooks_and_restores_forward():
    m = _WithAux()
    wrap_layers(m)
    assert uncalled_layers(m, lambda: m(torch.randn(2, 8))) == ["body.fc"]
    assert not any(type(mod).__name__.startswith("Watched") or "_thrifty_watch" in mod.__dict__ for mod in m.modules())
    assert all("forward" not in mod.__dict__ for mod in m.modules()) and m.training


# ------------------------------------------------------------------ one module, two names

def test_module_under_two_names_is_wrapped_once_everywhere():
    lin = nn.Linear(8, 8)
    m = nn.Sequential()
    m.a, m.relu, m.b = lin, nn.ReLU(), lin
    x = torch.randn(4, 8)
    apply(m, NM(2, 4))
    assert is_gemm(m.a) and m.a is m.b
    assert [n for n, _ in iter_selected(m)] == ["a"]
    w = m.a.effective_weight()
    assert torch.allclose(m(x), F.linear(torch.relu(F.linear(x, w, lin.bias)), w, lin.bias))
    plain = strip(m)
    assert type(plain.a) is nn.Linear and plain.a is plain.b and torch.equal(plain.a.weight, w)


def test_module_under_two_names_selected_by_either_name():
    lin = nn.Linear(8, 8)
    m = nn.Sequential()
    m.a, m.b = lin, lin
    apply(m, NM(2, 4), filter="b")
    assert is_gemm(m.a) and m.a is m.b


def test_quantize_counts_a_shared_layer_once():
    lin = nn.Linear(8, 8)
    m = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), lin, nn.ReLU(), lin, nn.ReLU(), nn.Linear(8, 2))
    res = quantize(m, PTQ(w_bits=4, a_bits=8, pipeline="rtn"), torch.randn(16, 8), progress=False)
    assert res.model[2] is res.model[4] and is_gemm(res.model[2])
    assert sorted(res.bits) == ["0", "2", "6"]


# ------------------------------------------------------------------ tied weights

class _TiedLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.head = nn.Linear(8, 10, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, t):
        return self.head(self.emb(t))


def test_tied_weights_stay_tied_after_apply_and_strip():
    torch.manual_seed(0)
    lm = _TiedLM()
    with pytest.warns(UserWarning, match=r"'head' shares its weight Parameter with 'emb.weight'"):
        apply(lm, NM(2, 4))
    w = lm.head.effective_weight()
    strip(lm)
    assert lm.head.weight is lm.emb.weight
    assert torch.equal(lm.emb.weight, w) and float(lm.emb.weight.eq(0).float().mean()) == 0.5


def test_strip_untie_keeps_the_other_holder():
    torch.manual_seed(0)
    lm = _TiedLM()
    before = lm.emb.weight.detach().clone()
    with pytest.warns(UserWarning, match="shares its weight"):
        apply(lm, NM(2, 4))
    strip(lm, tied="untie")
    assert lm.head.weight is not lm.emb.weight
    assert torch.equal(lm.emb.weight, before) and float(lm.head.weight.eq(0).float().mean()) == 0.5
    with pytest.raises(ValueError, match="tied must be"):
        strip(lm, tied="maybe")


def test_strip_refuses_two_layers_transforming_one_weight_differently():
    a, b = nn.Linear(8, 8), nn.Linear(8, 8)
    b.weight = a.weight
    m = nn.Sequential(a, b)
    with pytest.warns(UserWarning, match="'0' shares its weight Parameter with '1.weight'"):
        apply(m, NM(2, 4), filter="0")
    with pytest.warns(UserWarning, match="shares its weight"):
        apply(m, NM(1, 4), filter="1")
    with pytest.raises(ValueError, match=r"layers '0' and '1' share one weight Parameter"):
        strip(copy.deepcopy(m))
    plain = strip(m, tied="untie")
    assert float(plain[0].weight.eq(0).float().mean()) == 0.5 and float(plain[1].weight.eq(0).float().mean()) == 0.75


def test_untransformed_tie_gives_no_warning_and_survives_strip():
    lm = _TiedLM()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        apply(lm, GradNM(2, 4))  # only the backward changes: both holders read the same weight
    strip(lm)
    assert lm.head.weight is lm.emb.weight


# ------------------------------------------------------------------ one wrappability rule

class MyLinear(nn.Linear):
    pass


class OwnForward(nn.Linear):
    def forward(self, x):
        return super().forward(x) * 2


class OwnConv(nn.Conv2d):
    def _conv_forward(self, x, w, b):
        return super()._conv_forward(x, w.flip(-1), b)


class Conv1D(nn.Module):  # the shape of transformers' GPT-2 Conv1D
    def __init__(self, nf, nx):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(nx, nf))
        self.bias = nn.Parameter(torch.zeros(nf))

    def forward(self, x):
        return x @ self.weight + self.bias


class _Sym(nn.Module):
    def forward(self, w):
        return w.triu() + w.triu(1).T


def _parametrized() -> nn.Linear:
    lin = nn.Linear(4, 4)
    torch.nn.utils.parametrize.register_parametrization(lin, "weight", _Sym())
    return lin


_KINDS = [
    (nn.Linear(4, 4), True), (MyLinear(4, 4), True), (nn.Conv2d(4, 4, 3), True),
    (nn.modules.linear.NonDynamicallyQuantizableLinear(4, 4), True),
    (OwnForward(4, 4), False), (OwnConv(4, 4, 3), False), (nn.Conv2d(4, 4, 3, padding_mode="reflect"), False),
    (nn.Conv2d(4, 4, 2, padding="same"), False), (nn.LazyLinear(4), False), (nn.Conv1d(4, 4, 3), True),
    (nn.ConvTranspose2d(4, 4, 3), True), (nn.Conv3d(4, 4, 3), False), (nn.Bilinear(4, 4, 4), False),
    (Conv1D(4, 4), False), (nn.Conv1d(4, 4, 3, padding_mode="circular"), False),
    (_parametrized(), False),
]


@pytest.mark.parametrize("module,ok", _KINDS, ids=lambda v: type(v).__name__ if isinstance(v, nn.Module) else str(v))
def test_one_rule_for_wrap_apply_and_selection(module, ok):
    why = why_not_wrappable(module)
    assert (why is None) == ok and gemm_like(module)
    model = nn.Sequential(copy.deepcopy(module))
    if ok:
        assert is_gemm(wrap(copy.deepcopy(module)))
        assert [n for n, _ in iter_selected(model, "0")] == ["0"]
        apply(model, GradNM(2, 4), filter="0")
        assert is_gemm(model[0])
    else:
        with pytest.raises(TypeError, match="cannot wrap"):
            wrap(copy.deepcopy(module))
        assert list(iter_selected(model)) == []
        with pytest.raises(TypeError, match=r"layer '0' cannot be wrapped: " + why.split(" ")[0]):
            apply(model, GradNM(2, 4), filter="0")
        assert type(model[0]) is type(module)


def test_quantize_sparsify_and_adaprune_take_a_linear_subclass():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), MyLinear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    x = torch.randn(32, 8)
    res = quantize(m, PTQ(w_bits=4, a_bits=8, pipeline="rtn"), x, progress=False)  # before: AttributeError
    assert res.bits["2"] == (4, 8) and isinstance(res.model[2], GemmLinear)
    s = sparsify(copy.deepcopy(m), NM(2, 4), filter="2")
    assert float(s[2].effective_weight().eq(0).float().mean()) == 0.5
    from thrifty.sparse.adaprune import plan_from_unstructured
    m2 = copy.deepcopy(m)
    with torch.no_grad():
        m2[2].weight.mul_((torch.arange(16) % 2).float())
    assert set(plan_from_unstructured(m2)) == {"2"}


def test_unsupported_gemm_layers_are_named_never_skipped_silently():
    three_d = nn.Sequential(nn.Conv3d(1, 4, 1), nn.Conv3d(4, 4, 1), nn.Flatten(), nn.Linear(4, 2))
    with pytest.warns(UserWarning, match=r"'0' \(Conv3d is not supported.*'1'"):
        model = apply(copy.deepcopy(three_d), GradNM(2, 4))
    assert is_gemm(model[3])
    with pytest.raises(TypeError, match=r"layer '1' cannot be wrapped: Conv3d is not supported"):
        apply(copy.deepcopy(three_d), GradNM(2, 4), filter=["3", "1"])
    class OwnAttention(nn.MultiheadAttention):
        def forward(self, q, k, v, **kw):
            return super().forward(q, k, v, **kw)

    enc = _encoder(1)
    enc.layers[0].self_attn.__class__ = OwnAttention
    with pytest.raises(TypeError, match=r"'layers.0.self_attn.out_proj' cannot be wrapped: its nn.MultiheadAttention"):
        apply(enc, NM(2, 4), filter="layers.0.self_attn.out_proj")
    with pytest.warns(UserWarning, match=r"'layers.0.self_attn' \(OwnAttention overrides forward\(\)"):
        apply(enc, NM(2, 4))
    with pytest.warns(UserWarning) as rec:
        apply(nn.Sequential(nn.Linear(4, 4), Conv1D(4, 4)), GradNM(2, 4))
    assert "'1' (Conv1D is not supported" in str(rec[0].message)
    with pytest.warns(UserWarning, match="'1' .Conv3d is not supported"):
        sparsify(nn.Sequential(nn.Linear(8, 8), nn.Conv3d(8, 8, 1)), NM(2, 4))


def test_layer_status_reports_the_attention_gemms():
    enc = _encoder(1)
    got = {n: why for n, _, why in layer_status(enc)}
    assert got == {n: None for n in ("layers.0.self_attn.in_proj", "layers.0.self_attn.out_proj", "layers.0.linear1",
                                     "layers.0.linear2")}
    assert set(dict((n, w) for n, _, w in layer_status(enc, matmuls=True))) - set(got) == {
        "layers.0.self_attn.qk", "layers.0.self_attn.pv"}
    assert type(enc.layers[0].self_attn) is nn.MultiheadAttention  # reporting changes nothing


@register_config
@dataclass(frozen=True)
class _FailOn(Config):
    name: str = ""


@register_handler(_FailOn)
def _fail_on(layer, name, cfg):
    if name == cfg.name:
        raise ValueError(f"layer {name!r}: refused")


def test_failed_apply_leaves_an_encoder_exactly_as_it_was():
    enc, x = _encoder(), torch.randn(4, 6, 16)
    mask = torch.zeros(4, 6, dtype=torch.bool)
    mask[1, 4:] = True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch: nested tensors are a prototype; thrifty: attention stays FP
        with torch.no_grad():
            before = enc(x, src_key_padding_mask=mask)
        with pytest.raises(ValueError, match="refused"):
            apply(enc, _FailOn("layers.1.linear2"))
        assert not any(is_gemm(m) or m._forward_pre_hooks for m in enc.modules()) and enc.use_nested_tensor
        with torch.no_grad():
            assert torch.equal(enc(x, src_key_padding_mask=mask), before)  # the fused path is back, bit for bit


def test_quantize_warns_about_a_tied_head_and_strip_keeps_the_tie():
    torch.manual_seed(0)

    class LM(_TiedLM):
        def __init__(self):
            super().__init__()
            self.mid = nn.Linear(8, 8)

        def forward(self, t):
            return self.head(torch.relu(self.mid(self.emb(t))))

    lm = LM()
    with pytest.warns(UserWarning) as rec:
        res = quantize(lm, PTQ(w_bits=4, a_bits=8, pipeline="rtn"), torch.randint(0, 10, (16, 5)), progress=False)
    assert any("quantize: layer 'head' shares its weight Parameter with 'emb.weight'" in str(w.message) for w in rec)
    assert lm.head.weight is lm.emb.weight and not is_gemm(lm.head)  # the user's model is untouched
    baked = res.model.head.effective_weight()
    assert not torch.equal(baked, lm.emb.weight)
    q = strip(res.model)
    assert q.head.weight is q.emb.weight and torch.equal(q.emb.weight, baked)


# ------------------------------------------------------------------ random trees: the walker's invariants

_PARTS = ("linear", "subclass", "own_forward", "relu", "shared", "nested", "conv3d_branch")


def _tree(kinds: list[str]) -> nn.Module:
    shared = nn.Linear(8, 8)
    parts = []
    for k in kinds:
        if k == "linear":
            parts.append(nn.Linear(8, 8))
        elif k == "subclass":
            parts.append(MyLinear(8, 8))
        elif k == "own_forward":
            parts.append(OwnForward(8, 8))
        elif k == "relu":
            parts.append(nn.ReLU())
        elif k == "shared":
            parts.append(shared)
        elif k == "nested":
            parts.append(nn.Sequential(nn.Linear(8, 8), nn.Tanh(), shared))
        else:
            parts.append(_Conv3dBranch())
    return nn.Sequential(*parts)


class _Conv3dBranch(nn.Module):  # a GEMM thrifty cannot wrap
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv3d(1, 1, 1)

    def forward(self, x):
        return self.conv(x[:, None, None, None]).reshape(x.shape)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.sampled_from(_PARTS), min_size=1, max_size=6))
def test_apply_then_strip_on_random_trees(kinds):
    torch.manual_seed(0)
    model, x = _tree(kinds), torch.randn(3, 8)
    before = {n: (m, why_not_wrappable(m)) for n, m in model.named_modules(remove_duplicate=False)}
    with torch.no_grad():
        ref = model(x)
    wrappable = [n for n, (m, why) in before.items() if n and why is None and isinstance(m, nn.Linear)]
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        if not wrappable:
            with pytest.raises(ValueError, match="no nn.Linear/nn.Conv2d layer"):
                apply(model, GradNM(2, 4))
            assert all(model.get_submodule(n) is m for n, (m, _) in before.items())
            return
        apply(model, GradNM(2, 4), probe=x)
    refused = [n for n, (m, why) in before.items() if why is not None and gemm_like(m)]
    text = " ".join(str(w.message) for w in rec)
    assert all(f"'{n}'" in text for n in refused) and (refused or not rec)
    after = dict(model.named_modules(remove_duplicate=False))
    for n, (m, why) in before.items():
        assert is_gemm(after[n]) == (n in wrappable), n
        if n not in wrappable and n:
            assert after[n] is m, n
    same = {}
    for n, (m, _) in before.items():  # one module under several names is still one module
        assert same.setdefault(id(m), after[n]) is after[n]
    with torch.no_grad():
        assert torch.equal(model(x), ref)  # GradNM leaves the forward bit-identical
    plain = strip(model)
    assert not any(is_gemm(m) for m in plain.modules())
    with torch.no_grad():
        assert torch.equal(plain(x), ref)


def test_strip_keeps_the_users_hooks_and_drops_thriftys():
    enc, x = _encoder(1), torch.randn(2, 3, 16)
    seen = []
    handle = enc.layers[0].linear1.register_forward_hook(lambda mod, i, o: seen.append(type(mod).__name__))
    apply(enc, NM(2, 4))
    plain = strip(enc)
    assert not plain.layers[0].linear2._forward_pre_hooks  # thrifty's no-op hook went with the wrapper
    plain(x)
    assert seen == ["Linear"]
    handle.remove()
    plain(x)
    assert seen == ["Linear"] and not plain.layers[0].linear1._forward_hooks
