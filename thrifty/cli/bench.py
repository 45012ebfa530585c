"""``thrifty bench``: MLPerf LoadGen scenarios for a model on PyTorch and/or ONNX Runtime, FP32 and int8.

Writes a report folder (``--out``): results.json, report.md (tables), latency/throughput/accuracy plots, and
per-variant LoadGen logs. ``--quantize`` adds an int8 variant made by thrifty's PTQ (8-bit per-channel weights,
8-bit activations); on ``onnxruntime`` it runs as a real int8 QDQ graph.

Example:
    thrifty bench --model resnet20 --scenario all --backend torch,onnxruntime --quantize --out reports/bench
    thrifty bench --model minilm --scenario Offline --backend onnxruntime --quantize --seq-len 128
"""
from __future__ import annotations

import argparse
import os

from thrifty.cli import _common
from thrifty.cli._fields import Alias, add_config_flags, config_from_args


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("bench", help="MLPerf LoadGen benchmark (SingleStream/MultiStream/Server/Offline)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="zoo name (resnet20, minilm, ...), saved model stem, or .onnx")
    p.add_argument("--data", default=None, help="dataset name (default: the model's bundled data)")
    p.add_argument("--scenario", default="all", type=_scenarios,
                   help="all, or comma-separated SingleStream,MultiStream,Server,Offline")
    p.add_argument("--backend", default="torch", type=_backends, help="torch, onnxruntime, or both comma-separated")
    p.add_argument("--quantize", action="store_true", help="also benchmark an int8 PTQ variant")
    p.add_argument("--ptq-pipeline", default="rtn", choices=["rtn", "adaquant", "light", "advanced"])
    p.add_argument("--official", action="store_true",
                   help="official MLPerf durations and query counts (hours; implies --allow-long); the other "
                        "flags still override them")
    p.add_argument("--seq-len", type=_common.positive_int, default=128, help="token length for text models")
    p.add_argument("--max-samples", type=_common.positive_int, default=None,
                   help="use only the first N dataset samples")
    p.add_argument("--no-accuracy", action="store_true", help="skip the accuracy-mode run")
    p.add_argument("--out", default="reports/bench")
    _common.add_overwrite_option(p)
    _common.add_config_option(p)
    from thrifty.bench import BenchConfig

    # BenchConfig.scenario is one scenario; --scenario (a list) runs each in turn
    add_config_flags(p, "bench", BenchConfig, skip=("scenario",), title="LoadGen settings (thrifty.bench."
                     "BenchConfig fields)", on_load=lambda cfg: {"scenario": [cfg.scenario]},
                     aliases={"--min-duration": Alias(("min_duration_s",)),
                              "--server-qps": Alias(("server_target_qps",))})
    p.set_defaults(func=run)


def build_configs(args: argparse.Namespace) -> dict:
    """The configs the flags (and ``--config``) ask for: ``{"bench": BenchConfig}`` (for the first scenario)."""
    from thrifty.bench import BenchConfig

    first = list(args.scenario)[0]
    base = BenchConfig.official(first) if args.official else BenchConfig(scenario=first)
    return {"bench": config_from_args(args, "bench", base=base)}


def _choices_list(text: str | list, known: tuple[str, ...], what: str, all_ok: bool) -> list[str]:
    items = list(text) if isinstance(text, (list, tuple)) else [t.strip() for t in str(text).split(",") if t.strip()]
    if all_ok and items == ["all"]:
        return list(known)
    bad = [t for t in items if t not in known]
    if bad or not items:
        raise argparse.ArgumentTypeError(f"unknown {what} {bad or items}; choose from {', '.join(known)}"
                                         + (" or all" if all_ok else ""))
    return items


def _scenarios(text: str | list) -> list[str]:
    """argparse type of --scenario (a YAML config may give a list)."""
    from thrifty.bench.settings import SCENARIOS

    return _choices_list(text, SCENARIOS, "scenario(s)", True)


def _backends(text: str | list) -> list[str]:
    return _choices_list(text, ("torch", "onnxruntime"), "backend(s)", False)


_scenarios.accepts_list = _backends.accepts_list = True  # type: ignore[attr-defined]


def run_table(r: dict) -> str:
    """One benchmark run as the other commands print results: a row per scenario (numbers through
    ``thrifty.utils.fmt_value``: accuracies in percent, other values to 4 significant digits), then accuracy.

    Example:
        >>> r = {"scenarios": {"Offline": {"valid": True, "metric": "samples_per_second", "value": 1234.5678,
        ...                                "reasons": []}}, "accuracy": {"metrics": {"top1": 0.98765, "n": 64}}}
        >>> print(run_table(r))
          scenario      result   metric                  value
          Offline       VALID    samples_per_second     1234.6
          accuracy: top1 98.77%, n 64
    """
    from thrifty.utils import fmt_value

    lines = [f"  {'scenario':<13} {'result':<8} {'metric':<20} {'value':>9}"]
    for sc, x in r["scenarios"].items():
        metric = x.get("metric") or "-"
        line = f"  {sc:<13} {'VALID' if x['valid'] else 'INVALID':<8} {metric:<20} " \
               f"{fmt_value(metric, x['value']) if x.get('value') is not None else '-':>9}"
        if sc == "Server" and x.get("max_qps") is not None:
            line += (f"  max QPS {fmt_value('qps', x.get('max_qps'))} at the "
                     f"{fmt_value('ms', x.get('latency_bound_ms'))} ms bound")
        lines.append(line + ("" if x["valid"] else "  <- " + "; ".join(x["reasons"])))
    if r.get("accuracy"):
        lines.append("  accuracy: " + ", ".join(f"{k} {fmt_value(k, v)}" for k, v in r["accuracy"]["metrics"].items()))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from thrifty.bench import BenchConfig
    from thrifty.bench import run as bench_run
    from thrifty.bench.api import calibration_data, load_workload, ptq_int8
    from thrifty.bench.report import write_report

    scen, backends = list(args.scenario), list(args.backend)
    configs = build_configs(args)  # validates the settings before any work
    settings: BenchConfig = configs["bench"]
    out = _common.check_out_dir(args.out, args.overwrite)
    if args.model == "resnet20" and not os.path.exists(args.model):  # load_workload trains it when not cached
        _common.announce_baseline("resnet20", "digits32", command="bench")
    wl = load_workload(args.model, args.data, seq_len=args.seq_len, max_samples=args.max_samples)
    variants = [("fp32", wl.model if wl.model is not None else args.model, "auto")]
    if args.quantize:
        if wl.model is None:
            raise ValueError("--quantize needs a PyTorch model, not an .onnx file")
        with _common.step(f"PTQ int8 ({args.ptq_pipeline}) of {wl.name}"):
            q = ptq_int8(wl.model, calibration_data(wl), pipeline=args.ptq_pipeline)
        variants.append(("int8", q.model, "auto"))
    results = []
    for tag, model, ref in variants:
        for be in backends:
            name = f"{wl.name}_{tag}_{be}"
            print(f"== {name}: {', '.join(scen)}")
            r = bench_run(model, settings, wl.samples, scenarios=scen, backend=be, outdir=out,
                          accuracy=not args.no_accuracy, reference=ref, variant=name)
            print(run_table(r))
            results.append(r)
    paths = write_report(results, out, title=f"thrifty bench: {wl.name}")
    # last, so a failed run never leaves a config.yaml that does not match results.json
    _common.write_resolved_config(out, args, configs=configs)
    print(f"report: {paths['markdown']}")
    return 0 if all(x["valid"] for r in results for x in r["scenarios"].values()) else 1
