"""Thread policy of the backends: ONNX Runtime and PyTorch in one process each get the cores they are told to use,
and an idle ONNX Runtime session takes none."""
from __future__ import annotations

import gc
import time

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from thrifty.bench.backends import OrtBackend, TorchBackend, ort_options, ort_session
from thrifty.bench.settings import default_threads


def _matmul_model(k: int = 256) -> bytes:
    w = numpy_helper.from_array(np.random.default_rng(0).random((k, k), dtype=np.float32), "w")
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, k])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, k])], [w])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


@pytest.mark.parametrize("threads", [1, 2, None])
def test_session_options_are_what_the_session_runs_with(threads):
    o = ort_session(_matmul_model(), threads=threads).get_session_options()
    assert o.intra_op_num_threads == (threads or default_threads())  # None: this process's cores, not ORT's guess
    assert o.inter_op_num_threads == 1
    assert o.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert o.get_session_config_entry("session.inter_op.allow_spinning") == "0"


def test_bad_thread_counts_are_refused():
    with pytest.raises(ValueError, match="threads"):
        ort_options(0)
    import torch

    with pytest.raises(ValueError, match="threads"):
        TorchBackend(torch.nn.Linear(2, 2), threads=-1)


def test_idle_session_takes_no_cpu_and_torch_keeps_its_threads():
    # After a 2-thread session has worked, holding it idle must cost (almost) no CPU time of this process:
    # spinning workers would burn up to 2 cores' worth while PyTorch runs next to them.
    import torch

    gc.collect()  # sessions of earlier tests (their own options) are gone
    be = OrtBackend(_matmul_model(), threads=2)
    x = np.random.default_rng(1).random((64, 256), dtype=np.float32)
    for _ in range(50):
        be((x,))
    c0, t0 = time.process_time(), time.perf_counter()
    time.sleep(0.5)
    idle = (time.process_time() - c0) / (time.perf_counter() - t0)
    # spinning measured ~10% of a core here; sleeping workers wake for nothing: well under 1% of one core
    assert idle < 0.01, idle
    before = torch.get_num_threads()
    try:
        TorchBackend(torch.nn.Linear(4, 4), threads=2)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
