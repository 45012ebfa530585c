"""Reading LoadGen's logs: mlperf_log_summary.txt -> structured result with VALID/INVALID and reasons in words,
mlperf_log_detail.txt -> errors/warnings, mlperf_log_accuracy.json -> per-sample outputs.

Example:
    >>> text = ("Scenario : Offline\\nMode     : PerformanceOnly\\nSamples per second: 100.5\\n"
    ...         "Result is : INVALID\\n  Min duration satisfied : NO\\n  Min queries satisfied : Yes\\n"
    ...         "  Early stopping satisfied: Yes\\nmin_duration (ms): 2000\\n")
    >>> r = parse_summary_text(text)
    >>> r["valid"], r["metric"], r["value"]
    (False, 'samples_per_second', 100.5)
    >>> r["reasons"][0].startswith("the run was shorter than min_duration")
    True
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["parse_summary", "parse_summary_text", "parse_detail", "read_accuracy_log", "explain"]

_KV = re.compile(r"^\s*([^:]+?)\s*:\s*(.*?)\s*$")
_PCT = re.compile(r"^(\d+(?:\.\d+)?) percentile latency \(ns\)$")
_METRIC = re.compile(r"^(\d+(?:\.\d+)?)th percentile latency \(ns\)$")


def _num(v: str) -> Any:
    try:
        f = float(v)
    except ValueError:
        return v
    return int(f) if f.is_integer() and "." not in v and "e" not in v.lower() else f


def parse_summary_text(text: str) -> dict[str, Any]:
    """Structured summary: scenario, mode, valid, metric/value, constraint flags, latency percentiles (ms),
    parameters, LoadGen's recommendations and early-stopping lines, and ``reasons`` (INVALID, in words)."""
    r: dict[str, Any] = {"constraints": {}, "percentiles_ms": {}, "params": {}, "recommendations": [],
                         "early_stopping": [], "stats": {}}
    section = "head"
    for raw in text.splitlines():
        line = raw.rstrip()
        s = line.strip()
        if not s or set(s) == {"="}:
            continue
        if s in ("Additional Stats", "Test Parameters Used"):
            section = s
            continue
        if s == "Recommendations:":
            section = "rec"
            continue
        if s == "Early Stopping Result:":
            section = "es"
            continue
        if section in ("rec", "es") and (s.startswith("*") or raw.startswith(" ")) and ":" not in s.split("*")[0]:
            (r["recommendations"] if section == "rec" else r["early_stopping"]).append(s.lstrip("* ").strip())
            continue
        m = _KV.match(s)
        if not m:
            if section == "es":
                r["early_stopping"].append(s)
            continue
        k, v = m.group(1), m.group(2)
        if k.endswith("satisfied"):
            r["constraints"][k.replace(" satisfied", "").strip().lower().replace(" ", "_")] = v.lower() == "yes"
        elif k == "Result is":
            r["valid"] = v.strip().upper() == "VALID"
        elif k in ("Scenario", "Mode", "SUT name"):
            r[k.lower().replace(" ", "_")] = v
        elif _PCT.match(k):
            r["percentiles_ms"][_PCT.match(k).group(1)] = float(v) / 1e6
        elif _METRIC.match(k) and section == "head":
            r["metric"] = f"p{_METRIC.match(k).group(1).rstrip('0').rstrip('.')}_latency_ms"
            r["value"] = float(v) / 1e6
        elif k in ("Samples per second", "Completed samples per second") and section == "head":
            r["metric"] = "samples_per_second"
            r["value"] = float(v)
        elif k == "Completed tokens per second":
            r["stats"]["tokens_per_second"] = float(v)
        elif section == "Test Parameters Used":
            r["params"][k] = _num(v)
        elif section == "Additional Stats" or section == "head":
            key = k.lower().replace(" (ns)", "_ms").replace(" ", "_")
            val = _num(v)
            if k.endswith("(ns)") and isinstance(val, (int, float)):
                val = val / 1e6
            r["stats"][key] = val
    if "valid" not in r:
        raise ValueError("not a LoadGen summary: no 'Result is' line")
    r["reasons"] = explain(r)
    return r


def parse_summary(path: str | Path) -> dict[str, Any]:
    """Parse a mlperf_log_summary.txt file (ValueError naming the file if it is not one)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"LoadGen summary not found: {path}")
    try:
        return parse_summary_text(path.read_text(errors="replace"))
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def explain(r: dict[str, Any]) -> list[str]:
    """Why a run is INVALID, in words (empty for VALID runs)."""
    if r.get("valid"):
        return []
    c, p, sc = r["constraints"], r["params"], r.get("scenario", "")
    out = []
    if c.get("min_duration") is False:
        hint = {"Offline": "offline_expected_qps was too low (it must over-estimate throughput, so LoadGen "
                           "issues enough samples to fill min_duration)",
                "SingleStream": "single_stream_expected_latency_ns was too high (it must under-estimate latency)",
                "MultiStream": "multi_stream_expected_latency_ns was too high (it must under-estimate latency)",
                "Server": "the schedule ended early"}.get(sc, "")
        out.append(f"the run was shorter than min_duration ({p.get('min_duration (ms)', '?')} ms): {hint}")
    if c.get("min_queries") is False:
        out.append(f"fewer queries were processed than min_query_count ({p.get('min_query_count', '?')})")
    if c.get("performance_constraints") is False:
        bound = p.get("target_latency (ns)")
        pct = r["percentiles_ms"].get("99.00")
        bound_s = f"{bound / 1e6:.3g} ms" if isinstance(bound, (int, float)) else "the bound"
        out.append(f"the 99th-percentile latency ({pct:.3g} ms) exceeds the latency bound {bound_s} at "
                   f"{p.get('target_qps', '?')} queries/s: the system cannot sustain this arrival rate"
                   if pct is not None else f"latency exceeded the bound {bound_s}")
    if c.get("early_stopping") is False:
        detail = " ".join(r["early_stopping"])
        out.append("too few queries under the latency target for LoadGen's early-stopping estimate of the "
                   f"percentile (run longer or raise min_query_count){': ' + detail if detail else ''}")
    for rec in r["recommendations"]:
        out.append(f"LoadGen recommends: {rec}")
    if not out:
        out.append("LoadGen reported INVALID without a failed constraint in the summary; see mlperf_log_detail.txt")
    return out


def parse_detail(path: str | Path) -> dict[str, Any]:
    """Errors, warnings and selected ``result_*``/``effective_*`` values from mlperf_log_detail.txt."""
    path = Path(path)
    out: dict[str, Any] = {"errors": [], "warnings": [], "values": {}}
    if not path.is_file():
        out["errors"].append(f"LoadGen detail log missing: {path}")
        return out
    for line in path.read_text(errors="replace").splitlines():
        if not line.startswith(":::MLLOG "):
            continue
        try:
            rec = json.loads(line[len(":::MLLOG "):])
        except json.JSONDecodeError:
            continue
        meta = rec.get("metadata") or {}
        key, val = rec.get("key", ""), rec.get("value")
        if meta.get("is_error"):
            out["errors"].append(f"{key}: {val}")
        elif meta.get("is_warning"):
            out["warnings"].append(f"{key}: {val}")
        if key.startswith(("result_", "effective_", "generated_")):
            out["values"][key] = val
    return out


def read_accuracy_log(path: str | Path, n: int | None = None) -> dict[int, np.ndarray]:
    """mlperf_log_accuracy.json -> {qsl_idx: float32 output}. Raises ValueError naming the file if malformed."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"LoadGen accuracy log not found: {path}")
    try:
        entries = json.loads(path.read_text() or "[]")
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    out: dict[int, np.ndarray] = {}
    for e in entries:
        try:
            idx, data = int(e["qsl_idx"]), bytes.fromhex(e["data"])
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{path}: malformed entry {str(e)[:80]}: {err}") from None
        if len(data) % 4:
            raise ValueError(f"{path}: response of sample {idx} has {len(data)} bytes, not float32 data")
        if n is not None and not 0 <= idx < n:
            raise ValueError(f"{path}: qsl_idx {idx} outside the dataset (0..{n - 1})")
        out[idx] = np.frombuffer(data, dtype=np.float32).copy()
    return out
