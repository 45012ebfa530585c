"""Why AdaQuant lost to AdaRound at 2 bits on resnet20/digits32, and what fixes it (issue: PTQ vs AdaRound).

Setting (as experiments/ptq.py): resnet20 FP32 baseline from thrifty.train.pretrained, 100 calibration images
(10 per class, calibration_subset seed 0), first/last layer 8 bit, weights per output channel, activations per
tensor, advanced pipeline (AdaQuant + BN tuning + bias tuning). Measure: mean KL(FP32 || quantized) over the
test set (539 images; one image is 0.19 accuracy points, so KL separates methods, top-1 does not), top-1,
calibration KL, and the cost in CPU seconds (1 torch thread) and wall seconds. The ablation runs at W2A4, where
the gap to AdaRound was; the kept settings are then checked at W4A4, W3A4 and W2A4.

Hypotheses: HYPOTHESES below, written before any ablation run (each names the prediction it is judged by;
``--help`` lists them and the markdown carries them).

Win rule: the lowest W2A4 test KL among settings whose CPU time stays under AdaRound's (333 s per bit-width on
the issue's measurement); ties within 10 % in KL go to the cheaper setting. Results:
results/ptq_ablation.{json,md} and results/ptq_ablation.png.

    python experiments/ptq_ablation.py --quick            # CI-sized (< 1 min): 2 settings, 30 images, tiny budget
    python experiments/ptq_ablation.py                    # full: every setting at W2A4, then the finals
    python experiments/ptq_ablation.py --only base,lr1e-2 --tag a   # a subset in one process (parts merge)
    python experiments/ptq_ablation.py --merge            # rebuild the tables from the saved parts
"""
from __future__ import annotations

import json
import resource
import time
from pathlib import Path

import torch

from thrifty.bench.experiment import Experiment, table
from thrifty.data import calibration_subset, load_dataset
from thrifty.quant import PTQ, quantize
from thrifty.quant.calib import output_loss

HYPOTHESES = [
    "H1 optimisation budget. a. Weight learning rate. lr_weight=1e-3 is relative to the layer's mean weight "
    "step; Adam moves a parameter by about lr per iteration, so with the cosine schedule over 200 iterations a"
    " latent weight can drift at most ~0.1 step from its FP value: AdaQuant can only flip the rounding of "
    "weights that sit within 0.1 step of a rounding boundary, far from the free optimisation of the paper. The"
    " issue's 2000-iteration run (10x the drift) reaching W2A4 KL 0.0061 fits this. Prediction: lr_weight 1e-2"
    " at the same 200 iterations lowers W2A4 test KL by > 1.5x; 3e-2 is no better than 1e-2 (noise of a too-"
    "large step at 2 bits). b. Iterations. 3x the iterations at the old learning rate helps, but less than the"
    " learning rate does at 1x cost; more iterations on top of the better learning rate give a smaller further"
    " gain. c. Calibration samples per step (adaquant_batch 32 -> 100 images): less gradient noise, ~3x the "
    "cost per step; predicted small gain, not worth its cost.",
    "H2 layer order. sequential (each layer sees the already-quantized prefix's outputs and so compensates its"
    " error) beats parallel (FP inputs) at W2A4, predicted clearly (> 1.5x in KL), because errors compound "
    "over 19 layers at 2 bits.",
    "H3 what is learned. Dropping the activation step size (lr_a_scale=0) hurts at A4; dropping the weight "
    "step size (lr_w_scale=0) hurts at W2; weights-only (both 0) is worst of the three. Learning only the "
    "rounding (latent weights clamped within max_shift=1 step of their start, with the higher learning rate) "
    "regularises the fit to 100 images: predicted equal or slightly better test KL than free weights, with a "
    "smaller gap between calibration and test KL.",
    "H4 step-size initialisation. MSE-optimal per-channel ranges (default) beat min/max ranges after AdaQuant "
    "at W2A4 (min/max wastes most of 4 levels on outliers and 200 iterations do not fully move the steps "
    "back).",
    "H5 BN and bias tuning after AdaQuant. They helped a lot at W2A4 before (0.0428 -> 0.0118 in the issue); "
    "after a stronger AdaQuant the gain is predicted smaller but still positive (BN tuning re-matches channel "
    "statistics that a layer-wise MSE leaves biased).",
    "H6 (from the code) the layer loss is the MSE of the pre-activation output. Where a layer feeds a ReLU "
    "(conv1 of every block and the stem), errors where both outputs are negative are invisible to the network;"
    " measuring the error after the ReLU (AIMET's AdaRound does) spends the layer's capacity where it matters."
    " Prediction: lower W2A4 test KL, at no extra cost.",
    "H7 (from the code) overfitting to the 100 calibration images: if the winner's test KL is far above its "
    "calibration KL while the baseline's is not, the fix is regularisation (H3's rounding-only, larger batch),"
    " not more optimisation.",
]

# The settings before this ablation (the library's defaults until then), so the baseline row stays fixed when
# the defaults change.
BASE = dict(pipeline="advanced", adaquant_iters=200, adaquant_batch=32, lr_weight=1e-3, lr_w_scale=1e-2,
            lr_a_scale=1e-2, adaquant_mode="sequential", w_estimator="mse", adaquant_relu=False,
            adaquant_max_shift=None, bias_iters=100)

# name -> (hypothesis, overrides of BASE)
SETTINGS: dict[str, tuple[str, dict]] = {
    "base": ("-", {}),
    "rtn": ("-", dict(pipeline="rtn")),
    "lr_w 1e-2": ("H1a", dict(lr_weight=1e-2)),
    "lr_w 3e-2": ("H1a", dict(lr_weight=3e-2)),
    "iters 600": ("H1b", dict(adaquant_iters=600)),
    "batch 100": ("H1c", dict(adaquant_batch=100)),
    "parallel": ("H2", dict(adaquant_mode="parallel")),
    "no a-step": ("H3", dict(lr_a_scale=0.0)),
    "no w-step": ("H3", dict(lr_w_scale=0.0)),
    "weights only": ("H3", dict(lr_a_scale=0.0, lr_w_scale=0.0)),
    "rounding only (1e-2)": ("H3", dict(lr_weight=1e-2, adaquant_max_shift=1.0)),
    "min/max init": ("H4", dict(w_estimator="minmax")),
    "adaquant only": ("H5", dict(pipeline="adaquant")),
    "no bias tuning": ("H5", dict(bias_tune=False)),
    "relu loss": ("H6", dict(adaquant_relu=True)),
}


def _cpu() -> float:
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def setup(per_class: int = 10) -> dict:
    """FP32 model, calibration images (``per_class`` per class), test tensors and the FP32 test logits."""
    from thrifty.train import pretrained

    fp = pretrained("resnet20", "digits32")
    splits = load_dataset("digits32")
    calib = calibration_subset(splits.train, per_class=per_class, seed=0)
    x, y = splits.test.tensors
    with torch.no_grad():
        ref = fp(x)
    return dict(fp=fp, calib=calib, x=x, y=y, ref=ref, fp_acc=100.0 * float((ref.argmax(1) == y).float().mean()))


def evaluate_setting(env: dict, w_bits: int, a_bits: int, kw: dict) -> dict:
    """Quantize with ``kw``; return test KL / top-1, calibration KL, CPU and wall seconds."""
    w, c = time.perf_counter(), _cpu()
    res = quantize(env["fp"], PTQ(w_bits=w_bits, a_bits=a_bits, **kw), env["calib"], progress=False)
    wall, cpu = time.perf_counter() - w, _cpu() - c
    with torch.no_grad():
        out = res.model(env["x"])
    return dict(test_kl=float(output_loss("kl")(out, env["ref"])), acc=100.0 * float((out.argmax(1) == env["y"]).float().mean()),
                calib_kl=res.final_loss, cpu_s=cpu, wall_s=wall, reverted=res.reverted,
                stages={k: round(v, 6) for k, v in res.losses.items()})


def _parts(out: Path, stem: str) -> list[dict]:
    """The saved rows of every part file; a (setting, precision) measured twice keeps its first row."""
    rows: dict[tuple[str, str], dict] = {}
    for f in sorted(out.glob(f".{stem}_*.jsonl")):
        for line in f.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                rows.setdefault((r["setting"], r["precision"]), r)
    return list(rows.values())


def _markdown(res: dict) -> str:
    rows, fp_acc, n_calib, quick = res["rows"], res["fp_acc"], res["n_calib"], res["quick"]
    out = [f"# PTQ ablation{' (quick)' if quick else ''}: resnet20 / digits32", "",
           f"FP32 test top-1 {fp_acc:.2f} % (539 test images); {n_calib} calibration images; first/last layer 8 bit; "
           "KL = mean KL(FP32 || quantized) over the test set. CPU s = user+system CPU time with 1 torch thread "
           "(the fair measure on a shared machine), wall s as measured under that load. Hypotheses: listed above, "
           "written in experiments/ptq_ablation.py and committed before the runs.", "",
           table(sorted(rows, key=lambda r: (r["precision"], r["test_kl"])),
                 {"precision": "precision", "setting": "setting", "hypothesis": "hypothesis", "test_kl": "test KL",
                  "acc": "top-1 %", "calib_kl": "calib KL", "cpu_s": "CPU s", "wall_s": "wall s",
                  "reverted": "reverted"}, digits={"test_kl": 4, "calib_kl": 4, "cpu_s": 1, "wall_s": 1},
                 formats={"reverted": lambda r: ", ".join(r) or "-"})]
    return "\n".join(out)


def _plot(rows: list[dict], exp: Experiment) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    abl = sorted((r for r in rows if r["precision"] == "W2A4"), key=lambda r: r["test_kl"])
    if not abl:
        return
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(abl) + 1.2))
    ax.barh([f"{r['setting']} ({r['cpu_s']:.0f} CPU s)" for r in abl], [r["test_kl"] for r in abl])
    ax.set_xscale("log")
    ax.invert_yaxis()
    ax.set_xlabel("test KL(FP32 || quantized), W2A4, log scale")
    ax.set_title("resnet20 / digits32 PTQ ablation (advanced pipeline)")
    fig.tight_layout()
    exp.savefig(fig, ".png")


def main(argv=None) -> int:
    exp = Experiment("ptq_ablation", __doc__, hypotheses=HYPOTHESES)  # one torch thread: CPU seconds are the measure
    ap = exp.parser
    ap.add_argument("--only", default=None, help="comma-separated setting names (default: all; names hold no comma)")
    ap.add_argument("--precisions", default="2x4", help="W x A, e.g. 4x4,3x4,2x4")
    ap.add_argument("--extra", default=None, help='JSON {name: overrides of BASE} added to the settings')
    ap.add_argument("--tag", default="main", help="part file suffix (parallel processes)")
    ap.add_argument("--merge", action="store_true", help="only rebuild json/md/png from the saved parts")
    return exp.run(lambda args: science(args, exp), _markdown, lambda res: _plot(res["rows"], exp), argv)


def science(args, exp: Experiment) -> dict:
    out, stem = exp.out, exp.stem
    settings = dict(SETTINGS)
    for name, kw in (json.loads(args.extra) if args.extra else {}).items():
        settings[name] = ("combined", kw)
    env = setup(3 if args.quick else 10)  # quick: 30 calibration images
    if not args.merge:
        names = ["base", "lr_w 1e-2"] if args.quick else list(settings)
        if args.only:
            names = [n.strip() for n in args.only.split(",")]
            unknown = [n for n in names if n not in settings]
            if unknown:
                raise SystemExit(f"unknown setting(s) {unknown}; known: {list(settings)}")
        part = out / f".{stem}_{args.tag}.jsonl"
        if args.quick and part.exists():
            part.unlink()  # CI runs start fresh; the full run resumes where it stopped
        done = {(r["setting"], r["precision"]) for r in _parts(out, stem)}
        quick_kw = dict(adaquant_iters=10, bias_iters=5) if args.quick else {}
        for p in [tuple(int(b) for b in s.split("x")) for s in args.precisions.split(",") if s]:
            for name in names:
                if (name, f"W{p[0]}A{p[1]}") in done:
                    continue
                hyp, kw = settings[name]
                r = evaluate_setting(env, p[0], p[1], {**BASE, **kw, **quick_kw})
                r.update(setting=name, hypothesis=hyp, precision=f"W{p[0]}A{p[1]}", overrides=kw)
                print(f"W{p[0]}A{p[1]} {name:22s} test KL {r['test_kl']:.4f} top-1 {r['acc']:.2f} calib KL "
                      f"{r['calib_kl']:.4f} {r['cpu_s']:.1f} CPU s {r['wall_s']:.1f} wall s", flush=True)
                out.mkdir(parents=True, exist_ok=True)
                with open(part, "a") as f:  # appended row by row: a stopped full run resumes here
                    f.write(json.dumps(r) + "\n")
    return dict(fp_acc=env["fp_acc"], n_calib=len(env["calib"]), base=BASE, rows=_parts(out, stem), quick=args.quick)


if __name__ == "__main__":
    raise SystemExit(main())
