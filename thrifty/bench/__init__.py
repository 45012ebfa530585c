"""MLPerf-style inference benchmarking with the official LoadGen, and real int8 deployment on CPU.

``thrifty.bench.run("resnet20", scenarios="all", backend="onnxruntime")`` benchmarks the pretrained
resnet20 under all four scenarios (a runnable example on a small model: :mod:`thrifty.bench.api`).

Pieces: :class:`BenchConfig` (short laptop defaults, ``BenchConfig.official``), the harness (QSL over
in-memory samples, a threaded SUT with dynamic batching), the four scenarios and accuracy mode
(:func:`run_suite`, :func:`server_search`), log parsing (:func:`parse_summary`, :func:`check_accuracy`),
backends (:class:`TorchBackend`, :class:`OrtBackend`), the int8 QDQ exporter (:func:`export_onnx`), which
GEMMs ONNX Runtime fused (:func:`fused_report`), weight-only 4-bit MatMulNBits export (:func:`export_w4`), N:M
weights compressed in the ONNX file (:func:`save_nm_onnx`, :func:`load_nm_onnx`) and reports.
"""
from thrifty.bench.accuracy import check_accuracy, score_outputs
from thrifty.bench.api import Workload, load_workload, run, tokenize_fixed
from thrifty.bench.backends import INT8_KERNELS, OrtBackend, TorchBackend, optimized_op_counts
from thrifty.bench.export import export_onnx, quant_layers
from thrifty.bench.harness import Samples, calibrate, run_loadgen
from thrifty.bench.layout import fused_report
from thrifty.bench.logs import parse_detail, parse_summary, parse_summary_text, read_accuracy_log
from thrifty.bench.nm_onnx import load_nm_onnx, save_nm_onnx
from thrifty.bench.settings import SCENARIOS, BenchConfig
from thrifty.bench.suite import auto_latency_bound_ms, run_suite, server_search
from thrifty.bench.w4 import export_w4
from thrifty.core import deprecated_alias

__all__ = [
    "run", "BenchConfig", "SCENARIOS", "Samples", "Workload", "load_workload", "tokenize_fixed",
    "run_suite", "run_loadgen", "server_search", "calibrate", "auto_latency_bound_ms",
    "parse_summary", "parse_summary_text", "parse_detail", "read_accuracy_log", "check_accuracy", "score_outputs",
    "TorchBackend", "OrtBackend", "optimized_op_counts", "INT8_KERNELS", "export_onnx", "quant_layers",
    "fused_report", "export_w4", "save_nm_onnx", "load_nm_onnx",
]

__getattr__ = deprecated_alias(__name__, {"BenchSettings": ("BenchConfig", BenchConfig)})
