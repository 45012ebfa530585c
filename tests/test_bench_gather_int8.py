"""Quantized embedding tables exported as a Gather on their integer codes (thrifty.bench.gather_int8)."""
from __future__ import annotations

import json
import warnings

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn
from onnx import numpy_helper

from thrifty.bench.backends import OrtBackend
from thrifty.bench.export import export_onnx
from thrifty.quant import PTQ, QuantConfig, quantize


class _Tagger(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb, self.pos = nn.Embedding(300, 24), nn.Embedding(8, 24)

    def forward(self, ids):
        return self.emb(ids) + self.pos.weight[: ids.shape[1]]  # pos read directly: not a lookup, stays float


@pytest.mark.parametrize("symmetric", [False, True])
def test_int8_table_is_exact_and_stores_codes(tmp_path, symmetric):
    torch.manual_seed(0)
    model, ids = _Tagger().eval(), torch.randint(0, 300, (64, 8))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = quantize(model, PTQ(pipeline="rtn"), ids, progress=False,
                       layer_configs={"emb": QuantConfig(a_bits=None, w_symmetric=symmetric)})
        path = export_onnx(res.model, (ids[:2],), tmp_path / "m.onnx")
    proto = onnx.load(str(path))
    inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    # the table is its codes (one byte per weight) plus one scale (and zero point) per row; the float table is gone
    assert inits["emb.wq"].shape == (300, 24) and inits["emb.wq"].dtype == (np.int8 if symmetric else np.uint8)
    assert inits["emb.w_scale"].shape == (300, 1) and ("emb.w_zp" in inits) != symmetric
    assert not any(v.dtype == np.float32 and v.shape == (300, 24) for v in inits.values())
    meta = json.loads({p.key: p.value for p in proto.metadata_props}["thrifty.int8"])
    assert meta["int8_embeddings"] == {"emb": {"dtype": "int8" if symmetric else "uint8", "rows": 300, "dim": 24}}
    # the same float arithmetic as the simulated table: bit-identical rows
    with torch.no_grad():
        want = res.model(ids[:16]).numpy()
    np.testing.assert_array_equal(OrtBackend(path, threads=1)((ids[:16].numpy(),)), want)


def test_unused_or_too_wide_tables(tmp_path):
    from thrifty.bench.export import LayerQuant
    from thrifty.bench.gather_int8 import insert_int8_gather

    model, ids = _Tagger().eval(), torch.randint(0, 300, (4, 8))
    proto = onnx.load(str(export_onnx(model, (ids,), tmp_path / "f.onnx")))
    w = np.zeros((5, 3), np.float32)  # no Gather reads such a table: nothing changes
    lq = LayerQuant("other", w, w.astype(np.int64), np.ones(5, np.float32), np.zeros(5, np.int64), True, 8, None)
    before = proto.SerializeToString()
    assert insert_int8_gather(proto, [lq]) == {} and proto.SerializeToString() == before
    with pytest.raises(ValueError, match="layer 'other': an int8 embedding table needs at most 8-bit codes"):
        insert_int8_gather(proto, [LayerQuant("other", w, w.astype(np.int64), np.ones(5, np.float32),
                                              np.zeros(5, np.int64), True, 9, None)])
