"""int8 deployment: thrifty's int8 layout vs ONNX Runtime's quantize_static; weight-only 4-bit MatMulNBits.

Two parts (``--part``, default both), variants interleaved over ``--rounds`` rounds, medians reported:

* ``layouts``: resnet20 and MiniLM at 1 and 2 threads, batch 1 and 32, samples/s of FP32, thrifty int8
  (symmetric per-channel weights, u8 activations, int32 biases, integer residuals; each layer's weights in the
  fastest container that is exact on this CPU), thrifty int8 with 7-bit weights (exact in the fast u8s8 kernels
  without VNNI) and ONNX Runtime's quantize_static in its fast layouts (u8 activations, s8 per-channel weights;
  QDQ and QOperator; QDQ with ``reduce_range``, 7-bit weights, ONNX Runtime's advice for CPUs without VNNI; for
  MiniLM also MatMul-only), with each variant's accuracy and the GEMMs ONNX Runtime fused (or why not).
* ``w4``: batch-1 latency of FP32, int8 and weight-only 4-bit MatMulNBits (thrifty's codes and block RTN) on a
  Linear-heavy FFN stack at one token and on MiniLM at ``--w4-seq`` tokens, with the accuracy cost.

    python benchmarks/bench_deploy.py --rounds 5     # writes results/bench_deploy.{json,md} (CPU with VNNI)
    python benchmarks/bench_deploy.py --quick        # a fast smoke pass (numbers not meaningful)

Results are per CPU kind: on a CPU without VNNI the default stem is ``bench_deploy_<isa>`` (e.g.
``bench_deploy_avx2``), so a run there never overwrites the VNNI results; the JSON and markdown name the CPU, its
VNNI support and the load average before and after the run (``--name`` overrides the stem).

Timing: every variant is an ONNX Runtime session (``OrtBackend``: the given intra-op threads, no spinning, so the
idle sessions of the other variants take no CPU); per round and (threads, batch), each variant runs the same
batch repeatedly for ``--min-duration`` seconds after two warm-up calls; samples/s = samples / elapsed. Rounds
interleave the variants; the tables give the median over rounds and its ratio to FP32 ONNX Runtime.
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
import platform
import warnings
import statistics
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import numpy as np
import torch

from thrifty.bench import OrtBackend, TorchBackend, export_onnx, export_w4, fused_report
from thrifty.bench.api import calibration_data, load_workload, ptq_int8
from thrifty.bench.export import cpu_has_vnni
from thrifty.bench.int8_graph import onnx_feeds
from thrifty.bench.experiment import Experiment
from thrifty.quant.calib import as_batches
from thrifty.train import cache_dir


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _outputs(be: Callable, inputs: tuple[np.ndarray, ...], bs: int = 64) -> np.ndarray:
    n = len(inputs[0])
    return np.concatenate([np.asarray(be(tuple(a[i:i + bs] for a in inputs))).reshape(min(bs, n - i), -1)
                           for i in range(0, n, bs)])


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)


def _quantized(root: Path, key: str, model: torch.nn.Module, calib: Any, quick: bool, **ptq: Any) -> torch.nn.Module:
    """thrifty PTQ (RTN, MSE ranges; cached), or with ``quick`` (``--quick`` or ``--ptq minmax``) a min/max RTN
    QuantConfig (seconds, not minutes)."""
    if quick:
        from thrifty.core import apply
        from thrifty.quant import QuantConfig, calibrate_inputs

        cfg = QuantConfig(w_bits=ptq.get("w_bits", 8), a_bits=ptq.get("a_bits", 8),
                          w_symmetric=ptq.get("w_symmetric", False), w_estimator="minmax", a_estimator="minmax")
        q = apply(copy.deepcopy(model), cfg)
        return calibrate_inputs(q, calib) if cfg.a_bits else q
    path = cache_dir() / "bench" / f"{key}.pt"
    if path.is_file():
        return torch.load(path, weights_only=False)
    q = ptq_int8(model, calib, **ptq).model
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(q, path)
    return q


class _Reader:
    """onnxruntime.quantization.CalibrationDataReader over thrifty's calibration batches."""

    def __init__(self, feeds: list[dict]) -> None:
        self.it = iter(feeds)

    def get_next(self):
        return next(self.it, None)


def _ort_static(fp32: Path, out: Path, feeds: list[dict], fmt: str, op_types: Any = None,
                reduce_range: bool = False) -> Path:
    """ONNX Runtime's quantize_static in its fast x86 layout: u8 activations, s8 per-channel weights (MinMax);
    ``reduce_range``: 7-bit weights, which ONNX Runtime advises on x86 CPUs without VNNI (no u8s8 saturation)."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = out.with_suffix(".pre.onnx").resolve()
    fp32, out = fp32.resolve(), out.resolve()
    # both write scratch files (shape-inference models, external data) into the working directory
    with tempfile.TemporaryDirectory() as scratch, contextlib.chdir(scratch):
        # ORT's recommended preprocessing (shape inference, graph optimisation); its symbolic shape inference
        # refuses a dynamic sequence axis (MiniLM: "unsupported broadcast between Min(512, seq) seq"): skip that
        for skip_symbolic in (False, True):
            try:
                quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=skip_symbolic)
                break
            except Exception as e:  # noqa: BLE001 - any failure: retry without it, then quantize the plain export
                log(f"quant_pre_process(skip_symbolic_shape={skip_symbolic}) failed: {str(e)[:120]}")
        else:
            pre = fp32
        quantize_static(str(pre), str(out), _Reader(feeds), quant_format=getattr(QuantFormat, fmt),
                        op_types_to_quantize=op_types, per_channel=True, reduce_range=reduce_range,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return out


def _rate(be: OrtBackend, batch: tuple[np.ndarray, ...], min_s: float) -> float:
    be(batch)
    be(batch)
    n, t0 = 0, time.perf_counter()
    while True:
        be(batch)
        n += 1
        dt = time.perf_counter() - t0
        if dt >= min_s and n >= 3:
            return n * len(batch[0]) / dt


def _latency_ms(be: OrtBackend, batch: tuple[np.ndarray, ...], min_s: float) -> float:
    be(batch)
    be(batch)
    times, t0 = [], time.perf_counter()
    while time.perf_counter() - t0 < min_s or len(times) < 5:
        t = time.perf_counter()
        be(batch)
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def _accuracy(fam: str, wl, be: Callable, inputs, ref: np.ndarray) -> dict:
    out = _outputs(be, inputs)
    if fam == "resnet20":
        y = wl.samples.labels[:len(out)]
        return {"top1": float((out.argmax(1) == y).mean() * 100)}
    c = _cos(out, ref)
    return {"cos_mean": float(c.mean()), "cos_min": float(c.min())}


def _containers(path: Path) -> dict:
    """The int8 export's per-layer weight containers (int8: u8s8 kernels, uint8: u8u8) and their count."""
    import onnx

    meta = json.loads({p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
                      .get("thrifty.int8", "{}"))
    per = meta.get("weight_containers", {})
    count: dict[str, int] = {}
    for c in per.values():
        count[c["container"]] = count.get(c["container"], 0) + 1
    return {"count": count, "layers": per}


def cpu_info() -> dict:
    """The CPU a result was measured on: model name, whether it has VNNI, its widest int8 ISA, the load average."""
    from thrifty.bench.experiment import environment

    flags = set()
    with contextlib.suppress(OSError):
        flags = set(Path("/proc/cpuinfo").read_text().split())
    isa = ("vnni" if cpu_has_vnni() else "avx512" if "avx512bw" in flags else "avx2" if "avx2" in flags
           else platform.machine().lower())
    return {"model": environment("")["cpu"], "vnni": cpu_has_vnni(), "isa": isa, "cores": os.cpu_count()}


def _fused_summary(path: Path) -> dict:
    rep = fused_report(path)
    unfused = [{"layer": r["layer"], "reason": r["reason"]} for r in rep if not r["fused"]]
    return {"gemms": len(rep), "fused": len(rep) - len(unfused), "unfused": unfused}


def _workloads(quick: bool) -> dict:
    n = 64 if quick else None
    return {"resnet20": load_workload("resnet20", max_samples=n),
            "minilm": load_workload("minilm", seq_len=128, max_samples=n or 256)}


VARIANTS = ("thrifty_int8", "thrifty_int8_w7", "thrifty_int8_asym_w", "ort_static_qdq", "ort_static_qdq_reduce_range",
            "ort_static_qoperator", "ort_static_qdq_matmul_only", "ort_static_qdq_matmul_only_reduce_range")


def _variants(root: Path, fam: str, wl, work: Path, quick: bool, want: set[str]) -> dict[str, Path]:
    """The ONNX files of the variants in ``want`` (FP32 always); MatMul-only ones for MiniLM only."""
    calib = calibration_data(wl)
    ex = tuple(torch.from_numpy(a) for a in wl.samples.batch([0, 1]))
    names = wl.input_names
    v = {"fp32": export_onnx(wl.model, ex, work / f"{fam}_fp32.onnx", input_names=names)}
    for key, bits in (("thrifty_int8", 8), ("thrifty_int8_w7", 7)):
        if key in want:
            log(f"{fam}: thrifty PTQ W{bits}A8, symmetric per-channel weights")
            tag = "" if bits == 8 else f"_w{bits}"
            q = _quantized(root, f"{fam}_w{bits}a8_rtn_symw", wl.model, calib, quick, w_bits=bits, w_symmetric=True)
            v[key] = export_onnx(q, ex, work / f"{fam}_thrifty_int8{tag}.onnx", input_names=names, calib=calib)
    if "thrifty_int8_asym_w" in want:  # the previous default: asymmetric weights (for the before/after comparison)
        qa = _quantized(root, f"{fam}_w8a8_rtn", wl.model, calib, quick)
        v["thrifty_int8_asym_w"] = export_onnx(qa, ex, work / f"{fam}_thrifty_int8_asym.onnx", input_names=names,
                                               calib=calib)
    feeds = onnx_feeds(as_batches(calib), list(names))
    log(f"{fam}: ONNX Runtime quantize_static (u8 activations, s8 per-channel weights)")
    for key, fmt, ops, rr in (("ort_static_qdq", "QDQ", None, False), ("ort_static_qdq_reduce_range", "QDQ", None, True),
                              ("ort_static_qoperator", "QOperator", None, False),
                              ("ort_static_qdq_matmul_only", "QDQ", ["MatMul", "Gemm"], False),
                              ("ort_static_qdq_matmul_only_reduce_range", "QDQ", ["MatMul", "Gemm"], True)):
        # all-op quantization costs MiniLM most of its accuracy: MatMul/Gemm only, too (MiniLM only)
        if key in want and (ops is None or fam == "minilm"):
            v[key] = _ort_static(v["fp32"], work / f"{fam}_{key}.onnx", feeds, fmt, ops, reduce_range=rr)
    return v


def layouts(args: SimpleNamespace, root: Path, work: Path) -> dict:
    res: dict = {}
    for fam, wl in _workloads(args.quick).items():
        want = set(args.variants) - ({"thrifty_int8_asym_w"} if args.quick else set())  # --quick: the new layouts
        paths = _variants(root, fam, wl, work, args.quick or args.ptq == "minmax", want)
        inputs = wl.samples.inputs
        ref = _outputs(TorchBackend(wl.model), inputs)
        acc = {k: _accuracy(fam, wl, OrtBackend(p, threads=2), inputs, ref) for k, p in paths.items()}
        fused = {k: _fused_summary(p) for k, p in paths.items() if k != "fp32"}
        containers = {k: _containers(p) for k, p in paths.items() if k.startswith("thrifty")}
        log(f"{fam}: accuracy {acc}")
        log(f"{fam}: GEMMs fused {({k: (f['fused'], f['gemms']) for k, f in fused.items()})}; weight containers "
            f"{({k: c['count'] for k, c in containers.items()})}")
        grid: dict = {}
        sessions = {(k, t): OrtBackend(p, threads=t) for k, p in paths.items() for t in (1, 2)}
        for r in range(args.rounds):
            for t in (1, 2):
                for bs in (1, 32):
                    batch = tuple(a[:bs] for a in inputs)
                    for k in paths:
                        x = _rate(sessions[(k, t)], batch, args.min_duration)
                        grid.setdefault(f"t{t}_b{bs}", {}).setdefault(k, []).append(x)
                    log(f"{fam} round {r} threads {t} batch {bs}: "
                        + ", ".join(f"{k} {grid[f't{t}_b{bs}'][k][-1]:.1f}" for k in paths))
        del sessions
        med = {c: {k: statistics.median(xs) for k, xs in row.items()} for c, row in grid.items()}
        res[fam] = {"samples_per_s": grid, "median": med, "accuracy": acc, "fused": fused,
                    "weight_containers": containers,
                    "ratio_to_fp32": {c: {k: x / row["fp32"] for k, x in row.items()} for c, row in med.items()}}
    return res


def w4(args: SimpleNamespace, root: Path, work: Path) -> dict:
    """Batch-1 latency on MiniLM at each of ``--w4-seq`` sequence lengths: MatMulNBits only pays off when the
    GEMMs are memory bound (few tokens per call); with many tokens int8 compute wins."""
    res: dict = {"model": "minilm", "batch": 1, "by_seq_len": {}}
    for seq in args.w4_seq:
        wl = load_workload("minilm", seq_len=seq, max_samples=64 if args.quick else 256)
        calib = calibration_data(wl)
        ex = tuple(torch.from_numpy(a) for a in wl.samples.batch([0, 1]))
        names = wl.input_names
        paths = {"fp32": export_onnx(wl.model, ex, work / f"w4_s{seq}_fp32.onnx", input_names=names)}
        q8 = _quantized(root, f"minilm_s{seq}_w8a8_rtn_symw", wl.model, calib, args.quick, w_symmetric=True)
        paths["thrifty_int8"] = export_onnx(q8, ex, work / f"w4_s{seq}_int8.onnx", input_names=names, calib=calib)
        paths["w4_rtn_block32"] = export_w4(wl.model, ex, work / f"w4_s{seq}_rtn.onnx", block_size=32,
                                            input_names=names)
        if args.adaquant:
            q4 = _quantized(root, f"minilm_s{seq}_w4_adaquant", wl.model, calib, False, w_bits=4, a_bits=None,
                            pipeline="adaquant", first_last_bits=None)
        else:
            q4 = _quantized(root, f"minilm_s{seq}_w4_rtn", wl.model, calib, args.quick, w_bits=4, a_bits=None)
        tag = "w4_thrifty_" + ("adaquant" if args.adaquant else "rtn") + "_per_channel"
        paths[tag] = export_w4(q4, ex, work / f"w4_s{seq}_thrifty.onnx", block_size=32, input_names=names)
        inputs = wl.samples.inputs
        ref = _outputs(TorchBackend(wl.model), inputs)
        acc = {k: _accuracy("minilm", wl, OrtBackend(p, threads=2), inputs, ref) for k, p in paths.items()}
        one = tuple(a[:1] for a in inputs)
        res["by_seq_len"][str(seq)] = {**_latency_rounds(args, paths, one, f"w4 seq {seq}"), "accuracy": acc}
    return res


def _latency_rounds(args: SimpleNamespace, paths: dict[str, Path], one: tuple, what: str) -> dict:
    """Batch-1 latency of every variant at 1 and 2 threads, interleaved over the rounds; medians; file sizes."""
    lat: dict = {}
    sessions = {(k, t): OrtBackend(p, threads=t) for k, p in paths.items() for t in (1, 2)}
    for r in range(args.rounds):
        for t in (1, 2):
            for k in paths:
                lat.setdefault(f"t{t}", {}).setdefault(k, []).append(_latency_ms(sessions[(k, t)], one,
                                                                                  args.min_duration))
            log(f"{what} round {r} threads {t}: " + ", ".join(f"{k} {lat[f't{t}'][k][-1]:.3f} ms" for k in paths))
    return {"latency_ms": lat, "median_ms": {c: {k: statistics.median(xs) for k, xs in row.items()}
                                             for c, row in lat.items()},
            "file_bytes": {k: p.stat().st_size for k, p in paths.items()}}


def w4_ffn(args: SimpleNamespace, work: Path) -> dict:
    """A synthetic Linear-heavy model at one token per call (LLM decoding's GEMM shape): 4 FFN blocks
    1024 -> 4096 -> 1024, random weights. Accuracy cost: relative L2 error of the output to FP32 (no task)."""
    from thrifty.core import apply
    from thrifty.quant import QuantConfig, calibrate_inputs

    torch.manual_seed(0)
    blocks = [torch.nn.Sequential(torch.nn.Linear(1024, 4096), torch.nn.ReLU(), torch.nn.Linear(4096, 1024))
              for _ in range(4)]
    m = torch.nn.Sequential(*blocks).eval()
    x = torch.randn(256, 1024)
    # min/max ranges: the MSE range search over 4096-wide layers takes minutes and there is no task to win here
    cfg = QuantConfig(w_symmetric=True, w_estimator="minmax", a_estimator="minmax")
    q8 = calibrate_inputs(apply(copy.deepcopy(m), cfg), x[:128])
    ex = (x[:2],)
    paths = {"fp32": export_onnx(m, ex, work / "ffn_fp32.onnx"),
             "thrifty_int8": export_onnx(q8, ex, work / "ffn_int8.onnx"),
             "w4_rtn_block32": export_w4(m, ex, work / "ffn_w4.onnx", block_size=32)}
    xn = x[128:].numpy()
    ref = _outputs(OrtBackend(paths["fp32"], threads=2), (xn,))
    err = {k: float(np.linalg.norm(_outputs(OrtBackend(p, threads=2), (xn,)) - ref) / np.linalg.norm(ref))
           for k, p in paths.items()}
    return {**_latency_rounds(args, paths, (xn[:1],), "w4 ffn"), "relative_error_to_fp32": err}


def _paired(r: dict, keys: list) -> list:
    """Markdown lines: each thrifty variant against the fastest ort_static layout (by median) that is at least as
    accurate (the first accuracy metric), paired round by round (the rounds interleave the variants, so a slow
    spell hits both alike)."""
    per, acc = r.get("samples_per_s", {}), r.get("accuracy", {})
    ort = [k for k in keys if k.startswith("ort_static")]
    lines = []
    for t in (k for k in keys if k.startswith("thrifty")):
        if not ort or not per or t not in acc:
            continue
        metric = next(iter(acc[t]))
        fair = [k for k in ort if acc.get(k, {}).get(metric, float("-inf")) >= acc[t][metric] - 1e-9]
        if not fair:
            lines += [f"{t}: no ort_static layout is as accurate ({metric} {acc[t][metric]:.4f}; best "
                      f"{max(acc[k][metric] for k in ort if k in acc):.4f}).", ""]
            continue
        cells = []
        for c, row in r["median"].items():
            best = max(fair, key=lambda k: row[k])
            ratios = [a / b for a, b in zip(per[c][t], per[c][best]) if b > 0]
            cells.append(f"{c} {statistics.median(ratios):.3f} vs {best} ({sum(x >= 1 for x in ratios)}/{len(ratios)})")
        lines += [f"{t} / the fastest ort_static layout at least as accurate ({metric}), per round (median ratio; "
                  f"rounds where {t} was at least as fast): " + "; ".join(cells) + ".", ""]
    return lines


def render(out: dict) -> str:
    md = [f"# int8 / W4 deployment on ONNX Runtime {out['onnxruntime']}, {out['rounds']} interleaved rounds", ""]
    if "cpu" in out:
        c, load = out["cpu"], out.get("load_average", {})
        md += [f"CPU: {c['model']}, {c['cores']} cores, VNNI {'yes' if c['vnni'] else 'no'} (int8 ISA {c['isa']}). "
               f"Load average (1 min) {load.get('start', '-')} at the start, {load.get('end', '-')} at the end"
               f"{' (machine shared: absolute samples/s are low and noisy; the ratios are side by side)' if max(load.values(), default=0) > c['cores'] else ''}.", ""]
        if not c["vnni"]:
            md += ["No VNNI: int8 weights run ONNX Runtime's u8s8 kernels, whose int16 pair sums saturate unless every "
                   "stored weight code has |code| <= 64. ort_static_qdq, ort_static_qoperator and "
                   "ort_static_qdq_matmul_only store 8-bit s8 weights, so their outputs (and accuracy rows) are what "
                   "this CPU computes, saturation included; the *_reduce_range variants (7-bit weights) and "
                   "thrifty_int8_w7 stay within 64; thrifty_int8 (8-bit) stores uint8 weights (exact u8u8 kernels).", ""]
    md += [f"min_duration {out['min_duration']} s per measurement{' (--quick: not meaningful)' if out['quick'] else ''}."
           " Samples/s, median over rounds (ratio to FP32 ONNX Runtime). thrifty's int8 ranges: "
           f"{'min/max (RTN)' if out.get('ptq') == 'minmax' or out['quick'] else 'PTQ, RTN with MSE ranges'}.", ""]
    for fam, r in out.get("layouts", {}).items():
        keys = list(next(iter(r["median"].values())))
        md += [f"## {fam}", "", "| threads, batch | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
        for c, row in r["median"].items():
            md.append(f"| {c} | " + " | ".join(f"{row[k]:.1f} ({r['ratio_to_fp32'][c][k]:.2f}x)" for k in keys)
                      + " |")
        md.append("| accuracy | " + " | ".join(", ".join(f"{m} {v:.4f}" for m, v in r["accuracy"][k].items())
                                             for k in keys) + " |")
        md.append("| GEMMs fused (after ORT's optimiser) | - | " + " | ".join(
            f"{r['fused'][k]['fused']}/{r['fused'][k]['gemms']}" if r["fused"][k]["gemms"] else "- (QOperator)"
            for k in keys[1:]) + " |")
        md.append("")
        md += _paired(r, keys)
        for k in (k for k in keys if k.startswith("thrifty")):
            reasons: dict[str, list[str]] = {}
            for u in r["fused"][k]["unfused"]:
                reasons.setdefault(u["reason"], []).append(u["layer"])
            cont = r.get("weight_containers", {}).get(k, {}).get("count")
            md += [f"{k}: weight containers " + (", ".join(f"{n} layers {c}" for c, n in sorted(cont.items()))
                                                 if cont else "-")
                   + "; GEMMs left unfused: " + ("none" if not reasons else "; ".join(
                       f"{len(ls)} x {why} (e.g. {ls[0]})" for why, ls in reasons.items())), ""]
    tables = [(f"W4 weight-only (MatMulNBits, block 32) vs int8 vs FP32: MiniLM, batch 1, {seq} tokens", r,
               "cosine to FP32 (mean)", {k: a["cos_mean"] for k, a in r["accuracy"].items()})
              for seq, r in out.get("w4", {}).get("by_seq_len", {}).items()]
    if "w4_ffn" in out:
        r = out["w4_ffn"]
        tables.append(("W4 vs int8 vs FP32: synthetic FFN stack (4 x 1024-4096-1024), one token per call", r,
                       "relative L2 error to FP32", r["relative_error_to_fp32"]))
    for title, r, metric, vals in tables:
        keys = list(vals)
        md += [f"## {title}", "", "| | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
        for c, row in r["median_ms"].items():
            md.append(f"| latency ms, {c} | " + " | ".join(f"{row[k]:.3f}" for k in keys) + " |")
        md.append(f"| {metric} | " + " | ".join(f"{vals[k]:.4f}" for k in keys) + " |")
        md += ["| file MB | " + " | ".join(f"{r['file_bytes'][k] / 1e6:.1f}" for k in keys) + " |", ""]
    md += ["", f"Total {out['seconds']} s."]
    return "\n".join(md) + "\n"


def science(args: Any) -> dict:  # the harness's parsed flags
    import onnxruntime

    t0 = time.perf_counter()
    root = Path.cwd()
    work = Path("reports") / "bench_deploy"
    work.mkdir(parents=True, exist_ok=True)
    rounds, min_duration = (1, 0.2) if args.quick else (args.rounds, args.min_duration)
    args = SimpleNamespace(**{**vars(args), "rounds": rounds, "min_duration": min_duration})
    out: dict = {"onnxruntime": onnxruntime.__version__, "rounds": rounds, "min_duration": min_duration,
                 "ptq": "minmax" if args.quick else args.ptq,
                 "quick": bool(args.quick), "cpu": cpu_info(), "load_average": {"start": round(os.getloadavg()[0], 2)}}
    if "layouts" in args.part:
        out["layouts"] = layouts(args, root, work)
    if "w4" in args.part:
        out["w4_ffn"] = w4_ffn(args, work)
        out["w4"] = w4(args, root, work)
    out["seconds"] = round(time.perf_counter() - t0, 1)
    out["load_average"]["end"] = round(os.getloadavg()[0], 2)
    return out


def main(argv=None) -> int:
    cpu = cpu_info()
    exp = Experiment("bench_deploy" if cpu["vnni"] else f"bench_deploy_{cpu['isa']}", __doc__, threads=2)
    exp.parser.add_argument("--part", nargs="+", choices=("layouts", "w4"), default=["layouts", "w4"])
    exp.parser.add_argument("--rounds", type=int, default=3)
    exp.parser.add_argument("--ptq", choices=("mse", "minmax"), default="mse",
                            help="layouts part: thrifty's weight/activation ranges: PTQ with MSE ranges (minutes) or "
                                 "min/max (seconds; what --quick uses)")
    exp.parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS),
                            help="layouts part: the int8 variants to compare with FP32 (default all)")
    exp.parser.add_argument("--min-duration", type=float, default=2.0)
    exp.parser.add_argument("--adaquant", action="store_true", help="W4 part: thrifty weights from PTQ AdaQuant (slow)")
    exp.parser.add_argument("--w4-seq", type=int, nargs="+", default=[128, 8], help="W4 part: MiniLM sequence lengths")
    warnings.filterwarnings("ignore")
    return exp.run(science, render, argv=argv)


if __name__ == "__main__":
    raise SystemExit(main())
