"""Benchmark settings: one frozen config, short laptop defaults, official MLPerf durations on request.

Example:
    >>> from thrifty.bench.settings import BenchConfig
    >>> s = BenchConfig(scenario="Server", server_latency_ms=50)
    >>> s.queries_needed()
    500
    >>> BenchConfig.official("Offline").min_duration_s
    600.0
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Optional

from thrifty.core import CONFIG_ALIASES, Config, deprecated_alias, register_config, register_pipeline

__all__ = ["BenchConfig", "SCENARIOS", "EARLY_STOP_MIN_QUERIES", "OFFICIAL_MIN_QUERIES", "default_threads"]

SCENARIOS = ("SingleStream", "MultiStream", "Server", "Offline")

# The fewest queries for which LoadGen's early-stopping estimate can succeed when no query is over the
# latency target (read from LoadGen's own "would need N more queries" messages): shorter runs are INVALID
# however fast the model is, so the short defaults never go below these.
EARLY_STOP_MIN_QUERIES = {"SingleStream": 64, "MultiStream": 662, "Server": 500, "Offline": 1}
# MLPerf Inference's official minimum query counts (with min_duration 600 s).
OFFICIAL_MIN_QUERIES = {"SingleStream": 1024, "MultiStream": 270336, "Server": 270336, "Offline": 24576}


def default_threads() -> int:
    """CPU cores available to this process."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)


@register_config
@dataclass(frozen=True)
class BenchConfig(Config):
    """How one LoadGen scenario is run.

    Args:
        scenario: "SingleStream" | "MultiStream" | "Server" | "Offline".
        mode: "performance" (timing, VALID/INVALID) or "accuracy" (every sample once, responses logged).
        min_duration_s: LoadGen min_duration (short default; MLPerf uses 600 s).
        min_query_count: None = the early-stopping minimum for the scenario (see EARLY_STOP_MIN_QUERIES).
        max_duration_s: LoadGen max_duration (0 = none).
        performance_sample_count: samples kept loaded for the performance run (None = min(dataset, 1024)).
        server_latency_ms: Server latency bound at the 99th percentile (None = automatic, see bench.run).
        server_target_qps: a fixed Server QPS; None searches for the highest QPS meeting the bound.
        server_search_tolerance: the search stops when (lowest failing)/(highest passing) - 1 <= this.
        server_max_probes: at most this many rates probed in one Server search.
        server_confirm_invalid: re-run an INVALID probe once; the rate fails only if both runs are INVALID.
        multistream_samples: samples per MultiStream query (MLPerf: 8).
        max_batch: dynamic batching limit of the SUT (Offline and Server merge queued samples up to it).
        workers: SUT worker threads, each running whole batches (None = one per core).
        threads: intra-op threads per worker. The default, one thread per worker and one worker per core, uses
            every core without intra-op barriers, which stall badly when the machine is shared.
        max_run_s: a scenario whose estimated run time exceeds this raises unless allow_long.
        allow_long: permit runs longer than max_run_s (official durations take hours).
        official_counts: min_query_count defaults to MLPerf's official count of each scenario.
        seed: LoadGen's qsl/sample/schedule RNG seeds.
    """

    scenario: str = "Offline"
    mode: str = "performance"
    min_duration_s: float = 2.0
    min_query_count: Optional[int] = None
    max_duration_s: float = 0.0
    performance_sample_count: Optional[int] = None
    server_latency_ms: Optional[float] = None
    server_target_qps: Optional[float] = None
    server_search_tolerance: float = 0.05
    server_max_probes: int = 8
    server_confirm_invalid: bool = True
    multistream_samples: int = 8
    max_batch: int = 64
    workers: Optional[int] = None
    threads: int = 1
    max_run_s: float = 600.0
    allow_long: bool = False
    official_counts: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if self.scenario not in SCENARIOS:
            raise ValueError(f"scenario must be one of {SCENARIOS}, got {self.scenario!r}")
        if self.mode not in ("performance", "accuracy"):
            raise ValueError(f"mode must be 'performance' or 'accuracy', got {self.mode!r}")
        if not self.min_duration_s >= 0:
            raise ValueError(f"min_duration_s must be >= 0, got {self.min_duration_s}")
        if self.min_query_count is not None and self.min_query_count < 1:
            raise ValueError(f"min_query_count must be >= 1, got {self.min_query_count}")
        if self.performance_sample_count is not None and self.performance_sample_count < 1:
            raise ValueError(f"performance_sample_count must be >= 1, got {self.performance_sample_count}")
        if self.server_latency_ms is not None and not self.server_latency_ms > 0:
            raise ValueError(f"server_latency_ms must be > 0, got {self.server_latency_ms}")
        if self.server_target_qps is not None and not self.server_target_qps > 0:
            raise ValueError(f"server_target_qps must be > 0, got {self.server_target_qps}")
        if not 0 < self.server_search_tolerance < 1:
            raise ValueError(f"server_search_tolerance must be in (0, 1), got {self.server_search_tolerance}")
        for name in ("server_max_probes", "multistream_samples", "max_batch", "workers", "threads"):
            if getattr(self, name) is not None and int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_batch < self.multistream_samples and self.scenario == "MultiStream":
            raise ValueError(f"max_batch ({self.max_batch}) must be >= multistream_samples "
                             f"({self.multistream_samples}) so one MultiStream query runs as one batch")

    @classmethod
    def official(cls, scenario: str, **kw) -> "BenchConfig":
        """MLPerf Inference's official run lengths (600 s, official query counts); implies allow_long."""
        return cls(scenario=scenario, min_duration_s=600.0, allow_long=True, official_counts=True, **kw)

    def for_scenario(self, scenario: str) -> "BenchConfig":
        return dataclasses.replace(self, scenario=scenario)

    def queries_needed(self) -> int:
        """min_query_count, defaulting to the early-stopping minimum of the scenario."""
        if self.min_query_count is not None:
            return int(self.min_query_count)
        return (OFFICIAL_MIN_QUERIES if self.official_counts else EARLY_STOP_MIN_QUERIES)[self.scenario]

    def intra_threads(self) -> int:
        return int(self.threads)

    def n_workers(self) -> int:
        return int(self.workers) if self.workers is not None else max(1, default_threads() // self.intra_threads())

    def estimate_seconds(self, query_seconds: float) -> float:
        """Expected wall time of one run given the time one query takes (from calibration)."""
        return max(self.min_duration_s, self.queries_needed() * query_seconds)

    def check_duration(self, query_seconds: float, what: str = "") -> float:
        """Raise ValueError when a run would last longer than max_run_s and allow_long is False."""
        est = self.estimate_seconds(query_seconds)
        if est > self.max_run_s and not self.allow_long:
            raise ValueError(
                f"{what}{self.scenario} would run for about {_human(est)} (min_duration_s={self.min_duration_s}, "
                f"min_query_count={self.queries_needed()}, {query_seconds * 1e3:.3g} ms per query), more than "
                f"max_run_s={self.max_run_s:g} s; lower them, or pass allow_long=True (--allow-long) if you "
                f"really mean it")
        return est


def _human(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} hours"
    if seconds >= 60:
        return f"{seconds / 60:.1f} minutes"
    return f"{seconds:.1f} s"


register_pipeline(BenchConfig, "configures a benchmark run", "thrifty.bench.run(model, cfg, data)")
# Renamed for the naming rule (docs/naming.md); the old name works for one release.
CONFIG_ALIASES["BenchSettings"] = "BenchConfig"
__getattr__ = deprecated_alias(__name__, {"BenchSettings": ("BenchConfig", BenchConfig)})
