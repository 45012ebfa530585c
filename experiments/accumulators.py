"""Low-bit floating-point accumulators: accuracy vs accumulator bits, naive vs fine-tuned (STE / fine-grained).

Claim (Blumenfeld, Hubara, Soudry): with a short fine-tuning (first without underflow, then with), 12-bit
floating-point accumulators lose no significant accuracy; used naively they degrade; below 12 bits fine-grained
gradient approximations beat the plain straight-through estimator.

Models: the MLP on MNIST-1D (thrifty.train.pretrained) and ResNet-20 on the 8x8 digits images (trained here in
seconds; 32x32 inputs would not change the accumulation length K, which is set by channels x kernel size). Every
Linear/Conv2d accumulates in the format (products rounded to the same format, chunks of 16, IEEE-style bias,
subnormals, saturation); the simulation runs in the compiled kernel of thrifty.ops.accum. Ablation: the same
without chunking (chunk = K, one sequential sum per output), where swamping grows with K. Also: all-MiniLM-L6-v2
sentence embeddings with a 12-bit accumulator in every Linear (attention score products stay float32), no
fine-tuning: cosine similarity to the float32 embeddings.

Part "wide" (protocol written down and committed before its full run): the ResNet-20 rows above have K <= 576
(9 x 64), too short for 12 bits to matter. ImageNet ResNets reach K = 3x3x512 = 4608, so this part trains a wide
ResNet-20, ``create("resnet20", in_chans=1, num_classes=10, width=128)`` (K = 9 x 512 = 4608 in the last stage),
on the 8x8 digits exactly like the width-16 model (15 epochs, batch 64, SGD lr 0.1, weight decay 5e-4, seed =
--seed). The width was chosen to match ImageNet's K, not tuned on results. It is evaluated in FP32; with the
16-bit format naive (sanity row); with the 12-bit format (e4m7) naive, with the default chunk 16 and with
chunk = K (no chunking); and, for each of the two chunkings, after the same fine-tuning recipe and step count as
the width-16 ResNet rows (20 steps, SGD lr 0.01, half without underflow, half with), both STE and fine-grained.
A timing run (2 threads: one epoch 5 s, 2 fine-grained steps 20 s, peak 11 GB for the fine-grained traces)
showed the full step counts fit, so nothing is shortened. Whatever comes out is reported. The part runs alone
(``--parts wide``) and is merged into the existing results json without rerunning the other rows; quick mode
uses width 8.
Extension (written down and committed after the 12-bit result - lossless naive with chunk 16, one test image lost
without chunking - and before running it): the same wide model also at 10 bits (e4m5) and 8 bits (e4m3), chunk 16
and chunk = K, naive and after the same STE / fine-grained fine-tuning, to see at which width the long
reduction starts to cost accuracy. The model is retrained with the same seed (the 16/12-bit rows must come out
identical, a determinism check). Reported whichever way it goes. (First full run: 8 bits without chunking made
the fine-tuning loss NaN at step 2 and the script stopped; a fine-tuning that diverges is now recorded as
"diverged" in its cell, and the part was rerun unchanged otherwise.)

    python experiments/accumulators.py --quick     # CI-sized, about a minute
    python experiments/accumulators.py             # full: results/accumulators.{json,md,_acc.png}
    python experiments/accumulators.py --parts wide --threads 2   # only the wide ResNet-20, merged into the json
"""
from __future__ import annotations

import copy
import time

import torch
from torch.utils.data import TensorDataset

from thrifty.bench.experiment import Experiment, fmt, table
from thrifty.core import apply
from thrifty.data import load_dataset
from thrifty.models import create
from thrifty.ops.accum import FloatFormat, accumulate
from thrifty.quant.accum import AccumConfig, finetune_accumulators
from thrifty.train import TrainConfig, evaluate, fit, pretrained
from thrifty.utils import seed_everything

# total bits -> (exponent bits, mantissa bits); the paper's exact splits are not verified (METHODS.md sec. 4)
FORMATS = {16: (5, 10), 14: (5, 8), 12: (4, 7), 10: (4, 5), 8: (4, 3), 7: (4, 2), 6: (3, 2)}


FT = {"mlp": {True: 10, False: 120}, "resnet": {True: 4, False: 20}}  # fine-tuning steps {quick: n, full: n}
WIDE = {True: 8, False: 128}  # part "wide": ResNet-20 width {quick, full}; 128 gives K = 9 x 512 = 4608
PARTS = ("main", "wide")
WIDE_BITS = (12, 10, 8)  # part "wide": accumulator widths run naive and fine-tuned, chunk 16 and chunk K


def subset(ds: TensorDataset, n: int | None) -> TensorDataset:
    return ds if n is None or n >= len(ds) else TensorDataset(*(t[:n] for t in ds.tensors))


def digits8x8(seed: int, quick: bool, width: int = 16):
    """ResNet-20 trained from scratch on the 8x8 digits images (seconds; width 128: about a minute)."""
    s = load_dataset("digits", seed=0)
    tr = TensorDataset(s.train.tensors[0].reshape(-1, 1, 8, 8), s.train.tensors[1])
    te = TensorDataset(s.test.tensors[0].reshape(-1, 1, 8, 8), s.test.tensors[1])
    seed_everything(seed)
    model = create("resnet20", in_chans=1, num_classes=s.num_classes, width=width)
    fit(model, TrainConfig(epochs=3 if quick else 15, optim={"batch_size": 64, "lr": 0.1, "weight_decay": 5e-4},
                           seed=seed), tr,
        progress=False)
    return model.eval(), tr, te


def mlp_mnist1d(seed: int, quick: bool):
    s = load_dataset("mnist1d", seed=0)
    model = pretrained("mlp", "mnist1d", seed=seed, progress=False)
    return model.eval(), s.train, s.test


def run_model(name, model, train, test, bits_list, ft_steps, opt, lr, log, chunk=16, tune_bits=None):
    """Rows for one model; ``chunk=None`` is the ablation without chunking (one sequential sum of K terms).

    ``tune_bits``: the bit widths that are also fine-tuned (None: all); the others get only the naive row."""
    rows = []
    fp32 = evaluate(model, test)["acc"]
    log(f"{name}, chunk {chunk or 'K'}: fp32 acc {fp32:.4f}")
    for bits in bits_list:
        e, m = FORMATS[bits]
        row = {"model": name, "bits": bits, "format": f"e{e}m{m}", "fp32": fp32, "chunk": chunk}
        t0 = time.perf_counter()
        naive = apply(copy.deepcopy(model), AccumConfig(e, m, chunk=chunk))
        row["naive"] = evaluate(naive, test)["acc"]
        for mode in ("ste", "fine") if tune_bits is None or bits in tune_bits else ():
            tuned = copy.deepcopy(model)
            tc = TrainConfig(optim={"steps": ft_steps, "batch_size": 64, "lr": lr, "weight_decay": 0.0}, optimizer=opt,
                             momentum=0.9, schedule="cosine", seed=1)
            try:
                out = finetune_accumulators(tuned, AccumConfig(e, m, chunk=chunk, backward=mode), train, test, tc)
                row[f"ft_{mode}"] = out["test_acc"]
            except FloatingPointError as err:  # e.g. overflow to inf -> NaN loss: a result, not a crash
                row[f"ft_{mode}"], row[f"ft_{mode}_diverged"] = None, str(err)
        row["seconds"] = round(time.perf_counter() - t0, 1)
        log(f"  {bits:2d}-bit e{e}m{m}: naive {row['naive']:.4f}  ft-STE {_ft(row, 'ste')}  "
            f"ft-fine {_ft(row, 'fine')}  ({row['seconds']} s)")
        rows.append(row)
    return rows


def _pct(v) -> str:
    return fmt(v, percent=True)


def _ft(r: dict, mode: str) -> str:
    """A fine-tuned cell: accuracy, "diverged" (fine-tuning hit a NaN loss) or "-" (not run)."""
    return "diverged" if r.get(f"ft_{mode}_diverged") else _pct(r.get(f"ft_{mode}"))


def wide_part(seed: int, quick: bool, log) -> dict:
    """Part "wide" (protocol in the module docstring): ResNet-20 of width WIDE[quick] on the 8x8 digits."""
    t0 = time.perf_counter()
    width = WIDE[quick]
    name = f"ResNet-20 width {width} / digits 8x8"
    model, tr, te = digits8x8(seed, quick, width)
    te = subset(te, 128 if quick else None)
    log(f"{name}: trained in {time.perf_counter() - t0:.1f} s")
    rows = run_model(name, model, tr, te, [16, *WIDE_BITS], FT["resnet"][quick], "sgd", 0.01, log,
                     tune_bits=set(WIDE_BITS))
    rows += run_model(name, model, tr, te, list(WIDE_BITS), FT["resnet"][quick], "sgd", 0.01, log, chunk=None)
    return {"model": name, "width": width, "max_K": 9 * 4 * width, "ft_steps": FT["resnet"][quick], "rows": rows,
            "seconds": round(time.perf_counter() - t0, 1)}


def merge_results(old: dict, new: dict, parts) -> dict:
    """The results json after running ``parts``: the keys those parts write come from ``new``, all others from
    ``old`` (so ``--parts wide`` adds the wide section without touching the rows of the main part)."""
    unknown = set(parts) - set(PARTS)
    if unknown:
        raise ValueError(f"unknown part(s) {sorted(unknown)}; choose from {PARTS}")
    keys = set()
    for part in parts:
        keys |= {"wide"} if part == "wide" else set(new) - {"wide"}
    merged = {k: new[k] if k in keys and k in new else v for k, v in old.items()}  # keeps the file's key order
    merged.update((k, v) for k, v in new.items() if k in keys and k not in merged)
    return merged


def error_vs_k(ks, bits_list, log):
    """Relative error of one accumulated dot-product layer vs the float64 product, by accumulation length K.

    x = ReLU(gaussian) (64 x K), w gaussian / sqrt(K) (64 x K): the output scale stays fixed as K grows, each
    product shrinks like 1/sqrt(K); chunk 16 vs no chunking.
    """
    g = torch.Generator().manual_seed(0)
    out = []
    for k in ks:
        x = torch.randn(64, k, generator=g).clamp_min(0)
        w = torch.randn(64, k, generator=g) / k**0.5
        exact = x.double() @ w.double().T
        for bits in bits_list:
            e, m = FORMATS[bits]
            f = FloatFormat(e, m)
            for chunk in (16, None):
                y = accumulate(x, w, f, f, chunk).double()
                out.append({"K": k, "bits": bits, "format": f"e{e}m{m}", "chunk": chunk,
                            "rel_err": float((y - exact).norm() / exact.norm())})
    log("relative error vs K: " + ", ".join(f"K={r['K']} {r['bits']}b chunk {r['chunk'] or 'K'}: {r['rel_err']:.4f}"
                                            for r in out))
    return out


def minilm_fidelity(n_sent: int, bits: int, log, chunk=16):
    from thrifty.data.text import load_texts

    model = create("minilm")
    texts = load_texts(n_sent, seed=0)
    ref = model.encode(texts, batch_size=32, max_length=64)
    e, m = FORMATS[bits]
    apply(model, AccumConfig(e, m, chunk=chunk))
    t0 = time.perf_counter()
    low = model.encode(texts, batch_size=32, max_length=64)
    cos = (ref * low).sum(1)
    sim_ref, sim_low = ref @ ref.T, low @ low.T
    eye = torch.eye(len(texts), dtype=torch.bool)
    nn_ref = sim_ref.masked_fill(eye, -2).argmax(1)
    nn_low = sim_low.masked_fill(eye, -2).argmax(1)
    out = {"bits": bits, "format": f"e{e}m{m}", "chunk": chunk, "sentences": len(texts), "mean_cos": float(cos.mean()),
           "min_cos": float(cos.min()), "nn_agreement": float((nn_ref == nn_low).float().mean()),
           "pairwise_sim_max_abs_err": float((sim_ref - sim_low).abs().max()),
           "seconds": round(time.perf_counter() - t0, 1)}
    log(f"MiniLM {bits}-bit accumulator, chunk {chunk or 'K'}: mean cos {out['mean_cos']:.5f}, min cos {out['min_cos']:.5f}, "
        f"nearest-neighbour agreement {out['nn_agreement']:.3f}")
    return out


def _rows_table(rows: list[dict], with_chunk: bool = False) -> str:
    cols = {"model": "model", **({"chunk": "chunk"} if with_chunk else {}), "bits": "acc. bits", "format": "format",
            "fp32": "FP32", "naive": "naive", "ste": "fine-tuned (STE)", "fine": "fine-tuned (fine-grained)"}
    return table([{**r, "chunk": r.get("chunk") or "K (none)", "ste": _ft(r, "ste"), "fine": _ft(r, "fine")}
                  for r in rows], cols, formats={"fp32": _pct, "naive": _pct}).rstrip()


def to_markdown(res: dict) -> str:
    lines = ["# Low-bit floating-point accumulators", "",
             f"Mode: {res['mode']}; chunk 16; products rounded to the accumulator format; fine-tuning steps "
             f"{res['ft_steps']} (half without underflow, half with; MLP AdamW lr 2e-4, ResNet SGD lr 0.01). Command: `{res['command']}`.", "",
             _rows_table([r for r in res["rows"] if r.get("chunk", 16) is not None])]
    abl = [r for r in res["rows"] if r.get("chunk", 16) is None]
    if abl:
        lines += ["", "Ablation without chunking (chunk = K: each output is one sequential sum of all K products, K up "
                  "to 576 here), same fine-tuning:", "", _rows_table(abl)]
    wide = res.get("wide")
    if wide:
        note = "" if wide["max_K"] == 4608 else "; the full run's width 128 gives K = 4608"
        lines += ["", f"Wide ResNet-20 (width {wide['width']}: K up to {wide['max_K']}{note}, like the 3x3x512 "
                  "convolutions of ImageNet ResNets), trained like the width-16 model; "
                  f"{wide['ft_steps']} fine-tuning steps as above (16 bits: naive only, a sanity row). "
                  f"Command: `{wide['command']}`, {wide['seconds']} s ({wide['threads']} thread(s)):", "",
                  _rows_table(wide["rows"], with_chunk=True)]
    mms = [mm for mm in (res.get("minilm"), res.get("minilm_nochunk")) if mm]
    if mms:
        mm = mms[0]
        lines += ["", "all-MiniLM-L6-v2, every Linear with a "
                  f"{mm['bits']}-bit ({mm['format']}) accumulator, no fine-tuning, {mm['sentences']} sentences:", "",
                  table([{**mm, "chunk": mm.get("chunk", 16) or "K (none)"} for mm in mms],
                        {"chunk": "chunk", "mean_cos": "mean cosine to FP32", "min_cos": "min cosine",
                         "nn_agreement": "nearest-neighbour agreement",
                         "pairwise_sim_max_abs_err": "max abs error of pairwise sims"},
                        digits={"mean_cos": 5, "min_cos": 5, "nn_agreement": 3,
                                "pairwise_sim_max_abs_err": 4}).rstrip()]
    ek = res.get("error_vs_k")
    if ek:
        ks = sorted({r["K"] for r in ek})
        keys = sorted({(r["bits"], r["format"], r["chunk"] or 0) for r in ek}, key=lambda t: (-t[0], -t[2]))
        lines += ["", "Relative error (||y - y_fp64|| / ||y_fp64||) of one simulated layer, x = ReLU(gaussian), "
                  "w = gaussian / sqrt(K), products in the accumulator format, by accumulation length K:", "",
                  table([{"format": f"{b}-bit {form}", "chunk": c or "K (none)",
                          **{f"K={r['K']}": r["rel_err"] for r in ek if r["bits"] == b and (r["chunk"] or 0) == c}}
                         for b, form, c in keys], ["format", "chunk", *(f"K={k}" for k in ks)], digits=4).rstrip()]
    lines += ["", f"Total time {res['seconds']} s (CPU, {res['threads']} thread(s))."]
    return "\n".join(lines) + "\n"


def plot(res: dict, exp: Experiment) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    all_rows = res.get("rows", []) + res.get("wide", {}).get("rows", [])
    models = sorted({r["model"] for r in all_rows}, key=lambda n: (n.startswith("ResNet-20 width"), n))
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 3.6), squeeze=False)
    for ax, name in zip(axes[0], models):
        for chunk, ls in ((16, "-"), (None, ":")):
            rows = sorted((r for r in all_rows if r["model"] == name and r.get("chunk", 16) == chunk),
                          key=lambda r: r["bits"])
            if not rows:
                continue
            for i, (key, label) in enumerate((("naive", "naive"), ("ft_ste", "fine-tuned, STE"),
                                              ("ft_fine", "fine-tuned, fine-grained"))):
                pts = [(r["bits"], 100 * r[key]) for r in rows if r.get(key) is not None]
                if pts:
                    ax.plot(*zip(*pts), marker="o", ls=ls, color=f"C{i}", label=f"{label}, chunk {chunk or 'K'}")
            fp32 = rows[0]["fp32"]
        ax.axhline(100 * fp32, color="k", ls="--", lw=1, label="FP32")
        ax.set_title(name)
        ax.set_xlabel("accumulator bits")
        ax.set_ylabel("test accuracy (%)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    exp.savefig(fig, "_acc.png", dpi=120)


def main(argv=None) -> int:
    exp = Experiment("accumulators", __doc__)
    exp.parser.add_argument("--parts", default=",".join(PARTS),
                            help="comma-separated parts to run (main: MLP, ResNet-20, MiniLM, error vs K; wide: the "
                                 "wide ResNet-20); the other parts' results are kept from this experiment's json")
    args = exp.start(argv)
    parts = [x for x in args.parts.split(",") if x]
    merge_results({}, {}, parts)  # validates the part names before any work
    if args.render:
        res = exp.read_json()
    else:
        log = lambda s: print(s, flush=True)  # noqa: E731
        q = args.quick
        cmd = "python experiments/accumulators.py" + (" --quick" if q else "")
        res: dict = {"mode": "quick" if q else "full"}
        if "main" in parts:
            res.update(main_part(args, log, cmd))
        if "wide" in parts:
            wcmd = cmd + ("" if args.parts == ",".join(PARTS) else f" --parts {args.parts}") + \
                (f" --threads {args.threads}" if args.threads != 1 else "")
            res["wide"] = {**wide_part(args.seed, q, log), "command": wcmd, "threads": args.threads}
        # a part run alone is merged into this experiment's own earlier results, never another script's
        old = exp.read_json() if exp.path(".json").exists() else {}
        if old.get("mode", res["mode"]) != res["mode"]:
            raise ValueError(f"{exp.path('.json')} holds a {old['mode']} run; refusing to merge a {res['mode']} run "
                             "into it")
        exp.write_json(merge_results(old, res, parts))
        res = exp.read_json()  # rendered from the JSON, as --render does
    if "rows" in res:  # the markdown and plot need the main part (run now or earlier)
        print(exp.write_markdown(to_markdown(res)).read_text(), end="")
        plot(res, exp)
    return 0


def main_part(args, log, cmd: str) -> dict:
    """MLP / MNIST-1D and ResNet-20 / digits rows (chunk 16 and chunk K), error vs K, MiniLM fidelity."""
    t0 = time.perf_counter()
    q = args.quick
    bits_list = [12, 6] if q else [16, 12, 10, 8, 7, 6]
    rows = []
    abl_bits = [8] if q else [12, 10, 8, 7]
    model, tr, te = mlp_mnist1d(args.seed, q)
    te = subset(te, 256 if q else None)
    rows += run_model("MLP / MNIST-1D", model, tr, te, bits_list, FT["mlp"][q], "adamw", 2e-4, log)
    rows += run_model("MLP / MNIST-1D", model, tr, te, abl_bits, FT["mlp"][q], "adamw", 2e-4, log, chunk=None)
    model, tr, te = digits8x8(args.seed, q)
    te = subset(te, 128 if q else None)
    rows += run_model("ResNet-20 / digits 8x8", model, tr, te, bits_list, FT["resnet"][q], "sgd", 0.01, log)
    rows += run_model("ResNet-20 / digits 8x8", model, tr, te, abl_bits, FT["resnet"][q], "sgd", 0.01, log,
                      chunk=None)
    err_k = error_vs_k([16, 144, 576] if q else [16, 64, 144, 576, 2304, 9216], [16, 12, 8], log)
    mini = minilm_fidelity(8 if q else 64, 12, log)
    mini_nc = minilm_fidelity(8 if q else 64, 12, log, chunk=None)
    return {"command": cmd, "ft_steps": {"MLP / MNIST-1D": FT["mlp"][q], "ResNet-20 / digits 8x8": FT["resnet"][q]},
            "rows": rows, "minilm": mini, "minilm_nochunk": mini_nc, "error_vs_k": err_k, "threads": args.threads,
            "formats": FORMATS, "seconds": round(time.perf_counter() - t0, 1)}


if __name__ == "__main__":
    raise SystemExit(main())
