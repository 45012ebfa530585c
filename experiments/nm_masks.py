"""Experiment: N:M and transposable N:M weight masks -- diversity, 2-approximation quality, accuracy.

1. Mask diversity of one 8x8 tile (64 weights at 50% density): unstructured, 1:2, 2:4, 4:8 and
   transposable 1:2, 2:4, 4:8 -- exact integers and log10.
2. Kept magnitude of the greedy 2-approximation relative to the exact optimum, per 8x8 / 4x4 tile, on
   random Gaussian weights and on the trained resnet20's weights: mean, worst tile, share of tiles where
   greedy is optimal, and the density greedy actually keeps (rows/columns may end below N).
3. resnet20 on digits32 (every conv and the classifier sparsified): dense; 2:4 and transposable 4:8
   (and in full mode transposable 2:4) trained from scratch with masks recomputed every k steps
   (straight-through gradients); from the dense model: magnitude pruning + BN re-estimation, AdaPrune
   (no training), AdaPrune + 1 epoch of fixed-mask fine-tuning.
4. Unstructured -> N:M: global 50% magnitude pruning of the dense model, fine-tuned with the mask fixed,
   then a per-layer N:M pattern chosen by `thrifty.sparse.nm_for_density`, magnitude vs AdaPrune.

Usage:
    python experiments/nm_masks.py --quick   # ~2 min: 2-epoch sparse training, short AdaPrune
    python experiments/nm_masks.py           # full: the recipe's epochs, 2 seeds for the trained rows
Writes results/nm_masks.json, results/nm_masks.md and results/nm_masks_acc.png (quick: nm_masks_quick*).
"""
from __future__ import annotations

import copy
import dataclasses
import math
import statistics
import sys
import time

import torch

import thrifty
from thrifty.bench.experiment import Experiment, fmt, table
from thrifty.ops import nm as nmops
from thrifty.sparse import NM, adaprune, nm_masks, reestimate_bn, sparsify
from thrifty.utils import seed_everything

PATTERNS = [("unstructured 50%", 1, 2, "unstructured"), ("1:2", 1, 2, "nm"), ("2:4", 2, 4, "nm"),
            ("4:8", 4, 8, "nm"), ("transposable 1:2", 1, 2, "transposable"),
            ("transposable 2:4", 2, 4, "transposable"), ("transposable 4:8", 4, 8, "transposable")]


def diversity() -> list[dict]:
    rows = []
    for label, n, m, kind in PATTERNS:
        md = nmops.mask_diversity(64, n, m, kind)  # type: ignore[arg-type]
        rows.append({"mask": label, "count": str(md), "log10": round(nmops.log10_int(md), 3)})
    return rows


def _tile_sums(w: torch.Tensor, mask: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    a, _ = nmops._tiles(nmops.as_matrix(w.detach().abs().float()), m)
    k, _ = nmops._tiles(nmops.as_matrix(mask.float()), m)
    a, k = a.clamp_min(0), k.clamp_min(0)
    return (a * k).sum((1, 2)), k.sum((1, 2))


def approx_quality(weights: list[torch.Tensor], n: int, m: int) -> dict:
    ex_s, ap_s, ap_cnt, tot, plain = [], [], [], 0.0, 0.0
    ntiles_full = 0
    for w in weights:
        ex = nmops.transposable_mask(w, n, m, "exact")
        ap = nmops.transposable_mask(w, n, m, "approx")
        se, _ = _tile_sums(w, ex, m)
        sa, ca = _tile_sums(w, ap, m)
        ex_s.append(se), ap_s.append(sa), ap_cnt.append(ca)
        tot += float(w.abs().sum())
        plain += float((w.abs() * nmops.nm_mask(w, n, m)).sum())
        ntiles_full += (w.shape[0] // m) * (nmops.as_matrix(w).shape[1] // m)
    se, sa, ca = torch.cat(ex_s), torch.cat(ap_s), torch.cat(ap_cnt)
    ok = se > 0
    ratio = sa[ok] / se[ok]
    return {"pattern": f"transposable {n}:{m}", "tiles": int(se.numel()), "mean_ratio": float(ratio.mean()),
            "worst_tile_ratio": float(ratio.min()), "best_tile_ratio": float(ratio.max()),
            "greedy_optimal_share": float((sa[ok] >= se[ok] * (1 - 1e-6)).float().mean()),
            "overall_ratio": float(sa.sum() / se.sum()),
            "greedy_density_vs_target": float(ca.sum() / (se.numel() * n * m)),
            "kept_abs_exact": float(se.sum()) / tot, "kept_abs_approx": float(sa.sum()) / tot,
            "kept_abs_plain_nm": plain / tot}


def gemm_weights(model: torch.nn.Module) -> list[torch.Tensor]:
    return [mod.weight.detach() for mod in model.modules() if isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d))]


def train_sparse(cfg_nm: NM | None, splits, train_cfg, seed: int) -> tuple[float, float]:
    from thrifty.models import create
    from thrifty.train import evaluate, fit, model_kwargs_for

    seed_everything(seed)
    model = create("resnet20", **model_kwargs_for("resnet20", splits.input_shape, splits.num_classes))
    if cfg_nm is not None:
        sparsify(model, cfg_nm)
    t0 = time.perf_counter()
    fit(model, dataclasses.replace(train_cfg, seed=seed), splits.train, progress=False)
    check_patterns(model, cfg_nm)
    return evaluate(model, splits.test)["acc"], time.perf_counter() - t0


def check_patterns(model: torch.nn.Module, cfg: NM | None) -> None:
    if cfg is None:
        return
    for name, layer, _ in nm_masks(model):
        w = layer.effective_weight()
        ok = nmops.is_transposable(w, cfg.n, cfg.m) if cfg.transposable else nmops.is_nm(w, cfg.n, cfg.m)
        if not ok:
            raise AssertionError(f"layer {name} lost its {cfg.label} pattern")


def from_dense(dense: torch.nn.Module, cfg: NM, splits, calib, steps: int, seed: int) -> dict:
    from thrifty.train import TrainConfig, evaluate, fit

    xcal = torch.stack([calib[i][0] for i in range(len(calib))])
    mag = sparsify(copy.deepcopy(dense), cfg)
    out = {"magnitude (no BN re-est.)": evaluate(mag, splits.test)["acc"]}
    reestimate_bn(mag, xcal)
    out["magnitude + BN re-est."] = evaluate(mag, splits.test)["acc"]
    ada = copy.deepcopy(dense)
    t0 = time.perf_counter()
    report = adaprune(ada, cfg, calib, steps=steps, lr=1e-3, batch_size=32, progress=False, seed=seed)
    out["adaprune_seconds"] = time.perf_counter() - t0
    out["AdaPrune + BN re-est. (no training)"] = evaluate(ada, splits.test)["acc"]
    out["adaprune_mean_rel_mse"] = statistics.mean(r["rel_mse_after"] for r in report.values())
    fit(ada, TrainConfig(epochs=1, optim={"batch_size": 64, "lr": 0.01, "weight_decay": 5e-4}, seed=seed), splits.train,
        progress=False)
    check_patterns(ada, cfg)
    out["AdaPrune + 1 epoch"] = evaluate(ada, splits.test)["acc"]
    return out


class _FixedMask(torch.nn.Module):
    """Unstructured fixed mask for the weight slot (the unstructured-sparse starting model)."""

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w * self.mask


def unstructured_to_nm(dense: torch.nn.Module, splits, calib, steps: int, epochs: float) -> dict:
    """Global 50% magnitude pruning + fine-tuning, then per-layer N:M by the density rule (+ AdaPrune)."""
    from thrifty.core import strip, wrap_layers
    from thrifty.sparse import plan_from_unstructured
    from thrifty.train import TrainConfig, evaluate, fit

    model = copy.deepcopy(dense)
    layers = wrap_layers(model)
    allabs = torch.cat([layer.weight.detach().abs().flatten() for _, layer in layers])
    thr = allabs.kthvalue(allabs.numel() // 2).values
    for _, layer in layers:
        layer.add("weight", _FixedMask(layer.weight.detach().abs() > thr))
    fit(model, TrainConfig(epochs=epochs, optim={"batch_size": 64, "lr": 0.01}, seed=0), splits.train, progress=False)
    model = strip(model)
    unstructured = evaluate(model, splits.test)["acc"]
    plan = plan_from_unstructured(model, ms=(4, 8))
    density = {n: float(m.weight.ne(0).float().mean()) for n, m in model.named_modules()
               if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
    xcal = torch.stack([calib[i][0] for i in range(len(calib))])
    mag = copy.deepcopy(model)
    for name, c in plan.items():
        sparsify(mag, c, [name])
    reestimate_bn(mag, xcal)
    ada = copy.deepcopy(model)
    adaprune(ada, plan, calib, steps=steps, lr=1e-3, batch_size=32, progress=False)
    counts: dict[str, int] = {}
    for c in plan.values():
        counts[c.label] = counts.get(c.label, 0) + 1
    total = sum(m.weight.numel() for n, m in model.named_modules() if n in density)
    kept = sum(c.n / c.m * model.get_submodule(n).weight.numel() for n, c in plan.items())
    kept += sum(model.get_submodule(n).weight.numel() for n in density if n not in plan)
    return {"fine_tune_epochs": epochs, "unstructured_density": float(sum(
        model.get_submodule(n).weight.ne(0).sum() for n in density) / total),
        "layer_density_min": min(density.values()), "layer_density_max": max(density.values()),
        "plan_patterns": counts, "dense_layers": len(density) - len(plan), "nm_density": kept / total,
        "acc_unstructured": unstructured, "acc_nm_magnitude_bn": evaluate(mag, splits.test)["acc"],
        "acc_nm_adaprune": evaluate(ada, splits.test)["acc"]}


def main(argv: list[str] | None = None) -> int:
    exp = Experiment("nm_masks", __doc__)
    rc = exp.run(lambda args: science(args, exp), render, lambda res: plot(res, exp), argv)
    print(f"log10 of B(8,4) = {math.log10(nmops.count_transposable(8, 4)):.2f}")
    return rc


def science(args, exp: Experiment) -> dict:
    from thrifty.data import calibration_subset, load_dataset
    from thrifty.train import evaluate, pretrained, recipe

    res: dict = {"mode": "quick" if args.quick else "full", "diversity": diversity()}
    print("diversity done", flush=True)
    torch.manual_seed(0)
    size = 256 if args.quick else 1024
    rand = [torch.randn(size, size)]
    dense, meta = pretrained("resnet20", "digits32", return_meta=True, progress=False)
    trained = gemm_weights(dense)
    res["approx"] = {"random": [approx_quality(rand, 2, 4), approx_quality(rand, 4, 8)],
                     "trained resnet20": [approx_quality(trained, 2, 4), approx_quality(trained, 4, 8)]}
    print("approx quality done", flush=True)
    splits = load_dataset("digits32", seed=0)
    _, cfg = recipe("resnet20", "digits32")
    seeds = [0] if args.quick else [0, 1]
    if args.quick:
        cfg = dataclasses.replace(cfg, epochs=2)
    every = 10
    runs = [("2:4", NM(2, 4, recompute_every=every)),
            ("transposable 4:8 (exact)", NM(4, 8, transposable=True, recompute_every=every))]
    if not args.quick:
        runs.append(("transposable 2:4 (exact)", NM(2, 4, transposable=True, recompute_every=every)))
    scratch = []
    dense_acc = evaluate(dense, splits.test)["acc"]
    if args.quick:
        acc, secs = train_sparse(None, splits, cfg, 0)
        scratch.append({"model": "dense (same short recipe)", "acc": [acc], "seconds": secs})
    scratch.append({"model": f"dense (pretrained, {recipe('resnet20', 'digits32')[1].epochs:g} epochs)",
                    "acc": [dense_acc], "seconds": meta.get("train_seconds")})
    for label, c in runs:
        accs, secs = [], 0.0
        for s in seeds:
            a, t = train_sparse(c, splits, cfg, s)
            accs.append(a)
            secs += t
            print(f"scratch {label} seed {s}: {a:.4f}", flush=True)
        scratch.append({"model": f"{label} from scratch", "acc": accs, "seconds": secs / len(seeds)})
    res["scratch"] = {"epochs": cfg.epochs, "recompute_every": every, "seeds": seeds, "rows": scratch}
    calib = calibration_subset(splits.train, per_class=10 if args.quick else 25, seed=0)
    steps = 60 if args.quick else 300
    res["adaprune"] = {"calibration_images": len(calib), "steps_per_layer": steps, "dense_acc": dense_acc,
                       "rows": {}}
    for label, c in [("2:4", NM(2, 4)), ("transposable 4:8", NM(4, 8, transposable=True))]:
        res["adaprune"]["rows"][label] = from_dense(dense, c, splits, calib, steps, 0)
        print(f"adaprune {label}: {res['adaprune']['rows'][label]}", flush=True)
    res["unstructured"] = unstructured_to_nm(dense, splits, calib, steps, 1.0 if args.quick else 2.0)
    print(f"unstructured -> N:M: {res['unstructured']}", flush=True)
    res["seconds"] = exp.seconds()
    return res


def _pct(xs: list[float]) -> str:
    if len(xs) == 1:
        return f"{100 * xs[0]:.2f}"
    return f"{100 * statistics.mean(xs):.2f} ± {100 * statistics.stdev(xs):.2f} (n={len(xs)})"


def render(res: dict) -> str:
    md = [f"# N:M weight masks ({res['mode']} run, {res['seconds'] / 60:.1f} min)", "",
          "## Mask diversity of one 8x8 tile (64 weights, 50% density)", "",
          table(res["diversity"], {"mask": "mask", "count": "number of masks (exact)", "log10": "log10"},
                align="lrr").rstrip("\n")]
    md += ["", "## Greedy 2-approximation vs exact transposable masks (kept |w| per tile)", "",
           table([{"weights": src, **r} for src, rows in res["approx"].items() for r in rows],
                 {"weights": "weights", "pattern": "pattern", "tiles": "tiles", "mean_ratio": "mean ratio",
                  "worst_tile_ratio": "worst tile", "greedy_optimal_share": "greedy optimal",
                  "greedy_density_vs_target": "greedy density / target", "kept_abs_exact": "kept |w| exact",
                  "kept_abs_approx": "kept |w| greedy", "kept_abs_plain_nm": "kept |w| plain N:M"},
                 digits=4, formats={"greedy_optimal_share": lambda v: fmt(v, 1, percent=True) + "%"},
                 align="llrrrrrrrr").rstrip("\n")]
    sc = res["scratch"]
    md += ["", f"## resnet20 on digits32: trained from scratch with masks ({sc['epochs']:g} epochs, masks "
           f"recomputed every {sc['recompute_every']} steps, straight-through)", "",
           table(sc["rows"], {"model": "model", "acc": "test accuracy (%)", "seconds": "train seconds"},
                 formats={"acc": _pct, "seconds": lambda v: "" if v is None else fmt(v, 0)},
                 align="lrr").rstrip("\n")]
    md += ["", "Test set: 539 images (one image = 0.19%). Train seconds are wall clock on a shared, overloaded "
           "2-core machine: not a speed comparison."]
    ad = res["adaprune"]
    md += ["", f"## resnet20 on digits32: from the dense model (dense {100 * ad['dense_acc']:.2f}%), "
           f"{ad['calibration_images']} unlabelled calibration images, {ad['steps_per_layer']} AdaPrune steps "
           "per layer", "",
           table([{"pattern": label, **r} for label, r in ad["rows"].items()],
                 {"pattern": "pattern", "magnitude (no BN re-est.)": "magnitude",
                  "magnitude + BN re-est.": "magnitude + BN",
                  "AdaPrune + BN re-est. (no training)": "AdaPrune + BN (no training)",
                  "AdaPrune + 1 epoch": "AdaPrune + 1 epoch", "adaprune_seconds": "AdaPrune seconds"},
                 formats={**dict.fromkeys(("magnitude (no BN re-est.)", "magnitude + BN re-est.",
                                           "AdaPrune + BN re-est. (no training)", "AdaPrune + 1 epoch"),
                                          lambda v: fmt(v, percent=True)),
                          "adaprune_seconds": lambda v: fmt(v, 0)}, align="lrrrrr").rstrip("\n")]
    un = res.get("unstructured")
    if un:
        pats = ", ".join(f"{k} x{v}" for k, v in sorted(un["plan_patterns"].items()))
        md += ["", "## Unstructured -> N:M (global 50% magnitude pruning, "
               f"{un['fine_tune_epochs']:g} epoch(s) fine-tuned with the mask fixed)", "",
               f"Per-layer unstructured density {un['layer_density_min']:.2f}..{un['layer_density_max']:.2f}; "
               f"the rule (sparsest N:M with M in {{4, 8}} keeping at least the layer's density, ties to larger M) "
               f"chose: {pats}; {un['dense_layers']} layer(s) left dense.", "",
               table([{"model": "unstructured", "density": un["unstructured_density"], "acc": un["acc_unstructured"]},
                      {"model": "per-layer N:M, magnitude + BN re-est.", "density": un["nm_density"],
                       "acc": un["acc_nm_magnitude_bn"]},
                      {"model": "per-layer N:M, AdaPrune + BN re-est. (no training)", "density": un["nm_density"],
                       "acc": un["acc_nm_adaprune"]}],
                     {"model": "model", "density": "weight density", "acc": "test accuracy (%)"}, digits={"density": 3},
                     formats={"acc": lambda v: fmt(v, percent=True)}, align="lrr").rstrip("\n")]
    return "\n".join(md) + "\n"


def plot(res: dict, exp: Experiment) -> None:
    sc, ad = res["scratch"], res["adaprune"]
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        labels = [r["model"] for r in sc["rows"]] + [f"{k}: {c}" for k, r in ad["rows"].items()
                                                     for c in ("AdaPrune + BN re-est. (no training)", "AdaPrune + 1 epoch")]
        vals = [100 * statistics.mean(r["acc"]) for r in sc["rows"]] + [
            100 * r[c] for r in ad["rows"].values() for c in ("AdaPrune + BN re-est. (no training)", "AdaPrune + 1 epoch")]
        fig, ax = plt.subplots(figsize=(8, 0.45 * len(labels) + 1))
        ax.barh(range(len(vals)), vals)
        ax.set_yticks(range(len(vals)), labels, fontsize=8)
        ax.set_xlim(max(0, min(vals) - 5), 100)
        ax.set_xlabel("test accuracy (%)")
        ax.set_title("resnet20 / digits32, N:M weight sparsity")
        fig.tight_layout()
        exp.savefig(fig, "_acc.png", dpi=120)
    except Exception as e:  # a missing plot must not lose the numbers
        print(f"plot skipped: {e}", file=sys.stderr)


if __name__ == "__main__":
    raise SystemExit(main())
