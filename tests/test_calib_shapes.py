"""Calibration data in the shape the model takes: dict batches, one-dict forwards, ModelOutput field selection."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

import thrifty
from thrifty.datafree import Distill, distill
from thrifty.quant.calib import Batch, as_batches, model_output, pool, run, take, token_rows
from thrifty.sparse import NM, adaprune, reestimate_bn

transformers = pytest.importorskip("transformers")


def _bert(layers: int = 2, seed: int = 0, cls: str = "BertModel") -> nn.Module:
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=32)
    torch.manual_seed(seed)
    return getattr(transformers, cls)(cfg).eval()


def _tokens(n: int = 12, t: int = 10, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 64, (n, t), generator=g)
    mask = torch.ones_like(ids)
    for i in range(n):  # right padding of varying length, as a tokenizer gives it
        mask[i, t - i % 4:] = 0
    return {"input_ids": ids * mask, "attention_mask": mask}


class _TokenEmbeddings(nn.Module):
    """A sentence-transformers module: features dict in, the same dict with ``token_embeddings`` out."""

    def __init__(self, bert: nn.Module) -> None:
        super().__init__()
        self.bert = bert

    def forward(self, features: dict) -> dict:
        out = self.bert(input_ids=features["input_ids"], attention_mask=features["attention_mask"])
        return {**features, "token_embeddings": out.last_hidden_state}


def _sentence_transformer() -> nn.Module:
    st_mod = pytest.importorskip("sentence_transformers")
    try:
        from sentence_transformers.sentence_transformer.modules import Pooling
    except ImportError:  # sentence-transformers < 6
        from sentence_transformers.models import Pooling
    # the real SentenceTransformer container and Pooling, around a small random BERT
    return st_mod.SentenceTransformer(modules=[_TokenEmbeddings(_bert()), Pooling(32)], device="cpu").eval()


# ----------------------------------------------------------------------------------------- output selection
def test_model_output_defaults_per_task():
    ids, emb, logits, hidden = torch.ones(2, 3).long(), torch.randn(2, 4), torch.randn(2, 5), torch.randn(2, 3, 4)
    # a SentenceTransformer returns its input features first: the embedding is compared, never the ids
    assert model_output({"input_ids": ids, "attention_mask": ids, "sentence_embedding": emb}) is emb
    mo = transformers.modeling_outputs
    assert model_output(mo.SequenceClassifierOutput(logits=logits)) is logits
    assert model_output(mo.BaseModelOutputWithPooling(last_hidden_state=hidden, pooler_output=emb)) is hidden
    assert model_output({"input_ids": ids, "scores": emb}) is emb  # first floating-point value
    assert model_output((hidden, emb)) is hidden


def test_model_output_selector_and_errors():
    out = transformers.modeling_outputs.BaseModelOutputWithPooling(last_hidden_state=torch.randn(2, 3, 4),
                                                                   pooler_output=torch.randn(2, 4))
    assert model_output(out, "pooler_output") is out.pooler_output
    assert torch.equal(model_output(out, lambda o: o.last_hidden_state[:, 0]), out.last_hidden_state[:, 0])
    with pytest.raises(ValueError, match="'pooled'.*pooler_output"):
        model_output(out, "pooled")
    with pytest.raises(TypeError, match="callable returned"):
        model_output(out, lambda o: 3)
    with pytest.raises(TypeError, match="no floating-point tensor"):
        model_output({"input_ids": torch.ones(2, 3).long()})
    with pytest.raises(TypeError, match="output must be"):
        as_batches(torch.randn(4, 2), output=3)


# ------------------------------------------------------------------------------------------ how a dict is passed
def test_dict_passed_as_kwargs_or_as_one_features_argument():
    tok = _tokens(4)
    b = as_batches(tok)[0]
    bert = _bert()
    assert b.call_args(bert) == ((), b.kwargs)  # every key is a forward parameter: model(**batch)
    stm = _sentence_transformer()
    args, kwargs = b.call_args(stm)
    assert kwargs == {} and len(args) == 1 and args[0].keys() == tok.keys()
    emb = run(stm, b)
    assert emb.shape == (4, 32) and emb.is_floating_point()
    with torch.no_grad():
        assert torch.equal(emb, stm(dict(tok))["sentence_embedding"])
        assert torch.equal(run(bert, b), bert(**tok).last_hidden_state)


def test_whole_set_dict_and_batch_encoding_are_split():
    tok = _tokens(10)
    bs = as_batches(tok, batch_size=4)
    assert [b.size for b in bs] == [4, 4, 2] and torch.equal(bs[2].kwargs["input_ids"], tok["input_ids"][8:])
    enc = transformers.BatchEncoding(tok)  # a tokenizer's output is a UserDict, not a dict
    assert [b.size for b in as_batches(enc, batch_size=4)] == [4, 4, 2]
    assert [b.size for b in as_batches([enc, enc])] == [10, 10]


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(1, 5), min_size=1, max_size=4), st.integers(1, 20))
def test_take_and_pool(sizes, n):
    xs = [torch.randn(k, 3) for k in sizes]
    bs = [Batch((x,), {"m": x[:, 0]}) for x in xs]
    got = take(bs, n)
    assert sum(b.size for b in got) == min(n, sum(sizes))
    merged = pool(bs)
    assert len(merged) == 1 and torch.equal(merged[0].args[0], torch.cat(xs))
    assert torch.equal(merged[0].kwargs["m"], torch.cat(xs)[:, 0])
    ragged = [Batch((torch.randn(2, k),)) for k in (3, 4)]  # padded to different lengths: left as they are
    assert pool(ragged) == ragged


def test_token_rows_leave_padding_out():
    tok = _tokens(6, t=5)
    b = as_batches(tok)[0]
    h = torch.arange(6 * 5 * 2, dtype=torch.float32).reshape(6, 5, 2)
    rows = token_rows(h, b)
    assert rows.shape == (int(tok["attention_mask"].sum()), 2)
    assert torch.equal(rows, h[tok["attention_mask"].bool()])
    assert token_rows(h, Batch((h,))).shape == (30, 2)  # no mask: every position


# ----------------------------------------------------------------------------------- every data-taking function
def test_quantize_sentence_transformer_with_its_features():
    # issue 16: the input ids were taken as the output ("mse_cpu" not implemented for 'Long')
    stm = _sentence_transformer()
    tok = _tokens(16)
    res = thrifty.quant.quantize(stm, thrifty.PTQ(w_bits=8, a_bits=8, pipeline="rtn"), tok, progress=False)
    assert len(res.bits) == 13 and res.loss_kind == "mse"
    with torch.no_grad():
        ref, got = stm(dict(tok))["sentence_embedding"], res.model(dict(tok))["sentence_embedding"]
    assert float(nn.functional.cosine_similarity(ref, got).min()) > 0.99  # 8-bit: far from 0.67
    assert res.losses["rtn"] == pytest.approx(float(nn.functional.mse_loss(got, ref)), rel=1e-4)


def test_quantize_output_selector_changes_the_compared_field():
    bert, tok = _bert(), _tokens(8)
    cfg = thrifty.PTQ(w_bits=4, a_bits=8, pipeline="rtn")
    hidden = thrifty.quant.quantize(bert, cfg, tok, progress=False)
    pooled = thrifty.quant.quantize(bert, cfg, tok, progress=False, output="pooler_output")
    with torch.no_grad():
        ref = bert(**tok)
        mse = lambda a, b: float(nn.functional.mse_loss(a, b))  # noqa: E731
        assert hidden.losses["rtn"] == pytest.approx(mse(hidden.model(**tok).last_hidden_state, ref.last_hidden_state),
                                                     rel=1e-4)
        assert pooled.losses["rtn"] == pytest.approx(mse(pooled.model(**tok).pooler_output, ref.pooler_output),
                                                     rel=1e-4)
    with pytest.raises(ValueError, match="'nope'"):
        thrifty.quant.quantize(bert, cfg, tok, progress=False, output="nope")


def test_quantize_gpt2_lm_with_attention_mask():
    cfg = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=2, n_positions=32,
                                  bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    lm = transformers.GPT2LMHeadModel(cfg).eval()
    res = thrifty.quant.quantize(lm, thrifty.PTQ(w_bits=8, a_bits=8, pipeline="rtn"), _tokens(8), progress=False)
    assert res.bits and res.losses["rtn"] < 1e-3 * float(lm(**_tokens(8)).logits.pow(2).mean())


def test_adaprune_transformer_with_attention_mask():
    bert, tok = _bert(), _tokens(16)
    report = adaprune(bert, NM(2, 4), tok, steps=20, lr=1e-3, progress=False)
    assert len(report) == 13  # 2 x (q, k, v, o, ffn in, ffn out) + pooler
    assert all(r["mse_after"] <= r["mse_before"] for r in report.values())
    w = bert.encoder.layer[0].attention.self.query.effective_weight()
    assert int(w.reshape(-1, 4).ne(0).sum(1).max()) <= 2


def test_adaprune_sentence_transformer_and_output_field():
    stm = _sentence_transformer()
    report = adaprune(stm, NM(2, 4), _tokens(8), steps=5, progress=False)
    assert len(report) == 13 and all(r["mse_after"] <= r["mse_before"] for r in report.values())


def test_adaprune_fits_real_tokens_only():
    # padding positions never reach a pooled output: their activations must not enter the fit
    bert, tok = _bert(), _tokens(8)
    bert_b = _bert()
    junk = dict(tok)
    junk["input_ids"] = torch.where(tok["attention_mask"].bool(), tok["input_ids"], torch.full_like(tok["input_ids"], 63))
    ra = adaprune(bert, NM(2, 4), tok, steps=0, progress=False)
    rb = adaprune(bert_b, NM(2, 4), junk, steps=0, progress=False)
    for name in ra:  # the same real-token rows, whatever the padding holds: equal errors up to rounding
        assert rb[name]["mse_before"] == pytest.approx(ra[name]["mse_before"], rel=1e-4, abs=1e-12)


def test_reestimate_bn_and_distill_take_keyword_batches():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn, self.fc = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Linear(4, 5)

        def forward(self, pixel_values):
            return {"logits": self.fc(self.bn(self.conv(pixel_values)).mean((2, 3)))}

    torch.manual_seed(0)
    a, x = Net(), torch.randn(16, 3, 6, 6)
    b = Net()
    b.load_state_dict(a.state_dict())
    reestimate_bn(a, {"pixel_values": x}, batch_size=8)
    reestimate_bn(b.bn, a.conv(x).detach().split(8))  # the statistics of the same conv outputs, same batches
    assert torch.allclose(a.bn.running_mean, b.bn.running_mean, rtol=1e-5, atol=1e-6)
    assert torch.allclose(a.bn.running_var, b.bn.running_var, rtol=1e-5, atol=1e-6)
    teacher = _bert(cls="BertForSequenceClassification")
    res = thrifty.quant.quantize(teacher, thrifty.PTQ(w_bits=2, a_bits=8, pipeline="rtn"), _tokens(16),
                                 progress=False)
    r = distill(res.model, teacher, Distill(steps=15, lr=1e-3, batch_size=8), _tokens(16), progress=False)
    assert r["kept"] and r["kl_after"] < r["kl_before"]
