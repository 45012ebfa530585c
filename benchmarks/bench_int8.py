"""Offline throughput, FP32 PyTorch vs FP32 / int8 ONNX Runtime, interleaved over several rounds, plus accuracy.

(thrifty's int8 layout against ONNX Runtime's quantize_static, and W4 MatMulNBits: benchmarks/bench_deploy.py.)

The machine is shared, so one measurement per variant is noisy; this alternates the variants (LoadGen Offline,
each in its own subprocess, 2 workers x 1 thread) ``--rounds`` times and reports per-round ratios, their minimum
and median. Models: resnet20 (digits32, batch 64) and MiniLM (sequence length 128, batch 64), int8 = the cached
PTQ W8A8 models of experiments/bench.py (run that first; ``--int8-models`` names their folder), exported once with
``export_onnx(calib=<the PTQ calibration set>)``. Accuracy of the exported int8 graph (ONNX Runtime) is measured
in the same run next to the simulated (fake-quantized PyTorch) model and, given ``--ptq-json``, compared with the
PTQ experiment's W8A8 numbers (experiments/ptq.py's JSON).

    python benchmarks/bench_int8.py --rounds 3 --ptq-json results/ptq.json   # writes results/bench_int8.{json,md}
    python benchmarks/bench_int8.py --quick --out /tmp/x                      # 1 round of 0.5 s, a smoke test
"""
from __future__ import annotations

import json
import statistics
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from thrifty.bench import BenchConfig, OrtBackend, TorchBackend, optimized_op_counts, run
from thrifty.bench.api import calibration_data, load_workload
from thrifty.bench.backends import INT8_KERNELS
from thrifty.bench.experiment import Experiment, fmt, table
from thrifty.bench.export import export_onnx
from thrifty.train import cache_dir

FLOAT_KERNELS = ("Conv", "FusedConv", "MatMul", "FusedMatMul", "Gemm")


def _outputs(be, samples, bs: int = 64) -> np.ndarray:
    n = len(samples)
    return np.concatenate([np.asarray(be(samples.batch(range(i, min(i + bs, n))))).reshape(min(bs, n - i), -1)
                           for i in range(0, n, bs)])


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)


def _accuracy(fam: str, wl, q, int8_path: Path) -> dict:
    """Exported int8 (ONNX Runtime) vs simulated int8 (PyTorch fake quantization) vs FP32, on the same samples."""
    fp = _outputs(TorchBackend(wl.model), wl.samples)
    sim = _outputs(TorchBackend(q), wl.samples)
    ort = _outputs(OrtBackend(int8_path, threads=2), wl.samples)
    if fam == "resnet20":
        y = wl.samples.labels
        top1 = lambda o: float((o.argmax(1) == y).mean() * 100)  # noqa: E731
        return {"metric": "top-1 %", "n": len(y), "fp32": top1(fp), "int8_simulated": top1(sim),
                "int8_onnxruntime": top1(ort), "argmax_agreement_ort_vs_sim": float((ort.argmax(1) == sim.argmax(1)).mean())}
    c_sim, c_ort = _cos(sim, fp), _cos(ort, fp)
    return {"metric": "cosine to FP32 (mean)", "n": len(fp), "fp32": 1.0, "int8_simulated": float(c_sim.mean()),
            "int8_onnxruntime": float(c_ort.mean()), "min_cos_simulated": float(c_sim.min()),
            "min_cos_onnxruntime": float(c_ort.min()), "cos_ort_vs_sim": float(_cos(ort, sim).mean())}


def _ptq_reference(path: Path | None) -> dict:
    """The PTQ experiment's W8A8 RTN (MSE) numbers from its JSON ``path`` (``--ptq-json``); {} without one."""
    if path is None:
        return {}
    if not path.is_file():
        raise FileNotFoundError(f"--ptq-json: {path} not found (experiments/ptq.py writes it)")
    d = json.loads(path.read_text())
    out = {}
    r = next((r for r in d.get("resnet20", {}).get("rows", []) if r["precision"] == "W8A8" and "MSE" in r["method"]), None)
    if r:
        out["resnet20"] = {"value": r["acc"], "what": f"top-1 % (n={d['resnet20']['n_test']})"}
    r = next((r for r in d.get("minilm", {}).get("rows", []) if r["precision"] == "W8A8"), None)
    if r:
        out["minilm"] = {"value": r["mean_cos"], "what": f"mean cosine to FP32 (n={d['minilm']['n_test']})"}
    return out


def main(argv=None) -> int:
    exp = Experiment("bench_int8", __doc__, threads=2)
    exp.parser.add_argument("--rounds", type=int, default=3)
    exp.parser.add_argument("--min-duration", type=float, default=2.0)
    exp.parser.add_argument("--ptq-json", type=Path, default=None,
                            help="experiments/ptq.py's JSON, for its W8A8 column (omitted: that column shows -)")
    exp.parser.add_argument("--int8-models", type=Path, default=cache_dir() / "bench",
                            help="folder with experiments/bench.py's cached resnet20_w8a8_rtn.pt and "
                                 "minilm_w8a8_rtn.pt (default: %(default)s)")
    return exp.run(lambda args: science(args, exp), render, argv=argv)


def science(args, exp: Experiment) -> dict:
    warnings.filterwarnings("ignore")
    rounds, min_duration = (1, 0.5) if args.quick else (args.rounds, args.min_duration)
    ptq_ref = _ptq_reference(args.ptq_json)  # read first: a wrong path fails before the long run
    work = Path("reports") / exp.stem
    work.mkdir(parents=True, exist_ok=True)
    paths = {fam: args.int8_models / f"{fam}_w8a8_rtn.pt" for fam in ("resnet20", "minilm")}
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"--int8-models: {', '.join(missing)} not found; run experiments/bench.py first")
    r20 = load_workload("resnet20")
    mini = load_workload("minilm", seq_len=128, max_samples=256)
    models = {"resnet20": (r20, torch.load(paths["resnet20"], weights_only=False)),
              "minilm": (mini, torch.load(paths["minilm"], weights_only=False))}
    s = BenchConfig(min_duration_s=min_duration, max_batch=64)
    out: dict = {"rounds": rounds, "workers": s.n_workers(), "threads": s.threads, "results": {},
                 "ptq_experiment": ptq_ref, "min_duration_s": min_duration,
                 "ptq_json": str(args.ptq_json) if args.ptq_json else None}
    for fam, (wl, q) in models.items():
        ex = tuple(torch.from_numpy(a) for a in wl.samples.batch([0, 1]))
        paths = {"fp32": export_onnx(wl.model, ex, work / f"{fam}_fp32.onnx", input_names=wl.input_names),
                 "int8": export_onnx(q, ex, work / f"{fam}_int8.onnx", input_names=wl.input_names,
                                     calib=calibration_data(wl))}
        ops = optimized_op_counts(paths["int8"])
        kern = {k: v for k, v in ops.items() if k in INT8_KERNELS}
        kern["float Conv/MatMul/Gemm"] = sum(v for k, v in ops.items() if k in FLOAT_KERNELS)
        acc = _accuracy(fam, wl, q, paths["int8"])
        print(f"[{time.strftime('%H:%M:%S')}] {fam}: int8 kernels {kern}; accuracy {acc}", flush=True)
        rows: dict[str, list[float]] = {"fp32_torch": [], "fp32_ort": [], "int8_ort": []}
        for k in range(rounds):
            for var, model, be in (("fp32_torch", wl.model, "torch"), ("fp32_ort", str(paths["fp32"]), "onnxruntime"),
                                   ("int8_ort", str(paths["int8"]), "onnxruntime")):
                r = run(model, s, wl.samples, scenarios=["Offline"], backend=be, accuracy=False,
                        reference=None, outdir=work, variant=f"{fam}_{var}")
                o = r["scenarios"]["Offline"]
                rows[var].append(o["value"] if o["valid"] else float("nan"))
                print(f"[{time.strftime('%H:%M:%S')}] {fam} round {k} {var}: {o['value']:.1f} samples/s "
                      f"{'VALID' if o['valid'] else 'INVALID ' + '; '.join(o['reasons'])}", flush=True)
        ratio = [i / f for i, f in zip(rows["int8_ort"], rows["fp32_torch"])]
        ratio_ort = [i / f for i, f in zip(rows["int8_ort"], rows["fp32_ort"])]
        out["results"][fam] = {"samples_per_s": rows, "int8_ort_over_fp32_torch": ratio,
                               "int8_ort_over_fp32_ort": ratio_ort, "int8_kernels": kern, "accuracy": acc,
                               "median_int8_ort_over_fp32_torch": statistics.median(ratio),
                               "min_int8_ort_over_fp32_torch": min(ratio),
                               "median_int8_ort_over_fp32_ort": statistics.median(ratio_ort)}
    out["seconds"] = exp.seconds()
    return out


def render(out: dict) -> str:
    min_duration = out.get("min_duration_s", 2.0)  # runs that did not record it used the default, 2.0 s
    ptq_source = out.get("ptq_json", "results/ptq.json") or "none given"  # earlier runs read results/ptq.json
    f = lambda xs: ", ".join(fmt(x, 1) for x in xs)  # noqa: E731
    speed = [{"model": fam, "torch": f(r["samples_per_s"]["fp32_torch"]), "ort": f(r["samples_per_s"]["fp32_ort"]),
              "int8": f(r["samples_per_s"]["int8_ort"]),
              "vs_torch": f"{f(r['int8_ort_over_fp32_torch'])} (min **{fmt(r['min_int8_ort_over_fp32_torch'])}x**, "
                          f"median **{fmt(r['median_int8_ort_over_fp32_torch'])}x**)",
              "vs_ort": f"{f(r['int8_ort_over_fp32_ort'])} (**{fmt(r['median_int8_ort_over_fp32_ort'])}x**)"}
             for fam, r in out["results"].items()]
    md = [f"# int8 ONNX Runtime vs FP32, Offline (LoadGen), {out['rounds']} interleaved rounds", "",
          f"{out['workers']} SUT workers x {out['threads']} thread, batch 64, min_duration {min_duration} s; "
          f"resnet20 on digits32, MiniLM at sequence length 128. int8 = thrifty PTQ W8A8 (RTN, MSE ranges) exported "
          f"by `export_onnx(..., calib=<PTQ calibration set>)`: weights stored as int8 (u8s8 kernels), residual "
          f"Adds integer. Shared 2-core machine: rounds differ.", "",
          table(speed, {"model": "model", "torch": "FP32 PyTorch samples/s", "ort": "FP32 ORT samples/s",
                        "int8": "int8 ORT samples/s", "vs_torch": "int8 ORT / FP32 PyTorch (min, median)",
                        "vs_ort": "int8 ORT / FP32 ORT (median)"}).rstrip("\n")]
    acc = []
    for fam, r in out["results"].items():
        a, p = r["accuracy"], out.get("ptq_experiment", {}).get(fam)
        d = 2 if fam == "resnet20" else 5  # top-1 % vs cosine
        extra = (f" (min {fmt(a['min_cos_simulated'], 4)} / {fmt(a['min_cos_onnxruntime'], 4)})"
                 if "min_cos_onnxruntime" in a else "")
        acc.append({"model": fam, "metric": a["metric"], "n": a["n"], "fp32": fmt(a["fp32"], d),
                    "sim": fmt(a["int8_simulated"], d), "ort": fmt(a["int8_onnxruntime"], d) + extra,
                    "ptq": f"{fmt(p['value'], d)} ({p['what']})" if p else "-",
                    "kernels": ", ".join(f"{k} {v}" for k, v in r["int8_kernels"].items())})
    md += ["", "Accuracy of the same int8 model, measured in this run (exported graph in ONNX Runtime vs the "
               "simulated fake-quantized PyTorch model), and the PTQ experiment's number (" + ptq_source + "):", "",
           table(acc, {"model": "model", "metric": "metric", "n": "n", "fp32": "FP32", "sim": "int8 simulated",
                       "ort": "int8 ONNX Runtime (exported)", "ptq": "PTQ experiment W8A8",
                       "kernels": "kernels ONNX Runtime runs (int8 graph)"}).rstrip("\n")]
    md += ["", f"Total {out['seconds']} s."]
    return "\n".join(md) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
