"""Batch augmentation: 1-D signal augmentations, BatchAugment on images and signals inside the loop (lr and
steps unchanged, gradient-norm adaptation), and the experiment's steps-to-reach bookkeeping."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from thrifty.train import TrainConfig, fit
from thrifty.train.augment import AugmentConfig, SignalAugmentConfig, augment_signal, cutout
from thrifty.train.regimes import BatchAugment
from tolerance import assert_within, sum_bound, unit_roundoff

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
import regimes_batch_aug as ba  # noqa: E402


def test_cutout_square_has_the_requested_side():
    torch.manual_seed(0)
    x = torch.ones(200, 1, 16, 16)
    for size in (1, 4, 5):
        z = cutout(x, size) == 0
        rows, cols = z.any(3)[:, 0], z.any(2)[:, 0]  # (n, 16) which rows / columns hold zeroed pixels
        assert (rows.sum(1) <= size).all() and (cols.sum(1) <= size).all()
        inside = (rows.sum(1) == size) & (cols.sum(1) == size)  # squares that do not cross the border
        assert inside.any() and (z[inside].flatten(1).sum(1) == size * size).all()


def test_signal_shift_is_a_circular_roll_per_sample():
    torch.manual_seed(0)
    x = torch.randn(64, 40)
    out = augment_signal(x, SignalAugmentConfig(shift=3, scale=(1.0, 1.0)))
    shifts = set()
    for i in range(64):
        ks = [k for k in range(-3, 4) if torch.equal(out[i], torch.roll(x[i], k))]
        assert len(ks) == 1, i
        shifts.add(ks[0])
    assert shifts == set(range(-3, 4))  # every shift in range is drawn
    x3 = torch.randn(8, 2, 40)  # (N, C, L): all channels of a sample move together
    o3 = augment_signal(x3, SignalAugmentConfig(shift=5, scale=(1.0, 1.0)))
    for i in range(8):
        assert any(torch.equal(o3[i], torch.roll(x3[i], k, dims=-1)) for k in range(-5, 6))


def test_signal_scale_shear_noise_cutout():
    torch.manual_seed(0)
    x = torch.randn(50, 40).abs() + 0.5
    s = augment_signal(x, SignalAugmentConfig(shift=0, scale=(0.8, 1.2)))
    ratio = s / x  # f (1 + d1)(1 + d2): the product's and this division's rounding
    u = unit_roundoff()
    assert_within(ratio, ratio[:, :1].expand_as(ratio), 5 * u * ratio.abs(), "scale factor")  # one per sample
    assert ratio.min() >= 0.8 * (1 - 4 * u) and ratio.max() <= 1.2 * (1 + 4 * u) and ratio[:, 0].std() > 0.05
    d = augment_signal(x, SignalAugmentConfig(shift=0, scale=(1.0, 1.0), shear=2.0)) - x
    steps = d.diff(dim=1)  # a ramp: constant increments per sample, zero-mean over the signal
    # each d_i is the ramp up to the roundings of linspace, the product, the addition and this subtraction
    err = 4 * u * (x.abs() + d.abs()).amax(1, keepdim=True)
    assert_within(steps, steps[:, :1].expand_as(steps), 2 * err, "ramp increments")
    assert_within(d.mean(1), torch.zeros(50), err[:, 0] + sum_bound(d, 1) / d.shape[1], "ramp mean")
    n = augment_signal(x, SignalAugmentConfig(shift=0, scale=(1.0, 1.0), noise=0.5)) - x
    assert 0.4 < n.std() < 0.6
    c = augment_signal(x, SignalAugmentConfig(shift=0, scale=(1.0, 1.0), cutout=6)) == 0
    assert (c.sum(1) >= 1).all() and (c.sum(1) <= 6).all() and (c.sum(1) == 6).any()
    assert torch.equal(augment_signal(x, SignalAugmentConfig(shift=0, scale=(1.0, 1.0))), x)
    with pytest.raises(ValueError, match=r"\(N, L\)"):
        augment_signal(torch.randn(2, 1, 4, 4))
    with pytest.raises(ValueError, match="SignalAugmentConfig"):
        SignalAugmentConfig(shift=-1)


def test_batch_augment_signals_copies_differ_labels_repeat():
    torch.manual_seed(0)
    x, y = torch.randn(5, 40), torch.tensor([4, 0, 2, 2, 9])
    xa, ya = BatchAugment(m=3).batch(x, y, step=0)  # no config: the signal default is picked
    assert xa.shape == (15, 40) and torch.equal(ya, y.repeat(3))
    copies = xa.view(3, 5, 40)
    for i in range(5):
        assert not torch.equal(copies[0, i], copies[1, i]) and not torch.equal(copies[1, i], copies[2, i])
        # each copy is a rolled, rescaled version of its own source: max circular correlation is ~1
        for k in range(3):
            best = max(torch.corrcoef(torch.stack([copies[k, i], torch.roll(x[i], s)]))[0, 1] for s in range(-4, 5))
            assert best > 0.999
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        BatchAugment(m=2, augment_cfg=AugmentConfig()).batch(x, y, 0)
    with pytest.raises(ValueError, match=r"\(N, L\)"):
        BatchAugment(m=2, augment_cfg=SignalAugmentConfig()).batch(torch.randn(2, 1, 8, 8), y[:2], 0)
    with pytest.raises(TypeError, match="augment_cfg"):
        BatchAugment(m=2, augment_cfg={"shift": 3})


def test_batch_augment_keeps_lr_and_steps_and_grows_batch():
    ds = TensorDataset(torch.randn(48, 40), torch.arange(48) % 3)
    cfg = TrainConfig(optim={"steps": 6, "batch_size": 8, "lr": 0.1}, schedule="cosine")
    seen = {}
    for m in (1, 3):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(40, 16), nn.ReLU(), nn.Linear(16, 3))
        log = []
        fit(model, cfg, ds, regime=BatchAugment(m=m), progress=False,
            callbacks=[lambda s: log.append((s.step, s.lr, s.batch_size))])
        seen[m] = log
    assert [s for s, _, _ in seen[3]] == list(range(1, 7))  # same number of steps
    assert [lr for _, lr, _ in seen[3]] == [lr for _, lr, _ in seen[1]]  # same learning rates
    assert {b for _, _, b in seen[1]} == {8} and {b for _, _, b in seen[3]} == {24}  # m*B samples per step


def test_grad_norm_adaptation_scales_gradients_by_sqrt_m():
    model = nn.Linear(4, 2)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    BatchAugment(m=4, grad_norm_adapt=True).before_optimizer_step(model, 0)
    assert all(torch.equal(p.grad, torch.full_like(p, 2.0)) for p in model.parameters())
    BatchAugment(m=4).before_optimizer_step(model, 0)  # off by default
    assert all(torch.equal(p.grad, torch.full_like(p, 2.0)) for p in model.parameters())
    assert math.isclose(BatchAugment(m=9, grad_norm_adapt=True).m ** 0.5, 3.0)


def test_adapt_as_gives_the_control_run_its_scaling_without_copies():
    model = nn.Linear(4, 2)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    control = BatchAugment(m=1, grad_norm_adapt=True, adapt_as=4)
    control.before_optimizer_step(model, 0)
    assert all(torch.equal(p.grad, torch.full_like(p, 2.0)) for p in model.parameters())
    x, y = torch.randn(3, 40), torch.tensor([0, 1, 2])
    assert control.batch(x, y, step=0)[0].shape == (3, 40)  # still one copy per sample
    assert control.describe()["adapt_as"] == 4
    for bad in (0, True, 2.5):
        with pytest.raises(ValueError, match="adapt_as"):
            BatchAugment(m=1, adapt_as=bad)


def test_experiment_steps_to_reach_uses_seed_mean_curves():
    curve = lambda *accs: [[10 * (i + 1), a] for i, a in enumerate(accs)]  # noqa: E731
    raw = {"m=1": {"0": {"curve": curve(0.5, 0.7, 0.8, 0.9), "seconds": 1.0},
                   "1": {"curve": curve(0.5, 0.6, 0.8, 0.7), "seconds": 1.0}},
           "m=4": {"0": {"curve": curve(0.6, 0.9, 0.9, 0.95), "seconds": 2.0},
                   "1": {"curve": curve(0.6, 0.7, 0.8, 0.8), "seconds": 2.0}}}
    s = ba.summarize({"seeds": [0, 1], "train_config": {"steps": 40}, "raw": raw})
    assert s["baseline_final"] == pytest.approx(0.8)  # seed-mean at the last step
    assert s["baseline_final_last3"] == pytest.approx((0.65 + 0.8 + 0.8) / 3)
    m4 = next(r for r in s["rows"] if r["run"] == "m=4")
    assert m4["steps_to_baseline"] == 20 and m4["fraction"] == 0.5  # mean curve 0.6, 0.8, ...
    assert m4["steps_to_baseline_per_seed"] == [20, 20]  # seed 0 vs 0.9 reaches at 20; seed 1 vs 0.7 at 20
    assert m4["diff_vs_m1_mean"] == pytest.approx(0.075)
    assert ba.first_reach(curve(0.1, 0.2), 0.5) is None
    assert next(r for r in s["rows"] if r["run"] == "m=1")["fraction"] == 0.75  # its mean curve plateaus at 30


def test_cli_batch_aug_on_signals(tmp_path):
    from thrifty.cli import main

    out = tmp_path / "r"
    assert main(["train", "--model", "mlp", "--dataset", "mnist1d", "--optim.steps", "2", "--optim.batch-size", "8",
                 "--regime", "batch-aug:2", "--out", str(out)]) == 0
    assert (out / "model.safetensors").exists()
    assert json.loads((out / "history.json").read_text())["records"][-1]["step"] == 2


def test_protocol_b_changes_only_the_lr_schedule():
    for task in ba.tasks(quick=False):
        b = ba.with_schedule(task, "step")
        assert b.train.schedule == "step" and b.train.milestones == (0.5, 0.75) and b.train.gamma == 0.1
        same = {k: v for k, v in vars(b.train).items() if k not in ("schedule", "milestones", "gamma")}
        assert same == {k: v for k, v in vars(task.train).items() if k in same}
        assert (b.augment, b.ms, b.extra, b.model, b.dataset) == (task.augment, task.ms, task.extra, task.model,
                                                                   task.dataset)
        n = b.train.optim.steps
        lrs = [b.train.lr_at(s, n) for s in (0, n // 2 - 1, n // 2, 3 * n // 4 - 1, 3 * n // 4, n - 1)]
        lr = task.train.optim.lr
        assert lrs == pytest.approx([lr] * 2 + [lr / 10] * 2 + [lr / 100] * 2)
    long = [t for t in ba.tasks(quick=False) if "long" in t.name]
    assert long and all(t.schedules == ("step",) for t in long)  # chosen for protocol B only
