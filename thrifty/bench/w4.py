"""Weight-only 4-bit deployment of Linear layers: ONNX Runtime's block-wise ``com.microsoft.MatMulNBits``.

Every Linear layer (or those ``filter(module, name)`` keeps) becomes one MatMulNBits node: its weight ``[N, K]``
is stored as 4-bit codes in blocks of ``block_size`` consecutive elements along K, one float scale and one 4-bit
zero point per block (``w = (code - zp) * scale``); activations stay float. The codes are thrifty's own:

* a layer whose weight quantizer has at most 4 bits (PTQ / AdaQuant, per channel or per tensor) keeps its codes
  and scales exactly (a per-channel scale is repeated over the channel's blocks; symmetric codes are stored
  shifted by 8 with zero point 8, the same values);
* a per-group weight quantizer (``group_size``) keeps its codes, scales and zero points (its group is the block;
  MatMulNBits needs a power of two >= 16);
* a Linear layer without a weight quantizer is quantized here, round to nearest with each block's min/max range
  (asymmetric, the range widened to include 0), the baseline LLM deployments use.

A layer whose weight quantizer has more bits (PTQ's 8-bit first/last layers) stays a float GEMM with its
fake-quantized weight, listed under ``skipped`` in the ``thrifty.w4`` metadata.
``accuracy_level=4`` lets ONNX Runtime quantize each activation block to int8 and run integer dot products
(fastest on x86); ``0`` computes in float32 (the dequantized weights exactly).

Example:
    >>> import tempfile, torch, torch.nn as nn
    >>> p = export_w4(nn.Sequential(nn.Linear(64, 32)), (torch.randn(2, 64),), tempfile.mkdtemp() + "/w4.onnx")
    >>> import onnx; [n.op_type for n in onnx.load(str(p)).graph.node]
    ['MatMulNBits']
"""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn

from thrifty.utils import atomic_write_bytes

__all__ = ["export_w4", "insert_nbits", "nbits_layers", "nbits_params", "w4_params", "rtn_blocks", "pack_nbits",
           "unpack_nbits", "dequantize_blocks"]

BITS = 4


def _check_block(block_size: int, where: str) -> None:
    if not isinstance(block_size, int) or block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"{where}: MatMulNBits needs a block size that is a power of two >= 16, got {block_size!r}")


def _blocks(k: int, block: int) -> int:
    return -(-k // block)


def rtn_blocks(w: torch.Tensor, block_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Round-to-nearest 4-bit codes of ``w [N, K]`` with one min/max range per block of K: (codes [N, K] in
    0..15, scales [N, blocks], zero points [N, blocks])."""
    from thrifty.ops import quant as Q

    n, k = w.shape
    nb = _blocks(k, block_size)
    g = torch.nn.functional.pad(w.detach().float(), (0, nb * block_size - k)).reshape(n, nb, block_size)
    s, zp = Q.qparams_from_range(g.amin(2), g.amax(2), BITS, symmetric=False)  # padding zeros: 0 is in range
    codes = torch.clamp(torch.round(g / s[..., None]) + zp[..., None], 0, 2**BITS - 1).reshape(n, -1)[:, :k]
    return codes.numpy().astype(np.int64), s.numpy().astype(np.float32), zp.numpy().astype(np.int64)


def dequantize_blocks(codes: np.ndarray, scales: np.ndarray, zp: np.ndarray, block_size: int) -> np.ndarray:
    """``(codes - zp) * scale`` per block: the float weight ``[N, K]`` MatMulNBits computes with."""
    k = codes.shape[1]
    rep = lambda a: np.repeat(a, block_size, axis=1)[:, :k]  # noqa: E731
    return ((codes - rep(zp)) * rep(scales).astype(np.float64)).astype(np.float32)


def w4_params(layer: nn.Module, name: str, block_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    """(codes [N, K] in 0..15, scales [N, blocks], zero points [N, blocks], where they came from) of a Linear."""
    from thrifty.bench.export import _qparams, _weight_quantizer
    from thrifty.ops import quant as Q

    w = layer.effective_weight().detach().float() if hasattr(layer, "effective_weight") else layer.weight.detach()
    q = _weight_quantizer(getattr(getattr(layer, "slots", None), "weight", None))
    if q is None:
        return (*rtn_blocks(w, block_size), "rtn")
    if q.bits > BITS:
        raise ValueError(f"layer {name!r}: its weight quantizer has {q.bits} bits; MatMulNBits stores {BITS}-bit "
                         f"codes (export {q.bits}-bit layers with export_onnx)")
    n, k = w.shape
    nb = _blocks(k, block_size)
    s, zp = (t.detach().float() for t in _qparams(q, w))
    group = getattr(q, "group_size", None)
    if group is not None:
        if group != block_size:
            raise ValueError(f"layer {name!r}: its quantizer's group_size={group} must be the block size "
                             f"({block_size})")
        s, zp = s.reshape(n, nb), zp.reshape(n, nb)
    elif q.per_channel and q.axis != 0:
        raise ValueError(f"layer {name!r}: per-channel weight quantization must be along the output axis 0")
    else:  # per channel (N,) or per tensor (): the same scale in every block
        s, zp = s.reshape(-1, 1).expand(n, nb), zp.reshape(-1, 1).expand(n, nb)
    zp = torch.zeros_like(s) if q.symmetric else torch.round(zp)
    rep = lambda a: a.repeat_interleave(block_size, dim=1)[:, :k]  # noqa: E731
    qmin, qmax = Q.qrange(q.bits, q.symmetric)
    codes = torch.clamp(torch.round(w / rep(s)) + rep(zp), qmin, qmax)
    if not torch.allclose((codes - rep(zp)) * rep(s), w, rtol=1e-4, atol=1e-6 * float(s.max())):
        raise ValueError(f"layer {name!r}: the effective weight is not on its quantizer's grid (a transform after "
                         f"the quantizer?); cannot export its 4-bit codes")
    if q.symmetric:  # codes in [-7, 7]: the unsigned container holds them shifted by 8, zero point 8
        codes, zp = codes + 2 ** (BITS - 1), zp + 2 ** (BITS - 1)
    return (codes.numpy().astype(np.int64), s.numpy().astype(np.float32), zp.numpy().astype(np.int64),
            "group quantizer" if group is not None else "quantizer")


def nbits_layers(model: nn.Module) -> dict[str, int]:
    """The layers :func:`thrifty.bench.export.export_onnx` deploys as MatMulNBits, and each one's block size:
    nn.Linear layers whose weight quantizer is per group (``group_size``) with at most 4 bits and whose input is
    not quantized (weight-only). ValueError for a group size MatMulNBits cannot take (a power of two >= 16)."""
    from thrifty.bench.export import _last_quantizer, _weight_quantizer
    from thrifty.nn import gemm_layers

    out = {}
    for name, layer in gemm_layers(model):
        wq = _weight_quantizer(getattr(layer.slots, "weight", None))
        group = getattr(wq, "group_size", None)
        if group is None or wq.bits > BITS or not isinstance(layer, nn.Linear) \
                or _last_quantizer(getattr(layer.slots, "input", None))[0] is not None:
            continue
        if group < 16 or group & (group - 1):
            raise ValueError(f"layer {name!r}: a {wq.bits}-bit per-group weight quantizer deploys as MatMulNBits, "
                             f"whose block size must be a power of two >= 16; got group_size={group}")
        out[name] = int(group)
    return out


@torch.no_grad()
def nbits_params(model: nn.Module, blocks: dict[str, int]) -> tuple[dict[str, tuple], dict[str, torch.Tensor]]:
    """:func:`insert_nbits`' ``params`` and ``weights`` for the layers ``blocks`` names (layer -> block size)."""
    mods = dict(model.named_modules())
    params = {n: (*w4_params(mods[n], n, b), b) for n, b in blocks.items()}
    return params, {n: mods[n].effective_weight().detach().float() for n in blocks}


def pack_nbits(codes: np.ndarray, zp: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """MatMulNBits' layout: B ``[N, blocks, block_size / 2]`` uint8, element 2i in the low nibble and 2i + 1 in the
    high one (the tail of the last block holds the zero point); zero points ``[N, ceil(blocks / 2)]`` alike."""
    n, k = codes.shape
    nb = zp.shape[1]
    if codes.min(initial=0) < 0 or codes.max(initial=0) > 15 or zp.min(initial=0) < 0 or zp.max(initial=0) > 15:
        raise ValueError("4-bit codes and zero points must lie in 0..15")
    full = np.repeat(zp, block_size, axis=1).astype(np.uint8)
    full[:, :k] = codes
    pairs = full.reshape(n, nb, block_size // 2, 2)
    b = (pairs[..., 0] | (pairs[..., 1] << 4)).astype(np.uint8)
    zpad = np.concatenate([zp, np.zeros((n, nb % 2), zp.dtype)], axis=1).reshape(n, -1, 2).astype(np.uint8)
    return b, (zpad[..., 0] | (zpad[..., 1] << 4)).astype(np.uint8)


def unpack_nbits(b: np.ndarray, k: int) -> np.ndarray:
    """Codes ``[N, K]`` back from :func:`pack_nbits`' B."""
    lo, hi = b & 0x0F, b >> 4
    return np.stack([lo, hi], axis=-1).reshape(b.shape[0], -1)[:, :k].astype(np.int64)


def _linears(model: nn.Module, filter: Optional[Callable[[nn.Module, str], bool]]) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and (filter is None or filter(m, n))]


def export_w4(model: nn.Module, example_inputs: tuple, path: str | os.PathLike, block_size: int = 32,
              input_names: Optional[Sequence[str]] = None, opset: int = 17, accuracy_level: int = 4,
              filter: Optional[Callable[[nn.Module, str], bool]] = None) -> Path:
    """Export ``model`` to ONNX at ``path`` (atomic) with its Linear layers as 4-bit MatMulNBits (module doc).

    ``block_size``: elements per block along K (16, 32, 64, 128, ...). ``filter(module, name)``: which Linear
    layers (default: all). Other layers stay as ``thrifty.strip`` leaves them (float). The model is not modified.
    What was exported (per layer: where the codes came from) is in the ``thrifty.w4`` metadata.
    """
    import onnx

    from thrifty.bench.export import _check_inputs, _torch_export, _weight_quantizer
    from thrifty.core import strip

    example_inputs, names = _check_inputs("export_w4", model, example_inputs, input_names)
    _check_block(block_size, "export_w4")
    if accuracy_level not in (0, 1, 2, 3, 4):
        raise ValueError(f"accuracy_level must be 0..4 (MatMulNBits), got {accuracy_level!r}")
    m = copy.deepcopy(model).eval()
    skipped: dict[str, str] = {}
    for n, mod in _linears(m, filter):
        q = _weight_quantizer(getattr(getattr(mod, "slots", None), "weight", None))
        if q is not None and q.bits > BITS:
            skipped[n] = f"{q.bits}-bit weight quantizer: stays float with its quantized weights (or use export_onnx)"
    with torch.no_grad():
        params = {n: w4_params(mod, n, block_size) for n, mod in _linears(m, filter) if n not in skipped}
    weights = {n: (mod.effective_weight() if hasattr(mod, "effective_weight") else mod.weight).detach().float()
               for n, mod in _linears(m, filter) if n in params}
    m = strip(m, tied="untie")  # a tied embedding keeps reading the dense weight, as in the simulated model
    data = _torch_export(m, example_inputs, names, opset)
    proto = onnx.load_from_string(data)
    meta: dict[str, Any] = {"block_size": block_size, "accuracy_level": accuracy_level, "skipped": skipped,
                            "layers": insert_nbits(proto, {n: (*p, block_size) for n, p in params.items()}, weights,
                                                   accuracy_level)}
    proto.metadata_props.add(key="thrifty.w4", value=json.dumps(meta))
    return atomic_write_bytes(path, proto.SerializeToString())


def insert_nbits(proto, params: dict[str, tuple], weights: dict[str, torch.Tensor],
                 accuracy_level: int = 4) -> dict[str, str]:
    """Replace, in place, each layer's float GEMM node by a MatMulNBits node holding its 4-bit codes.

    ``params[name]``: (codes [N, K], scales [N, blocks], zero points [N, blocks], source, block size), as
    :func:`w4_params` gives them; ``weights[name]``: the float weight the exported graph holds (to find the
    node). Returns layer -> source for the layers found in the graph (a layer not on the forward path is left
    out). Adds the ``com.microsoft`` opset and drops the float weights no node reads any more.
    """
    from onnx import helper, numpy_helper

    from thrifty.bench.export import _find_node

    g = proto.graph
    arrays = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    done: dict[str, str] = {}
    for name, (codes, scales, zp, source, block_size) in params.items():
        found = _find_node(g.node, arrays, _Probe(name, weights[name].numpy()))
        if found is None:
            continue
        node, layout = found
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        plain = (attrs.get("alpha", 1.0), attrs.get("beta", 1.0), attrs.get("transA", 0)) == (1, 1, 0)
        if node.op_type == "Gemm" and not plain:
            raise ValueError(f"layer {name!r}: a Gemm with alpha/beta/transA is not a plain Linear")
        n_out, k = codes.shape
        tag = name.replace(".", "_") or "root"
        b, zpp = pack_nbits(codes, zp, block_size)
        g.initializer.extend([numpy_helper.from_array(b, f"{tag}.w4"),
                              numpy_helper.from_array(np.asarray(scales, np.float32), f"{tag}.w4_scale"),
                              numpy_helper.from_array(zpp, f"{tag}.w4_zp")])
        ins = [node.input[0], f"{tag}.w4", f"{tag}.w4_scale", f"{tag}.w4_zp"]
        if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2]:
            ins += ["", node.input[2]]  # g_idx unused, then the bias
        new = helper.make_node("MatMulNBits", ins, list(node.output), name=f"{node.name}_Q4", domain="com.microsoft",
                               K=k, N=n_out, bits=BITS, block_size=block_size, accuracy_level=accuracy_level)
        node.CopyFrom(new)
        done[name] = source
    if not any(o.domain == "com.microsoft" for o in proto.opset_import):
        proto.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    used = {i for n in g.node for i in n.input}
    keep = [i for i in g.initializer if i.name in used]
    del g.initializer[:]
    g.initializer.extend(keep)
    return done


class _Probe:
    """What :func:`thrifty.bench.export._find_node` needs to locate a layer's node: its name and weight."""

    def __init__(self, name: str, weight: np.ndarray) -> None:
        self.name, self.weight = name, weight
