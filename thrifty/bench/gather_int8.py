"""Quantized embedding tables in the exported ONNX graph: a Gather on the integer codes, dequantized per row.

A quantized ``nn.Embedding`` (per-row weight quantizer, e.g. ``quantize(..., layer_configs={"embed": ...})``)
otherwise exports its table as float32: for a text model the table is most of the file (all-MiniLM-L6-v2:
46.9 of 90 MB). :func:`insert_int8_gather` replaces the float table behind its Gather by the codes
(int8 when symmetric, uint8 with per-row zero points otherwise) and gathers the per-row scale (and zero point)
with them, so only the looked-up rows are dequantized:

    rows = (Cast(Gather(codes, ids)) - Gather(zero_points, ids)) * Gather(scales, ids)

the same float arithmetic as thrifty's simulated table, so the outputs are bit-identical to it.

Example:
    >>> import tempfile, torch, torch.nn as nn, onnx
    >>> from thrifty.bench.export import export_onnx
    >>> from thrifty.quant import PTQ, QuantConfig, quantize
    >>> m = nn.Sequential(nn.Embedding(50, 16), nn.Linear(16, 4)).eval()
    >>> ids = torch.randint(0, 50, (32, 6))
    >>> q = quantize(m, PTQ(pipeline="rtn"), ids, layer_configs={"0": QuantConfig(a_bits=None)}, progress=False)
    >>> p = export_onnx(q.model, (ids[:2],), tempfile.mkdtemp() + "/m.onnx")
    >>> sorted(i.name for i in onnx.load(str(p)).graph.initializer if i.name.startswith("0."))
    ['0.w_scale', '0.w_zp', '0.wq']
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

__all__ = ["insert_int8_gather"]


def insert_int8_gather(proto: Any, layers: Sequence[Any]) -> dict[str, dict[str, Any]]:
    """Replace, in place, the float table of each quantized embedding in ``layers``
    (:class:`thrifty.bench.export.LayerQuant`, per-row scales) behind its Gather node by its integer codes;
    returns ``{layer: {"dtype", "rows", "dim"}}`` of those replaced (a table not in the graph is left out)."""
    from onnx import helper, numpy_helper

    from thrifty.bench.export import _tag, weight_codes_name

    g = proto.graph
    inits = {i.name: i for i in g.initializer}
    done: dict[str, dict[str, Any]] = {}
    for lq in layers:
        if lq.w_bits > 8 or lq.weight.ndim != 2 or np.ndim(lq.w_scale) != 1:
            raise ValueError(f"layer {lq.name!r}: an int8 embedding table needs at most 8-bit codes with one scale "
                             f"per row, got {lq.w_bits} bits and scales of shape {np.shape(lq.w_scale)}")
        node = next((n for n in g.node if n.op_type == "Gather" and n.input[0] in inits
                     and tuple(inits[n.input[0]].dims) == lq.weight.shape
                     and np.array_equal(numpy_helper.to_array(inits[n.input[0]]), lq.weight)), None)
        if node is None:  # not looked up in the exported forward
            continue
        tag, out, ids = _tag(lq.name), node.output[0], node.input[1]
        dt = np.int8 if lq.w_signed else np.uint8
        rows = lq.w_scale.shape[0]
        names = {"codes": weight_codes_name(lq.name), "scale": f"{tag}.w_scale", "zp": f"{tag}.w_zp"}
        g.initializer.extend([
            numpy_helper.from_array(lq.codes.astype(dt), names["codes"]),
            numpy_helper.from_array(lq.w_scale.astype(np.float32).reshape(rows, 1), names["scale"])])
        new = [helper.make_node("Gather", [names["codes"], ids], [f"{tag}.q_rows"], name=f"{tag}/Gather_codes"),
               helper.make_node("Cast", [f"{tag}.q_rows"], [f"{tag}.f_rows"], name=f"{tag}/Cast",
                                to=helper.np_dtype_to_tensor_dtype(np.dtype(np.float32))),
               helper.make_node("Gather", [names["scale"], ids], [f"{tag}.s_rows"], name=f"{tag}/Gather_scale")]
        centred = f"{tag}.f_rows"
        if not lq.w_signed or lq.w_zp.any():  # per-row zero points, as floats (exact: small integers)
            g.initializer.append(numpy_helper.from_array(lq.w_zp.astype(np.float32).reshape(rows, 1), names["zp"]))
            new += [helper.make_node("Gather", [names["zp"], ids], [f"{tag}.z_rows"], name=f"{tag}/Gather_zp"),
                    helper.make_node("Sub", [f"{tag}.f_rows", f"{tag}.z_rows"], [f"{tag}.c_rows"],
                                     name=f"{tag}/Sub")]
            centred = f"{tag}.c_rows"
        new.append(helper.make_node("Mul", [centred, f"{tag}.s_rows"], [out], name=f"{tag}/Mul"))
        at = list(g.node).index(node)
        nodes = list(g.node)
        nodes[at:at + 1] = new
        del g.node[:]
        g.node.extend(nodes)
        done[lq.name] = {"dtype": np.dtype(dt).name, "rows": int(rows), "dim": int(lq.weight.shape[1])}
    used = {i for n in g.node for i in n.input}
    keep = [i for i in g.initializer if i.name in used]
    del g.initializer[:]
    g.initializer.extend(keep)
    return done
