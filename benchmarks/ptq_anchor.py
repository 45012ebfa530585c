"""Side-by-side PTQ against installed anchors (AIMET AdaRound, Brevitas), on the exact same model, data and placement.

thrifty side (this repository's python): resnet20 / digits32 FP32 baseline (thrifty.train.pretrained), its
BatchNorms folded into the convolutions (what thrifty quantizes), the 100 calibration images of
experiments/ptq.py and the 539 test images. Both tools then quantize that same folded model: every Conv2d /
Linear gets a per-output-channel asymmetric weight quantizer and a per-tensor asymmetric quantizer on its
input, the first and last layer at 8/8 bit, the others at W{2,3,4}A4; biases stay FP32. Reported per
bit-width and method: test KL(FP32 || quantized), top-1, CPU and wall seconds (1 torch thread).

The anchors run in their own python (their own virtual environment: Brevitas pins its own numpy/setuptools,
aimet-torch pulls a long list of packages, and neither is a dependency of thrifty or of ``make test``). Either run
this script with a python that has both thrifty's requirements and an anchor, or pass the anchor's python with
``--anchor-python`` (it needs only torch and brevitas and/or aimet-torch: the model and data travel in a file);
the worker runs every anchor that python has. aimet-torch imports torchvision, which does not load beside the CPU
torch build: a stub package whose modules answer any attribute with a placeholder class is enough (AIMET only
builds type tables from it); ``python3 tools/anchor_venv.py VENV`` builds such an environment (CPU torch, the stub,
aimet-torch 2.42.0; add transformers for the MiniLM / LM workloads: ``VENV/bin/pip install torch==2.13.0
transformers``). AIMET: AdaRound (``--aimet-iters`` per layer, 2000 by default) with per-channel
asymmetric weights, then a QuantSim whose activation quantizers are moved to each Conv/Linear input (SQNR
calibration), matching thrifty's placement. Without an anchor the script says so and exits 0.

    python benchmarks/ptq_anchor.py --anchor-python /path/to/anchor-venv/bin/python
    python benchmarks/ptq_anchor.py --quick     # W4A4 only, small budgets (smoke test)

``--workload minilm`` (all-MiniLM-L6-v2 at W4A8, mean cosine to FP32 on held-out sentences) and ``--workload lm``
(the causal LM at W4A16 per channel and per group of 64, held-out perplexity) compare AIMET AdaRound with thrifty
on the same tensors (benchmarks/ptq_anchor_nlp.py); each run replaces its workload's rows in the JSON and keeps
the others:

    python benchmarks/ptq_anchor.py --workload minilm --anchor-python /path/to/anchor-venv/bin/python
    python benchmarks/ptq_anchor.py --workload lm --anchor-python /path/to/anchor-venv/bin/python
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def _nlp_module():
    """benchmarks/ptq_anchor_nlp.py, loaded from beside this file however this script was loaded (run as a
    script, as the anchor's worker, or imported by a test)."""
    mod = sys.modules.get("ptq_anchor_nlp")
    if mod is None:
        spec = importlib.util.spec_from_file_location("ptq_anchor_nlp", Path(__file__).with_name("ptq_anchor_nlp.py"))
        mod = importlib.util.module_from_spec(spec)
        sys.modules["ptq_anchor_nlp"] = mod
        spec.loader.exec_module(mod)
    return mod


# prints the installed anchors (name+version, one per word); fails when none is importable with torch
_PROBE = """
import importlib.util, importlib.metadata, torch
found = [f"{n}-{importlib.metadata.version(d)}" for m, n, d in (("brevitas", "Brevitas", "brevitas"),
         ("aimet_torch", "AIMET", "aimet-torch")) if importlib.util.find_spec(m) is not None]
print(" ".join(found))
"""


def _cpu() -> float:
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _scores(out: torch.Tensor, ref: torch.Tensor, y: torch.Tensor) -> dict:
    kl = torch.nn.functional.kl_div(out.log_softmax(-1), ref.log_softmax(-1), log_target=True, reduction="batchmean")
    return dict(test_kl=float(kl), acc=100.0 * float((out.argmax(1) == y).float().mean()))


# ------------------------------------------------------------------------------------------------ anchor side
def _brevitas_quantize(model: torch.nn.Module, first_last: set[str], w_bits: int, a_bits: int) -> torch.nn.Module:
    import brevitas.nn as qnn
    from brevitas.core.scaling.standalone import ParameterFromStatsFromParameterScaling
    from brevitas.core.zero_point import ParameterFromStatsFromParameterZeroPoint
    from brevitas.graph.quantize import layerwise_quantize
    from brevitas.quant.shifted_scaled_int import ShiftedUint8ActPerTensorFloat, ShiftedUint8WeightPerChannelFloat

    # as Brevitas' own PTQ examples: weight scale / zero point initialised from the weight statistics once, then
    # kept, so GPTQ's column updates do not move the grid under it
    wq = ShiftedUint8WeightPerChannelFloat.let(scaling_impl=ParameterFromStatsFromParameterScaling,
                                               zero_point_impl=ParameterFromStatsFromParameterZeroPoint)

    names = [n for n, m in model.named_modules() if type(m) in (torch.nn.Conv2d, torch.nn.Linear)]

    def layer_map(wb: int, ab: int) -> dict:
        kw = dict(weight_quant=wq.let(bit_width=wb),
                  input_quant=ShiftedUint8ActPerTensorFloat.let(bit_width=ab), bias_quant=None,
                  return_quant_tensor=False)
        return {torch.nn.Conv2d: (qnn.QuantConv2d, kw), torch.nn.Linear: (qnn.QuantLinear, kw)}

    model = layerwise_quantize(model, layer_map(w_bits, a_bits), name_blacklist=sorted(first_last))
    return layerwise_quantize(model, layer_map(8, 8), name_blacklist=[n for n in names if n not in first_last])


def _brevitas_run(bundle: dict, w_bits: int, a_bits: int, method: str) -> torch.nn.Module:
    import copy

    from brevitas.graph.calibrate import bias_correction_mode, calibration_mode
    from brevitas.graph.gptq import gptq_mode

    model = _brevitas_quantize(copy.deepcopy(bundle["model"]).eval(), set(bundle["first_last"]), w_bits, a_bits)
    batches = bundle["calib"].split(32)
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "quant_weight"):
                m.quant_weight()  # initialises the weight quantizers' stored scales (see _brevitas_quantize)
        with calibration_mode(model):
            for x in batches:
                model(x)
        if method.startswith("gptq"):
            with gptq_mode(model, act_order=True, use_quant_activations=False) as gptq:
                for _ in range(gptq.num_layers):
                    for x in batches:
                        gptq.model(x)
                    gptq.update()
        if method.endswith("bias correction"):
            with bias_correction_mode(model):
                for x in batches:
                    model(x)
    return model.eval()




def _aimet_run(bundle: dict, w_bits: int, a_bits: int, iters: int) -> torch.nn.Module:
    """AIMET AdaRound (``iters`` iterations per layer) on the bundle's folded model, then a QuantSim whose
    activation quantizers sit where thrifty's do: one per-tensor asymmetric quantizer on each Conv/Linear input
    (SQNR-calibrated, AIMET's tf_enhanced analyser), none on op outputs."""
    import copy

    nlp = _nlp_module()
    from aimet_torch.adaround.adaround_weight import Adaround, AdaroundParameters
    from aimet_torch.common.defs import QuantScheme
    from aimet_torch.quantization.affine import QuantizeDequantize
    from aimet_torch.quantization.encoding_analyzer import SqnrEncodingAnalyzer
    from aimet_torch.quantsim import QuantizationSimModel

    model = copy.deepcopy(bundle["model"]).eval()
    calib = bundle["calib"]
    first_last = set(bundle["first_last"])
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(calib), batch_size=32, shuffle=False)
    dummy = calib[:1]
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Path(tmp) / "config.json"
        cfg.write_text(json.dumps(nlp.AIMET_CONFIG))
        params = AdaroundParameters(data_loader=loader, num_batches=len(loader), default_num_iterations=iters,
                                    forward_fn=lambda m, b: m(b[0]))
        overrides = [(model.get_submodule(n), 8) for n in first_last]
        ada = Adaround.apply_adaround(model, dummy, params, path=tmp, filename_prefix="ada", default_param_bw=w_bits,
                                      param_bw_override_list=overrides,
                                      default_quant_scheme=QuantScheme.post_training_tf_enhanced,
                                      default_config_file=str(cfg))
        sim = QuantizationSimModel(ada, dummy, quant_scheme=QuantScheme.post_training_tf_enhanced,
                                   default_output_bw=a_bits, default_param_bw=w_bits, config_file=str(cfg))
        sim.set_and_freeze_param_encodings(encoding_path=str(Path(tmp) / "ada.encodings"))
    gemms = {n for n, m in bundle["model"].named_modules() if type(m) in (torch.nn.Conv2d, torch.nn.Linear)}
    for name, qm in sim.model.named_modules():
        nlp.drop_act_quantizers(qm)
        if name in gemms:
            bits = 8 if name in first_last else a_bits
            qm.input_quantizers[0] = QuantizeDequantize((), bits, symmetric=False,
                                                        encoding_analyzer=SqnrEncodingAnalyzer(()))
    with torch.no_grad():
        sim.compute_encodings(lambda m: [m(x) for x in calib.split(32)])
    return sim.model.eval()


def anchor_worker(bundle_path: str, out_path: str) -> int:
    """Run every installed anchor (Brevitas, AIMET) on the saved bundle; write their rows as JSON (runs in the
    anchor's python)."""
    torch.set_num_threads(1)
    bundle = torch.load(bundle_path, weights_only=False)
    if bundle.get("workload", "resnet20") != "resnet20":
        return _nlp_worker(bundle, out_path)
    runs = []
    if importlib.util.find_spec("brevitas") is not None:
        import brevitas
        runs += [(f"Brevitas {brevitas.__version__}", m, lambda w, a, m=m: _brevitas_run(bundle, w, a, m))
                 for m in ("calibration + bias correction", "gptq (act-order) + bias correction")]
    if importlib.util.find_spec("aimet_torch") is not None:
        from importlib.metadata import version
        runs += [(f"AIMET {version('aimet-torch')}", f"AdaRound, {it} iterations",
                  lambda w, a, it=it: _aimet_run(bundle, w, a, it)) for it in bundle["aimet_iters"]]
    rows = []
    for w_bits, a_bits in bundle["precisions"]:
        for tool, method, fn in runs:
            w, c = time.perf_counter(), _cpu()
            model = fn(w_bits, a_bits)
            wall, cpu = time.perf_counter() - w, _cpu() - c
            with torch.no_grad():
                out = model(bundle["x"])
            rows.append(dict(tool=tool, method=method, precision=f"W{w_bits}A{a_bits}",
                             **_scores(out, bundle["ref"], bundle["y"]), cpu_s=cpu, wall_s=wall))
            print(json.dumps(rows[-1]), flush=True)
    Path(out_path).write_text(json.dumps(rows))
    return 0


def _nlp_worker(bundle: dict, out_path: str) -> int:
    """AIMET AdaRound on a transformer workload (benchmarks/ptq_anchor_nlp.py); a failure is recorded as the
    anchor's outcome (its exception in the row), not raised."""
    import traceback
    from importlib.metadata import version

    nlp = _nlp_module()

    rows = []
    if importlib.util.find_spec("aimet_torch") is None:
        print("ptq_anchor: the transformer workloads have AIMET only as anchor; aimet_torch is not importable")
    else:
        for w_bits, a_bits, group in bundle["precisions"]:
            for it in bundle["aimet_iters"]:
                prec = nlp.precision_name(w_bits, a_bits, group)
                row = dict(tool=f"AIMET {version('aimet-torch')}", method=f"AdaRound, {it} iterations", precision=prec)
                w, c = time.perf_counter(), _cpu()
                costs: dict = {}
                try:
                    model, shapes = nlp.aimet_linears(bundle, w_bits, a_bits, it, group, costs)
                    row.update(nlp.score(bundle, model))
                    if group and not all(len(s) == 2 and s[1] > 1 for s in shapes.values()):
                        row["note"] = f"weight quantizers are not per group of {group}: {sorted(set(shapes.values()))}"
                except Exception as e:  # noqa: BLE001 - the anchor's failure is its result
                    traceback.print_exc()
                    row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
                row.update(cpu_s=_cpu() - c, wall_s=time.perf_counter() - w)
                if costs.get("layers"):  # AdaRound's own per-layer work, for extrapolating to other budgets
                    row["adaround"] = dict(costs, iters=it, n_calib=bundle["n_calib"])
                rows.append(row)
                print(json.dumps(rows[-1]), flush=True)
    Path(out_path).write_text(json.dumps(rows))
    return 0


# ----------------------------------------------------------------------------------------------- thrifty side
def _bundle(precisions: list[tuple[int, int]]) -> dict:
    import copy

    from thrifty.data import calibration_subset, load_dataset
    from thrifty.quant.fold import fold_bn
    from thrifty.train import pretrained

    fp = pretrained("resnet20", "digits32")
    splits = load_dataset("digits32")
    calib = calibration_subset(splits.train, per_class=10, seed=0).tensors[0]
    x, y = splits.test.tensors
    folded = copy.deepcopy(fp).eval()
    fold_bn(folded, calib[:32])
    gemms = [n for n, m in folded.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    with torch.no_grad():
        ref = fp(x)
    return dict(fp=fp, model=folded, first_last=[gemms[0], gemms[-1]], calib=calib, x=x, y=y, ref=ref,
                precisions=precisions)


def _thrifty_rows(bundle: dict, quick: bool) -> list[dict]:
    from thrifty.quant import PTQ, quantize

    rows = []
    budget = dict(adaquant_iters=20, bias_iters=10) if quick else {}
    for w_bits, a_bits in bundle["precisions"]:
        for pipe in ("rtn", "advanced"):
            w, c = time.perf_counter(), _cpu()
            # the thrifty model is the unfolded FP32 one: quantize() folds the BatchNorms itself (same result)
            res = quantize(bundle["fp"], PTQ(w_bits=w_bits, a_bits=a_bits, pipeline=pipe, **budget), bundle["calib"],
                           progress=False)
            wall, cpu = time.perf_counter() - w, _cpu() - c
            with torch.no_grad():
                out = res.model(bundle["x"])
            rows.append(dict(tool="thrifty", method=pipe + ("" if pipe == "rtn" else " (library defaults)"),
                             precision=f"W{w_bits}A{a_bits}", **_scores(out, bundle["ref"], bundle["y"]),
                             cpu_s=cpu, wall_s=wall))
            print(json.dumps(rows[-1]), flush=True)
    return rows


def render(res: dict) -> str:
    from thrifty.bench.experiment import table

    out = ["# PTQ side by side: thrifty vs an installed anchor"]
    if "rows" in res:  # the resnet20 part (absent when only a transformer workload has run into this file)
        text = (f"resnet20 / digits32 (FP32 top-1 {res['fp_acc']:.2f} %, 539 test images), the same BN-folded model, "
                "the same 100 calibration images, the same placement (per-channel asymmetric weights, per-tensor "
                "asymmetric layer inputs, first/last layer 8/8 bit, FP32 biases). Test KL = mean KL(FP32 || "
                f"quantized). CPU s with 1 torch thread. Anchor: {res['anchor']}. Produced by `python "
                f"benchmarks/ptq_anchor.py --anchor-python ...`{res.get('source', '')}.")
        cols = {"precision": "precision", "tool": "tool", "method": "method", "test_kl": "test KL", "acc": "top-1 %",
                "cpu_s": "CPU s", "wall_s": "wall s"}
        out += ["", "## resnet20 / digits32", "", text, "",
                table(sorted(res["rows"], key=lambda r: (r["precision"], r["test_kl"])), cols,
                      digits={"test_kl": 4, "cpu_s": 1, "wall_s": 1})]
    for key in ("minilm", "lm"):
        if key in res:
            out += ["", *_render_nlp(key, res[key])]
    return "\n".join(out)


def _render_nlp(key: str, part: dict) -> list[str]:
    nlp = _nlp_module()
    from thrifty.bench.experiment import table

    for r in part["rows"]:  # a failed anchor run: its error is the row's outcome
        r.setdefault("outcome", r.get("error") or r.get("note") or "")
    runs = part.get("runs") or [dict(command=part["command"], load=part["load"])]
    by = "; ".join(f"`{r['command']}` (load {r['load']:.0f})" for r in runs)
    when = (f"Produced by {by}; wall s include waiting when the machine was shared, CPU s are the comparable cost; "
            "1 torch thread.")
    cols = {"precision": "precision", "tool": "tool", "method": "method"}
    if key == "minilm":
        head = ["## all-MiniLM-L6-v2, W4A8", "",
                f"{part['n_calib']} calibration and {part['n_test']} held-out sentences of experiments/ptq.py, "
                "each set tokenized once (padded to its longest sentence) and given to both tools. Placement as "
                "thrifty's: every Linear (encoder and pooler) per-channel asymmetric weights + a per-tensor "
                "asymmetric 8-bit input quantizer, first and last GEMM (layer 0's query, the pooler) 8/8 bit; "
                "embeddings, LayerNorms and attention products FP32. Mean cosine of the sentence embeddings to FP32 "
                f"on the held-out sentences. {when}", ""]
        cols.update(mean_cos="mean cosine", min_cos="min cosine")
        digits = {"mean_cos": 4, "min_cos": 4}
        rows = sorted(part["rows"], key=lambda r: -r.get("mean_cos", -1.0))
    else:
        head = ["## Causal LM (tinyllama), W4A16", "",
                f"thrifty.train.lm.pretrained_lm; {part['n_calib']} random training windows for calibration, "
                f"{part['n_test']} held-out windows for perplexity per byte (experiments/causal_lm.py's). Every "
                "Linear (LM head included) at 4 bit, asymmetric, per channel or per group of 64; activations FP. "
                f"FP32 perplexity {part['fp32_ppl']:.4f}. thrifty: AdaQuant with causal_lm.py's settings. AIMET per group: "
                "its block-wise weight quantizers (min/max grid; per channel its SQNR-searched grid), AdaRound given "
                f"that grid per element (ptq_anchor_nlp.blockwise_adaround). {when}", ""]
        cols.update(ppl="perplexity")
        digits = {"ppl": 4}
        rows = sorted(part["rows"], key=lambda r: (r["precision"], r.get("ppl", float("inf"))))
    cols.update(cpu_s="CPU s", wall_s="wall s")
    if any(r["outcome"] for r in rows):
        cols["outcome"] = "anchor outcome"
    return head + [table(rows, cols, digits={**digits, "cpu_s": 1, "wall_s": 1})] + nlp.aimet_cost(part)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--worker"]:  # the anchor's python: torch and brevitas only, no thrifty
        return anchor_worker(*argv[1:3])
    from thrifty.bench.experiment import Experiment

    exp = Experiment("ptq_anchor", __doc__)  # one torch thread: the CPU seconds compare like for like
    ap = exp.parser
    ap.add_argument("--anchor-python", default=os.environ.get("THRIFTY_ANCHOR_PYTHON"),
                    help="a python with torch + brevitas and/or aimet-torch (default: $THRIFTY_ANCHOR_PYTHON, "
                         "else this python)")
    ap.add_argument("--thrifty-from", default=None, metavar="JSON",
                    help="take thrifty's rows from experiments/ptq_ablation.py's JSON (same model, data and quantize "
                         "call) instead of recomputing them; with --setting naming the row(s) to use")
    ap.add_argument("--setting", action="append", default=None, help="ablation setting(s) for --thrifty-from")
    ap.add_argument("--anchor-from", nargs="+", default=None, metavar="JSON",
                    help="anchor rows saved by earlier worker runs (the --worker output files) instead of rerunning")
    ap.add_argument("--aimet-iters", type=int, nargs="+", default=[2000],
                    help="AdaRound iterations per layer for AIMET (several values: one row each)")
    ap.add_argument("--workload", choices=["resnet20", "minilm", "lm"], default="resnet20",
                    help="which comparison to run; its rows replace that workload's in the JSON, the others are kept")
    ap.add_argument("--precision", action="append", default=None,
                    help="minilm / lm: only this precision, as the table names it (W4A8, W4A16, 'W4A16 g64'); "
                         "repeatable. The workload's rows of other precisions already in the JSON are kept, so "
                         "two runs with different precisions can share one JSON (even at the same time)")
    args = exp.start(argv)
    if args.render:
        res = exp.read_json()
    else:
        if args.precision and args.workload == "resnet20":
            ap.error("--precision applies to --workload minilm / lm")
        # the anchor's python is a path on this machine; the command a reader reruns names it VENV/bin/python
        command = exp.command.replace(args.anchor_python, "VENV/bin/python") if args.anchor_python else exp.command
        exp.command = command  # the JSON's environment records it too
        part = science(args) if args.workload == "resnet20" else nlp_science(args, command)
        if part is None:
            return 0
        with _locked(exp.path(".json.lock")):  # read-merge-write, safe beside a run of another precision
            try:
                old = exp.read_json()
            except (FileNotFoundError, SystemExit):
                old = {}
            if args.workload == "resnet20":
                res = {**{k: old[k] for k in ("minilm", "lm") if k in old}, **part}
            else:  # the resnet20 rows (and the command that produced them) stay as they were
                res = {**old, "resnet20_environment": old.get("resnet20_environment", old.get("environment")),
                       args.workload: merge_precisions(old.get(args.workload), part)}
                res.pop("environment", None)
            exp.write_json(res)
        res = exp.read_json()  # rendered from the JSON, as --render does
    print(exp.write_markdown(render(res)).read_text(), end="")
    return 0


def science(args) -> dict | None:
    """The side-by-side rows, or None (after saying why) when no anchor is installed."""
    anchor_py = _anchor_python(args)
    if anchor_py is None:
        return None
    anchor = ", ".join(subprocess.run([anchor_py, "-c", _PROBE], capture_output=True, text=True).stdout.split())
    precisions = [(4, 4)] if args.quick else [(4, 4), (3, 4), (2, 4)]
    bundle = _bundle(precisions)
    bundle["aimet_iters"] = [50] if args.quick else args.aimet_iters
    if args.anchor_from:
        anchor_rows = [r for f in args.anchor_from for r in json.loads(Path(f).read_text())]
    else:
        anchor_rows = _run_anchor(anchor_py, bundle)
    if args.thrifty_from:
        saved = json.loads(Path(args.thrifty_from).read_text())["rows"]
        want = {f"W{w}A{a}" for w, a in precisions}
        rows = [dict(tool="thrifty", method="rtn" if r["setting"] == "rtn" else f"advanced ({r['setting']})",
                     precision=r["precision"], test_kl=r["test_kl"], acc=r["acc"], cpu_s=r["cpu_s"],
                     wall_s=r["wall_s"]) for r in saved
                if r["setting"] in (args.setting or []) and r["precision"] in want]
    else:
        rows = _thrifty_rows(bundle, args.quick)
    rows += anchor_rows
    source = "".join([" --anchor-from <saved worker rows>" if args.anchor_from else "",
                      f" --thrifty-from {Path(args.thrifty_from).name} (thrifty rows of experiments/ptq_ablation.py: "
                      "same model, calibration tensors and quantize call)" if args.thrifty_from else ""])
    fp_acc = 100.0 * float((bundle["ref"].argmax(1) == bundle["y"]).float().mean())
    return dict(fp_acc=fp_acc, anchor=anchor, rows=rows, source=source)


def nlp_science(args, command: str) -> dict | None:
    """MiniLM (W4A8) or the causal LM (W4A16): thrifty's rows and AIMET AdaRound's on the same bundle."""
    nlp = _nlp_module()

    anchor_py = _anchor_python(args)
    if anchor_py is None:
        return None
    bundle = (nlp.minilm_bundle if args.workload == "minilm" else nlp.lm_bundle)(args.quick)
    if args.precision:
        known = {nlp.precision_name(*p): p for p in bundle["precisions"]}
        unknown = [p for p in args.precision if p not in known]
        if unknown:
            raise SystemExit(f"ptq_anchor: --precision {unknown[0]!r} is not one of the {args.workload} workload's: "
                             f"{', '.join(known)}")
        bundle["precisions"] = [known[p] for p in args.precision]
    bundle["aimet_iters"] = [50] if args.quick else args.aimet_iters
    if args.anchor_from:
        anchor_rows = [r for f in args.anchor_from for r in json.loads(Path(f).read_text())]
    else:
        anchor_rows = _run_anchor(anchor_py, bundle)

    def timed(fn):
        w, c = time.perf_counter(), _cpu()
        out = fn()
        return out, time.perf_counter() - w, _cpu() - c

    rows = nlp.thrifty_rows(bundle, args.quick, timed) + anchor_rows
    keep = ("n_calib", "n_calib_full", "n_test", "fp32_ppl", "first_last")
    return dict(rows=rows, anchor=anchor_rows[0]["tool"] if anchor_rows else "none",
                runs=[dict(command=command, load=os.getloadavg()[0],
                           precisions=[nlp.precision_name(*p) for p in bundle["precisions"]])],
                **{k: bundle[k] for k in keep if k in bundle})


def merge_precisions(old: dict | None, new: dict) -> dict:
    """``new`` (one nlp workload's part) plus the rows of ``old`` for precisions ``new`` did not run, with the runs
    that produced them. A part from before runs were recorded (``command`` / ``load``) counts as one run.

        >>> a = dict(rows=[dict(precision="W4A16", ppl=9.2)], runs=[dict(command="a", load=1, precisions=["W4A16"])])
        >>> b = dict(rows=[dict(precision="W4A16 g64", ppl=9.1)],
        ...          runs=[dict(command="b", load=1, precisions=["W4A16 g64"])])
        >>> [r["precision"] for r in merge_precisions(a, b)["rows"]], len(merge_precisions(a, b)["runs"])
        (['W4A16', 'W4A16 g64'], 2)
    """
    if not old:
        return new
    done = {p for r in new["runs"] for p in r["precisions"]}
    old_runs = old.get("runs") or [dict(command=old.get("command", ""), load=old.get("load", 0.0),
                                        precisions=sorted({r["precision"] for r in old["rows"]}))]
    kept_runs = [dict(r, precisions=[p for p in r["precisions"] if p not in done]) for r in old_runs]
    return {**old, **new, "rows": [r for r in old["rows"] if r["precision"] not in done] + new["rows"],
            "runs": [r for r in kept_runs if r["precisions"]] + new["runs"]}


@contextlib.contextmanager
def _locked(path: Path):
    """An exclusive lock on ``path`` (created) for the block: two runs merging into one JSON take turns."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _anchor_python(args) -> str | None:
    """The anchor's python, or None (after saying why) when there is none."""
    here = any(importlib.util.find_spec(m) is not None for m in ("brevitas", "aimet_torch"))
    anchor_py = args.anchor_python or (sys.executable if here else None)
    if anchor_py is None:
        print("ptq_anchor: no anchor installed (neither brevitas nor aimet_torch is importable here and no "
              "--anchor-python / $THRIFTY_ANCHOR_PYTHON was given); nothing to compare, exiting.")
        return None
    probe = subprocess.run([anchor_py, "-c", _PROBE], capture_output=True, text=True)
    if probe.returncode != 0 or not probe.stdout.strip():
        print(f"ptq_anchor: {anchor_py} cannot import torch with brevitas or aimet_torch "
              f"({probe.stderr.strip().splitlines()[-1:]}); nothing to compare, exiting.")
        return None
    return anchor_py


def _run_anchor(anchor_py: str, bundle: dict) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        path, res_path = Path(tmp) / "bundle.pt", Path(tmp) / "anchor.json"
        torch.save({k: v for k, v in bundle.items() if k != "fp"}, path)
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        w, c = time.perf_counter(), _cpu()
        proc = subprocess.run([anchor_py, str(Path(__file__).resolve()), "--worker", str(path), str(res_path)],
                              env=env)
        if proc.returncode != 0:
            raise SystemExit(f"ptq_anchor: the anchor run failed (exit {proc.returncode}); see its output above")
        print(f"anchor total {time.perf_counter() - w:.0f} s wall, {_cpu() - c:.0f} CPU s", flush=True)
        return json.loads(res_path.read_text())


if __name__ == "__main__":
    raise SystemExit(main())
