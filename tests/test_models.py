"""Tests for thrifty.models: registry, forward shapes, variable input sizes, offline MiniLM."""
from __future__ import annotations

import socket

import pytest
import torch
import torch.nn as nn

from thrifty.models import count_params, create, list_models, model_size_bytes, register_model
from thrifty.models import minilm as minilm_mod
from tolerance import assert_within, forward_bound, gamma, gamma_prob

# cheap constructor args and a matching input per model
CASES = {
    "cnn1d": (dict(channels=(8, 16), num_classes=7), lambda: torch.randn(3, 40)),
    "mlp": (dict(in_features=64, num_classes=7), lambda: torch.randn(3, 64)),
    "resnet20": (dict(in_chans=1, num_classes=7), lambda: torch.randn(2, 1, 16, 16)),
    "vit": (dict(num_classes=7, dim=32, depth=2, heads=4), lambda: torch.randn(2, 1, 32, 32)),
}


@pytest.fixture(scope="module")
def minilm():
    return create("minilm")


def test_registry_lists_all():
    assert set(list_models()) >= {"mlp", "resnet20", "vit", "minilm"}
    assert list_models() == sorted(list_models())


@pytest.mark.parametrize("name", list_models())
def test_forward_shape(name, request):
    if name == "minilm":
        m = request.getfixturevalue("minilm")
        enc = m.tokenize(["Hello world.", "A second, longer sentence for padding."])
        out = m(**enc)
        assert out.shape == (2, 384)
        # x / |x| has norm 1 up to a sum of 384 squares, a square root and a division
        assert_within(out.norm(dim=1), torch.ones(2), 2 * gamma_prob(384 + 4), "embedding norms")
        return
    if name == "tinyllama":  # a causal LM: token ids in, next-token logits out
        torch.manual_seed(0)
        m = create(name, hidden=32, layers=1, heads=2, intermediate=48)
        logits = m(input_ids=torch.randint(0, 256, (3, 9))).logits
        assert logits.shape == (3, 9, 256) and torch.isfinite(logits).all()
        logits.sum().backward()
        assert all(p.grad is not None for p in m.parameters())
        return
    kw, make_x = CASES[name]
    torch.manual_seed(0)
    m = create(name, **kw)
    out = m(make_x())
    assert out.shape == (make_x().shape[0], 7) and torch.isfinite(out).all()
    out.sum().backward()
    assert all(p.grad is not None for p in m.parameters())


@pytest.mark.parametrize("name", ["resnet20", "vit"])
@pytest.mark.parametrize("size", [16, 24, 32, 48])
def test_variable_input_size(name, size):
    torch.manual_seed(0)
    m = create(name, num_classes=5) if name == "resnet20" else create(name, num_classes=5, dim=32, depth=1)
    assert m(torch.randn(2, 1, size, size)).shape == (2, 5)


def test_vit_pos_embed_identity_at_native_size_and_interpolates():
    torch.manual_seed(0)
    m = create("vit", dim=32, depth=1)
    assert m._pos(8, 8) is m.pos_embed
    p = m._pos(12, 12)
    assert p.shape == (1, 1 + 144, 32) and torch.equal(p[:, :1], m.pos_embed[:, :1])
    # a constant grid stays constant under bilinear interpolation
    with torch.no_grad():
        m.pos_embed[:, 1:] = 0.5
    # each output: weights summing to 1 times 0.5 (exact products), a sum of 4 terms and the weights' rounding
    assert_within(m._pos(6, 10)[:, 1:], torch.full((1, 60, 32), 0.5), 0.5 * 2 * gamma(8), "interpolated grid")


def test_vit_uses_linear_projections_only():
    m = create("vit")
    names = {n for n, mod in m.named_modules() if isinstance(mod, nn.Linear)}
    assert {"blocks.0.attn.qkv", "blocks.0.attn.proj", "blocks.0.mlp.fc1", "blocks.0.mlp.fc2", "head"} <= names
    assert len(names) == 4 * 4 + 1
    assert not any(isinstance(mod, nn.MultiheadAttention) for mod in m.modules())
    assert isinstance(m.patch_embed, nn.Conv2d)


def test_mlp_named_layers_and_batchnorm():
    m = create("mlp", in_features=40, hidden=(32, 16, 8), num_classes=3, batchnorm=True)
    assert [n for n, mod in m.named_modules() if isinstance(mod, nn.Linear)] == ["fc1", "fc2", "fc3", "head"]
    assert isinstance(m.bn2, nn.BatchNorm1d) and m.fc1.bias is None
    assert m(torch.randn(4, 1, 40)).shape == (4, 3)  # input is flattened
    with pytest.raises(ValueError, match="40 input features"):
        m(torch.randn(4, 41))


def test_cnn1d_inputs_and_layers():
    torch.manual_seed(0)
    m = create("cnn1d", num_classes=3)
    assert [n for n, mod in m.named_modules() if isinstance(mod, nn.Conv1d)] == ["conv1", "conv2", "conv3"]
    x = torch.randn(4, 40)
    m.eval()
    assert torch.equal(m(x), m(x.unsqueeze(1)))  # (N, L) is one channel
    assert m(torch.randn(2, 1, 57)).shape == (2, 3)  # any length (global average pool)
    assert create("cnn1d", in_chans=2, batchnorm=False)(torch.randn(2, 2, 40)).shape == (2, 10)
    with pytest.raises(ValueError, match="CNN1d expects"):
        m(torch.randn(2, 3, 40))
    with pytest.raises(ValueError, match="odd"):
        create("cnn1d", kernel_size=4)


def test_resnet20_structure():
    m = create("resnet20")
    convs = [mod for mod in m.modules() if isinstance(mod, nn.Conv2d)]
    assert len(convs) == 19 and count_params(m) == 269_434  # 19 conv + 1 linear = 20 layers (option A)
    mb = create("resnet20", shortcut="B")
    assert len([mod for mod in mb.modules() if isinstance(mod, nn.Conv2d)]) == 21
    assert mb(torch.randn(1, 1, 20, 20)).shape == (1, 10)
    with pytest.raises(ValueError, match=">= 8"):
        m(torch.randn(1, 1, 4, 4))


def test_create_errors_and_registry():
    with pytest.raises(ValueError, match="unknown model 'nope'.*mlp.*resnet20"):
        create("nope")
    with pytest.raises(TypeError, match="create\\('mlp'\\).*accepted arguments"):
        create("mlp", bogus=1)



def test_create_duplicate_registration_rejected():
    from thrifty.models.mlp import mlp

    assert register_model("mlp")(mlp) is mlp  # same factory again (e.g. module reload): a no-op
    with pytest.raises(ValueError, match="already registered"):
        register_model("mlp")(lambda: nn.Linear(1, 1))


def test_count_params_and_size():
    m = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    assert count_params(m) == 4 * 3 + 3 + 3 + 3
    # params (21 floats) + buffers: running_mean/var (6 floats) + num_batches_tracked (int64)
    assert model_size_bytes(m) == (21 + 6) * 4 + 8
    shared = nn.Linear(2, 2)
    assert count_params(nn.Sequential(shared, shared)) == 6
    m[0].weight.requires_grad_(False)
    assert count_params(m, trainable_only=True) == 9
    assert model_size_bytes(m.half()) == 21 * 2 + 6 * 2 + 8


def test_minilm_matches_sentence_transformers(minilm):
    st = minilm_mod.load_sentence_transformer()
    texts = ["The quick brown fox jumps over the lazy dog.", "Return the inverse hyperbolic cosine of x.",
             "short", "Embeddings are mean pooled and normalised, " * 6]
    ref = torch.as_tensor(st.encode(texts, batch_size=2, convert_to_numpy=True))
    ours = minilm.encode(texts, batch_size=3)
    assert ours.shape == (4, 384)
    # the same network computed by two implementations with different batch padding
    assert_within(ours, ref, forward_bound(minilm, ref, prob=True), "embeddings")
    # projections stay nn.Linear modules, reachable by name
    lin = [n for n, mod in minilm.named_modules() if isinstance(mod, nn.Linear)]
    assert "bert.encoder.layer.0.attention.self.query" in lin and len(lin) >= 6 * 6
    assert not minilm.training


def test_minilm_copies_are_independent_and_offline(monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    minilm_mod._base.cache_clear()  # force a real load from disk under the network guard
    a = create("minilm")
    b = create("minilm")
    with torch.no_grad():
        a.bert.encoder.layer[0].attention.self.query.weight.zero_()
    assert b.bert.encoder.layer[0].attention.self.query.weight.abs().sum() > 0
