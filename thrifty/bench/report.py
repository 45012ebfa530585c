"""Report folder for benchmark results: results.json, a markdown table, plots.

Example:
    >>> from thrifty.bench.report import markdown_table
    >>> r = {"variant": "m_torch", "backend": "torch", "artifact_bytes": 1000, "scenarios": {"Offline": {
    ...     "valid": True, "metric": "samples_per_second", "value": 10.0, "percentiles_ms": {}, "reasons": []}}}
    >>> print(markdown_table([r]).splitlines()[2])
    | m_torch | torch | Offline | VALID | 10 samples/s | - | - | 0.001 |  |
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

from thrifty.utils import atomic_write_text

__all__ = ["markdown_table", "accuracy_table", "write_report", "plot_results", "portable_paths"]

PATH_KEYS = frozenset({"logdir", "path"})  # the keys under which benchmark results hold file system paths


def portable_paths(obj: Any, base: str | Path) -> Any:
    """A copy of ``obj`` (nested dicts/lists) whose absolute paths under :data:`PATH_KEYS` are relative to ``base``.

    Written results then stay valid when their folder moves and say nothing about the machine they ran on.
    Example:
        >>> portable_paths({"logdir": "/data/bench/m/Offline", "runs": [{"path": "/data/m.onnx"}]}, "/data/bench")
        {'logdir': 'm/Offline', 'runs': [{'path': '../m.onnx'}]}
    """
    if isinstance(obj, dict):
        return {k: (Path(os.path.relpath(v, os.path.abspath(base))).as_posix()
                    if k in PATH_KEYS and isinstance(v, (str, Path)) and os.path.isabs(v) else portable_paths(v, base))
                for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [portable_paths(v, base) for v in obj]
    return obj


def _fmt(v: Any, nd: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{nd}g}"
    return str(v)


def _metric(r: dict[str, Any]) -> str:
    if r.get("metric") == "samples_per_second":
        return f"{_fmt(r.get('value'))} samples/s"
    if r.get("metric"):
        return f"{_fmt(r.get('value'))} ms ({r['metric'].split('_')[0]})"
    return "-"


def markdown_table(results: Sequence[dict[str, Any]]) -> str:
    """One row per (variant, scenario): validity, the scenario's metric, Server max QPS/bound, p99, size."""
    lines = ["| variant | backend | scenario | result | metric | Server max QPS (bound) | p99 latency ms | "
             "artifact MB | why INVALID |", "|---|---|---|---|---|---|---|---|---|"]
    for res in results:
        for sc, r in res.get("scenarios", {}).items():
            srv = "-"
            if sc == "Server":
                srv = f"{_fmt(r.get('max_qps'))} ({_fmt(r.get('latency_bound_ms'))} ms)"
            why = "; ".join(r.get("reasons", []))
            lines.append(f"| {res.get('variant')} | {res.get('backend')} | {sc} | "
                         f"{'VALID' if r.get('valid') else 'INVALID'} | {_metric(r)} | {srv} | "
                         f"{_fmt(r.get('percentiles_ms', {}).get('99.00'))} | "
                         f"{_fmt(res.get('artifact_bytes', 0) / 1e6, 3)} | {why} |")
    return "\n".join(lines)


def accuracy_table(results: Sequence[dict[str, Any]]) -> str:
    """Accuracy-mode results (LoadGen's logged responses) per variant."""
    lines = ["| variant | samples | top-1 vs labels | argmax agreement vs reference | cosine mean (min) vs reference |",
             "|---|---|---|---|---|"]
    for res in results:
        a = res.get("accuracy")
        if not a:
            continue
        m = a.get("metrics", {})
        cos = f"{_fmt(m.get('cosine_mean'), 6)} ({_fmt(m.get('cosine_min'), 6)})" if "cosine_mean" in m else "-"
        lines.append(f"| {res.get('variant')} | {m.get('n', '-')} | {_fmt(m.get('top1'))} | "
                     f"{_fmt(m.get('agreement'))} | {cos} |")
    return "\n".join(lines)


def plot_results(results: Sequence[dict[str, Any]], outdir: str | Path, prefix: str = "") -> list[str]:
    """Latency percentiles per scenario, Offline throughput, and accuracy vs size vs latency (PNG files)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    files = []
    scen = [s for s in ("SingleStream", "MultiStream", "Server", "Offline")
            if any(s in r.get("scenarios", {}) for r in results)]
    if scen:
        fig, axes = plt.subplots(1, len(scen), figsize=(4.2 * len(scen), 3.4), squeeze=False)
        for ax, sc in zip(axes[0], scen):
            for r in results:
                p = r.get("scenarios", {}).get(sc, {}).get("percentiles_ms", {})
                if p:
                    ks = sorted(p, key=float)
                    ax.plot([float(k) for k in ks], [p[k] for k in ks], marker="o", label=r["variant"])
            ax.set_title(sc)
            ax.set_xlabel("percentile")
            ax.set_ylabel("latency (ms)")
            ax.set_yscale("log")
        axes[0][0].legend(fontsize=7)
        fig.tight_layout()
        path = outdir / f"{prefix}latency.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        files.append(str(path))
    thr = [(r["variant"], r["scenarios"]["Offline"].get("value")) for r in results
           if r.get("scenarios", {}).get("Offline", {}).get("value")]
    if thr:
        fig, ax = plt.subplots(figsize=(max(4, 1.2 * len(thr)), 3.4))
        ax.bar([t[0] for t in thr], [t[1] for t in thr], color="tab:blue")
        ax.set_ylabel("Offline samples/s")
        ax.tick_params(axis="x", rotation=30, labelsize=7)
        fig.tight_layout()
        path = outdir / f"{prefix}throughput.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        files.append(str(path))
    pts = []
    for r in results:
        acc = r.get("accuracy_value")
        if acc is None:
            m = (r.get("accuracy") or {}).get("metrics", {})
            acc = m.get("top1", m.get("cosine_mean"))
        lat = r.get("latency_ms")
        if lat is None:
            lat = r.get("scenarios", {}).get("SingleStream", {}).get("value")
        size = r.get("size_bytes", r.get("artifact_bytes"))
        if acc is not None and size:
            pts.append((r["variant"], size / 1e6, acc, lat))
    if pts:  # one panel per model (the part of the variant name before "_"): metrics differ across models
        fams = sorted({p[0].split("_")[0] for p in pts})
        fig, axes = plt.subplots(1, len(fams), figsize=(5.2 * len(fams), 3.8), squeeze=False)
        lats = [p[3] for p in pts if p[3]]
        for ax, fam in zip(axes[0], fams):
            fp = [p for p in pts if p[0].split("_")[0] == fam]
            sc = ax.scatter([p[1] for p in fp], [p[2] for p in fp], c=[p[3] or 0 for p in fp], cmap="viridis",
                            s=60, vmin=min(lats) if lats else 0, vmax=max(lats) if lats else 1)
            for v, x, y, _ in fp:
                ax.annotate(v[len(fam) + 1:] or v, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
            ax.set_title(fam)
            ax.set_xlabel("model size (MB)")
            ax.set_ylabel("accuracy (top-1, or cosine to FP32)")
            fig.colorbar(sc, ax=ax, label="SingleStream p90 latency (ms)")
        fig.tight_layout()
        path = outdir / f"{prefix}accuracy_size_latency.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        files.append(str(path))
    return files


def write_report(results: Sequence[dict[str, Any]], outdir: str | Path, title: str = "thrifty bench",
                 extra_markdown: str = "", prefix: str = "") -> dict[str, Any]:
    """Write ``results.json``, ``report.md`` and plots into ``outdir``; returns the paths.

    Paths in ``results.json`` (log folders) are relative to ``outdir``."""
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    plots = plot_results(results, outdir, prefix)
    md = [f"# {title}", "", markdown_table(results), "", "## Accuracy mode", "", accuracy_table(results), ""]
    if extra_markdown:
        md += [extra_markdown, ""]
    md += [f"![{Path(p).stem}]({Path(p).name})" for p in plots]
    js = atomic_write_text(outdir / f"{prefix}results.json", json.dumps(portable_paths(list(results), outdir), indent=1,
                                                                     default=str))
    mdp = atomic_write_text(outdir / f"{prefix}report.md", "\n".join(md) + "\n")
    return {"json": str(js), "markdown": str(mdp), "plots": plots}
