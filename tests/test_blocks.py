"""Block-wise sequential calibration (thrifty.quant.blocks) and its use by AdaPrune and AdaQuant."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import thrifty
from thrifty.quant.blocks import block_forward, block_inputs, check_chain, find_blocks
from thrifty.quant.calib import as_batches
from thrifty.sparse import NM, adaprune

transformers = pytest.importorskip("transformers")


def _bert(layers: int = 2, seed: int = 0) -> nn.Module:
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=32)
    torch.manual_seed(seed)
    return transformers.BertModel(cfg).eval()


def _tokens(n: int = 16, t: int = 10, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 64, (n, t), generator=g)
    mask = torch.ones_like(ids)
    for i in range(n):
        mask[i, t - i % 4:] = 0
    return {"input_ids": ids * mask, "attention_mask": mask}


class _Residual(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        return x + scale * self.fc2(torch.relu(self.fc1(x)))


class _Stack(nn.Module):
    def __init__(self, d: int = 16, n: int = 3) -> None:
        super().__init__()
        self.inp, self.blocks, self.head = nn.Linear(8, d), nn.ModuleList(_Residual(d) for _ in range(n)), nn.Linear(d, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for b in self.blocks:
            h = b(h, scale=0.5)  # a keyword argument every block gets
        return self.head(h)


def test_find_blocks_auto_and_named():
    bert = _bert(3)
    assert find_blocks(bert) == ["encoder.layer.0", "encoder.layer.1", "encoder.layer.2"]
    assert find_blocks(bert, "encoder.layer") == find_blocks(bert)
    assert find_blocks(_Stack()) == ["blocks.0", "blocks.1", "blocks.2"]
    assert find_blocks(bert, ["encoder.layer.0", "encoder.layer.2"]) == ["encoder.layer.0", "encoder.layer.2"]


def test_bad_block_names_are_named():
    bert = _bert()
    with pytest.raises(ValueError, match=r"\['encoder.layers.0', 'nope'\].*BertModel"):
        find_blocks(bert, ["encoder.layers.0", "nope", "encoder.layer.1"])
    with pytest.raises(ValueError, match="overlap"):
        find_blocks(bert, ["encoder.layer", "encoder.layer.0"])
    with pytest.raises(TypeError, match="blocks must be"):
        find_blocks(bert, [3])
    with pytest.raises(ValueError, match="no container of repeated blocks"):
        find_blocks(nn.Linear(3, 3))
    b = as_batches(_tokens(4))[0]
    with pytest.raises(ValueError, match="'encoder.layer.1.output' is not fed by 'encoder.layer.0'"):
        check_chain(bert, ["encoder.layer.0", "encoder.layer.1.output"], b)


def test_block_streams_reproduce_the_model():
    for model, data in ((_bert(3), _tokens(8)), (_Stack(), torch.randn(8, 8))):
        batches = as_batches(data, batch_size=4)
        names = find_blocks(model)
        check_chain(model, names, batches[0])
        xs = block_inputs(model, model.get_submodule(names[0]), batches)
        for n in names:
            xs = block_forward(model.get_submodule(n), xs)
        with torch.no_grad():
            if isinstance(model, _Stack):
                ref = [model.blocks[2](model.blocks[1](model.blocks[0](model.inp(b.args[0]), 0.5), 0.5), 0.5)
                       for b in batches]
            else:
                ref = [model(**b.kwargs).last_hidden_state for b in batches]
        for x, r in zip(xs, ref):  # the same ops on the same inputs: bit-identical
            assert torch.equal(x.args[0], r)


def _weights(m: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in m.state_dict().items() if k.endswith("weight")}


@pytest.mark.parametrize("chunk", [None, 4])
def test_adaprune_blockwise_equals_whole_model(monkeypatch, chunk):
    # every layer's inputs and targets are the same tensors either way, so the fits are the same; with the block
    # streams cut into micro-batches of 4 samples each layer still sees the same rows in the same order
    import sys

    if chunk is not None:
        monkeypatch.setattr(sys.modules["thrifty.sparse.adaprune"], "BLOCK_CHUNK", chunk)
    data = _tokens(16)
    whole, blockwise = _bert(), _bert()
    r1 = adaprune(whole, NM(2, 4), data, steps=10, progress=False)
    r2 = adaprune(blockwise, NM(2, 4), data, steps=10, progress=False, blocks="auto")
    assert list(r1) == list(r2)
    for n in r1:
        assert r2[n]["mse_after"] == pytest.approx(r1[n]["mse_after"], rel=1e-4, abs=1e-12), n
    w1, w2 = _weights(whole), _weights(blockwise)
    for k in w1:
        assert torch.allclose(w1[k], w2[k], rtol=1e-4, atol=1e-6), k


def test_adaprune_bad_blocks_leave_the_model_alone():
    bert = _bert()
    before = copy.deepcopy(bert.state_dict())
    with pytest.raises(ValueError, match="nope"):
        adaprune(bert, NM(2, 4), _tokens(4), steps=1, progress=False, blocks=["nope"])
    with pytest.raises(ValueError, match="is not fed by"):
        adaprune(bert, NM(2, 4), _tokens(4), steps=1, progress=False,
                 blocks=["encoder.layer.0", "encoder.layer.1.output"])
    assert not any(hasattr(m, "slots") for m in bert.modules())
    assert all(torch.equal(v, bert.state_dict()[k]) for k, v in before.items())


def test_quantize_blockwise_adaquant_matches_whole_model():
    model, x = _Stack(), torch.randn(64, 8)
    torch.manual_seed(0)
    cfg = thrifty.PTQ(w_bits=3, a_bits=8, pipeline="adaquant", adaquant_iters=30)
    r1 = thrifty.quant.quantize(model, cfg, x, progress=False)
    r2 = thrifty.quant.quantize(model, cfg, x, progress=False, blocks="blocks")
    assert list(r1.adaquant_errors) == list(r2.adaquant_errors)
    for n, (b1, a1) in r1.adaquant_errors.items():
        b2, a2 = r2.adaquant_errors[n]
        assert b2 == pytest.approx(b1, rel=1e-4) and a2 == pytest.approx(a1, rel=1e-4), n
    assert r2.final_loss <= r1.final_loss * (1 + 1e-4)
    with pytest.raises(ValueError, match="'blockz'"):
        thrifty.quant.quantize(model, cfg, x, progress=False, blocks="blockz")


def test_adaprune_block_fit_lowers_block_error():
    bert, data = _bert(), _tokens(16)
    report = adaprune(bert, NM(2, 4), data, steps=5, progress=False, blocks="auto", block_steps=30, block_lr=1e-3)
    fits = {k: v for k, v in report.items() if k.startswith("block ")}
    assert list(fits) == ["block encoder.layer.0", "block encoder.layer.1"]
    assert all(r["mse_after"] < r["mse_before"] and not r["reverted"] for r in fits.values())
    w = bert.encoder.layer[1].output.dense.effective_weight()
    assert int(w.reshape(-1, 4).ne(0).sum(1).max()) <= 2  # the masks survive the block fit
    with pytest.raises(ValueError, match="block_steps needs blocks="):
        adaprune(_bert(), NM(2, 4), data, steps=1, progress=False, block_steps=3)


def test_walk_blocks_releases_finished_blocks_inputs():
    # the streams advance in place: once the caller asks for block i + 1, block i's input tensors are gone
    import gc
    import weakref

    from thrifty.quant.blocks import walk_blocks

    model, ref = _bert(3), _bert(3)
    batches = as_batches(_tokens(8), batch_size=4)
    names = find_blocks(model)
    seen: list[tuple[int, int]] = []
    prev: list[weakref.ref] = []
    for blk, q_in, fp_in in walk_blocks(model, ref, names, batches):
        gc.collect()
        assert all(r() is None for r in prev), blk  # the previous block's inputs were released
        prev = [weakref.ref(b.args[0]) for b in q_in + fp_in]
        seen.append((id(q_in), id(fp_in)))
        assert len(q_in) == len(fp_in) == 2
    assert len(set(seen)) == 1  # the same two lists, updated in place
    assert not q_in and not fp_in  # emptied once the walk ends


def test_walk_blocks_chunks_keep_sample_order():
    from thrifty.quant.blocks import split_batches, walk_blocks

    model = _bert(2)
    batches = as_batches(_tokens(10), batch_size=10)
    names = find_blocks(model)
    last = {}
    for chunk in (None, 3):
        for blk, q_in, _ in walk_blocks(model, model, names, batches, chunk=chunk):
            last[chunk] = [(b.args[0].clone(), b.tokens().clone()) for b in q_in]
    assert [b.size for b in split_batches(batches, 3)] == [3, 3, 3, 1]
    assert len(last[3]) == 4 and len(last[None]) == 1
    whole = torch.cat([x for x, _ in last[3]])
    # the same block on fewer samples: equal up to float32 rounding of the GEMMs (a few ulps of O(1) values)
    assert torch.allclose(whole, last[None][0][0], rtol=0, atol=1e-5)
    assert torch.equal(torch.cat([m for _, m in last[3]]), last[None][0][1])
    with pytest.raises(ValueError, match="chunk must be"):
        split_batches(batches, 0)


def test_structural_checks_run_on_a_probe_of_the_batch():
    from thrifty.quant.blocks import PROBE, split_layers

    bert = _bert(2)
    batch = as_batches(_tokens(8), batch_size=8)[0]
    sizes: list[int] = []
    h = bert.encoder.layer[0].register_forward_pre_hook(lambda _m, a: sizes.append(a[0].shape[0]))
    names = find_blocks(bert)
    check_chain(bert, names, batch)
    split_layers(bert, ["encoder.layer.0.output.dense"], names, batch)
    h.remove()
    assert sizes == [PROBE, PROBE]


def test_capture_keep_applies_in_the_hook():
    from thrifty.quant.calib import capture, token_rows

    bert = _bert(1)
    batches = as_batches(_tokens(8), batch_size=4)
    layer = bert.encoder.layer[0].intermediate.dense
    raw = capture(bert, layer, batches)[0]
    rows = capture(bert, layer, batches, keep=token_rows)[0]
    assert [r.shape for r in rows] == [token_rows(x, b).shape for x, b in zip(raw, batches)]
    assert all(torch.equal(r, token_rows(x, b)) for r, x, b in zip(rows, raw, batches))
    assert all(r.dim() == 2 for r in rows)  # padding rows dropped, no [B, T, C] tensor kept


def test_adaprune_blockwise_transposable_masks_survive_the_block_fit():
    from thrifty.ops.nm import is_transposable
    from thrifty.sparse import nm_masks

    bert = _bert()
    adaprune(bert, NM(4, 8, transposable=True), _tokens(16), steps=5, progress=False, blocks="auto",
             block_steps=5, block_lr=1e-3)
    layers = list(nm_masks(bert))
    assert len(layers) == 13  # 6 per encoder layer and the pooler (after the last block)
    for name, layer, _ in layers:
        assert is_transposable(layer.effective_weight(), 4, 8), name


@pytest.mark.parametrize("blocks", [None, "auto"])
def test_adaprune_shares_one_capture_among_layers_reading_the_same_tensor(monkeypatch, blocks):
    # query, key and value read the same hidden states: one input capture serves the three, the fits unchanged
    import sys

    import thrifty.quant.calib as calib
    from thrifty.quant.calib import shared_inputs

    mod = sys.modules["thrifty.sparse.adaprune"]
    bert = _bert()
    b = as_batches(_tokens(4))[0]
    layers = {n: m for n, m in bert.named_modules() if isinstance(m, nn.Linear)}
    got = shared_inputs(bert, layers, b)
    for i in range(2):
        p = f"encoder.layer.{i}.attention.self."
        assert got[p + "key"] == got[p + "value"] == p + "query"
    assert len(got) == 4  # nothing else reads the same tensor as an earlier layer

    calls = []
    real = calib.capture

    def counting(*a, **k):
        calls.append(k.get("inputs", True))
        return real(*a, **k)

    monkeypatch.setattr(mod, "capture", counting)
    runs = {}
    for share in (False, True):
        monkeypatch.setattr(mod, "SHARE_INPUTS", share)
        calls.clear()
        model = _bert()
        runs[share] = (adaprune(model, NM(2, 4), _tokens(16), steps=10, progress=False, blocks=blocks),
                       _weights(model), sum(calls))
    assert runs[False][2] == 13 and runs[True][2] == 9  # input captures: 6 layers x 2 blocks + pooler; minus k, v
    assert list(runs[False][0]) == list(runs[True][0])
    for n, r in runs[False][0].items():
        assert runs[True][0][n] == r, n  # the same rows in the same order: bit-identical fits
    for k, w in runs[False][1].items():
        assert torch.equal(runs[True][1][k], w), k


def test_capture_of_inputs_stops_before_the_layer():
    from thrifty.quant.calib import capture

    net = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    ran = []
    net[1].register_forward_hook(lambda *_: ran.append(1))
    x = torch.randn(3, 4)
    xs, ys = capture(net, net[1], as_batches(x))
    with torch.no_grad():
        assert not ran and ys == [] and torch.equal(xs[0], net[0](x))
    _, ys = capture(net, net[1], as_batches(torch.randn(3, 4)), inputs=False, outputs=True)
    assert ran == [1] and ys[0].shape == (3, 4)
