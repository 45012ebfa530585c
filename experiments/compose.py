"""Composition: 8-bit W/A/G + transposable 4:8 weights + MVUE 2:4 gradients + a 12-bit accumulator in one model.

Part 1 trains ResNet-20 (width 8) on digits32 from scratch, same seed and steps, under: FP32 dense; 8-bit
W/A/G (Train8: stochastic-rounded gradients, 16-bit dW GEMM, Range BN); transposable 4:8 weights (sparse
training, mask recomputed every 10 steps, straight-through); MVUE 2:4 gradients (both backward GEMMs); all three
in the same layers; and all four: the same plus a 12-bit floating-point accumulator (1+4+7, chunks of 16, the
accumulator study's 12-bit format; compiled kernel in the forward, straight-through backward). Part 1b adds the
accumulator to the trained all-three model instead, evaluates it as is, then fine-tunes briefly with all four
slots active (thrifty.quant.accum's two-stage recipe: without underflow, then with it).

Part 2 is the deployment chain on the pretrained FP32 model (thrifty.train.pretrained("resnet20", "digits32")):
transposable 4:8 by AdaPrune, strip (zeros baked into the weights), then W8A8 and W4A8 advanced PTQ; accuracy and
the bytes of the weights stored as N:M-compressed integer codes (thrifty.sparse.storage.compress on the codes).
The model is stripped before PTQ because quantize() drops the N:M masks of a wrapped model (tests/test_compose.py).

    python experiments/compose.py --quick     # CI-sized: results/compose_quick.{json,md,png}
    python experiments/compose.py             # full:     results/compose.{json,md,png}
"""
from __future__ import annotations

import copy
import math
import os
import time
import warnings
from pathlib import Path

import torch
import torch.nn as nn
from torch.utils.data import Subset

from thrifty.bench.experiment import Experiment, fmt, table
from thrifty.core import apply, strip
from thrifty.data import calibration_subset, load_dataset
from thrifty.models import create, model_size_bytes
from thrifty.nn import gemm_layers
from thrifty.ops import nm as nmops
from thrifty.quant import PTQ, UniformQuantizer, quantize
from thrifty.quant.accum import AccumConfig, finetune_accumulators
from thrifty.quant.train8 import Train8, prepare_train8
from thrifty.sparse import NM, GradNM, adaprune, save_sparse, sparsify
from thrifty.sparse.storage import compress
from thrifty.train import TrainConfig, evaluate, fit, pretrained
from thrifty.utils import seed_everything

T48 = NM(4, 8, transposable=True, recompute_every=10)
G24 = GradNM(2, 4, method="mvue")
ACC12 = AccumConfig(exp_bits=4, man_bits=7, chunk=16)


def _train8(m: nn.Module) -> nn.Module:
    return prepare_train8(m, Train8())


def _t48(m: nn.Module) -> nn.Module:
    return sparsify(m, T48)


def _g24(m: nn.Module) -> nn.Module:
    return apply(m, G24)


def _acc12(m: nn.Module) -> nn.Module:
    return apply(m, ACC12)


VARIANTS = {
    "FP32 dense": [],
    "8-bit W/A/G (Train8)": [_train8],
    "transposable 4:8 weights": [_t48],
    "MVUE 2:4 gradients": [_g24],
    "all three (Train8 -> T4:8 -> MVUE 2:4)": [_train8, _t48, _g24],
    "all four (+ 12-bit accumulator, STE backward)": [_train8, _t48, _g24, _acc12],
}


def log(msg: str) -> None:
    print(msg, flush=True)


def nm_ok(model: nn.Module, n: int, m: int) -> bool:
    return all(nmops.is_transposable(layer.effective_weight().ne(0), n, m) for _, layer in gemm_layers(model))


def train_part(splits, a) -> dict:
    cfg = TrainConfig(optim={"steps": a.steps, "batch_size": 32, "lr": 0.1, "weight_decay": 5e-4}, seed=0)
    rows, curves, models = [], {}, {}
    for name, steps in VARIANTS.items():
        seed_everything(0)
        model = create("resnet20", in_chans=1, num_classes=splits.num_classes, width=a.width)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for s in steps:
                model = s(model)
        t0 = time.perf_counter()
        hist = fit(model, cfg, splits.train, progress=False)
        sec = time.perf_counter() - t0
        acc = evaluate(model, splits.test)["acc"]
        row = {"variant": name, "test_acc": acc, "final_loss": sum(hist.losses[-10:]) / len(hist.losses[-10:]),
               "ms_per_step": 1000 * sec / a.steps, "n_test": len(splits.test)}
        if name != "FP32 dense" and _t48 in steps:
            row["weights_transposable_4_8"] = nm_ok(model, 4, 8)
        rows.append(row)
        curves[name] = hist.losses
        models[name] = model
        log(f"  {name}: test acc {100 * acc:.2f}%  ({row['ms_per_step']:.0f} ms/step)")
    return {"config": {"steps": a.steps, "batch_size": 32, "lr": 0.1, "width": a.width, "seed": 0},
            "rows": rows, "curves": curves}, models["all three (Train8 -> T4:8 -> MVUE 2:4)"]


def accum_part(model: nn.Module, splits, a) -> dict:
    """The all-three model + a 12-bit accumulator: as is, then a short two-stage fine-tune with all four slots."""
    test = Subset(splits.test, range(min(a.acc_test, len(splits.test))))
    m = copy.deepcopy(model)
    apply(m, ACC12)
    t0 = time.perf_counter()
    naive = evaluate(m, test, batch_size=64)["acc"]
    eval_s = time.perf_counter() - t0
    ref = evaluate(model, test)["acc"]
    t0 = time.perf_counter()
    ft_cfg = TrainConfig(optim={"steps": a.acc_steps, "batch_size": 32, "lr": 0.01, "weight_decay": 5e-4}, seed=1)
    ft = finetune_accumulators(m, ACC12, splits.train, test, ft_cfg, progress=False)
    sec = time.perf_counter() - t0
    # control: the same extra steps without the accumulator (the fine-tune also just trains the model longer)
    ctrl = copy.deepcopy(model)
    for steps, seed in zip(ft["steps"], (1, 2)):  # the recipe's two stages: same steps, schedules and seeds
        if steps:
            fit(ctrl, TrainConfig(optim={"steps": steps, "batch_size": 32, "lr": 0.01, "weight_decay": 5e-4},
                                  seed=seed), splits.train,
                progress=False)
    ctrl_acc = evaluate(ctrl, test)["acc"]
    row = {"variant": "all three + 12-bit accumulator (1+4+7, chunk 16)", "n_test": len(test),
           "without_accumulator": ref, "naive": naive, "finetuned": ft["test_acc"], "finetune_steps": a.acc_steps,
           "control_finetuned_without_accumulator": ctrl_acc,
           "eval_seconds": eval_s, "finetune_seconds": sec,
           "weights_transposable_4_8": nm_ok(m, 4, 8)}
    log(f"  +12-bit accumulator on {len(test)} test images: without {100 * ref:.2f}%, naive {100 * naive:.2f}%, "
        f"fine-tuned {a.acc_steps} steps {100 * ft['test_acc']:.2f}% (same steps without accumulator "
        f"{100 * ctrl_acc:.2f}%)")
    return row


def _qbytes(layer: nn.Module, nm: tuple[int, int] | None) -> tuple[int, bool]:
    """Bytes of one quantized layer's weights as integer codes (N:M-compressed if ``nm``), + qparams + bias."""
    q = layer.slots.weight
    assert isinstance(q, UniformQuantizer) and q.mode == "frozen"
    w = layer.effective_weight()
    shape = [-1] + [1] * (w.dim() - 1)
    scale = q.scale.detach().reshape(shape) if q.per_channel else q.scale.detach()
    ints = torch.round(w / scale)  # (code - zero point); exactly 0 where the weight was pruned
    per_ch = w.shape[0] if q.per_channel else 1
    qparams = per_ch * (4 + math.ceil(q.bits / 8))  # float32 scale + integer zero point per channel
    bias = layer.bias.numel() * 4 if layer.bias is not None else 0
    if nm is None:
        return math.ceil(w.numel() * q.bits / 8) + qparams + bias, True
    try:
        c = compress(ints, *nm)
    except ValueError:
        return math.ceil(w.numel() * q.bits / 8) + qparams + bias, False  # not N:M: stored dense
    return math.ceil(c["values"].numel() * q.bits / 8) + c["indices"].numel() + qparams + bias, True


def model_bytes(qmodel: nn.Module, nm: tuple[int, int] | None) -> tuple[int, bool]:
    total, ok, seen = 0, True, set()
    for _, layer in gemm_layers(qmodel):
        if isinstance(layer.slots.weight, UniformQuantizer):
            b, good = _qbytes(layer, nm)
            total += b
            ok &= good
            seen |= {id(layer.weight), id(layer.bias)}
    for mod in qmodel.modules():  # everything else (BN folded away, FP layers) at float32
        for p in list(mod.parameters(recurse=False)) + list(mod.buffers(recurse=False)):
            if id(p) not in seen and not isinstance(mod, UniformQuantizer) and p.is_floating_point():
                seen.add(id(p))
                total += p.numel() * 4
    return total, ok


def deploy_part(splits, a, out_dir: Path) -> dict:
    fp, meta = pretrained("resnet20", "digits32", return_meta=True, progress=False)
    fp.eval()
    calib = calibration_subset(splits.train, per_class=10 if not a.quick else 3, seed=0)
    fp_bytes = model_size_bytes(fp)
    rows = [{"model": "FP32 dense (pretrained)", "test_acc": evaluate(fp, splits.test)["acc"], "bytes": fp_bytes,
             "nm_ok": None, "seconds": 0.0}]
    t0 = time.perf_counter()
    sp = copy.deepcopy(fp)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adaprune(sp, NM(4, 8, transposable=True), calib, steps=a.adaprune_steps, progress=False)
    ap_s = time.perf_counter() - t0
    info = save_sparse(sp, out_dir / "compose_t48.nm.safetensors")  # real file: FP32 values + packed indices
    (out_dir / "compose_t48.nm.safetensors").unlink()
    rows.append({"model": "T4:8 AdaPrune, FP32 values (save_sparse file)", "test_acc": evaluate(sp, splits.test)["acc"],
                 "bytes": info["file_bytes"], "nm_ok": nm_ok(sp, 4, 8), "seconds": ap_s})
    plain = strip(copy.deepcopy(sp))
    iters = dict(adaquant_iters=a.adaquant_iters, bias_iters=a.bias_iters)
    for wb in (8, 4):
        runs = [(plain, f"T4:8 AdaPrune -> W{wb}A8 PTQ advanced", (4, 8))]
        if wb == 4:  # one dense reference (the W8A8 one would cost another minute)
            runs.append((fp, f"dense -> W{wb}A8 PTQ advanced (reference)", None))
        for src, label, nm in runs:
            t0 = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                res = quantize(src, PTQ(w_bits=wb, a_bits=8, pipeline="advanced", **iters), calib, progress=False)
            sec = time.perf_counter() - t0
            nbytes, ok = model_bytes(res.model, nm)
            rows.append({"model": label, "test_acc": evaluate(res.model, splits.test)["acc"], "bytes": nbytes,
                         "nm_ok": nm_ok(res.model, 4, 8) if nm else None, "seconds": sec})
            if nm and not ok:
                rows[-1]["model"] += " (N:M lost: stored dense)"
            log(f"  {rows[-1]['model']}: {100 * rows[-1]['test_acc']:.2f}%, {nbytes} bytes ({sec:.0f} s)")
    for r in rows:
        r["size_vs_fp32"] = r["bytes"] / fp_bytes
    cache = meta.get("path")  # stored relative to the results folder: nothing about the machine, still findable
    cache = Path(os.path.relpath(cache, out_dir.resolve())).as_posix() if cache and os.path.isabs(cache) else cache
    return {"fp32_cache": cache, "calib": len(calib), "adaprune_steps": a.adaprune_steps, **iters,
            "rows": rows}


def _pct(v: float) -> str:
    return fmt(v, percent=True)


def markdown(res: dict) -> str:
    tr, acc, dp, cmd = res["train"], res.get("accum"), res.get("deploy"), res["command"]
    c = tr["config"]
    n = tr["rows"][0]["n_test"]
    L = [f"# Composition: Train8 + transposable 4:8 + MVUE 2:4 + 12-bit accumulator", "",
         f"Mode: {res['mode']}. Command: `{cmd}`. Total {res['seconds']:.0f} s wall ({res['cpu_seconds']:.0f} s CPU) "
         f"on {res['threads']} thread(s) "
         f"of a shared, loaded 2-core CPU (ms/step: not a speed comparison).", "",
         f"## ResNet-20 (width {c['width']}) on digits32 from scratch: {c['steps']} steps, batch {c['batch_size']}, "
         f"SGD lr {c['lr']} cosine, seed {c['seed']}", "",
         f"Test set: {n} images (one image = {100 / n:.2f} points); one seed, so differences of a few images "
         "are noise.",
         "", table(tr["rows"], {"variant": "variant", "test_acc": "test acc. (%)",
                                "final_loss": "train loss (last 10 steps)", "ms_per_step": "ms / step"},
                   digits={"final_loss": 3, "ms_per_step": 0}, formats={"test_acc": _pct}, align="lrrr").rstrip("\n")]
    if acc is None or dp is None:  # --steps: the training part only
        return "\n".join(L) + "\n"
    L += ["", f"12-bit accumulator (1+4+7 bits, products in the same format, chunks of 16) added after training: "
          f"to the all-three model above, evaluated on the "
          f"first {acc['n_test']} test images, then fine-tuned {acc['finetune_steps']} steps (batch 32) with all four "
          f"slots active (two-stage recipe: no underflow, then underflow).", "",
          table([{"model": "without accumulator", "acc": acc["without_accumulator"]},
                 {"model": "+ 12-bit accumulator, as is", "acc": acc["naive"]},
                 {"model": f"+ 12-bit accumulator, fine-tuned {acc['finetune_steps']} steps", "acc": acc["finetuned"]},
                 {"model": f"control: same {acc['finetune_steps']} extra steps (lr 0.01) without accumulator",
                  "acc": acc["control_finetuned_without_accumulator"]}],
                {"model": "all three model", "acc": "test acc. (%)"}, formats={"acc": _pct}, align="lr"),
          f"Weights still transposable 4:8 in every layer after the fine-tune: {acc['weights_transposable_4_8']}.", "",
          f"## Deployment chain on the pretrained FP32 model: AdaPrune (transposable 4:8, {dp['adaprune_steps']} steps "
          f"per layer) -> strip -> advanced PTQ ({dp['adaquant_iters']} AdaQuant / {dp['bias_iters']} bias iterations, "
          f"first/last layer 8 bit), {dp['calib']} calibration images", "",
          "Bytes: N:M layers store kept integer codes at the weight bit-width plus 3-bit packed in-block indices "
          "(thrifty.sparse.storage.compress on the codes), per-channel float32 scale + integer zero point, float32 "
          "biases; everything else float32. The FP32 rows are the parameter + buffer bytes / the real save_sparse "
          "file.",
          "", table(dp["rows"], {"model": "model", "test_acc": "test acc. (%)", "bytes": "bytes",
                                 "size_vs_fp32": "size vs FP32", "nm_ok": "effective weights transposable 4:8",
                                 "seconds": "seconds"}, digits={"size_vs_fp32": 3, "seconds": 0},
                    formats={"test_acc": _pct, "bytes": lambda b: f"{b:,}",
                             "nm_ok": lambda ok: "-" if ok is None else ("yes" if ok else "NO")}, align="lrrrlr")]
    return "\n".join(L)


def plot(res: dict, exp: Experiment) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    two = "deploy" in res
    fig, axes = plt.subplots(1, 2 if two else 1, figsize=(12 if two else 6, 4))
    ax1, ax2 = (axes if two else (axes, None))
    for name, losses in res["train"]["curves"].items():
        k = max(1, len(losses) // 20)
        sm = [sum(losses[max(0, i - k + 1):i + 1]) / len(losses[max(0, i - k + 1):i + 1]) for i in range(len(losses))]
        ax1.plot(sm, label=name)
    ax1.set(xlabel="step", ylabel="train loss (running mean)", title="ResNet-20 digits32 from scratch")
    ax1.legend(fontsize=7)
    rows = res["deploy"]["rows"] if two else []
    if two:
        ax2.scatter([r["size_vs_fp32"] for r in rows], [100 * r["test_acc"] for r in rows])
    for i, r in enumerate(rows):  # staggered labels: several points share an accuracy
        ax2.annotate(r["model"].replace(" PTQ advanced", ""), (r["size_vs_fp32"], 100 * r["test_acc"]), fontsize=6,
                     xytext=(4, 10 * (i % 3) - 10), textcoords="offset points")
    if two:
        ax2.set(xlabel="bytes / FP32 bytes", ylabel="test acc. (%)", title="deployment chain (pretrained model)")
    fig.tight_layout()
    exp.savefig(fig, ".png")


def main(argv=None) -> int:
    exp = Experiment("compose", __doc__)  # one thread by default: fastest on a busy machine
    exp.parser.add_argument("--steps", type=int, default=0,
                            help="only the from-scratch training part, with this many steps (results stem "
                                 "compose_steps<N> unless --name is given)")
    return exp.run(lambda a: science(a, exp), markdown, lambda res: plot(res, exp), argv)


def science(a, exp: Experiment) -> dict:
    full = dict(steps=300, width=8, acc_test=200, acc_steps=6, adaprune_steps=40, adaquant_iters=50, bias_iters=25)
    quick = dict(steps=6, width=8, acc_test=32, acc_steps=1, adaprune_steps=3, adaquant_iters=3, bias_iters=2)
    only_train = a.steps > 0
    for k, v in (quick if a.quick else full).items():
        if not (k == "steps" and only_train):
            setattr(a, k, v)
    exp.out.mkdir(parents=True, exist_ok=True)
    c0 = time.process_time()
    splits = load_dataset("digits32", seed=0)
    log("part 1: training from scratch")
    train, all3 = train_part(splits, a)
    res = {"mode": ("quick" if a.quick else "full") + (f", training part only ({a.steps} steps)" if only_train else ""),
           "threads": a.threads, "train": train, "command": exp.command}
    if not only_train:
        log("part 1b: 12-bit accumulator on the all-three model")
        res["accum"] = accum_part(all3, splits, a)
        log("part 2: deployment chain on the pretrained model")
        res["deploy"] = deploy_part(splits, a, exp.out)
    res.update(seconds=exp.seconds(), cpu_seconds=time.process_time() - c0)
    return res


if __name__ == "__main__":
    raise SystemExit(main())
