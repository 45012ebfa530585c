"""Training regimes: batch augmentation, mixed sizes (B+/D+), augmentations, BN recalibration."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from thrifty.train import TrainConfig, evaluate, fit
from thrifty.train.augment import AugmentConfig, augment, cutout, hflip, random_crop, resize
from thrifty.train.bn import bn_layers, recalibrate_bn
from thrifty.train.regimes import BatchAugment, MixedSize, SizeSchedule, default_schedule
from thrifty.train.train_options import parse_regime
from tolerance import assert_within, gamma_prob


def _images(n: int = 16, size: int = 32, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 1, size, size, generator=g), torch.arange(n) % 4)


class _ConvNet(nn.Module):
    """Accepts any input size (global pooling); records the input shapes it saw while training."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.bn, self.head = nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Linear(8, 4)
        self.seen: list[tuple[int, ...]] = []

    def forward(self, x):
        if self.training:
            self.seen.append(tuple(x.shape))
        return self.head(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


def test_batch_augment_copies_differ_and_labels_repeat():
    torch.manual_seed(0)  # smooth images (like the upscaled digits), so an augmented copy still resembles its source
    x = resize(torch.randn(6, 1, 6, 6), 32)
    y = torch.tensor([3, 1, 4, 1, 5, 9])
    xa, ya = BatchAugment(m=4).batch(x, y, step=0)
    assert xa.shape == (24, 1, 32, 32) and torch.equal(ya, y.repeat(4))
    copies = xa.view(4, 6, -1)  # copy k of sample i is row k*B + i
    for i in range(6):
        for a in range(4):
            for b in range(a + 1, 4):
                assert not torch.allclose(copies[a, i], copies[b, i])  # duplicates really differ
        # each copy still resembles its own source sample more than any other sample
        corr = torch.stack([torch.corrcoef(torch.stack([copies[k, i], x[j].flatten()]))[0, 1]
                            for k in range(4) for j in range(6)]).view(4, 6)
        assert (corr.argmax(1) == i).all()


def test_batch_augment_bad_m():
    for m in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="m must be an integer >= 1"):
            BatchAugment(m=m)
    with pytest.raises(ValueError, match="batch-aug:M"):
        parse_regime("batch-aug:x")
    assert parse_regime("none") is None and parse_regime("batch-aug:3").m == 3
    assert parse_regime("mixed-size:B+").mode == "B+"
    with pytest.raises(ValueError, match="mode must be"):
        parse_regime("mixed-size:C+")


def test_augmentations_shapes_and_effects():
    torch.manual_seed(0)
    x = torch.randn(5, 2, 12, 12)
    assert torch.equal(random_crop(x, 0), x)
    c = random_crop(x, 2)
    assert c.shape == x.shape and not torch.equal(c, x)
    f = hflip(x, p=1.0)
    assert torch.equal(f, x.flip(-1))
    z = cutout(x, 4)
    assert ((z == 0) & (x != 0)).any(dim=(1, 2, 3)).all()  # every sample lost some pixels
    assert augment(x, AugmentConfig(rotate=0, scale=(1.0, 1.0), crop_padding=0)).equal(x)
    assert resize(x, 6).shape == (5, 2, 6, 6)
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        augment(torch.randn(3, 10))


def test_size_sampler_follows_probabilities():
    reg = MixedSize(mode="B+")
    sizes, probs = reg.schedule.sizes, reg.schedule.probs
    assert sizes == (16, 24, 32, 48) and default_schedule(64).sizes == (32, 48, 64, 96)
    n = 20000
    draws = torch.tensor([reg.size_at(t) for t in range(n)])
    for s, p in zip(sizes, probs):
        freq = (draws == s).float().mean().item()
        assert abs(freq - p) < 4 * (p * (1 - p) / n) ** 0.5 + 1e-3, (s, freq, p)
    assert [reg.size_at(t) for t in range(50)] == [MixedSize(mode="B+").size_at(t) for t in range(50)]


@pytest.mark.parametrize("mode", ["B+", "D+"])
def test_pixels_per_step_stay_constant(mode):
    reg, base = MixedSize(mode=mode), 64
    target = base * 32 * 32
    seen = set()
    ds = _images(n=256)
    for step in range(40):
        n = reg.batch_size(step, base)
        x, y = reg.batch(ds.tensors[0][:n], ds.tensors[1][:n], step)
        assert x.shape[-1] == reg.size_at(step) and len(x) == len(y)
        assert abs(x[0].numel() * len(x) / target - 1) <= 0.15, (mode, x.shape)
        seen.add(x.shape[-1])
        if mode == "B+":
            assert len(x) == n  # B+: bigger batches, no duplicates
        else:
            assert n <= base  # D+: never more distinct samples than the base batch
    assert seen == {16, 24, 32, 48}


def test_mixed_size_bad_input_before_training():
    with pytest.raises(ValueError, match="sum to 1"):
        MixedSize(sizes=(16, 32), probs=(0.5, 0.6))
    with pytest.raises(ValueError, match="positive integers"):
        SizeSchedule((0, 32), (0.5, 0.5))
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(32 * 32, 4))  # only takes 32x32
    steps = []
    with pytest.raises(ValueError, match="input size 16x16"):
        fit(mlp, TrainConfig(optim={"steps": 3, "batch_size": 4}), _images(), regime=MixedSize(mode="D+"),
            callbacks=[steps.append], progress=False)
    assert steps == []  # nothing was trained


def test_mixed_size_in_fit_and_resume(tmp_path):
    ds = _images(n=64)
    cfg = TrainConfig(optim={"steps": 8, "batch_size": 8, "lr": 0.05})
    reg = MixedSize(mode="B+", seed=3)
    model = _ConvNet()
    fit(model, cfg, ds, regime=reg, progress=False)
    assert [s[0] for s in model.seen] == [reg.batch_size(t, 8) for t in range(8)]
    assert [s[-1] for s in model.seen] == [reg.size_at(t) for t in range(8)]
    part = _ConvNet()
    fit(part, cfg, ds, regime=reg, ckpt_dir=tmp_path, progress=False,
        callbacks=[lambda s: setattr(s, "stop", s.step == 5)])
    resumed = _ConvNet()
    fit(resumed, cfg, ds, regime=reg, ckpt_dir=tmp_path, resume=True, progress=False)
    for k, v in model.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k


def test_recalibrate_bn_changes_only_bn_buffers():
    model = _ConvNet()
    fit(model, TrainConfig(optim={"steps": 3, "batch_size": 8}), _images(n=32), progress=False)
    model.eval()
    before = copy.deepcopy(model.state_dict())
    recalibrate_bn(model, _images(n=32, seed=1), size=20, batches=4, batch_size=8)  # 4 x 8 covers all 32 once
    assert not model.training
    bn_keys = {f"bn.{k}" for k in ("running_mean", "running_var", "num_batches_tracked")}
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == bn_keys
    assert bn_layers(model)[0].momentum == 0.1 and int(model.bn.num_batches_tracked) == 4
    # the statistics are the cumulative average over the calibration batches at that size
    x = resize(_images(n=32, seed=1).tensors[0], 20)
    feats = model.conv(x)
    # the cumulative average of equal-size batch means is the mean of all: a sum of n terms rounded either way
    n = feats.numel() // feats.shape[1]
    bound = 2 * gamma_prob(n + 16) * feats.detach().abs().mean((0, 2, 3))
    assert_within(model.bn.running_mean, feats.mean((0, 2, 3)), bound, "running mean")
    assert evaluate(model, _images(n=32, seed=1), size=20)["n"] == 32


def test_cli_regime_and_eval_sizes(tmp_path, capsys):
    import json

    from thrifty.cli import main

    out = tmp_path / "r"
    assert main(["train", "--model", "resnet20", "--dataset", "digits32", "--optim.steps", "2", "--optim.batch-size", "8",
                 "--model-arg", "width=4", "--regime", "batch-aug:2", "--out", str(out)]) == 0
    assert main(["eval", str(out / "model"), "--sizes", "16,24", "--calibrate-bn", "--calib-batches", "2"]) == 0
    rows = json.loads((out / "eval" / "eval.json").read_text())["rows"]
    assert [r["size"] for r in rows] == [16, 24] and all(r["bn_calibrated"] for r in rows)
    assert "size 16" in capsys.readouterr().out
