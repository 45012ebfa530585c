"""Post-training quantization (Hubara et al.) at small scale: resnet20 on digits32 and all-MiniLM-L6-v2.

resnet20 (FP32 baseline from thrifty.train.pretrained, calibration = 10 training images per class):
  FP32 vs RTN (min/max ranges), RTN (MSE ranges), AdaQuant, light, advanced at W8A8, W4A8, W4A4 (plus the
  harder W3A3 / W2A4 in the full run), first and last layer at 8 bit; then the ILP bit allocation (light and
  advanced pipelines, candidate bits {2,3,4,8}, A8) for budgets 0.13..0.25 of the FP32 size of the
  quantized layers -> accuracy vs size curve.
all-MiniLM-L6-v2: W8A8 and W4A8 (RTN and advanced), fidelity on held-out real sentences: mean cosine
  similarity to the FP32 embeddings and agreement of nearest-neighbour retrieval.

Times are wall-clock and CPU seconds of this process (torch uses --threads threads); on a shared machine the
CPU time is the better estimate of the time on an idle one.

    python experiments/ptq.py --quick     # CI-sized
    python experiments/ptq.py             # full: writes results/ptq.{json,md} and results/ptq_size.png
    # or in parallel processes (what produced results/ptq.*):
    python experiments/ptq.py --only resnet20 --threads 1 --precisions 8x8,4x8 --no-curve --tag a &
    python experiments/ptq.py --only resnet20 --threads 1 --precisions 4x4,3x3 --no-curve --tag b &
    python experiments/ptq.py --only resnet20 --threads 1 --precisions "" --tag c &
    python experiments/ptq.py --only resnet20 --threads 1 --precisions "" --budgets 0.07,0.1 --tag d &
    python experiments/ptq.py --only minilm --threads 1; wait; python experiments/ptq.py --merge
"""
from __future__ import annotations

import json
import time
import warnings

import torch

from thrifty.bench.experiment import Experiment, fmt, table
from thrifty.data import calibration_subset, load_dataset
from thrifty.quant import PTQ, quantize
from thrifty.utils import atomic_write_text


def _acc(model, ds) -> float:
    from thrifty.train import evaluate
    return 100.0 * evaluate(model, ds)["acc"]


def _timed(fn):
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w, time.process_time() - c


def resnet_part(quick: bool, log, precisions=None, curve: bool = True, budgets=None) -> dict:
    from thrifty.train import pretrained

    fp = pretrained("resnet20", "digits32")
    splits = load_dataset("digits32")
    calib = calibration_subset(splits.train, per_class=10, seed=0)
    test = splits.test
    fp_acc = _acc(fp, test)
    log(f"resnet20 FP32 test acc {fp_acc:.2f}% (test n={len(test)}, calibration n={len(calib)})")
    iters = dict(adaquant_iters=30, bias_iters=20) if quick else {}  # full: PTQ defaults (200 / 100)
    methods = {
        "RTN (min/max)": dict(pipeline="rtn", w_estimator="minmax", a_estimator="minmax"),
        "RTN (MSE)": dict(pipeline="rtn"),
        "AdaQuant": dict(pipeline="adaquant", **iters),
        "light": dict(pipeline="light"),
        "advanced": dict(pipeline="advanced", **iters),
    }
    if precisions is None:
        precisions = [(8, 8), (4, 4)] if quick else [(8, 8), (4, 8), (4, 4), (3, 3)]
    rows = []
    for wb, ab in precisions:
        for mname, kw in methods.items():
            res, wall, cpu = _timed(lambda: quantize(fp, PTQ(w_bits=wb, a_bits=ab, **kw), calib, progress=False))
            acc = _acc(res.model, test)
            rows.append(dict(precision=f"W{wb}A{ab}", method=mname, acc=acc, drop=fp_acc - acc,
                             size=res.size_fraction, calib_loss=res.final_loss, wall_s=wall, cpu_s=cpu))
            log(f"  W{wb}A{ab} {mname:14s} acc {acc:6.2f}% (drop {fp_acc - acc:+.2f})  size {res.size_fraction:.3f}"
                f"  KL {res.final_loss:.4f}  {wall:.1f}s wall / {cpu:.1f}s cpu")
    if budgets is None:
        budgets = [0.1, 0.25] if quick else [0.13, 0.17, 0.21, 0.25]
    budgets = budgets if curve else []
    curve = []
    for pipe in ["light", "advanced"]:
        for b in budgets:
            cfg = PTQ(pipeline=pipe, a_bits=8, budget=b, candidate_bits=(2, 3, 4, 8), **(iters if pipe == "advanced" else {}))
            res, wall, cpu = _timed(lambda: quantize(fp, cfg, calib, progress=False))
            acc = _acc(res.model, test)
            hist = {k: sum(1 for w, _ in res.bits.values() if w == k) for k in (2, 3, 4, 8)}
            curve.append(dict(pipeline=pipe, budget=b, size=res.size_fraction, acc=acc, drop=fp_acc - acc,
                              predicted_loss=res.predicted_loss, measured_loss=res.measured_loss,
                              final_loss=res.final_loss, bits_hist=hist, wall_s=wall, cpu_s=cpu))
            log(f"  budget {b:.2f} {pipe:8s} size {res.size_fraction:.3f} acc {acc:6.2f}%  bits {hist}  "
                f"predicted KL {res.predicted_loss:.4f} measured {res.measured_loss:.4f} final {res.final_loss:.4f}"
                f"  {wall:.1f}s / {cpu:.1f}s cpu")
    return dict(fp_acc=fp_acc, n_test=len(test), n_calib=len(calib), rows=rows, curve=curve)


@torch.no_grad()
def _embed(model, batches):
    return torch.cat([model(**b) for b in batches])


def minilm_part(quick: bool, log) -> dict:
    from thrifty.models import create

    fp = create("minilm")
    splits = load_dataset("text")
    train_texts, test_texts = list(splits.train_texts), list(splits.test_texts)
    labels = splits.train.tensors[1]
    # x of the "text" dataset are indices into the split's sentences
    idx = calibration_subset(splits.train, per_class=10, seed=0).tensors[0].tolist()
    calib_texts = [train_texts[int(i)] for i in idx]
    n_test = 64 if quick else len(test_texts)
    calib_texts = calib_texts[:32] if quick else calib_texts
    test_texts = test_texts[:n_test]
    tok = lambda texts: [fp.tokenize(texts[i:i + 32], max_length=128) for i in range(0, len(texts), 32)]  # noqa: E731
    calib, test = tok(calib_texts), tok(test_texts)
    ref = _embed(fp, test)
    nn_fp = _nn(ref)
    log(f"MiniLM: calibration {len(calib_texts)} sentences, held-out {len(test_texts)} sentences ({len(set(labels.tolist()))} topics)")
    iters = dict(adaquant_iters=30, bias_iters=20) if quick else {}
    rows = []
    for wb, ab, pipe in [(8, 8, "rtn"), (4, 8, "rtn"), (4, 8, "advanced")]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # embeddings / LayerNorms stay FP32 (listed in the warning)
            res, wall, cpu = _timed(lambda: quantize(fp, PTQ(w_bits=wb, a_bits=ab, pipeline=pipe,
                                                             **(iters if pipe == "advanced" else {})), calib,
                                                     progress=False))
        emb = _embed(res.model, test)
        cos = torch.nn.functional.cosine_similarity(emb, ref).float()
        agree = float((_nn(emb) == nn_fp).float().mean())
        rows.append(dict(precision=f"W{wb}A{ab}", method=pipe, mean_cos=float(cos.mean()), min_cos=float(cos.min()),
                         nn_agreement=agree, n_layers=len(res.bits), size=res.size_fraction, wall_s=wall, cpu_s=cpu))
        log(f"  W{wb}A{ab} {pipe:8s} mean cos {cos.mean():.4f} (min {cos.min():.4f})  NN agreement {agree:.3f}  "
            f"{len(res.bits)} layers  {wall:.1f}s / {cpu:.1f}s cpu")
    return dict(n_calib=len(calib_texts), n_test=len(test_texts), rows=rows)


def _nn(emb: torch.Tensor) -> torch.Tensor:
    sim = emb @ emb.T
    sim.fill_diagonal_(-2.0)
    return sim.argmax(1)


def _markdown(r: dict) -> str:
    rn, ml = r["resnet20"], r["minilm"]
    out = [f"# PTQ results{' (quick)' if r['quick'] else ''}", "",
           f"resnet20 on digits32: FP32 test accuracy **{rn['fp_acc']:.2f}%** (n={rn['n_test']}; one image = "
           f"{100 / rn['n_test']:.2f} points); calibration {rn['n_calib']} training images (10 per class). "
           "First and last layer at 8 bit; weights per output channel, activations per tensor, asymmetric.", "",
           table(rn["rows"], {"precision": "precision", "method": "method", "acc": "test acc %",
                              "drop": "drop (points)", "size": "size vs FP32", "calib_loss": "KL to FP32 (calib)",
                              "wall_s": "wall s", "cpu_s": "CPU s"},
                 digits={"size": 3, "calib_loss": 4, "wall_s": 1, "cpu_s": 1},
                 formats={"drop": lambda d: fmt(d, sign=True)}).rstrip("\n")]
    def hist(h: dict) -> str:  # int keys in a fresh run, str keys once read back from the JSON
        h = {int(k): v for k, v in h.items()}
        return "/".join(str(h[b]) for b in (2, 3, 4, 8))
    out += ["", "Bit allocation (ILP over {2,3,4,8}-bit weights, A8; budget = fraction of the FP32 bytes of the "
            "quantized layers):", "",
            table(sorted(rn["curve"], key=lambda c: (c["pipeline"] != "light", c["budget"])),
                  {"pipeline": "pipeline", "budget": "budget", "size": "size", "acc": "test acc %", "drop": "drop",
                   "bits_hist": "layers at 2/3/4/8 bit", "predicted_loss": "predicted KL",
                   "measured_loss": "measured KL (RTN)", "final_loss": "final KL", "cpu_s": "CPU s"},
                  digits={"size": 3, "predicted_loss": 4, "measured_loss": 4, "final_loss": 4, "cpu_s": 1},
                  formats={"drop": lambda d: fmt(d, sign=True), "bits_hist": hist}).rstrip("\n")]
    out += ["", f"all-MiniLM-L6-v2: fidelity on {ml['n_test']} held-out sentences (calibration {ml['n_calib']} "
            "sentences); embeddings, LayerNorms and attention score/value products stay FP32.", "",
            table(ml["rows"], {"precision": "precision", "method": "method", "mean_cos": "mean cosine",
                               "min_cos": "min cosine", "nn_agreement": "NN retrieval agreement",
                               "n_layers": "layers", "cpu_s": "CPU s"},
                  digits={"mean_cos": 4, "min_cos": 4, "nn_agreement": 3, "cpu_s": 1}).rstrip("\n")]
    out += ["", "## Targets", ""] + [f"- {t}" for t in r["targets"]]
    adv = [x["cpu_s"] for x in rn["rows"] if x["method"] == "advanced"]
    adv_b = [x["cpu_s"] for x in rn["curve"] if x["pipeline"] == "advanced"]
    rng = lambda v: f"{min(v):.0f}-{max(v):.0f}" if v else "n/a"  # noqa: E731
    out += ["", "Timing note: CPU s is this process's CPU time with 1 torch thread. The runs may share the 2-core "
            "machine with other jobs, which inflates wall-clock time; CPU time is the estimate for an idle machine. "
            f"The resnet20 advanced pipeline (fold, calibration, AdaQuant, BN tuning, bias tuning) used {rng(adv)} "
            f"CPU s here, {rng(adv_b)} CPU s with bit allocation (sensitivities). 'measured KL (RTN)' is the loss of "
            "the chosen allocation before AdaQuant/tuning, to check the additivity assumption behind 'predicted KL'."]
    return "\n".join(out) + "\n"


def _targets(r: dict) -> list[str]:
    rn, ml = r["resnet20"], r["minilm"]
    get = lambda p, m: next(x for x in rn["rows"] if x["precision"] == p and x["method"] == m)  # noqa: E731
    mget = lambda p, m: next(x for x in ml["rows"] if x["precision"] == p and x["method"] == m)  # noqa: E731
    a44, a88, r88 = get("W4A4", "advanced"), get("W8A8", "advanced"), get("W8A8", "RTN (MSE)")
    m88, m48a, m48r = mget("W8A8", "rtn"), mget("W4A8", "advanced"), mget("W4A8", "rtn")
    ok = lambda c: "MET" if c else "NOT MET"  # noqa: E731
    return [
        f"resnet20 W4A4 advanced within 1.5 points of FP32: drop {a44['drop']:+.2f} -> {ok(a44['drop'] <= 1.5)}",
        f"resnet20 W8A8 within 0.3 points: RTN drop {r88['drop']:+.2f}, advanced {a88['drop']:+.2f} -> "
        f"{ok(max(r88['drop'], a88['drop']) <= 0.3)}",
        f"MiniLM W8A8 mean cosine >= 0.99: {m88['mean_cos']:.4f} -> {ok(m88['mean_cos'] >= 0.99)}",
        f"MiniLM W4A8 advanced >= 0.97 and better than RTN: {m48a['mean_cos']:.4f} vs RTN {m48r['mean_cos']:.4f} -> "
        f"{ok(m48a['mean_cos'] >= 0.97 and m48a['mean_cos'] > m48r['mean_cos'])}",
        f"advanced pipeline on resnet20 (W4A4) < 2 min on 2 cores: {a44['wall_s']:.1f} s wall, {a44['cpu_s']:.1f} s "
        f"CPU -> {ok(a44['cpu_s'] < 120)}",
    ]


def _plot(r: dict, exp: Experiment) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rn = r["resnet20"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for pipe, mk in (("light", "o-"), ("advanced", "s-")):
        pts = sorted((x["size"], x["acc"]) for x in rn["curve"] if x["pipeline"] == pipe)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], mk, label=f"ILP allocation, {pipe}")
    for prec, mk in (("W4A8", "^"), ("W4A4", "v"), ("W8A8", "D")):
        x = next((x for x in rn["rows"] if x["precision"] == prec and x["method"] == "advanced"), None)
        if x is None:
            continue
        ax.plot([x["size"]], [x["acc"]], mk, label=f"uniform {prec} advanced")
    ax.axhline(rn["fp_acc"], color="k", ls="--", lw=1, label="FP32")
    ax.set_xlabel("size of quantized layers / FP32")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("resnet20 / digits32 PTQ: accuracy vs size")
    ax.legend(fontsize=7)
    fig.tight_layout()
    exp.savefig(fig, "_size.png", dpi=120)


def main(argv=None) -> int:
    exp = Experiment("ptq", __doc__)  # one thread by default: what the committed results used
    ap = exp.parser
    ap.add_argument("--only", choices=["resnet20", "minilm"], default=None, help="run one part (saved for --merge)")
    ap.add_argument("--merge", action="store_true", help="combine the parts saved by --only runs")
    ap.add_argument("--precisions", default=None, help="resnet20 rows, e.g. 8x8,4x8 (W x A); default all")
    ap.add_argument("--no-curve", action="store_true", help="skip the resnet20 bit-allocation curve")
    ap.add_argument("--budgets", default=None, help="bit-allocation budgets, e.g. 0.13,0.25 (default 0.13..0.25)")
    ap.add_argument("--tag", default="", help="suffix of the part file (several resnet20 processes)")
    args = exp.start(argv)
    if args.render:
        r = exp.read_json()
    else:
        r = science(args, exp)
        if r is None:
            return 0
        exp.write_json(r)
        r = exp.read_json()  # rendered from the JSON, as --render does
    print(exp.write_markdown(_markdown(r)).read_text(), end="")
    _plot(r, exp)
    return 0


def science(args, exp: Experiment) -> dict | None:
    """The results, or None for an ``--only`` run (its part is saved for ``--merge``)."""
    log = lambda s: print(s, flush=True)  # noqa: E731
    out, stem = exp.out, exp.stem
    r: dict = {"quick": args.quick, "threads": args.threads}
    prec = None if args.precisions is None else [tuple(int(b) for b in p.split("x")) for p in args.precisions.split(",") if p]
    budgets = None if args.budgets is None else [float(b) for b in args.budgets.split(",") if b]
    parts = {"resnet20": lambda q, lg: resnet_part(q, lg, prec, not args.no_curve, budgets), "minilm": minilm_part}
    for name, fn in parts.items():
        # --only runs parts in separate processes (files .ptq_<part>[_<tag>].json); --merge combines them
        part = out / f".{stem}_{name}{'_' + args.tag if args.tag else ''}.json"
        if args.merge:
            pieces = [json.loads(f.read_text()) for f in sorted(out.glob(f".{stem}_{name}*.json"))]
            if not pieces:
                raise FileNotFoundError(f"no saved part .{stem}_{name}*.json in {out}")
            r[name] = pieces[0]
            for extra in pieces[1:]:
                r[name]["rows"] += extra["rows"]
                r[name].setdefault("curve", []).extend(extra.get("curve", []))
        elif args.only in (None, name):
            r[name] = fn(args.quick, log)
            if args.only:
                atomic_write_text(part, json.dumps(r[name], indent=1))
    r["total_seconds"] = exp.seconds()
    if args.only:
        return None
    r["targets"] = _targets(r)
    return r


if __name__ == "__main__":
    raise SystemExit(main())
