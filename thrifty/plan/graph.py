"""Which planned layers are neighbours in the deployed graph: producer -> consumer pairs of GEMM layers.

The latency of quantizing a layer depends on its neighbours: between two int8 layers ONNX Runtime fuses
DequantizeLinear -> QuantizeLinear away (the tensor stays integer), a lone int8 layer pays both. The cost model
measures a pairwise term for every pair :func:`layer_edges` returns.

A layer ``b`` is a neighbour of ``a`` when a path in the FP32 ONNX graph runs from ``a``'s GEMM node to ``b``'s
without passing another planned GEMM and through at most one residual ``Add`` (an Add of two computed tensors;
a bias Add has a constant input and is not counted): the residual stream of a ResNet or a transformer would
otherwise connect every block to every later one. Layers are located like the int8 export locates them (the
node whose weight initializer equals the layer's weight, else the module scope in the node name).

Example:
    >>> import torch, torch.nn as nn
    >>> m = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
    >>> from thrifty.bench.export import export_onnx
    >>> import tempfile; p = export_onnx(m, (torch.randn(2, 4),), tempfile.mkdtemp() + "/m.onnx")
    >>> layer_edges(p.read_bytes(), m, ["0", "2", "4"])
    [('0', '2'), ('2', '4')]
"""
from __future__ import annotations

from collections import defaultdict
from typing import Sequence

import numpy as np
import torch.nn as nn

__all__ = ["layer_edges", "layer_nodes"]

_GEMMS = ("Conv", "Gemm", "MatMul")


class _Probe:
    def __init__(self, name: str, weight: np.ndarray) -> None:
        self.name, self.weight = name, weight


def layer_nodes(proto, model: nn.Module, layers: Sequence[str]) -> dict[str, str]:
    """Layer name -> the name of its GEMM node in ``proto`` (an FP32 export of ``model``); layers not found are
    left out."""
    from onnx import numpy_helper

    from thrifty.bench.export import _find_node

    g = proto.graph
    arrays = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    mods = dict(model.named_modules())
    out: dict[str, str] = {}
    for n in layers:
        w = getattr(mods[n], "weight", None)
        hit = None
        if w is not None:
            hit = _find_node(g.node, arrays, _Probe(n, w.detach().float().numpy()))
        if hit is None:  # weights folded or transformed by the exporter: the module scope in the node name
            scope = "/" + n.replace(".", "/") + "/"
            cands = [x for x in g.node if x.op_type in _GEMMS and (scope in x.name or f"/{n}/" in x.name)]
            hit = (cands[0], "") if len(cands) == 1 else None
        if hit is not None and hit[0].name not in out.values():
            out[n] = hit[0].name or hit[0].output[0]
    return out


def layer_edges(graph: bytes, model: nn.Module, layers: Sequence[str], max_nodes: int = 64) -> list[tuple[str, str]]:
    """Producer -> consumer pairs of ``layers`` in the FP32 ONNX ``graph`` of ``model`` (module doc), sorted in
    ``layers`` order; ``max_nodes`` bounds each search."""
    import onnx

    proto = onnx.load_from_string(graph)
    g = proto.graph
    consts = {i.name for i in g.initializer} | {o for x in g.node if x.op_type == "Constant" for o in x.output}
    where = layer_nodes(proto, model, layers)
    key = {x.name or x.output[0]: x for x in g.node}
    layer_of = {id(key[v]): k for k, v in where.items()}
    consumers: dict[str, list] = defaultdict(list)
    for x in g.node:
        for i in x.input:
            consumers[i].append(x)
    order = {n: i for i, n in enumerate(layers)}
    edges: set[tuple[str, str]] = set()
    for a, node_name in where.items():
        # breadth-first from the layer's outputs: (tensor, residual Adds passed)
        todo = [(t, 0) for t in key[node_name].output]
        seen: set[tuple[int, int]] = set()
        steps = 0
        while todo and steps < max_nodes:
            t, adds = todo.pop(0)
            for c in consumers.get(t, []):
                if (id(c), adds) in seen:
                    continue
                seen.add((id(c), adds))
                steps += 1
                if id(c) in layer_of:
                    if layer_of[id(c)] != a:
                        edges.add((a, layer_of[id(c)]))
                    continue
                residual = c.op_type in ("Add", "Sum") and sum(i not in consts for i in c.input) > 1
                if residual and adds >= 1:
                    continue
                todo += [(o, adds + residual) for o in c.output]
    return sorted(edges, key=lambda e: (order[e[0]], order[e[1]]))
