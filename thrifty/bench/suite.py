"""Running scenarios in this process: calibration, the Server max-QPS search, accuracy mode.

Example:
    >>> import numpy as np
    >>> from thrifty.bench.harness import Samples
    >>> from thrifty.bench.settings import BenchConfig
    >>> import tempfile
    >>> data = Samples((np.random.rand(256, 4).astype("float32"),))
    >>> res = run_suite(lambda xs: xs[0] * 2, data, BenchConfig(min_duration_s=0.2), ["Offline"],
    ...                 tempfile.mkdtemp())
    >>> res["scenarios"]["Offline"]["valid"]
    True
"""
from __future__ import annotations

import dataclasses
import math
import shutil
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from thrifty.bench.accuracy import check_accuracy
from thrifty.bench.harness import Backend, Samples, calibrate, run_loadgen
from thrifty.bench.settings import SCENARIOS, BenchConfig
from thrifty.utils import get_logger

__all__ = ["run_suite", "server_search", "auto_latency_bound_ms"]

log = get_logger("thrifty.bench")


def auto_latency_bound_ms(calib: dict[str, float]) -> float:
    """Default Server bound: 10x the median single-sample latency, at least 5 ms, rounded up to 1-2-5 steps."""
    raw = max(5.0, 10.0 * calib["single_median_s"] * 1e3)
    exp = 10 ** math.floor(math.log10(raw))
    return float(next(m * exp for m in (1, 2, 5, 10) if m * exp >= raw))


def server_search(backend: Backend, data: Samples, settings: BenchConfig, outdir: str | Path,
                  calib: dict[str, float], sustained_qps: Optional[float] = None) -> dict[str, Any]:
    """Highest Server QPS whose LoadGen run is VALID (99th-percentile latency under the bound).

    Bisection in log-QPS between the highest VALID and the lowest INVALID probe, starting at 0.7x the sustained
    throughput (``sustained_qps``, e.g. the Offline result through LoadGen, else the calibrated batched
    throughput: an upper bound on any Server rate), until they are within ``server_search_tolerance`` or
    ``server_max_probes`` runs are spent. Each probe is capped at max(3 x min_duration, min_duration + 5 s) so
    a hopeless rate cannot run away. Every probe's logs are kept under ``outdir/probes``.
    """
    outdir = Path(outdir)
    bound = settings.server_latency_ms
    if bound is None:
        raise ValueError("server_search needs settings.server_latency_ms")
    single_ms = calib["single_min_s"] * 1e3
    if bound <= single_ms:
        raise ValueError(f"Server latency bound {bound:g} ms is below the model's fastest single-sample latency "
                         f"({single_ms:.3g} ms measured): no arrival rate can meet it; raise server_latency_ms")
    probes: list[dict[str, Any]] = []
    best: Optional[dict[str, Any]] = None
    lo, hi = 0.0, float("inf")
    peak = sustained_qps or calib["throughput_peak"]
    settings.check_duration(1.0 / max(peak, 1e-9), what="each Server search probe: ")
    if not settings.max_duration_s:
        settings = dataclasses.replace(settings, max_duration_s=max(3 * settings.min_duration_s,
                                                                    settings.min_duration_s + 5.0))
    q = 0.7 * peak
    r: dict[str, Any] = {}
    for _ in range(settings.server_max_probes):
        if settings.estimate_seconds(1.0 / q) > settings.max_run_s and not settings.allow_long:
            probes.append({"target_qps": q, "valid": None, "reasons": [
                f"not run: a probe at {q:.3g} QPS needs {settings.queries_needed()} queries, longer than "
                f"max_run_s={settings.max_run_s:g} s"]})
            break
        r = run_loadgen(backend, data, settings, outdir / "probes" / f"qps_{q:.6g}", calib, target_qps=q)
        if not r["valid"] and settings.server_confirm_invalid:
            # one scheduler hiccup on a shared machine can push a p99 over the bound: a rate fails only if a
            # second run fails too (the reported maximum always has a VALID LoadGen log behind it)
            probes.append({"target_qps": q, "valid": False, "p99_ms": r["percentiles_ms"].get("99.00"),
                           "achieved_qps": r.get("value"), "reasons": r["reasons"], "rerun": True})
            r = run_loadgen(backend, data, settings, outdir / "probes" / f"qps_{q:.6g}_again", calib, target_qps=q)
        probes.append({"target_qps": q, "valid": r["valid"], "p99_ms": r["percentiles_ms"].get("99.00"),
                       "achieved_qps": r.get("value"), "reasons": r["reasons"]})
        log.info("Server probe %.4g QPS: %s (p99 %.3g ms, bound %g ms)", q, "VALID" if r["valid"] else "INVALID",
                 r["percentiles_ms"].get("99.00", float("nan")), bound)
        if r["valid"]:
            lo, best = q, r
        else:
            hi = q
        if hi < float("inf") and lo > 0 and hi / lo - 1 <= settings.server_search_tolerance:
            break
        if lo == 0:
            q = q / 2.0
        elif hi == float("inf"):
            q = q * 1.5
        else:
            q = math.sqrt(lo * hi)
        if q < 1e-3:
            break
    if best is None:
        res = dict(r) if r else {"percentiles_ms": {}, "constraints": {}, "scenario": "Server"}
        tried = [p["target_qps"] for p in probes if p["valid"] is not None]
        res.update(valid=False, max_qps=None, probes=probes, latency_bound_ms=bound,
                   reasons=[f"no probed arrival rate (lowest {min(tried, default=q):.3g} QPS) met the {bound:g} ms "
                            f"99th-percentile bound"] + r.get("reasons", []) + probes[-1]["reasons"][:1])
        return res
    final = outdir / "final"
    if final.exists():
        shutil.rmtree(final)
    shutil.copytree(best["logdir"], final)
    res = dict(best)
    res.update(max_qps=lo, logdir=str(final), probes=probes, search_bracket=[lo, hi if hi < float("inf") else None],
               search_converged=hi < float("inf") and hi / lo - 1 <= settings.server_search_tolerance)
    return res


def run_with_hint_retry(backend: Backend, data: Samples, settings: BenchConfig, outdir: Path,
                        calib: dict[str, float], target_qps: Optional[float] = None, retries: int = 2) -> dict[str, Any]:
    """run_loadgen, re-run up to ``retries`` times with 4x bolder hints when the only failure is a run shorter
    than min_duration (the hints come from a quick calibration and can be off; they are not results)."""
    scale, first_reasons = 1.0, None
    r = run_loadgen(backend, data, settings, outdir, calib, target_qps, scale)
    for _ in range(retries):
        if settings.mode != "performance" or settings.scenario == "Server" or r["valid"] or \
                r["constraints"].get("min_duration") is not False:
            break
        first_reasons = first_reasons or r["reasons"]
        scale *= 4.0
        log.info("%s ended before min_duration; re-running with %gx bolder hints", settings.scenario, scale)
        r = run_loadgen(backend, data, settings, outdir, calib, target_qps, scale)
    r["hint_scale"] = scale
    if first_reasons:
        r["hint_retry_reasons"] = first_reasons
    return r


def _scenario_settings(settings: BenchConfig, scenario: str, calib: dict[str, float]) -> BenchConfig:
    s = settings.for_scenario(scenario)
    if scenario == "Server" and s.server_latency_ms is None:
        s = dataclasses.replace(s, server_latency_ms=auto_latency_bound_ms(calib))
    return s


def run_suite(backend: Backend, data: Samples, settings: BenchConfig, scenarios: Sequence[str],
              outdir: str | Path, *, accuracy: bool = True, reference: Optional[np.ndarray] = None,
              accuracy_scenario: str = "Offline") -> dict[str, Any]:
    """Calibrate once, run each scenario (Server: the max-QPS search unless a target QPS is fixed), then an
    accuracy-mode run checked against labels and ``reference``. Returns a JSON-able dict."""
    bad = [s for s in scenarios if s not in SCENARIOS]
    if bad:
        raise ValueError(f"unknown scenario(s) {bad}; choose from {SCENARIOS} or 'all'")
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    calib = calibrate(backend, data, settings)
    res: dict[str, Any] = {"calibration": calib, "scenarios": {}, "samples": len(data), "dataset": data.name}
    # Offline before Server: its LoadGen-measured throughput bounds the Server search from above.
    order = sorted(dict.fromkeys(scenarios), key=lambda x: ("SingleStream", "MultiStream", "Offline", "Server").index(x))
    sustained = None
    if "Server" in order and "Offline" not in order and settings.server_target_qps is None:
        s = dataclasses.replace(settings.for_scenario("Offline"), min_duration_s=min(settings.min_duration_s, 1.0))
        sustained = run_with_hint_retry(backend, data, s, outdir / "server_prerun_Offline", calib).get("value")
    for sc in order:
        s = _scenario_settings(settings, sc, calib)
        log.info("LoadGen %s (%s)", sc, s.mode)
        if sc == "Server" and s.server_target_qps is None:
            if "Offline" in res["scenarios"]:
                sustained = res["scenarios"]["Offline"].get("value")
            res["scenarios"][sc] = server_search(backend, data, s, outdir / sc, calib, sustained)
        else:
            res["scenarios"][sc] = run_with_hint_retry(backend, data, s, outdir / sc, calib, s.server_target_qps)
        r = res["scenarios"][sc]
        log.info("%s: %s %s=%s", sc, "VALID" if r["valid"] else "INVALID", r.get("metric"), r.get("value"))
    if accuracy:
        s = dataclasses.replace(_scenario_settings(settings, accuracy_scenario, calib), mode="accuracy",
                                server_target_qps=settings.server_target_qps or calib["throughput"] / 2)
        r = run_loadgen(backend, data, s, outdir / f"accuracy_{accuracy_scenario}", calib,
                        target_qps=s.server_target_qps if accuracy_scenario == "Server" else None)
        r["metrics"] = check_accuracy(r["logdir"], labels=data.labels, reference=reference, n=len(data))
        res["accuracy"] = r
    return res
