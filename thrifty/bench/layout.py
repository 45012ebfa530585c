"""The int8 graph layout ONNX Runtime runs fastest, and a report of which GEMMs its optimiser fused.

ONNX Runtime fuses ``DQ -> Conv/Gemm/MatMul -> Q`` into one integer kernel (QLinearConv, QGemm,
QLinearMatMul, MatMulIntegerToFloat) only when the pattern is exact. Three passes make thrifty's QDQ graphs
match it; the first two change no dequantized value, the third rounds each bias by at most half a step of the
integer accumulator:

* :func:`hoist_quantize`: a QuantizeLinear behind value-preserving layout ops (``Conv -> Relu -> Flatten -> Q``)
  moves in front of them, so the GEMM's output is quantized directly and the Flatten runs on int8 codes;
* :func:`set_activation_dtype`: activation codes as uint8 or int8 (codes and zero points shifted by 128, the
  same real values). x86 runs u8 activations x s8 weights (VNNI ``VPDPBUSD``) several times faster than s8 x s8;
* :func:`quantize_biases`: int32 biases behind DequantizeLinear, so a GEMM whose output stays float (the
  classifier head) still fuses.

:func:`fused_report` runs ONNX Runtime's optimiser and lists every GEMM as fused (with the kernel) or not (with
the reason read off the graph).

Example:
    >>> import tempfile, torch, torch.nn as nn, thrifty as th
    >>> from thrifty.bench import export_onnx
    >>> q = th.apply(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)), th.quant.QuantConfig(w_symmetric=True))
    >>> _ = th.quant.calibrate_inputs(q, torch.randn(64, 8))
    >>> p = export_onnx(q, (torch.randn(2, 8),), tempfile.mkdtemp() + "/mlp.onnx")
    >>> [(r["layer"], r["fused"], r["kernel"]) for r in fused_report(p)]
    [('/0/Gemm', True, 'QGemm'), ('/2/Gemm', True, 'QGemm')]
"""
from __future__ import annotations

import os
import platform
import tempfile
from typing import Any

import numpy as np

__all__ = ["hoist_quantize", "quantize_biases", "set_activation_dtype", "default_activation_dtype", "fused_report",
           "GEMM_OPS"]

GEMM_OPS = ("Conv", "Gemm", "MatMul")
# single-data-input ops that only move values; quantizing per tensor before or after them gives the same codes
_MOVE = ("Flatten", "Reshape", "Squeeze", "Unsqueeze", "Transpose")


def default_activation_dtype() -> str:
    """``"uint8"`` on x86 (u8 x s8 is ONNX Runtime's fast int8 GEMM there), ``"int8"`` elsewhere (ARM's SDOT)."""
    return "uint8" if platform.machine().lower() in ("x86_64", "amd64", "i386", "i686") else "int8"


def _index(g) -> tuple[dict, dict]:
    prod = {o: n for n in g.node for o in n.output}
    cons: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            cons.setdefault(i, []).append(n)
    return prod, cons


def hoist_quantize(proto) -> int:
    """Move every per-tensor QuantizeLinear in front of the Flatten/Reshape/... chain that feeds it (the chain then
    moves int8 codes). Returns how many were moved. In place."""
    from onnx import helper, numpy_helper

    from thrifty.bench.int8_graph import _prune_and_sort

    g = proto.graph
    inits = {i.name: i for i in g.initializer}
    moved = 0

    def movable(q, prod: dict, cons: dict) -> tuple[list, str]:
        scale = inits.get(q.input[1])
        if scale is None or numpy_helper.to_array(scale).size != 1 or q.input[0] in inits:
            return [], ""
        chain, t = [], q.input[0]
        while (p := prod.get(t)) is not None and p.op_type in _MOVE and len(cons.get(t, [])) == 1:
            chain.append(p)
            t = p.input[0]
        return chain, t

    while True:  # one at a time: rewriting the node list replaces every node object
        prod, cons = _index(g)
        cands = ((q, *movable(q, prod, cons)) for q in g.node if q.op_type == "QuantizeLinear")
        found = next((c for c in cands if c[1]), None)
        if found is None:
            break
        q, chain, t = found
        src = f"{q.output[0]}.hoisted"
        new = [helper.make_node("QuantizeLinear", [t] + list(q.input[1:]), [src], name=f"{src}/QuantizeLinear",
                                domain=q.domain)]
        new[0].attribute.extend(q.attribute)
        for k, c in enumerate(reversed(chain)):
            out = q.output[0] if k == len(chain) - 1 else f"{c.output[0]}.int8"
            new.append(helper.make_node(c.op_type, [src] + list(c.input[1:]), [out], name=f"{out}/{c.op_type}",
                                        domain=c.domain))
            new[-1].attribute.extend(c.attribute)
            src = out
        drop = {id(n) for n in chain} | {id(q)}
        keep = [n for n in g.node if id(n) not in drop] + new
        del g.node[:]
        g.node.extend(keep)
        moved += 1
    if moved:
        _prune_and_sort(g)
    return moved


def set_activation_dtype(proto, dtype: str) -> int:
    """Store every activation QuantizeLinear's codes as ``dtype`` (``"uint8"`` or ``"int8"``): its zero point (shared
    with the matching DequantizeLinear and integer Pads) is shifted by 128, which leaves every dequantized value
    unchanged. Returns how many zero points changed. In place."""
    from onnx import numpy_helper

    if dtype not in ("uint8", "int8"):
        raise ValueError(f"activation dtype must be 'uint8' or 'int8', got {dtype!r}")
    g = proto.graph
    inits = {i.name: i for i in g.initializer}
    want = np.dtype(dtype)
    weight_zps = {n.input[2] for n in g.node if n.op_type == "DequantizeLinear" and len(n.input) > 2
                  and n.input[0] in inits}
    done = set()
    for q in g.node:
        if q.op_type != "QuantizeLinear" or len(q.input) < 3 or q.input[0] in inits or q.input[2] in done:
            continue
        name = q.input[2]
        if name not in inits or name in weight_zps:
            continue
        zp = numpy_helper.to_array(inits[name])
        if zp.dtype == want or zp.dtype not in (np.int8, np.uint8):
            continue
        shift = 128 if want == np.uint8 else -128
        inits[name].CopyFrom(numpy_helper.from_array((zp.astype(np.int32) + shift).astype(want), name))
        done.add(name)
    return len(done)


def quantize_biases(proto) -> tuple[int, list[str]]:
    """Replace the float bias of every Conv/Gemm whose input and weight come from DequantizeLinear by int32 codes on
    the accumulator's grid (scale ``s_x * s_w``, zero point 0) behind a DequantizeLinear: ONNX Runtime then fuses
    the layer even when its output stays float (a classifier head becomes QGemm). Rounding moves each output by at
    most ``s_x * s_w / 2``, half a step of the integer accumulator. Returns (how many were converted, the nodes
    whose bias stays float because a code would not fit int32). In place."""
    from onnx import helper, numpy_helper

    g = proto.graph
    inits = {i.name: i for i in g.initializer}
    prod, _ = _index(g)

    def dq_scale(t: str):
        p = prod.get(t)
        if p is None or p.op_type != "DequantizeLinear" or p.input[1] not in inits:
            return None
        return numpy_helper.to_array(inits[p.input[1]]).astype(np.float32)

    converted, kept, new_nodes = 0, [], []
    for n in g.node:
        if n.op_type not in ("Conv", "Gemm") or len(n.input) < 3 or n.input[2] not in inits:
            continue
        sx, sw = dq_scale(n.input[0]), dq_scale(n.input[1])
        if sx is None or sw is None or sx.size != 1:
            continue
        bias = numpy_helper.to_array(inits[n.input[2]]).astype(np.float64)
        bscale = (sx.reshape(()) * np.broadcast_to(sw, bias.shape)).astype(np.float32)
        codes = np.round(bias / bscale.astype(np.float64))
        if not np.all(np.isfinite(codes)) or np.abs(codes).max(initial=0) > np.iinfo(np.int32).max:
            kept.append(n.name)
            continue
        tag = f"{n.name}.bias"
        g.initializer.extend([numpy_helper.from_array(codes.astype(np.int32), f"{tag}_q"),
                              numpy_helper.from_array(bscale, f"{tag}_scale"),
                              numpy_helper.from_array(np.zeros(bias.shape, np.int32), f"{tag}_zp")])
        new_nodes.append(helper.make_node("DequantizeLinear", [f"{tag}_q", f"{tag}_scale", f"{tag}_zp"],
                                          [f"{tag}_dq"], name=f"{tag}/DequantizeLinear", axis=0))
        n.input[2] = f"{tag}_dq"
        converted += 1
    if converted:
        from thrifty.bench.int8_graph import _prune_and_sort

        g.node.extend(new_nodes)
        _prune_and_sort(g)  # drops nothing used; orders the new DQs before their layers
        used = {i for m in g.node for i in m.input}
        keep = [i for i in g.initializer if i.name in used]
        del g.initializer[:]
        g.initializer.extend(keep)
    return converted, kept


def _why_not(n, prod: dict, cons: dict, consts: set) -> str:
    """Why ONNX Runtime cannot fuse GEMM node ``n``, read off the graph it was given."""
    def from_dq(t: str) -> bool:
        p = prod.get(t)
        return p is not None and p.op_type == "DequantizeLinear"

    if len(n.input) > 1 and not from_dq(n.input[1]):
        p = prod.get(n.input[1])
        if n.input[1] in consts or (p is not None and p.op_type == "Constant"):
            return "float weight (layer not quantized)"
        return "product of two float activations (e.g. attention scores): nothing to fuse"
    if not from_dq(n.input[0]):
        return "float input (the layer has no input quantizer)"
    out = n.output[0]
    nxt = cons.get(out, [])
    if len(nxt) == 1 and nxt[0].op_type in ("Relu", "Clip"):
        out, nxt = nxt[0].output[0], cons.get(nxt[0].output[0], [])
    quantized_out = bool(nxt) and all(c.op_type == "QuantizeLinear" for c in nxt)
    has_bias = len(n.input) > 2 and bool(n.input[2])
    if has_bias and not from_dq(n.input[2]) and not quantized_out:
        return "float bias and float output (export with int_bias=True: an int32 bias behind DequantizeLinear)"
    if n.op_type == "Conv" and not quantized_out:
        kinds = sorted({c.op_type for c in nxt}) or ["graph output"]
        return f"output not quantized (feeds {', '.join(kinds)}): QLinearConv needs a QuantizeLinear after the Conv"
    if not quantized_out and len(nxt) > 1:
        return "output feeds several ops, not only a QuantizeLinear"
    return "ONNX Runtime's QDQ selectors rejected the pattern (data types or zero points)"


def fused_report(model: str | os.PathLike | bytes, threads: int = 1) -> list[dict[str, Any]]:
    """For every Conv/Gemm/MatMul of ``model``: ``{"layer", "op", "fused", "kernel", "reason"}`` after ONNX
    Runtime's optimiser (``ORT_ENABLE_ALL``, CPU). ``kernel`` is the op ONNX Runtime runs for it (None when it was
    folded away), ``reason`` says why an unfused GEMM stayed float (None when fused)."""
    import onnx

    from thrifty.bench.backends import INT8_KERNELS, ort_session

    proto = onnx.load_from_string(model) if isinstance(model, bytes) else onnx.load(str(model))
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "optimized.onnx")
        ort_session(model, threads=threads, optimized_path=path)
        opt = onnx.load(path, load_external_data=False).graph.node
    kernels = {n.name: n.op_type for n in opt}
    g = proto.graph
    prod, cons = _index(g)
    consts = {i.name for i in g.initializer}
    out = []
    for n in g.node:
        if n.op_type not in GEMM_OPS:
            continue
        # the fused node keeps the target's name, with a "_token_<k>" suffix after a layout transform
        kernel = kernels.get(n.name) or next((v for k, v in kernels.items() if k.startswith(n.name + "_token_")),
                                             None)
        fused = kernel in INT8_KERNELS
        out.append({"layer": n.name, "op": n.op_type, "fused": fused, "kernel": kernel,
                    "reason": None if fused else _why_not(n, prod, cons, consts)})
    return out
