"""Compressed storage of N:M weights: kept values + bit-packed in-block indices, in one safetensors file.

For every N:M-masked layer the effective weight's GEMM view ``[out, K]`` (see :mod:`thrifty.ops.nm`) is cut
into blocks of M along K (zero-padded tail) and stored as ``values [out, K/M, N]`` in the weight's dtype and
``indices`` of ``ceil(log2 M)`` bits each, packed into a uint8 bit stream (2 bits per kept weight for 2:4,
3 bits for 4:8). Blocks with fewer than N nonzeros store zeros. Every other tensor of the state dict
(biases, BN, layers left dense) is stored as is. The file is written atomically (temp file + os.replace).

`load_sparse` returns the dense state dict of the stripped model (``thrifty.strip``), bit-identical to its
``state_dict()``.

Example:
    >>> import torch, torch.nn as nn, tempfile, os
    >>> from thrifty.sparse.weights import sparsify, NM
    >>> model = sparsify(nn.Sequential(nn.Linear(64, 64)), NM(2, 4))
    >>> path = os.path.join(tempfile.mkdtemp(), "m.nm.safetensors")
    >>> info = save_sparse(model, path)
    >>> info["stored_bytes"] < 0.6 * info["dense_bytes"]
    True
    >>> sd = load_sparse(path); sd["0.weight"].ne(0).float().mean().item()
    0.5
"""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch
import torch.nn as nn
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor

from thrifty.core import strip
from thrifty.nn.gemm_op import GemmOp
from thrifty.ops import nm as nmops
from thrifty.utils import atomic_write_bytes

__all__ = ["compress", "decompress", "save_sparse", "load_sparse", "FORMAT"]

FORMAT = "thrifty-nm-1"
PathLike = Union[str, os.PathLike]


def _bits(m: int) -> int:
    return max(1, (m - 1).bit_length())


def compress(w: Tensor, n: int, m: int) -> dict[str, Any]:
    """N:M weight -> ``{"values", "indices" (packed uint8), "shape", "n", "m", "bits"}``.

    Raises ValueError if some block of ``w`` holds more than ``n`` nonzeros.
    """
    nmops.check_nm(n, m)
    mat = nmops.as_matrix(w.detach().cpu())
    r, k = mat.shape
    kp = -(-k // m) * m
    blocks = torch.zeros(r, kp, dtype=mat.dtype)
    blocks[:, :k] = mat
    blocks = blocks.view(r, kp // m, m)
    nz = blocks != 0
    if nz.numel() and int(nz.sum(-1).max()) > n:
        raise ValueError(f"weight of shape {tuple(w.shape)} is not {n}:{m} sparse (a block has more than {n} nonzeros)")
    # nonzero positions first (stable: in order), then filler positions holding zeros
    idx = torch.sort(nz.to(torch.uint8), dim=-1, descending=True, stable=True).indices[..., :n]
    values = blocks.gather(-1, idx).contiguous()
    bits = _bits(m)
    flat = idx.reshape(-1).numpy().astype(np.uint16)
    bitarr = ((flat[:, None] >> np.arange(bits, dtype=np.uint16)) & 1).astype(np.uint8).reshape(-1)
    packed = torch.from_numpy(np.packbits(bitarr, bitorder="little"))
    return {"values": values, "indices": packed, "shape": list(w.shape), "n": n, "m": m, "bits": bits}


def decompress(values: Tensor, indices: Tensor, shape: list[int], n: int, m: int) -> Tensor:
    """Inverse of :func:`compress`: the dense weight of ``shape``."""
    r = shape[0]
    k = int(np.prod(shape[1:]))
    kp = -(-k // m) * m
    nb = kp // m
    bits = _bits(m)
    count = r * nb * n
    if tuple(values.shape) != (r, nb, n) or indices.numel() * 8 < count * bits:
        raise ValueError(f"compressed tensor does not match shape {shape} at {n}:{m}")
    bitarr = np.unpackbits(indices.numpy(), bitorder="little")[: count * bits].reshape(count, bits)
    idx = (bitarr.astype(np.int64) << np.arange(bits)).sum(1)
    if idx.max(initial=0) >= m:
        raise ValueError("corrupt N:M indices (index >= M)")
    blocks = torch.zeros(r, nb, m, dtype=values.dtype)
    blocks.scatter_(-1, torch.from_numpy(idx).view(r, nb, n), values)
    return nmops.from_matrix(blocks.view(r, kp)[:, :k], shape)


def _nm_layers(model: nn.Module) -> dict[str, tuple[int, int, GemmOp]]:
    from thrifty.sparse.weights import nm_masks

    out: dict[str, tuple[int, int, GemmOp]] = {}
    for name, layer, mk in nm_masks(model):
        key = f"{name}.weight" if name else "weight"
        n, m = mk.cfg.n, mk.cfg.m
        # several masks in one chain: the weight satisfies each; store with the sparsest pattern
        if key not in out or n / m < out[key][0] / out[key][1]:
            out[key] = (n, m, layer.op)
    return out


def save_sparse(model: nn.Module, path: PathLike) -> dict[str, Any]:
    """Write the stripped model's weights with N:M layers compressed; returns byte counts.

    ``dense_bytes``: the same state dict stored densely; ``stored_bytes``: tensor bytes actually stored;
    ``file_bytes``: size of the written file (adds the safetensors header).
    """
    layers = _nm_layers(model)
    if not layers:
        raise ValueError("save_sparse: the model has no N:M-masked layer (call thrifty.sparse.sparsify first)")
    plain = strip(copy.deepcopy(model))
    sd = {k: v.detach().cpu().contiguous() for k, v in plain.state_dict().items()}
    tensors: dict[str, Tensor] = {}
    meta: dict[str, Any] = {}
    dense_bytes = 0
    for key, t in sd.items():
        dense_bytes += t.numel() * t.element_size()
        if key in layers:
            n, m, op = layers[key]
            # blocks run along the GEMM reduction: compress the [out, in/g, *k] view (GPT-2 Conv1D, ConvTranspose)
            c = compress(op.gemm_weight(t).contiguous(), n, m)
            tensors[f"{key}::values"], tensors[f"{key}::indices"] = c["values"], c["indices"]
            meta[key] = {k: c[k] for k in ("shape", "n", "m", "bits")}
            if op.kind in ("linear_t", "conv_transpose1d", "conv_transpose2d"):
                meta[key].update(kind=op.kind, groups=op.groups, stored_shape=list(t.shape))
        else:
            tensors[key] = t.clone()
    stored = sum(t.numel() * t.element_size() for t in tensors.values())
    data = st_save(tensors, metadata={"format": FORMAT, "nm_layers": json.dumps(meta)})
    atomic_write_bytes(path, data)
    return {"path": str(path), "dense_bytes": dense_bytes, "stored_bytes": stored, "file_bytes": len(data),
            "layers": {k: f"{v['n']}:{v['m']}" for k, v in meta.items()}}


def load_sparse(path: PathLike) -> dict[str, Tensor]:
    """Read a :func:`save_sparse` file -> dense state dict for ``thrifty.strip(model)``."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"N:M weights file not found: {p}")
    raw = p.read_bytes()
    try:
        tensors = st_load(raw)
        header_len = int.from_bytes(raw[:8], "little")
        header = json.loads(raw[8:8 + header_len])
        info = header.get("__metadata__", {})
    except Exception as e:  # safetensors raises its own error types
        raise ValueError(f"{p}: not a readable safetensors file ({e})") from None
    if info.get("format") != FORMAT:
        raise ValueError(f"{p}: not a thrifty N:M file (format {info.get('format')!r}, expected {FORMAT!r})")
    meta = json.loads(info["nm_layers"])
    out: dict[str, Tensor] = {}
    for key, t in tensors.items():
        if "::" not in key:
            out[key] = t
    for key, c in meta.items():
        t = decompress(tensors[f"{key}::values"], tensors[f"{key}::indices"], c["shape"], c["n"], c["m"])
        if "kind" in c:
            t = GemmOp(c["kind"], groups=c["groups"]).from_gemm_weight(t, c["stored_shape"]).contiguous()
        out[key] = t
    return out
