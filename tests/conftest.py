"""Test-session settings.

Torch threads per pytest worker: ``THRIFTY_TEST_THREADS`` (default 1; ``make test`` runs 2 workers on 2 cores).
Thread count and ``ATEN_CPU_CAPABILITY`` change the order of float reductions, so every numeric test must pass
with any of them (``tools/test_matrix.sh`` runs the ``numeric`` tests over that matrix).

``numeric``: the tests that compare floating-point results, i.e. every test in the files below except their CLI
round trips (plus any test marked explicitly); ``tools/test_matrix.sh`` runs ``-m "numeric and not slow"``.
"""
import os

import pytest

_threads = os.environ.get("THRIFTY_TEST_THREADS", "1")
if not _threads.isdigit() or int(_threads) < 1:
    raise ValueError(f"THRIFTY_TEST_THREADS must be a positive integer, got {_threads!r}")
os.environ.setdefault("OMP_NUM_THREADS", _threads)
os.environ.setdefault("MKL_NUM_THREADS", _threads)

import torch  # noqa: E402

torch.set_num_threads(int(_threads))

NUMERIC_FILES = frozenset({
    "test_core_gemm.py", "test_nn_rangebn.py", "test_ops_accum.py", "test_ops_accum_kernel.py",
    "test_ops_hash_counter.py", "test_ops_mvue.py", "test_ops_mvue_kernel.py", "test_ops_nm.py",
    "test_ops_quant.py", "test_ops_quant_minmax.py", "test_quant_accum.py", "test_quant_ptq.py",
    "test_quant_train8.py", "test_sparse_actgrad.py", "test_sparse_nm.py", "test_bench_int8_graph.py",
    "test_datafree.py", "test_datafree_distill.py", "test_merge.py", "test_models.py",
    "test_attention.py", "test_attention_hf.py", "test_deploy.py",
})


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        # command-line round trips in these files check plumbing, not numbers (and are the slowest)
        if item.path.name in NUMERIC_FILES and "cli" not in item.name:
            item.add_marker(pytest.mark.numeric)
