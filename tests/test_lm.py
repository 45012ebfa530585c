"""The causal LM workload: byte-level stdlib text, tinyllama, its training loop, perplexity and cache."""
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from thrifty.data.lm import VOCAB_SIZE, decode, encode, lm_documents, lm_text, lm_tokens, lm_windows
from thrifty.models import create
from thrifty.train import TrainConfig
from thrifty.train.lm import nll, perplexity, pretrained_lm, train_lm

TINY = dict(hidden=32, layers=1, heads=2, intermediate=64)


def test_text_splits_are_disjoint_documents_and_bytes_round_trip():
    docs = lm_documents()
    assert len(docs) >= 1000 and len(set(docs)) == len(docs)
    train, test = lm_text("train"), lm_text("test")
    assert 5 * len(test) < len(train)
    held = docs[9::10]
    assert all(d not in train for d in held[:50])
    s = "Return x.\nA caf\u00e9"
    assert decode(encode(s)) == s and encode("").numel() == 0
    assert int(lm_tokens("train").max()) < VOCAB_SIZE
    w = lm_windows("test", 100)
    assert w.shape == (len(test.encode()) // 100, 100) and torch.equal(w.reshape(-1), lm_tokens("test")[:w.numel()])
    for bad in (dict(split="val"), dict(seq_len=1), dict(n=0), dict(n=10**9)):
        with pytest.raises(ValueError):
            lm_windows(**bad)


class _Fixed(nn.Module):
    """Logits log(q) for one fixed next-token distribution q, whatever the input."""

    def __init__(self, q):
        super().__init__()
        self.logq = nn.Parameter(torch.log(q))

    def forward(self, input_ids):
        return self.logq.expand(*input_ids.shape, -1)


def test_perplexity_closed_forms():
    w = lm_windows("test", 64, n=6)
    uniform = _Fixed(torch.full((VOCAB_SIZE,), 1.0 / VOCAB_SIZE))
    # exp(-log(1/256)) = 256, up to the float32 log-softmax and the float64 exp
    assert perplexity(uniform, w) == pytest.approx(VOCAB_SIZE, rel=1e-5)
    g = torch.Generator().manual_seed(0)
    q = torch.rand(VOCAB_SIZE, generator=g, dtype=torch.float64) + 0.01
    q = (q / q.sum()).float()
    want = -np.log(q.double().numpy())[w[:, 1:].reshape(-1).numpy()].mean()
    # the mean of 6 * 63 float32 terms, each rounded at log q's magnitude
    assert nll(_Fixed(q), w, batch_size=4) == pytest.approx(want, rel=1e-5)
    with pytest.raises(TypeError):
        perplexity(uniform, w.float())
    with pytest.raises(ValueError):
        perplexity(uniform, w[:, :1])


def test_tiny_llama_trains_and_caches(tmp_path, monkeypatch):
    torch.manual_seed(0)
    m = create("tinyllama", **TINY)
    cfg = TrainConfig(optim={"steps": 25, "batch_size": 8, "lr": 3e-3}, optimizer="adamw", warmup=3, grad_clip=1.0)
    losses = train_lm(m, cfg, lm_tokens("train"), seq_len=48, progress=False)
    # starts near log(256) = 5.55 (random init) and falls well below it
    assert losses[0] > 5.0 and np.mean(losses[-5:]) < losses[0] - 1.0
    assert not m.training

    monkeypatch.setenv("THRIFTY_CACHE", str(tmp_path))
    a, meta = pretrained_lm(return_meta=True, progress=False, steps=3, batch_size=4, seq_len=32, **TINY)
    b = pretrained_lm(progress=False, steps=3, batch_size=4, seq_len=32, **TINY)  # from the cache
    assert meta["test_ppl"] < VOCAB_SIZE * 1.5 and math.isfinite(meta["test_ppl"])
    assert all(torch.equal(p, r) for p, r in zip(a.parameters(), b.parameters()))
    saved = [p for p in (tmp_path / "pretrained").glob("tinyllama-*.safetensors") if ".plain." not in p.name]
    assert len(saved) == 1  # one cache entry (beside it: its plain export)


def test_tinyllama_bad_arguments():
    with pytest.raises(ValueError, match="hidden"):
        create("tinyllama", hidden=30, heads=4)
    with pytest.raises(ValueError, match="layers"):
        create("tinyllama", layers=0)


def test_per_group_ptq_on_the_llama_with_dict_batches():
    from thrifty.quant import PTQ, quantize

    torch.manual_seed(0)
    m = create("tinyllama", **TINY).eval()
    calib = [{"input_ids": w} for w in lm_windows("train", 32, n=16).split(8)]
    with pytest.warns(UserWarning, match="embed_tokens"):  # the lookup and the norms are named, not skipped silently
        res = quantize(m, PTQ(w_bits=4, a_bits=None, group_size=16, first_last_bits=4, pipeline="rtn", loss="kl"),
                       calib, progress=False)
    linears = [n for n, x in m.named_modules() if isinstance(x, nn.Linear)]
    assert sorted(res.bits) == sorted(linears) and len(linears) == 7 + 1
    assert res.model.model.layers[0].mlp.down_proj.slots.weight.scale.shape == (32, 4)
    w = lm_windows("test", 32, n=4)
    assert perplexity(res.model, w) == pytest.approx(perplexity(m, w), rel=0.5)
