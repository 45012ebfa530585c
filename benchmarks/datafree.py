"""Time BNS synthesis of 256 samples for resnet20 (target: under 60 s on 2 cores), next to one training epoch.

With the library defaults (thrifty.datafree.Synth), at batch 256 and 128, plus the BN distance of the samples
(the quality the speed must not cost). Also, side by side in this process, one optimisation step with the
BN-statistic taps of the first version (forward pre-hooks collecting ``Tensor.mean``/``Tensor.var`` per BN
input, re-registered every step) against the normalised one-pass taps now used.

    python benchmarks/datafree.py [--steps N]      # on a quiet machine
    python benchmarks/datafree.py --quick --out /tmp/x    # 10 steps, 64 samples, no first-version run
"""
from __future__ import annotations

import statistics
import time

import torch

import thrifty as th
from thrifty.bench.experiment import Experiment, table
from thrifty.core import flat_fields
from thrifty.datafree import Synth, bn_similarity, synthesize
from thrifty.datafree.synth import _bn_taps, _frozen_eval, _NormalisedTaps, bns_loss


def step_seconds(model: torch.nn.Module, batch: int, rounds: int = 3, steps: int = 4) -> dict[str, float]:
    """Median seconds of one BNS forward+backward to the inputs: first-version taps vs normalised taps."""
    x = torch.randn(batch, 1, 32, 32, generator=torch.Generator().manual_seed(0))

    def old() -> None:
        xi = x.clone().requires_grad_(True)
        with _bn_taps(model) as taps:
            model(xi)
        torch.autograd.grad(bns_loss(taps), xi)

    fast = _NormalisedTaps(model)

    def new() -> None:
        xi = x.clone().requires_grad_(True)
        model(xi)
        torch.autograd.grad(fast.pop(), xi)

    times: dict[str, list[float]] = {"first version": [], "normalised": []}
    with _frozen_eval(model):
        old(), new()  # warm up
        for _ in range(rounds):  # interleaved, so both see the same machine
            for name, f in (("first version", old), ("normalised", new)):
                t0 = time.perf_counter()
                for _ in range(steps):
                    f()
                times[name].append((time.perf_counter() - t0) / steps)
    fast.close()
    return {k: statistics.median(v) for k, v in times.items()}


def main(argv=None) -> int:
    exp = Experiment("bench_datafree", __doc__, threads=2)  # the target is for 2 cores
    exp.parser.add_argument("--steps", type=int, default=None, help="default: Synth().steps")
    exp.parser.add_argument("--n", type=int, default=256)
    exp.parser.add_argument("--batches", default="256,128", help="synthesis batch sizes to time")
    exp.parser.add_argument("--no-old", action="store_true", help="skip the first version's 200-step settings (~75 s)")
    return exp.run(science, render, argv=argv)


def science(args) -> dict:
    if args.quick:
        args.steps, args.n, args.batches, args.no_old = 10, 64, "64", True
    cfg = Synth() if args.steps is None else Synth(optim={"steps": args.steps})
    splits = th.data.load_dataset("digits32")
    model = th.train.pretrained("resnet20", "digits32")
    model.eval()
    runs = [(f"defaults ({cfg.optim.steps} steps at 1/{cfg.upsample} resolution)",
             cfg.replace(optim={"batch_size": int(b)}))
            for b in args.batches.split(",")]
    if not args.no_old:  # the first version's settings, with today's code (taps compared separately below)
        runs.append(("first version's settings (200 full-resolution steps, lr 0.2)",
                     cfg.replace(optim={"steps": 200, "lr": 0.2, "batch_size": 256}, upsample=1)))
    rows = []
    for label, c in runs:
        t0, c0 = time.perf_counter(), time.process_time()
        ds = synthesize(model, c, args.n, input_shape=splits.input_shape, progress=False)
        rows.append({"settings": label, "batch_size": c.optim.batch_size, "steps": c.optim.steps,
                     "seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - c0,
                     "bn_distance": bn_similarity(model, ds)})
    per_step = step_seconds(model, 256, rounds=1 if args.quick else 3, steps=1 if args.quick else 2)
    # reference on the same machine in the same run: one epoch of resnet20 training on digits32
    torch.manual_seed(0)
    m = th.models.create("resnet20", in_chans=1, num_classes=10)
    t0 = time.perf_counter()
    th.train.fit(m, th.train.TrainConfig(epochs=1, optim={"batch_size": 64}), splits.train, progress=False)
    epoch = time.perf_counter() - t0
    ref = {"real test digits": bn_similarity(model, splits.test),
           "Gaussian noise": bn_similarity(model, torch.randn(args.n, *splits.input_shape))}
    return {"n": args.n, "config": flat_fields(cfg), "threads": torch.get_num_threads(),
            "rows": rows, "step_seconds_batch256": per_step, "train_epoch_seconds": epoch,
            "bn_distance_reference": ref}


def render(out: dict) -> str:
    cfg, epoch, ref = out["config"], out["train_epoch_seconds"], out["bn_distance_reference"]
    rows = [{**r, "x_epoch": r["seconds"] / epoch} for r in out["rows"]]
    md = ["# BNS synthesis speed (resnet20, digits32 statistics)", "",
          f"{out['n']} samples, at most {cfg['steps']} Adam steps (lr {cfg['lr']}, warmup {cfg['warmup']}, cosine), "
          f"inputs optimised at 1/{cfg['upsample']} resolution, {out['threads']} threads; target < 60 s.", "",
          table(rows, {"settings": "settings", "batch_size": "batch size", "seconds": "seconds",
                       "cpu_seconds": "CPU seconds (all threads)", "x_epoch": "x one training epoch",
                       "bn_distance": "BN distance"},
                digits={"seconds": 1, "cpu_seconds": 1, "x_epoch": 1, "bn_distance": 3}).rstrip("\n")]
    old, new = out["step_seconds_batch256"]["first version"], out["step_seconds_batch256"]["normalised"]
    md += ["", "BN distance: the BNS objective over the samples (sum over BN layers of the channel-mean KL to the "
           "stored statistics); for reference " + ", ".join(f"{k} {v:.3f}" for k, v in ref.items()) + ".", "",
           f"One BNS step at batch 256 (forward + backward to the inputs), side by side: first-version taps "
           f"(`Tensor.var` per BN input) {1000 * old:.0f} ms, normalised one-pass taps {1000 * new:.0f} ms "
           f"({old / new:.2f}x).", "",
           f"One training epoch of resnet20 on digits32 (1258 images, batch 64) in the same run: {epoch:.1f} s.", ""]
    return "\n".join(md)


if __name__ == "__main__":
    raise SystemExit(main())
