"""N:M sparsity of activations and neural gradients in training (METHODS.md section 6; issue 5).

Trains from scratch, same seed, data order and number of steps for every variant (see VARIANTS):
dense; activations 2:4 MSE; gradients 1:2 / 2:4 MVUE and 2:4 MSE (biased) on the weight-gradient GEMM
dW = dY^T X (the paper's setting, blocks along the batch); the same MVUE masks on both backward GEMMs
(dX = dY W too, blocks along output features/channels); transposable 4:8 weights (mask recomputed every
10 steps, straight-through) + 2:4 MVUE gradients, which makes all three GEMMs N:M sparse. Pruning acts on
every Linear/Conv2d. Activation pruning keeps the top-2 of every 4 inputs along the forward reduction.

    python experiments/grad_sparsity.py --quick   # CI-sized (about 1-2 minutes)
    python experiments/grad_sparsity.py           # full: resnet20 on digits32 + MLP on MNIST-1D
Writes results/grad_sparsity.{json,md} and results/grad_sparsity_curves.png (quick: *_quick.*).
"""
from __future__ import annotations

import dataclasses
import json
import statistics
import time
import warnings

import torch

import thrifty
from thrifty.bench.experiment import Experiment, fmt, table
from thrifty.data import load_dataset
from thrifty.sparse import NM, ActNM, GradNM, sparsify
from thrifty.train import fit
from thrifty.train.io import model_kwargs_for
from thrifty.train.recipes import flat_train_config, recipe
from thrifty.utils import seed_everything

W = ("weight",)  # dW = dY^T X only: the update GEMM, the setting of the paper (dX stays exact)
VARIANTS = {
    "dense": [],
    "act 2:4 MSE": [ActNM(2, 4)],
    "grad 1:2 MVUE (dW)": [GradNM(1, 2, "mvue", gemms=W)],
    "grad 2:4 MVUE (dW)": [GradNM(2, 4, "mvue", gemms=W)],
    "grad 2:4 MSE, biased (dW)": [GradNM(2, 4, "mse", gemms=W)],
    "grad 1:2 MVUE (dX+dW)": [GradNM(1, 2, "mvue")],
    "grad 2:4 MVUE (dX+dW)": [GradNM(2, 4, "mvue")],
    "grad 2:4 MSE, biased (dX+dW)": [GradNM(2, 4, "mse")],
    "T4:8 weights + grad 2:4 MVUE (dW)": [NM(4, 8, transposable=True, recompute_every=10), GradNM(2, 4, "mvue", gemms=W)],
}


def build(variant: str, model_name: str, splits, seed: int, **model_kw) -> torch.nn.Module:
    seed_everything(seed)
    kw = model_kwargs_for(model_name, splits.input_shape, splits.num_classes, **model_kw)
    model = thrifty.models.create(model_name, **kw)
    for cfg in VARIANTS[variant]:
        if isinstance(cfg, NM):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # layers too small for 4:8 tiles stay dense (sparsify warns)
                sparsify(model, cfg)
        else:
            thrifty.apply(model, dataclasses.replace(cfg, seed=seed) if isinstance(cfg, GradNM) else cfg)
    return model


def run(model_name: str, dataset: str, cfg, seeds: list[int], variants: list[str], prev: dict | None = None,
        **model_kw) -> dict:
    """Train every (variant, seed); runs found in ``prev`` (an earlier result, same schedule) are reused."""
    splits = load_dataset(dataset, seed=0)
    train = {k: v for k, v in flat_train_config(cfg).items() if k not in ("kind", "version")}
    out = {"model": model_name, "dataset": dataset, "model_kwargs": model_kw, "train": train, "runs": {}}
    if prev is not None and (prev["model"], prev["dataset"], prev["train"], prev.get("model_kwargs", {})) != \
            (model_name, dataset, json.loads(json.dumps(out["train"])), model_kw):
        raise SystemExit(f"--merge: {model_name}/{dataset} was run with another schedule; rerun without --merge")
    old = prev["runs"] if prev else {}
    for variant in VARIANTS:
        done = {r["seed"]: r for r in old.get(variant, [])}
        per_seed = [done[s] for s in sorted(done)]
        for seed in seeds if variant in variants else []:
            if seed in done:
                continue
            model = build(variant, model_name, splits, seed, **model_kw)
            t0 = time.perf_counter()
            try:
                hist = fit(model, dataclasses.replace(cfg, seed=seed), splits.train, splits.test, progress=False)
                rec = {"seed": seed, "diverged": None, "losses": hist.losses, "records": hist.records}
            except FloatingPointError as e:  # fit stops on a non-finite loss
                rec = {"seed": seed, "diverged": str(e), "losses": [], "records": []}
            rec["seconds"] = time.perf_counter() - t0
            final = rec["records"][-1] if rec["records"] else {}
            rec["test_acc"] = final.get("test_acc", float("nan"))
            rec["best_test_acc"] = max((r["test_acc"] for r in rec["records"]), default=float("nan"))
            rec["final_train_loss"] = final.get("train_loss", float("nan"))
            per_seed = sorted(per_seed + [rec], key=lambda r: r["seed"])
            print(f"{model_name}/{dataset} {variant:30s} seed {seed}: test acc {rec['test_acc']:.4f} "
                  f"(best {rec['best_test_acc']:.4f}) loss {rec['final_train_loss']:.4f} {rec['seconds']:.0f}s"
                  + (" DIVERGED" if rec["diverged"] else ""), flush=True)
        if per_seed:
            out["runs"][variant] = per_seed
    return out


def grad_quality(model_name: str, dataset: str, draws: int, batch: int = 64, **model_kw) -> dict:
    """How far the pruned-dY gradient of all weights is from the dense one, on one batch at initialisation.

    ``rel_err``: mean over draws of ||g_hat - g|| / ||g||; ``bias``: ||mean(g_hat) - g|| / ||g||. For an
    unbiased estimator the bias of the mean of K draws is only noise, about rel_err / sqrt(K)
    (``bias_over_noise`` ~ 1); a biased one stays far above that.
    """
    splits = load_dataset(dataset, seed=0)
    x, y = splits.train.tensors[0][:batch], splits.train.tensors[1][:batch]

    def flat_grad(model: torch.nn.Module) -> torch.Tensor:
        model.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        return torch.cat([p.grad.reshape(-1) for n, p in model.named_parameters() if n.endswith("weight")])

    ref = flat_grad(build("dense", model_name, splits, 0, **model_kw))
    rows = []
    for variant, cfgs in VARIANTS.items():
        if not cfgs or not all(isinstance(c, GradNM) for c in cfgs):
            continue
        model = build(variant, model_name, splits, 0, **model_kw)
        gs = torch.stack([flat_grad(model) for _ in range(draws)])
        err = (gs - ref).norm(dim=1) / ref.norm()
        bias = float((gs.mean(0) - ref).norm() / ref.norm())
        rows.append({"variant": variant, "rel_err": float(err.mean()), "bias": bias,
                     "bias_over_noise": bias / float(err.mean() / draws**0.5),
                     "cosine": float(torch.nn.functional.cosine_similarity(gs, ref[None]).mean())})
        print(f"grad quality {model_name}: {variant:30s} rel err {rows[-1]['rel_err']:.3f} bias {bias:.3f} "
              f"bias/noise {rows[-1]['bias_over_noise']:.2f}", flush=True)
    return {"model": model_name, "dataset": dataset, "batch": batch, "draws": draws, "rows": rows}


def quality_table(q: dict) -> list[str]:
    lines = [f"### Gradient quality: {q['model']} on {q['dataset']}, one batch of {q['batch']} at initialisation, "
             f"{q['draws']} draws", "",
             "Relative error of the weight gradient vs the dense one; the bias of the mean of the draws compared "
             "with the noise expected for an unbiased estimator (rel. error / sqrt(draws)): about 1 when unbiased, "
             "sqrt(draws) for a deterministic biased mask (MSE).",
             "", table(q["rows"], {"variant": "variant", "rel_err": "rel. error per draw", "bias": "bias of the mean",
                                   "bias_over_noise": "bias / expected noise", "cosine": "cosine to dense"},
                       digits={"rel_err": 3, "bias": 3, "cosine": 3}, align="lrrrr")]
    return lines


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def accuracy_table(res: dict) -> list[str]:
    dense = _mean([r["test_acc"] for r in res["runs"]["dense"]])
    kw = "".join(f", {k}={v}" for k, v in res.get("model_kwargs", {}).items())
    steps = f"{res['train']['steps']} steps" if res["train"]["steps"] else f"{res['train']['epochs']:g} epochs"
    lines = [f"### {res['model']}{kw} on {res['dataset']} ({steps}, "
             f"batch {res['train']['batch_size']}, {res['train']['optimizer']}, seeds "
             f"{[r['seed'] for r in res['runs']['dense']]})", "",
             ]
    rows = []
    for variant, runs in res["runs"].items():
        accs = [r["test_acc"] for r in runs]
        acc = _mean(accs)
        sd = f" ± {fmt(statistics.stdev(accs), percent=True)}" if len(accs) > 1 else ""
        rows.append({"variant": variant + (" (diverged)" if any(r["diverged"] for r in runs) else ""),
                     "acc": fmt(acc, percent=True) + sd, "median": statistics.median(accs),
                     "best": _mean([r["best_test_acc"] for r in runs]),
                     "loss": _mean([r["final_train_loss"] for r in runs]), "vs_dense": acc - dense,
                     "seconds": _mean([r["seconds"] for r in runs])})
    pct = lambda v: fmt(v, percent=True)  # noqa: E731
    lines.append(table(rows, {"variant": "variant", "acc": "final test acc (mean ± sd over seeds)", "median": "median",
                              "best": "best test acc", "loss": "final train loss", "vs_dense": "vs dense (points)",
                              "seconds": "time (s)"}, digits={"loss": 4, "seconds": 0},
                       formats={"median": pct, "best": pct, "vs_dense": lambda v: fmt(v, percent=True, sign=True)},
                       align="lrrrrrr"))
    return lines


def plot(results: list[dict], exp: Experiment) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(results), figsize=(6 * len(results), 8), squeeze=False)
    for col, res in enumerate(results):
        ax_l, ax_a = axes[0][col], axes[1][col]
        for variant, runs in res["runs"].items():
            r = runs[0]
            if r["losses"]:
                k = max(1, len(r["losses"]) // 50)  # moving average over ~2% of the run
                ls = torch.tensor(r["losses"])
                sm = torch.nn.functional.avg_pool1d(ls.view(1, 1, -1), k, stride=1).view(-1) if len(ls) >= k else ls
                ax_l.plot(range(k, k + len(sm)), sm.tolist(), label=variant)
            if r["records"]:
                ax_a.plot([x["step"] for x in r["records"]], [x["test_acc"] for x in r["records"]], marker=".",
                          label=variant)
        ax_l.set(title=f"{res['model']} / {res['dataset']}: training loss (seed {runs[0]['seed']})", xlabel="step",
                 ylabel="loss (moving average)", yscale="log")
        ax_a.set(title="test accuracy", xlabel="step", ylabel="accuracy")
        ax_l.legend(fontsize=8)
        ax_a.legend(fontsize=8)
    fig.tight_layout()
    exp.savefig(fig, "_curves.png")


def main(argv: list[str] | None = None) -> int:
    exp = Experiment("grad_sparsity", __doc__)
    exp.parser.add_argument("--variants", default=None,
                            help=f"comma-separated subset of: {', '.join(VARIANTS)} (default: all)")
    exp.parser.add_argument("--merge", action="store_true",
                            help="keep the (variant, seed) runs of this experiment's existing JSON and train only the "
                                 "missing ones")
    exp.parser.add_argument("--resnet-seeds", type=lambda t: [int(x) for x in t.split(",")], default=[0],
                            help="seeds for the full resnet20 runs, e.g. 0,1")
    return exp.run(lambda args: science(args, exp), render, lambda res: plot(res["results"], exp), argv)


def science(args, exp: Experiment) -> dict:
    variants = list(VARIANTS) if args.variants is None else [v.strip() for v in args.variants.split(",")]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        exp.parser.error(f"unknown variant(s) {unknown}; choose from {list(VARIANTS)}")
    _, cfg_r = recipe("resnet20", "digits32")
    _, cfg_m = recipe("mlp", "mnist1d")
    if args.quick:
        cfg_r = cfg_r.replace(epochs=1, optim={"steps": 8}, eval_steps=4)
        cfg_m = dataclasses.replace(cfg_m, epochs=3)
        jobs = [("resnet20", "digits32", cfg_r, [0], {"width": 8}), ("mlp", "mnist1d", cfg_m, [0], {})]
    else:
        # half the cached-baseline recipes' epochs (8 and 60) so that the twelve-plus runs fit in about
        # 20 minutes on a shared 2-core machine; every variant gets exactly the same schedule
        cfg_r = dataclasses.replace(cfg_r, epochs=4)
        cfg_m = dataclasses.replace(cfg_m, epochs=30)
        jobs = [("resnet20", "digits32", cfg_r, args.resnet_seeds, {}), ("mlp", "mnist1d", cfg_m, [0, 1], {})]
    prev = [None] * len(jobs)
    if args.merge and exp.path(".json").is_file():  # this experiment's own earlier runs, asked for by --merge
        prev = exp.read_json()["results"]
    results = [run(name, ds, cfg, seeds, variants, p, **kw) for (name, ds, cfg, seeds, kw), p in zip(jobs, prev)]
    quality = grad_quality("resnet20", "digits32", 4 if args.quick else 32, **jobs[0][4])
    return {"quick": args.quick, "results": results, "grad_quality": quality, "seconds": exp.seconds(),
            "merge": args.merge, "threads": args.threads}


def render(res: dict) -> str:
    suffix = "_quick" if res["quick"] else ""
    lines = ["# N:M sparsity of activations and neural gradients (MSE vs MVUE)", "",
             f"`python experiments/grad_sparsity.py{' --quick' if res['quick'] else ''}` "
             f"({res['seconds']:.0f} s{' for this invocation' if res['merge'] else ''}, {res['threads']} "
             "thread(s)). Same seeds, data order and steps "
             "for every variant; masks on every Linear/Conv2d; (dW): dY pruned for the weight-gradient GEMM "
             "only (blocks along the batch), (dX+dW): for both backward GEMMs; accuracy in %."
             + (" Runs accumulated over several invocations (`--merge`)." if res["merge"] else ""), ""]
    for r in res["results"]:
        lines += accuracy_table(r)
    lines += quality_table(res["grad_quality"])
    lines.append(f"![training curves](grad_sparsity{suffix}_curves.png)")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
