"""Accuracy-mode checker: LoadGen's logged responses against the dataset's labels and/or a reference model.

Example:
    >>> import numpy as np
    >>> out = {0: np.array([0.1, 0.9], dtype=np.float32), 1: np.array([0.8, 0.2], dtype=np.float32)}
    >>> r = score_outputs(out, labels=np.array([1, 1]), reference=np.array([[0, 1], [1, 0]], dtype=np.float32))
    >>> r["top1"], r["agreement"]
    (0.5, 1.0)
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import numpy as np

from thrifty.bench.logs import read_accuracy_log

__all__ = ["check_accuracy", "score_outputs"]


def score_outputs(outputs: dict[int, np.ndarray], labels: Optional[np.ndarray] = None,
                  reference: Optional[np.ndarray] = None, n: Optional[int] = None) -> dict[str, Any]:
    """Metrics of per-sample outputs {index: vector}.

    * ``top1``: argmax == label, when labels are given and outputs are class scores (one per class).
    * against ``reference`` (the FP model's outputs, row i for sample i): ``agreement`` (same argmax),
      ``cosine_mean``/``cosine_min`` and ``max_abs_diff``.
    ``n`` (dataset size) makes missing samples an error.
    """
    if not outputs:
        raise ValueError("no responses to score (empty accuracy log)")
    idx = np.array(sorted(outputs))
    if n is not None and len(idx) != n:
        missing = sorted(set(range(n)) - set(idx.tolist()))[:5]
        raise ValueError(f"accuracy log has {len(idx)} of {n} samples (missing e.g. {missing})")
    dims = {outputs[i].size for i in idx}
    if len(dims) != 1:
        raise ValueError(f"responses have different sizes {sorted(dims)}")
    out = np.stack([outputs[i] for i in idx]).reshape(len(idx), -1)
    r: dict[str, Any] = {"n": int(len(idx)), "output_dim": int(out.shape[1])}
    if not np.isfinite(out).all():
        r["non_finite"] = int((~np.isfinite(out)).sum())
    if labels is not None:
        lab = np.asarray(labels)[idx]
        # class scores only when there is one output per class (not e.g. a 384-d embedding)
        if lab.ndim == 1 and np.issubdtype(lab.dtype, np.integer) and out.shape[1] in (int(lab.max()) + 1,
                                                                                       len(np.unique(lab))):
            r["top1"] = float((out.argmax(1) == lab).mean())
    if reference is not None:
        ref = np.asarray(reference, dtype=np.float32).reshape(len(reference), -1)[idx]
        if ref.shape != out.shape:
            raise ValueError(f"reference outputs have shape {ref.shape}, responses {out.shape}")
        cos = (out * ref).sum(1) / np.maximum(np.linalg.norm(out, axis=1) * np.linalg.norm(ref, axis=1), 1e-12)
        r.update(agreement=float((out.argmax(1) == ref.argmax(1)).mean()), cosine_mean=float(cos.mean()),
                 cosine_min=float(cos.min()), max_abs_diff=float(np.abs(out - ref).max()))
    return r


def check_accuracy(log: str | Path, labels: Optional[np.ndarray] = None, reference: Optional[np.ndarray] = None,
                   n: Optional[int] = None) -> dict[str, Any]:
    """Parse ``mlperf_log_accuracy.json`` (a file, or the LoadGen output folder holding it) and score it."""
    log = Path(log)
    if log.is_dir():
        log = log / "mlperf_log_accuracy.json"
    return score_outputs(read_accuracy_log(log, n), labels, reference, n)
