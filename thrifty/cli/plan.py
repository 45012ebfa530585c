"""``thrifty plan``: the most accurate per-layer plan that runs within a latency and a size budget on this CPU.

The per-layer cost table (ONNX Runtime latency per batch of ``--batch`` samples at ``--threads`` threads, and
ONNX bytes, each measured in the deployed graph) is cached under ``$THRIFTY_CACHE/plan``; sensitivities are
measured after ``--pipeline``; one integer program picks each layer's candidate. Writes to ``--out``:
``plan.yaml`` (per-layer configs: ``thrifty.apply`` / ``thrifty.plan.quantize_plan`` read it back with
``thrifty.core.from_yaml``), ``model.onnx`` (the deployed plan), and ``report.{json,md,png}``: the plan's
predicted and measured latency and loss, the LoadGen latency, and the Pareto fronts (accuracy vs measured
latency, accuracy vs size) of plans over a sweep of latency budgets against all FP32, all int8, W4A8 and ONNX
Runtime's quantize_static.

``--model``: a registry name (``resnet20``: the pretrained digits32 baseline; ``minilm``; ``tinyllama``: the causal
LM trained on the bundled text, planned on held-out ``--seq-len``-byte windows and scored by perplexity), a saved
thrifty model, with ``--dataset`` where it has none recorded.

Example:
    thrifty plan --model resnet20 --latency-ms 6 --size-mb 0.5 --out runs/plan-resnet20
"""
from __future__ import annotations

import argparse

from thrifty.cli import _common


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("plan", help="per-layer precision plan under a measured latency and size budget",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True,
                   help="registry name (resnet20, minilm, tinyllama: the causal LM on the bundled text) or saved "
                        "model stem/path")
    p.add_argument("--dataset", default=None, help="dataset (default: the model's own)")
    p.add_argument("--seq-len", type=_common.positive_int, default=128,
                   help="token window of a text model or causal LM (minilm, tinyllama)")
    p.add_argument("--latency-ms", type=float, default=None, help="latency budget, ms per batch of --batch samples")
    p.add_argument("--size-mb", type=float, default=None, help="size budget, MB (10^6 bytes) of the deployed ONNX file's weights (its initializers: "
                        "codes, scales, biases; N:M layers as stored)")
    p.add_argument("--batch", type=_common.positive_int, default=32, help="batch size the latency is measured at")
    p.add_argument("--threads", type=_common.positive_int, default=1, help="ONNX Runtime intra-op threads")
    p.add_argument("--candidates", default="fp32,int8", help="comma list of per-layer candidates: "
                   "fp32, int8, int7, w4a8, w4, int8-2:4, int8-t4:8 (thrifty.plan.CANDIDATES; when each pays off: "
                   "docs/methods/plan.md)")
    p.add_argument("--pipeline", choices=["rtn", "adaquant", "light", "advanced"], default="rtn",
                   help="PTQ pipeline of the quantized layers (sensitivities are measured after it)")
    p.add_argument("--adaquant-iters", type=_common.nonneg_int, default=200)
    p.add_argument("--rounds", type=_common.positive_int, default=7, help="interleaved timing rounds per graph")
    p.add_argument("--max-rounds", type=_common.positive_int, default=3,
                   help="plans measured at most while the cost model is refitted to them and the ILP solved again "
                        "(1: measure the first plan only)")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="time by the wall clock (what a latency budget means) or by the process's CPU time (at "
                        "--threads 1 on a shared machine it leaves out the waits for a core)")
    p.add_argument("--sweep", type=_common.nonneg_int, default=3, help="extra latency budgets for the Pareto front")
    p.add_argument("--max-samples", type=_common.positive_int, default=1024, help="evaluation samples")
    p.add_argument("--calib-per-class", type=_common.positive_int, default=10)
    p.add_argument("--loadgen-s", type=float, default=2.0, help="LoadGen run of the chosen plan, seconds (0: skip)")
    p.add_argument("--no-cache", action="store_true", help="measure the cost table again (and do not store it)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="output folder (default runs/plan-<model>)")
    _common.add_overwrite_option(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from thrifty.bench.api import calibration_data, load_workload
    from thrifty.plan.config import candidate
    from thrifty.plan.report import plan_report, write_report
    from thrifty.utils import atomic_write_text, seed_everything

    if args.latency_ms is None and args.size_mb is None:
        raise ValueError("give a budget: --latency-ms and/or --size-mb")
    for name in ("latency_ms", "size_mb"):
        v = getattr(args, name)
        if v is not None and not v > 0:
            raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {v}")
    cands = [c.strip() for c in args.candidates.split(",") if c.strip()]
    for c in cands:
        candidate(c)
    if "fp32" not in cands:
        raise ValueError("--candidates must include fp32 (the reference every layer can keep)")
    out = _common.check_out_dir(args.out or f"runs/plan-{args.model}", args.overwrite)
    seed_everything(args.seed)
    wl = load_workload(args.model, args.dataset, max_samples=args.max_samples, seed=args.seed, seq_len=args.seq_len)
    if wl.model is None:
        raise ValueError(f"--model {args.model}: thrifty plan needs a PyTorch model, not an ONNX file")
    if args.batch > len(wl.samples):
        raise ValueError(f"--batch {args.batch} is larger than the {len(wl.samples)} samples (--max-samples)")
    calib = calibration_data(wl, per_class=args.calib_per_class, seed=args.seed)
    example = tuple(torch.from_numpy(a) for a in wl.samples.batch([0, 1]))
    with _common.step(f"planning {args.model}: costs on ONNX Runtime ({args.threads} thread(s), batch {args.batch}), "
                      f"sensitivities after {args.pipeline}, ILP, deployment, comparison"):
        res, report = plan_report(wl.model, calib, example, wl.samples, latency_ms=args.latency_ms,
                                  size_mb=args.size_mb, batch=args.batch, threads=args.threads, rounds=args.rounds,
                                  sweep=args.sweep, pipeline=args.pipeline, adaquant_iters=args.adaquant_iters,
                                  candidates=cands, input_names=wl.input_names,
                                  loadgen_dir=out / "loadgen" if args.loadgen_s > 0 else None,
                                  loadgen_s=args.loadgen_s, cache=not args.no_cache, clock=args.clock,
                                  max_rounds=args.max_rounds,
                                  # a causal LM on the bundled text is scored by perplexity, the rest by top-1
                                  # (labelled samples) or by cosine to FP32
                                  metric="perplexity" if wl.samples.name.startswith("lm@") else "auto")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "plan.yaml", res.plan.to_yaml())
    from thrifty.utils import atomic_write_bytes

    atomic_write_bytes(out / "model.onnx", res.onnx)
    report["model"] = args.model
    write_report(report, out, "report", f"thrifty plan: {args.model}")
    _common.write_resolved_config(out, args)
    print(res.summary())
    print(f"wrote {out}/plan.yaml, model.onnx, report.md/json/png")
    from thrifty.bench.nm_onnx import is_nm_onnx

    if is_nm_onnx(res.onnx):
        print("model.onnx stores its N:M layers compressed: thrifty.bench.OrtBackend runs it as it is; for a plain "
              "onnxruntime session, thrifty.bench.load_nm_onnx('model.onnx') gives the dense graph's bytes")
    return 0
