"""Inference backends: PyTorch eager (float32) and ONNX Runtime on CPU.

A backend maps a batch ``tuple[np.ndarray, ...]`` to a numpy array with the batch as leading dimension.

Example:
    >>> import numpy as np, torch
    >>> b = TorchBackend(torch.nn.Linear(4, 2))
    >>> b((np.ones((3, 4), dtype=np.float32),)).shape
    (3, 2)
"""
from __future__ import annotations

import os
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np

__all__ = ["TorchBackend", "OrtBackend", "ort_session", "ort_options", "optimized_op_counts", "INT8_KERNELS"]

# ONNX Runtime ops that execute integer arithmetic (after its QDQ fusion), i.e. "real int8".
INT8_KERNELS = ("QLinearConv", "QLinearMatMul", "MatMulInteger", "ConvInteger", "MatMulIntegerToFloat",
                "DynamicQuantizeMatMul", "QGemm", "QLinearAdd", "QAttention", "NhwcQLinearConv")


def _to_numpy(out: Any) -> Any:
    import torch

    if isinstance(out, torch.Tensor):
        return out.detach().float().cpu().numpy()
    if isinstance(out, (tuple, list)) and out and all(isinstance(o, torch.Tensor) for o in out):
        b = out[0].shape[0] if out[0].ndim else -1
        if any(o.ndim == 0 or o.shape[0] != b for o in out):
            raise ValueError("model returned several tensors without a common leading batch dimension")
        return np.concatenate([o.detach().float().reshape(b, -1).cpu().numpy() for o in out], axis=1)
    if isinstance(out, Mapping) or hasattr(out, "logits"):  # a ModelOutput / dict: its main tensor, as PTQ reads it
        from thrifty.quant.calib import model_output

        return _to_numpy(model_output(out))
    return out  # harness.check_output raises a clear TypeError naming the type


class TorchBackend:
    """PyTorch eager inference of ``model`` (put in eval mode) under ``torch.inference_mode``."""

    name = "torch"

    def __init__(self, model, threads: Optional[int] = None) -> None:
        import torch

        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"TorchBackend needs an nn.Module, got {type(model).__name__}")
        if threads is not None:
            if int(threads) < 1:
                raise ValueError(f"threads must be a positive number of cores, got {threads}")
            torch.set_num_threads(int(threads))
            try:  # one inter-op pool thread: the SUT's workers already run batches in parallel
                torch.set_num_interop_threads(1)
            except RuntimeError:  # settable once, before any inter-op work; keep what the process has
                pass
        self.model = model.eval()
        dtypes = {p.dtype for p in model.parameters()} or {torch.float32}
        self.float_dtype = torch.float32 if torch.float32 in dtypes else next(iter(dtypes))

    def __call__(self, xs: Sequence[np.ndarray]) -> Any:
        import torch

        ts = [torch.from_numpy(np.ascontiguousarray(x)) for x in xs]
        ts = [t.to(self.float_dtype) if t.is_floating_point() else t for t in ts]
        with torch.inference_mode():
            return _to_numpy(self.model(*ts))


def ort_options(threads: Optional[int] = None, optimize: bool = True):
    """SessionOptions for one CPU session that uses ``threads`` cores and no more (None: the cores this process
    may run on). Its intra-op workers sleep instead of spinning when idle (``session.intra_op.allow_spinning=0``)
    and it runs no inter-op pool, so PyTorch (or another session) in the same process gets the cores it was told
    to use: spinning workers of an idle session took most of a 2-core machine from PyTorch next to it.
    ``optimize=False`` runs the graph as written (no fusion), the exact QDQ arithmetic."""
    import onnxruntime as ort

    from thrifty.bench.settings import default_threads

    if threads is not None and int(threads) < 1:
        raise ValueError(f"threads must be a positive number of cores, got {threads}")
    so = ort.SessionOptions()
    so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                   else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.inter_op_num_threads = 1
    so.intra_op_num_threads = int(threads) if threads else default_threads()
    so.log_severity_level = 3
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return so


def ort_session(model: str | os.PathLike | bytes, threads: Optional[int] = None,
                optimized_path: Optional[str] = None, optimize: bool = True):
    """A CPU InferenceSession with :func:`ort_options` (all graph optimizations, QDQ fusion included, unless
    ``optimize=False``); ``optimized_path`` saves the graph ONNX Runtime executes. A file (or bytes) written by
    :func:`thrifty.bench.nm_onnx.save_nm_onnx` is decompressed first."""
    import onnxruntime as ort

    so = ort_options(threads, optimize)
    if optimized_path:
        so.optimized_model_filepath = str(optimized_path)
    from thrifty.bench.nm_onnx import runnable

    if not isinstance(model, bytes) and not Path(model).is_file():
        raise FileNotFoundError(f"ONNX model not found: {model}")
    # N:M weights stored compressed: the runtime gets the dense graph (it has no N:M kernel)
    return ort.InferenceSession(runnable(model), sess_options=so, providers=["CPUExecutionProvider"])


_ORT_DTYPES = {"tensor(float)": np.float32, "tensor(int64)": np.int64, "tensor(int32)": np.int32,
               "tensor(double)": np.float64, "tensor(float16)": np.float16, "tensor(uint8)": np.uint8,
               "tensor(int8)": np.int8, "tensor(bool)": np.bool_}


class OrtBackend:
    """ONNX Runtime (CPU) inference of an .onnx file or serialized model bytes; output 0 is returned."""

    name = "onnxruntime"

    def __init__(self, model: str | os.PathLike | bytes, threads: Optional[int] = None) -> None:
        self.session = ort_session(model, threads)
        self.inputs = [(i.name, _ORT_DTYPES.get(i.type, np.float32)) for i in self.session.get_inputs()]

    def __call__(self, xs: Sequence[np.ndarray]) -> np.ndarray:
        if len(xs) != len(self.inputs):
            raise ValueError(f"ONNX model takes {len(self.inputs)} inputs ({[n for n, _ in self.inputs]}), "
                             f"got {len(xs)}")
        feed = {n: np.ascontiguousarray(x, dtype=dt) for (n, dt), x in zip(self.inputs, xs)}
        return self.session.run(None, feed)[0]


def optimized_op_counts(model: str | os.PathLike | bytes) -> dict[str, int]:
    """Op types of the graph ONNX Runtime actually executes (after its optimizations and QDQ fusion)."""
    import onnx

    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "optimized.onnx")
        ort_session(model, threads=1, optimized_path=path)
        g = onnx.load(path).graph
    return dict(Counter(n.op_type for n in g.node))
