"""The LoadGen harness: a Query Sample Library over in-memory samples, a System Under Test with a worker pool
and dynamic batching, calibration of LoadGen's hints, and one LoadGen run per call.

A *backend* is any callable ``backend(inputs: tuple[np.ndarray, ...]) -> np.ndarray`` mapping a batch
(leading dimension B on every input) to B float outputs; :mod:`thrifty.bench.backends` has PyTorch and ONNX
Runtime ones. Responses are the float32 bytes of each sample's output, so accuracy mode can check them.

Example:
    >>> import numpy as np
    >>> from thrifty.bench.harness import Samples, run_loadgen, calibrate
    >>> from thrifty.bench.settings import BenchConfig
    >>> data = Samples((np.random.rand(64, 4).astype("float32"),), labels=np.zeros(64, dtype=np.int64))
    >>> backend = lambda xs: xs[0] * 2
    >>> s = BenchConfig(scenario="SingleStream", min_duration_s=0.2)
    >>> import tempfile
    >>> r = run_loadgen(backend, data, s, tempfile.mkdtemp(), calibrate(backend, data, s))
    >>> r["valid"]
    True
"""
from __future__ import annotations

import dataclasses
import queue
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

from thrifty.bench.logs import parse_detail, parse_summary
from thrifty.bench.settings import BenchConfig

__all__ = ["Samples", "Backend", "calibrate", "check_output", "run_loadgen"]

Backend = Callable[[tuple], np.ndarray]

# Samples/s the Python SUT + LoadGen's own per-sample bookkeeping sustain on one core (measured with a
# no-op model: ~1e5/s). Throughput hints above it would make LoadGen schedule far more work than min_duration.
HARNESS_MAX_QPS = 250_000.0


@dataclass
class Samples:
    """The Query Sample Library's contents: ``inputs`` (tuple of arrays, leading dim N) and optional labels."""

    inputs: tuple
    labels: Optional[np.ndarray] = None
    name: str = "samples"
    trim_mask: Optional[int] = None  # index of an attention mask: batches drop trailing all-padding columns

    def __post_init__(self) -> None:
        if isinstance(self.inputs, np.ndarray):
            self.inputs = (self.inputs,)
        self.inputs = tuple(np.ascontiguousarray(a) for a in self.inputs)
        if not self.inputs:
            raise ValueError("Samples needs at least one input array")
        n = {a.shape[0] if a.ndim else -1 for a in self.inputs}
        if len(n) != 1 or -1 in n:
            raise ValueError(f"every input array needs the same leading (sample) dimension, got shapes "
                             f"{[a.shape for a in self.inputs]}")
        if self.labels is not None:
            self.labels = np.asarray(self.labels)
            if len(self.labels) != len(self):
                raise ValueError(f"{len(self.labels)} labels for {len(self)} samples")

    def __len__(self) -> int:
        return int(self.inputs[0].shape[0])

    def batch(self, idx: Sequence[int]) -> tuple:
        ii = np.asarray(idx, dtype=np.int64)
        out = tuple(a[ii] for a in self.inputs)
        if self.trim_mask is not None:  # dynamic sequence length: pad only to the batch's longest sample
            length = max(1, int(out[self.trim_mask].sum(1).max()))
            out = tuple(a[:, :length] if a.ndim >= 2 else a for a in out)
        return out


def check_output(out: Any, batch: int, what: str = "model") -> np.ndarray:
    """The backend output as a contiguous float32 array (batch, ...), or a clear TypeError/ValueError."""
    if not isinstance(out, np.ndarray):
        raise TypeError(f"{what} output of type {type(out).__name__} cannot be serialised into LoadGen responses; "
                        f"return a tensor/array whose first dimension is the batch")
    if out.dtype.kind not in "fiub":
        raise TypeError(f"{what} output dtype {out.dtype} cannot be serialised into LoadGen responses "
                        f"(needs a numeric array)")
    if out.ndim == 0 or out.shape[0] != batch:
        raise ValueError(f"{what} output shape {out.shape} has no leading batch dimension of size {batch}")
    return np.ascontiguousarray(out, dtype=np.float32)


def _time(fn: Callable[[], Any], reps: int) -> list[float]:
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def calibrate(backend: Backend, data: Samples, settings: BenchConfig, budget_s: float = 1.5) -> dict[str, float]:
    """Quick timing of batch 1, MultiStream-sized and max_batch batches, to set LoadGen's hints.

    Also validates the output (serialisable, batch-leading) before LoadGen starts. Runs in a separate thread
    like the SUT's workers: thread pools (OpenMP) behave differently in the main thread.
    """
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["res"] = _calibrate(backend, data, settings, budget_s)
        except BaseException as e:  # re-raised in the caller's thread
            box["err"] = e

    t = threading.Thread(target=target, name="thrifty-calibrate")
    t.start()
    t.join()
    if "err" in box:
        raise box["err"]
    return box["res"]


def _calibrate(backend: Backend, data: Samples, settings: BenchConfig, budget_s: float) -> dict[str, float]:
    n = len(data)
    sizes = {"single": 1, "multi": settings.multistream_samples, "batch": min(settings.max_batch, n)}
    res: dict[str, float] = {"output_dim": 0.0}
    rng = np.random.default_rng(settings.seed)
    import mlperf_loadgen as lg

    def step(idx: np.ndarray) -> np.ndarray:
        # What one SUT batch costs: gather, forward, output check, response objects (Python overhead
        # dominates tiny models, so leaving it out would over-state throughput by orders of magnitude).
        out = check_output(backend(data.batch(idx)), len(idx))
        [lg.QuerySampleResponse(0, out[k].ctypes.data, out[k].nbytes) for k in range(len(idx))]
        return out

    for key, b in sizes.items():
        idx = rng.integers(0, n, size=b)
        t0 = time.perf_counter()
        out = step(idx)  # warm-up, and the output check
        first = time.perf_counter() - t0
        res["output_dim"] = float(out[0].size)
        reps = int(max(2, min(20, budget_s / 3 / max(first, 1e-6))))
        ts = _time(lambda: step(idx), reps)
        res[f"{key}_min_s"] = float(min(ts))
        res[f"{key}_median_s"] = float(np.median(ts))
        res[f"{key}_size"] = float(b)
    res["throughput"] = min(HARNESS_MAX_QPS, res["batch_size"] / res["batch_median_s"])
    res["throughput_peak"] = min(HARNESS_MAX_QPS, res["batch_size"] / res["batch_min_s"])
    return res


class _SUT:
    """Worker pool with dynamic batching: queued samples are merged into batches of up to max_batch."""

    def __init__(self, backend: Backend, data: Samples, max_batch: int, workers: int) -> None:
        self.backend, self.data, self.max_batch = backend, data, max_batch
        self.q: "queue.Queue[Optional[list[tuple[int, int]]]]" = queue.Queue()
        self.errors: list[str] = []
        self.batches = 0
        self._lock = threading.Lock()
        self.threads = [threading.Thread(target=self._loop, daemon=True, name=f"thrifty-sut-{i}")
                        for i in range(workers)]
        for t in self.threads:
            t.start()

    def issue(self, query_samples) -> None:
        # Copy ids/indices now: LoadGen's sample vector is only valid during this callback.
        items = [(int(s.id), int(s.index)) for s in query_samples]
        for i in range(0, len(items), self.max_batch):
            self.q.put(items[i : i + self.max_batch])

    def flush(self) -> None:
        pass

    def _take(self) -> Optional[list[tuple[int, int]]]:
        first = self.q.get()
        if first is None:
            return None
        items = list(first)
        while len(items) < self.max_batch:  # merge whatever is already waiting (Server, Offline)
            try:
                nxt = self.q.get_nowait()
            except queue.Empty:
                break
            if nxt is None:
                self.q.put(None)
                break
            if len(items) + len(nxt) > self.max_batch:
                self.q.put(nxt)  # keep order roughly; another worker or the next round takes it
                break
            items.extend(nxt)
        return items

    def _loop(self) -> None:
        import mlperf_loadgen as lg

        while True:
            items = self._take()
            if items is None:
                return
            ids = [i for i, _ in items]
            try:
                out = check_output(self.backend(self.data.batch([j for _, j in items])), len(items))
                resp = [lg.QuerySampleResponse(qid, out[k].ctypes.data, out[k].nbytes) for k, qid in enumerate(ids)]
            except Exception as e:  # complete the samples anyway so LoadGen does not hang; report after
                with self._lock:
                    self.errors.append(f"{type(e).__name__}: {e}")
                out = None
                resp = [lg.QuerySampleResponse(qid, 0, 0) for qid in ids]
            lg.QuerySamplesComplete(resp)  # copies response data (accuracy mode) before returning
            with self._lock:
                self.batches += 1
            del out

    def close(self) -> None:
        for _ in self.threads:
            self.q.put(None)
        for t in self.threads:
            t.join()


def _test_settings(s: BenchConfig, calib: dict[str, float], target_qps: Optional[float], hint_scale: float):
    import mlperf_loadgen as lg

    ts = lg.TestSettings()
    ts.scenario = getattr(lg.TestScenario, s.scenario)
    ts.mode = lg.TestMode.AccuracyOnly if s.mode == "accuracy" else lg.TestMode.PerformanceOnly
    ts.min_duration_ms = int(round(s.min_duration_s * 1000))
    ts.max_duration_ms = int(round(s.max_duration_s * 1000))
    ts.min_query_count = s.queries_needed()
    ts.qsl_rng_seed = ts.sample_index_rng_seed = ts.schedule_rng_seed = s.seed
    # Hints: LoadGen sizes its query schedule from them, so latency hints must under-estimate and the
    # Offline QPS hint must over-estimate, else the run ends before min_duration and is INVALID.
    ts.single_stream_expected_latency_ns = max(1, int(0.5 * calib["single_min_s"] * 1e9 / hint_scale))
    ts.multi_stream_expected_latency_ns = max(1, int(0.5 * calib["multi_min_s"] * 1e9 / hint_scale))
    ts.multi_stream_samples_per_query = s.multistream_samples
    ts.offline_expected_qps = float(1.5 * calib["throughput_peak"] * s.n_workers() * hint_scale)
    if s.scenario == "Server":
        if target_qps is None or s.server_latency_ms is None:
            raise ValueError("Server runs need a target QPS and server_latency_ms")
        ts.server_target_qps = float(target_qps)
        ts.server_target_latency_ns = int(s.server_latency_ms * 1e6)
    return ts


def run_loadgen(backend: Backend, data: Samples, settings: BenchConfig, outdir: str | Path,
                calib: dict[str, float], target_qps: Optional[float] = None,
                hint_scale: float = 1.0) -> dict[str, Any]:
    """One LoadGen test (scenario and mode from ``settings``) in ``outdir``; returns the parsed result.

    ``hint_scale`` > 1 makes the latency hints smaller and the Offline QPS hint larger (used to retry a run
    that ended before min_duration). ``outdir`` is wiped first and keeps LoadGen's logs. LoadGen reads an ``audit.config`` (compliance audit
    overrides) from the path we pass: a file in ``outdir`` that never exists, so a stray one in the current
    directory cannot change the run.
    """
    import mlperf_loadgen as lg

    n = len(data)
    psc = settings.performance_sample_count or min(n, 1024)
    if psc > n:
        raise ValueError(f"performance_sample_count={psc} is larger than the dataset ({n} samples); "
                         f"lower it or use a bigger dataset")
    if settings.scenario == "MultiStream" and n < settings.multistream_samples:
        raise ValueError(f"MultiStream needs at least {settings.multistream_samples} samples, dataset has {n}")
    per_query = {"SingleStream": calib["single_median_s"], "MultiStream": calib["multi_median_s"],
                 "Server": 1.0 / max(target_qps or 1e9, 1e-9),
                 "Offline": calib["batch_median_s"] / calib["batch_size"]}[settings.scenario]
    if settings.mode == "performance":
        settings.check_duration(per_query)
    outdir = Path(outdir)
    if outdir.exists():
        shutil.rmtree(outdir)
    outdir.mkdir(parents=True)
    ts = _test_settings(settings, calib, target_qps, hint_scale)
    sut_impl = _SUT(backend, data, settings.max_batch, settings.n_workers())
    sut = lg.ConstructSUT(sut_impl.issue, sut_impl.flush)
    qsl = lg.ConstructQSL(n, psc, lambda idx: None, lambda idx: None)  # samples live in memory already
    log_out = lg.LogOutputSettings()
    log_out.outdir = str(outdir.resolve())
    log_out.copy_summary_to_stdout = False
    log_settings = lg.LogSettings()
    log_settings.log_output = log_out
    log_settings.enable_trace = False
    t0 = time.perf_counter()
    try:
        lg.StartTestWithLogSettings(sut, qsl, ts, log_settings, str((outdir / "audit.config").resolve()))
    finally:
        wall = time.perf_counter() - t0
        sut_impl.close()
        lg.DestroyQSL(qsl)
        lg.DestroySUT(sut)
    if sut_impl.errors:
        raise RuntimeError(f"the model failed during the LoadGen run ({len(sut_impl.errors)} batches): "
                           f"{sut_impl.errors[0]}")
    res = parse_summary(outdir / "mlperf_log_summary.txt") if settings.mode == "performance" else {}
    detail = parse_detail(outdir / "mlperf_log_detail.txt")
    res.update(scenario=settings.scenario, mode=settings.mode, wall_s=wall, batches=sut_impl.batches,
               logdir=str(outdir), errors=detail["errors"], warnings=detail["warnings"],
               performance_sample_count=psc, target_qps=target_qps,
               latency_bound_ms=settings.server_latency_ms if settings.scenario == "Server" else None)
    if settings.mode == "accuracy":
        res["valid"] = not detail["errors"]
        res["reasons"] = list(detail["errors"])
    return res


def settings_dict(s: BenchConfig) -> dict[str, Any]:
    return {f.name: getattr(s, f.name) for f in dataclasses.fields(s)}
