"""Make a thrifty QDQ graph integer end to end around residual Adds (ONNX graph surgery + calibration).

thrifty's PTQ quantizes the *inputs* of Gemm layers only. In a residual network that leaves every Conv whose
output goes into a residual Add without a QuantizeLinear after it, so ONNX Runtime cannot fuse it into
QLinearConv and runs it in float on dequantized tensors (and converts layouts around it). This pass adds the
few activation quantizers an integer deployment needs, so that ONNX Runtime (ORT_ENABLE_ALL) fuses
DQ -> Conv -> Q into QLinearConv and DQ -> Add -> Q into QLinearAdd:

* the residual branch of an Add reuses the quantizer that already quantizes that tensor for the next Conv
  (same scale/zero point; a strided Slice / zero Pad shortcut between them keeps values on that grid, so
  re-quantizing after it is exact);
* a Conv output that only goes into the Add (after BN folding) gets a new quantizer;
* an Add (+ Relu) output that feeds anything besides QuantizeLinear (e.g. the global pool) gets one too.

New quantizers are calibrated exactly like thrifty's PTQ calibrates activation quantizers: a
``thrifty.quant.UniformQuantizer`` with the model's activation-quantizer spec (bits, symmetry, range estimator)
observes the tensor on each calibration batch, computed by the PTQ-exact graph (before this pass), then
freezes. Nothing else changes: weights and existing activation quantizers keep the PTQ result's values.

Used by ``export_onnx(..., calib=...)``; what it added is in the model's ``thrifty.int8`` metadata.

Example (an 8-bit resnet20, narrow and on 8x8 inputs to stay small):
    >>> import json, tempfile, onnx, torch, thrifty as th
    >>> from thrifty.bench import export_onnx
    >>> q = th.apply(th.models.create("resnet20", width=4).eval(), th.quant.QuantConfig(w_bits=8, a_bits=8))
    >>> calib = torch.rand(32, 1, 8, 8)
    >>> _ = th.quant.calibrate_inputs(q, calib)
    >>> p = export_onnx(q, (calib[:2],), tempfile.mkdtemp() + "/r20_int8.onnx", calib=calib)
    >>> info = json.loads({m.key: m.value for m in onnx.load(str(p)).metadata_props}["thrifty.int8"])
    >>> info["residual_adds"], len(info["new_quantizers"]), info["shared"]
    (9, 10, 9)
"""
from __future__ import annotations

import json
from typing import Any, Callable, Optional, Union

import numpy as np

__all__ = ["quantize_residuals", "residual_points", "onnx_feeds"]

# single-data-input ops that move/copy values without changing them (a tensor on a grid stays on it)
_LAYOUT = ("Slice", "Pad", "Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose")


class _G:
    """Producer/consumer index over a GraphProto (rebuilt after every edit: graphs here are small)."""

    def __init__(self, g) -> None:
        self.g = g
        self.refresh()

    def refresh(self) -> None:
        self.inits = {i.name for i in self.g.initializer}
        self.prod = {o: n for n in self.g.node for o in n.output}
        self.cons: dict[str, list] = {}
        for n in self.g.node:
            for i in n.input:
                self.cons.setdefault(i, []).append(n)

    def is_const(self, name: str) -> bool:
        p = self.prod.get(name)
        return name in self.inits or (p is not None and p.op_type == "Constant")

    def q_consumer(self, t: str):
        return next((n for n in self.cons.get(t, []) if n.op_type == "QuantizeLinear"), None)

    def dq_of(self, q) -> Optional[Any]:
        return next((n for n in self.cons.get(q.output[0], []) if n.op_type == "DequantizeLinear"), None)

    def quantized_conv(self, n) -> bool:
        return n is not None and n.op_type == "Conv" and all(
            (p := self.prod.get(i)) is not None and p.op_type == "DequantizeLinear" for i in n.input[:2])


def residual_points(g) -> tuple[list, list[str]]:
    """The residual Adds to make integer and the tensors that need a new quantizer (no pre-existing one)."""
    G = _G(g)
    adds = [n for n in g.node if n.op_type == "Add" and len(n.input) == 2
            and not any(G.is_const(i) for i in n.input)
            and any(G.quantized_conv(G.prod.get(i)) for i in n.input)]
    points: list[str] = []
    for a in adds:
        for t in a.input:
            if _share_base(G, t) is None and t not in points:
                points.append(t)
        r = _post_relu(G, a)
        if G.q_consumer(r) is None and any(c.op_type not in _LAYOUT + ("Add",) for c in G.cons.get(r, [])) \
                and r not in points:
            points.append(r)
    return adds, points


def _post_relu(G: _G, add) -> str:
    o = add.output[0]
    c = G.cons.get(o, [])
    return c[0].output[0] if len(c) == 1 and c[0].op_type == "Relu" else o


def _share_base(G: _G, t: str) -> Optional[tuple[Any, list]]:
    """(QuantizeLinear already applied to t or to a tensor t is a Slice/Pad/... copy of, chain of those ops)."""
    chain: list = []
    while True:
        q = G.q_consumer(t)
        if q is not None:
            return q, chain[::-1]
        p = G.prod.get(t)
        if p is None or p.op_type not in _LAYOUT or (p.op_type == "Pad" and not _zero_pad(G, p)):
            return None
        chain.append(p)
        t = p.input[0]


def _zero_pad(G: _G, p) -> bool:
    mode = next((a.s for a in p.attribute if a.name == "mode"), b"constant")
    return mode == b"constant" and (len(p.input) < 3 or not p.input[2])


def onnx_feeds(batches: list, input_names: list[str]) -> list[dict[str, np.ndarray]]:
    """ONNX Runtime feeds from thrifty calibration batches (``thrifty.quant.calib.Batch``)."""
    feeds = []
    for b in batches:
        f = {n: a.detach().cpu().numpy() for n, a in zip(input_names, b.args)}
        f.update({k: v.detach().cpu().numpy() for k, v in b.kwargs.items() if k in input_names})
        missing = [n for n in input_names if n not in f]
        if missing:
            raise ValueError(f"calibration batch does not provide ONNX inputs {missing}")
        feeds.append({k: (v.astype(np.float32) if v.dtype == np.float64 else v) for k, v in f.items()})
    return feeds


def _calibrate(proto, points: list[str], feeds: list[dict], spec: dict) -> dict[str, tuple[float, int]]:
    import onnx
    import torch

    from thrifty.bench.backends import ort_session
    from thrifty.quant import UniformQuantizer

    m = onnx.ModelProto()
    m.CopyFrom(proto)
    del m.graph.output[:]
    m.graph.output.extend([onnx.helper.make_tensor_value_info(p, onnx.TensorProto.FLOAT, None) for p in points])
    sess = ort_session(m.SerializeToString(), optimize=False)  # the PTQ-exact float arithmetic
    qs = {p: UniformQuantizer(**spec).calibrate() for p in points}
    for f in feeds:
        for p, y in zip(points, sess.run(points, f)):
            qs[p].observe(torch.from_numpy(np.asarray(y, dtype=np.float32)))
    out = {}
    for p, q in qs.items():
        q.freeze()
        out[p] = (float(q.scale), 0 if q.symmetric else int(round(float(q.zero_point))))
    return out


def _range_key(spec: dict, tensor: str) -> str:
    return json.dumps([spec, tensor], sort_keys=True, default=str)


def quantize_residuals(proto, feeds: Union[list[dict], Callable[[], list[dict]]], spec: dict,
                       ranges: Optional[dict] = None) -> dict[str, Any]:
    """Rewrite ``proto`` in place (see module doc); ``feeds``: calibration inputs for ONNX Runtime (or a function
    making them, called only when a quantizer needs calibrating), ``spec``: ``UniformQuantizer.spec()`` for the
    new quantizers. Returns what was added.

    ``ranges``: a dict shared between calls on graphs of one model that differ only in which layers are
    quantized (a cost table's graphs): a new quantizer whose tensor (by name, with the same ``spec``) it holds
    reuses that scale/zero point instead of calibrating; on a miss the inputs and outputs of every Add of two
    computed tensors in the graph are calibrated in the same pass and stored. The reused ranges were observed with other layers quantized, so
    they suit graphs that are timed and sized (neither depends on a scale's value), not a deployed model."""
    from onnx import helper, numpy_helper

    g = proto.graph
    adds, points = residual_points(g)
    if not adds:
        return {"residual_adds": 0, "new_quantizers": {}, "shared": 0}
    if spec.get("per_channel") or spec.get("bits", 8) > 8:
        raise ValueError("integer residuals need per-tensor activation quantizers of at most 8 bits")
    if ranges is None:
        qp = _calibrate(proto, points, feeds() if callable(feeds) else feeds, spec) if points else {}
    else:
        if any(_range_key(spec, p) not in ranges for p in points):
            # every Add of two computed tensors, not only this graph's residual ones: a graph with other layers
            # quantized makes other Adds residual, and finds their tensors here
            G = _G(g)
            every_add = [n for n in g.node if n.op_type == "Add" and len(n.input) == 2
                         and not any(G.is_const(i) for i in n.input)]
            every = list(dict.fromkeys([*points, *(t for a in every_add for t in (*a.input, _post_relu(G, a)))]))
            got = _calibrate(proto, every, feeds() if callable(feeds) else feeds, spec)
            ranges.update({_range_key(spec, t): v for t, v in got.items()})
        qp = {p: ranges[_range_key(spec, p)] for p in points}
    signed = bool(spec.get("symmetric"))
    dt = np.int8 if signed else np.uint8
    inits, nodes = [], []
    k = [0]

    def qdq(src: str, scale_name: str, zp_name: str, tag: str) -> str:
        k[0] += 1
        q, d = f"{tag}.q{k[0]}", f"{tag}.dq{k[0]}"
        nodes.append(helper.make_node("QuantizeLinear", [src, scale_name, zp_name], [q], name=f"{q}/QuantizeLinear"))
        nodes.append(helper.make_node("DequantizeLinear", [q, scale_name, zp_name], [d], name=f"{d}/DequantizeLinear"))
        return d

    new_q: dict[str, str] = {}
    for i, p in enumerate(points):
        s, z = qp[p]
        tag = f"residual{i}"
        inits += [numpy_helper.from_array(np.array(s, dtype=np.float32), f"{tag}.scale"),
                  numpy_helper.from_array(np.array(z, dtype=dt), f"{tag}.zp")]
        new_q[p] = qdq(p, f"{tag}.scale", f"{tag}.zp", tag)
    G = _G(g)
    shared = 0
    made: set[str] = set()
    for a in adds:
        for j, t in enumerate(list(a.input)):
            if t in new_q:
                a.input[j] = new_q[t]
                continue
            q, chain = _share_base(G, t)
            zp = list(q.input[2:3])
            if chain:  # the same Slice/Pad on the integer tensor (zero padding = the zero point), then DQ
                src = q.output[0]
                for c in chain:
                    ins = [src] + list(c.input[1:])
                    if c.op_type == "Pad":
                        ins = [src, c.input[1], zp[0] if zp else ""] + list(c.input[3:])
                    out = f"{c.output[0]}.int8"
                    nodes.append(helper.make_node(c.op_type, ins, [out], name=f"{c.name}.int8", domain=c.domain))
                    nodes[-1].attribute.extend(c.attribute)
                    src = out
                d = f"{src}.dq"
                nodes.append(helper.make_node("DequantizeLinear", [src, q.input[1]] + zp, [d], name=f"{d}/DQ"))
                src = d
            elif (dq := G.dq_of(q)) is not None:
                src = dq.output[0]
            else:
                src = f"{q.output[0]}.dq"
                if src not in made:
                    made.add(src)
                    nodes.append(helper.make_node("DequantizeLinear", [q.output[0], q.input[1]] + zp, [src],
                                                  name=f"{src}/DQ"))
            a.input[j] = src
            shared += 1
    g.node.extend(nodes)
    g.initializer.extend(inits)
    # every other consumer of a new output quantizer's tensor reads the dequantized value too
    G.refresh()
    for p, d in new_q.items():
        qname = G.prod[d].input[0]
        for c in list(G.cons.get(p, [])):
            if c.output[0] != qname:
                for j, i in enumerate(c.input):
                    if i == p:
                        c.input[j] = d
    _prune_and_sort(g)
    return {"residual_adds": len(adds), "new_quantizers": {p: {"scale": s, "zero_point": z} for p, (s, z) in qp.items()},
            "shared": shared}


def _prune_and_sort(g) -> None:
    """Drop nodes whose outputs nobody uses, then order nodes topologically (Kahn, stable)."""
    outs = {o.name for o in g.output}
    while True:
        used = {i for n in g.node for i in n.input} | outs
        dead = [n for n in g.node if not any(o in used for o in n.output)]
        if not dead:
            break
        keep = [n for n in g.node if any(o in used for o in n.output)]
        del g.node[:]
        g.node.extend(keep)
    avail = {i.name for i in g.input} | {i.name for i in g.initializer} | {""}
    pending, order = list(g.node), []
    while pending:
        rest = []
        for n in pending:
            if all(i in avail for i in n.input):
                order.append(n)
                avail.update(n.output)
            else:
                rest.append(n)
        if len(rest) == len(pending):
            raise ValueError(f"graph has a cycle or a missing input at {[n.name for n in rest[:3]]}")
        pending = rest
    copies = [type(n)() for n in order]
    for c, n in zip(copies, order):
        c.CopyFrom(n)
    del g.node[:]
    g.node.extend(copies)
