"""N:M-sparse GEMM weights of an ONNX model stored compressed on disk, decompressed when the model is loaded.

:func:`save_nm_onnx` finds every GEMM weight (a Conv/Gemm/MatMul weight initializer, or the integer codes behind
a weight DequantizeLinear whose zero code is a zero weight: int8 codes with zero points 0, or the uint8 container of
symmetric codes, zero points 128) whose GEMM view is N:M sparse along the reduction and stores it as
:func:`thrifty.sparse.storage.compress` does (kept values + bit-packed in-block indices, ``values`` in the
tensor's own dtype, uint8 codes shifted back to int8 so that their zero is 0), inside the same ONNX file;
everything else is untouched. ``layers`` names the weights to store compressed and each one's pattern (a plan
mixing 2:4 and 4:8 layers; a listed weight that is not sparse so is an error), instead of every weight that
happens to be N:M sparse. ONNX Runtime has no N:M kernel, so :func:`load_nm_onnx` rebuilds the dense model in
memory (bit-identical) for a session; :func:`thrifty.bench.backends.ort_session` (and so ``OrtBackend``) does
that by itself for a compressed file or its bytes.

Example:
    >>> import tempfile, torch, torch.nn as nn
    >>> from thrifty.bench import export_onnx, OrtBackend
    >>> from thrifty.sparse.weights import sparsify, NM
    >>> d = tempfile.mkdtemp()
    >>> p = export_onnx(sparsify(nn.Sequential(nn.Linear(64, 64)), NM(2, 4)), (torch.randn(2, 64),), d + "/m.onnx")
    >>> info = save_nm_onnx(p, d + "/m.nm.onnx")
    >>> info["layers"], info["stored_bytes"] < 0.6 * info["dense_bytes"]
    ({'0.weight': '2:4'}, True)
    >>> OrtBackend(load_nm_onnx(d + "/m.nm.onnx"))((torch.randn(3, 64).numpy(),)).shape
    (3, 64)
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np

from thrifty.utils import atomic_write_bytes

__all__ = ["save_nm_onnx", "load_nm_onnx", "is_nm_onnx", "runnable", "densify", "gemm_weights", "METADATA_KEY"]

METADATA_KEY = "thrifty.nm"  # the model metadata entry that marks (and describes) a compressed file


def gemm_weights(g) -> dict[str, bool]:
    """Initializers holding GEMM weights -> whether they are stored transposed ``[K, N]`` (MatMul, Gemm without
    transB) rather than ``[N, K...]`` (Conv, Gemm with transB). Integer codes behind a DequantizeLinear count when
    a zero weight has one code: int8 with zero points 0, uint8 with zero points 128 (the unsigned container of
    symmetric codes, :func:`thrifty.bench.export.export_onnx`)."""
    return {name: t for name, (t, _) in _gemm_weights(g).items()}


def _gemm_weights(g) -> dict[str, tuple[bool, int]]:
    """:func:`gemm_weights` with each weight's zero code (what a masked weight is stored as)."""
    from onnx import numpy_helper

    inits = {i.name: i for i in g.initializer}
    prod = {o: n for n in g.node for o in n.output}
    out: dict[str, tuple[bool, int]] = {}
    for n in g.node:
        if n.op_type not in ("Conv", "Gemm", "MatMul") or len(n.input) < 2:
            continue
        tb = next((a.i for a in n.attribute if a.name == "transB"), 0)
        transposed = n.op_type == "MatMul" or (n.op_type == "Gemm" and not tb)
        w = n.input[1]
        p = prod.get(w)
        if p is not None and p.op_type == "DequantizeLinear" and p.input[0] in inits:
            zp = numpy_helper.to_array(inits[p.input[2]]) if len(p.input) > 2 and p.input[2] in inits else None
            if zp is None or not zp.any():
                out[p.input[0]] = (transposed, 0)
            elif zp.dtype == np.uint8 and (zp == 128).all():
                out[p.input[0]] = (transposed, 128)
        elif w in inits:
            out[w] = (transposed, 0)
    return out


def save_nm_onnx(model_path: str | os.PathLike, out_path: str | os.PathLike, n: int = 2, m: int = 4, *,
                 layers: Optional[Mapping[str, tuple[int, int]]] = None) -> dict[str, Any]:
    """Write ``model_path`` to ``out_path`` (atomic; it may be ``model_path``) with its N:M-sparse GEMM weights
    compressed; returns ``{"layers": {initializer: "n:m"}, "dense_bytes", "stored_bytes"`` (of those weights),
    ``"onnx_bytes"`` (the input file), ``"file_bytes"`` (the written one)``}``. ``layers``: compress exactly these
    weight initializers, each with its ``(n, m)`` (``n``/``m`` are then unused). Raises ValueError when no weight
    is N:M sparse, or naming a listed weight that is not a GEMM weight or not sparse in its pattern."""
    import onnx
    import torch
    from onnx import numpy_helper

    from thrifty.sparse.storage import compress

    src = Path(model_path)
    if not src.is_file():
        raise FileNotFoundError(f"ONNX model not found: {src}")
    proto = onnx.load(str(src))
    g = proto.graph
    meta: dict[str, Any] = {}
    dense = stored = 0
    new: dict[str, list] = {}
    found = _gemm_weights(g)
    if layers is not None:
        bad = sorted(set(layers) - set(found))
        if bad:
            raise ValueError(f"{src}: {bad} are not GEMM weights that a zero weight stores as one code (float "
                             f"weights, or symmetric integer codes); GEMM weights: {sorted(found)}")
        found = {k: found[k] for k in layers}
    for name, (transposed, zero) in found.items():
        if layers is not None:
            n, m = layers[name]
        init = next(i for i in g.initializer if i.name == name)
        a = numpy_helper.to_array(init)
        if zero:  # uint8 codes around 128: int8 around 0 (exact), so a masked weight is a zero value
            a = (a.astype(np.int16) - zero).astype(np.int8)
        mat = a.T if transposed and a.ndim == 2 else a
        try:
            c = compress(torch.from_numpy(np.array(mat, order="C")), n, m)  # a writable copy
        except ValueError as e:  # not N:M sparse: stays dense
            if layers is not None:
                raise ValueError(f"{src}: weight {name!r} is not stored {n}:{m} sparse: {e}") from None
            continue
        values, indices = c["values"].numpy(), c["indices"].numpy()
        new[name] = [numpy_helper.from_array(values, f"{name}::nm_values"),
                     numpy_helper.from_array(indices, f"{name}::nm_idx")]
        meta[name] = {"shape": c["shape"], "n": n, "m": m, "transposed": bool(transposed and a.ndim == 2)}
        if zero:
            meta[name]["zero"] = zero
        dense += a.nbytes
        stored += values.nbytes + indices.nbytes
    if not meta:
        raise ValueError(f"{src}: no GEMM weight is {n}:{m} sparse (sparsify the model first; int8 weights need "
                         f"symmetric quantization so that a zero weight is a zero code)")
    # each compressed tensor takes its dense tensor's place: loading restores the graph exactly, order included
    keep = [t for i in g.initializer for t in new.get(i.name, [i])]
    del g.initializer[:]
    g.initializer.extend(keep)
    proto.metadata_props.add(key=METADATA_KEY, value=json.dumps(meta))
    data = proto.SerializeToString()
    atomic_write_bytes(out_path, data)
    return {"path": str(out_path), "layers": {k: f"{n}:{m}" for k in meta}, "dense_bytes": dense,
            "stored_bytes": stored, "onnx_bytes": src.stat().st_size, "file_bytes": len(data)}


def is_nm_onnx(model: str | os.PathLike | bytes) -> bool:
    """Whether ``model`` (a path or serialized bytes) is a :func:`save_nm_onnx` file."""
    import onnx

    data = model if isinstance(model, bytes) else Path(model).read_bytes()
    if METADATA_KEY.encode() not in data:  # cheap: the metadata key is stored verbatim
        return False
    return any(m.key == METADATA_KEY for m in onnx.load_from_string(data).metadata_props)


def runnable(model: str | os.PathLike | bytes) -> str | bytes:
    """``model`` as ONNX Runtime takes it: a :func:`save_nm_onnx` file (path or bytes) as its dense graph's bytes,
    parsed once; anything else unchanged (a path stays a path)."""
    import onnx

    data = model if isinstance(model, bytes) else Path(model).read_bytes()
    if METADATA_KEY.encode() not in data:
        return model if isinstance(model, bytes) else str(model)
    proto = onnx.load_from_string(data)
    if not any(m.key == METADATA_KEY for m in proto.metadata_props):
        return model if isinstance(model, bytes) else str(model)
    return densify(proto, str(model) if not isinstance(model, bytes) else "<bytes>").SerializeToString()


def load_nm_onnx(path: str | os.PathLike | bytes) -> bytes:
    """The dense model of a :func:`save_nm_onnx` file (a path or its bytes), serialized (give it to
    ``OrtBackend`` / ``ort_session``)."""
    import onnx

    if isinstance(path, bytes):
        return densify(onnx.load_from_string(path), "<bytes>").SerializeToString()
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"ONNX model not found: {p}")
    return densify(onnx.load(str(p)), str(p)).SerializeToString()


def densify(proto: Any, where: str = "model") -> Any:
    """Decompress the N:M weights of a parsed :func:`save_nm_onnx` model in place and return it; ``where``
    names it in errors."""
    import torch
    from onnx import numpy_helper

    from thrifty.sparse.storage import decompress

    info = {m.key: m.value for m in proto.metadata_props}
    if METADATA_KEY not in info:
        raise ValueError(f"{where}: not an N:M-compressed ONNX file (no {METADATA_KEY!r} metadata); load it directly")
    meta = json.loads(info[METADATA_KEY])
    g = proto.graph
    arrays = {i.name: i for i in g.initializer}
    rebuilt = {}
    for name, c in meta.items():
        try:
            values = torch.from_numpy(numpy_helper.to_array(arrays[f"{name}::nm_values"]).copy())
            indices = torch.from_numpy(numpy_helper.to_array(arrays[f"{name}::nm_idx"]).copy())
        except KeyError:
            raise ValueError(f"{where}: compressed tensors of {name!r} are missing") from None
        w = decompress(values, indices, c["shape"], c["n"], c["m"]).numpy()
        if c.get("zero"):
            w = (w.astype(np.int16) + c["zero"]).astype(np.uint8)
        rebuilt[f"{name}::nm_values"] = numpy_helper.from_array(np.ascontiguousarray(w.T if c["transposed"] else w),
                                                                name)
    packed = {f"{name}::nm_idx" for name in meta}
    keep = [rebuilt.get(i.name, i) for i in g.initializer if i.name not in packed]
    del g.initializer[:]
    g.initializer.extend(keep)
    props = [m for m in proto.metadata_props if m.key != METADATA_KEY]
    del proto.metadata_props[:]
    proto.metadata_props.extend(props)
    return proto
