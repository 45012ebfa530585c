"""The one training loop: learning, exact resume, checkpoints, DDP equivalence, bad input."""
from __future__ import annotations

import os
import socket

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from thrifty.core import from_yaml, to_yaml
from thrifty.train import (CheckpointError, Regime, TrainConfig, evaluate, fit, load_checkpoint, load_model,
                           save_checkpoint, save_model)
from thrifty.train.loop import CKPT_NAME
from tolerance import assert_within, gamma, unit_roundoff


def _data(n: int = 256, d: int = 8, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    y = ((x[:, 0] + x[:, 1]) > 0).long() + 2 * (x[:, 2] > 0).long()
    return TensorDataset(x, y)


def _mlp(seed: int = 1, bn: bool = False, dropout: float = 0.1) -> nn.Module:
    torch.manual_seed(seed)
    layers = [nn.Linear(8, 32)] + ([nn.BatchNorm1d(32)] if bn else []) + [nn.ReLU(), nn.Dropout(dropout),
                                                                          nn.Linear(32, 4)]
    return nn.Sequential(*layers)


def _same(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_fit_improves_accuracy():
    ds = _data()
    model = _mlp()
    before = evaluate(model, ds)["acc"]
    hist = fit(model, TrainConfig(epochs=8, optim={"batch_size": 32, "lr": 0.1}), ds, ds, progress=False)
    assert hist.final["test_acc"] > max(0.85, before + 0.3)
    assert len(hist.losses) == 8 * 8 and len(hist.records) == 8
    assert hist.losses[-1] < hist.losses[0]


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_resume_is_exact(tmp_path, optimizer):
    ds = _data()
    cfg = TrainConfig(epochs=4, optim={"batch_size": 48, "lr": 0.05}, optimizer=optimizer,
                      ckpt_every=5)  # 6 steps/epoch
    ref = _mlp(bn=True)
    fit(ref, cfg, ds, ds, progress=False)

    stop_at = 13  # mid-epoch, off the checkpoint grid: the checkpoint at step 13 comes from `stop`
    part = _mlp(bn=True)
    fit(part, cfg, ds, ds, ckpt_dir=tmp_path, progress=False,
        callbacks=[lambda s: setattr(s, "stop", s.step == stop_at)])
    assert load_checkpoint(tmp_path / CKPT_NAME, _mlp(bn=True))["step"] == stop_at
    assert not _same(part, ref)

    resumed = _mlp(seed=99, bn=True)  # different init: everything must come from the checkpoint
    hist = fit(resumed, cfg, ds, ds, ckpt_dir=tmp_path, resume=True, progress=False)
    assert _same(resumed, ref)
    assert len(hist.losses) == 24 and hist.final["step"] == 24


def test_resume_errors(tmp_path):
    ds = _data()
    with pytest.raises(CheckpointError, match=str(tmp_path / CKPT_NAME)):
        fit(_mlp(), TrainConfig(optim={"steps": 2}), ds, ckpt_dir=tmp_path, resume=True, progress=False)
    fit(_mlp(), TrainConfig(optim={"steps": 2, "batch_size": 16}), ds, ckpt_dir=tmp_path, progress=False)
    with pytest.raises(CheckpointError, match="different TrainConfig.*lr"):
        fit(_mlp(), TrainConfig(optim={"steps": 2, "batch_size": 16, "lr": 0.3}), ds, ckpt_dir=tmp_path, resume=True,
            progress=False)


def test_checkpoint_atomic_and_corrupt(tmp_path, monkeypatch):
    model, path = _mlp(), tmp_path / "ck.safetensors"
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(4, 8)).sum().backward()
    opt.step()
    save_checkpoint(path, model, opt, step=7, extra={"a": 1})
    good = path.read_bytes()

    # a failing write leaves the previous checkpoint intact and no temp files behind
    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        save_checkpoint(path, model, opt, step=8)
    monkeypatch.undo()
    assert path.read_bytes() == good and sorted(p.name for p in tmp_path.iterdir()) == ["ck.safetensors"]

    fresh = _mlp(seed=5)
    fresh_opt = torch.optim.SGD(fresh.parameters(), lr=0.1, momentum=0.9)
    info = load_checkpoint(path, fresh, fresh_opt)
    assert info == {"step": 7, "extra": {"a": 1}} and _same(fresh, model)
    assert torch.equal(fresh_opt.state_dict()["state"][0]["momentum_buffer"],
                       opt.state_dict()["state"][0]["momentum_buffer"])

    path.write_bytes(good[: len(good) // 2])  # truncated file
    untouched = _mlp(seed=6)
    snapshot = {k: v.clone() for k, v in untouched.state_dict().items()}
    with pytest.raises(CheckpointError, match="corrupt.*ck.safetensors"):
        load_checkpoint(path, untouched)
    assert all(torch.equal(snapshot[k], v) for k, v in untouched.state_dict().items())
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.safetensors", untouched)


def test_nan_errors():
    ds = _data()
    model = _mlp()
    with torch.no_grad():
        model[3].bias[1] = float("nan")
    with pytest.raises(ValueError, match=r"parameter .3\.bias."):
        fit(model, TrainConfig(optim={"steps": 2}), ds, progress=False)

    calls = []

    def loss_fn(out, y):
        calls.append(1)
        loss = nn.functional.cross_entropy(out, y)
        return loss * float("nan") if len(calls) == 3 else loss

    with pytest.raises(FloatingPointError, match="at step 2"):
        fit(_mlp(), TrainConfig(optim={"steps": 5, "batch_size": 16}), ds, loss_fn=loss_fn, progress=False)


def test_empty_dataset_and_bad_config():
    empty = TensorDataset(torch.zeros(0, 8), torch.zeros(0).long())
    with pytest.raises(ValueError, match="train_ds is empty"):
        fit(_mlp(), None, empty, progress=False)
    with pytest.raises(ValueError, match="empty"):
        evaluate(_mlp(), empty)
    with pytest.raises(ValueError, match="TrainConfig.optim.batch_size"):
        TrainConfig(optim={"batch_size": 0})
    with pytest.raises(ValueError, match="TrainConfig.schedule"):
        TrainConfig(schedule="linear")
    cfg = TrainConfig(epochs=3, optim={"lr": 0.2}, milestones=(0.3, 0.6), schedule="step")
    assert from_yaml(to_yaml(cfg)) == cfg


def test_lr_schedules():
    cfg = TrainConfig(optim={"lr": 1.0}, schedule="step", milestones=(0.5, 0.75), gamma=0.1, warmup=2)
    assert [round(cfg.lr_at(t, 8), 6) for t in range(8)] == [0.5, 1, 1, 1, 0.1, 0.1, 0.01, 0.01]
    cos = TrainConfig(optim={"lr": 1.0})
    assert cos.lr_at(0, 10) == 1.0 and abs(cos.lr_at(5, 10) - 0.5) <= 4 * 2.0**-53  # cos(pi / 2) ~ 6e-17


def test_evaluate_restores_mode():
    ds, model = _data(), _mlp()
    model.train()
    evaluate(model, ds)
    assert model.training
    model.eval()
    evaluate(model, ds)
    assert not model.training


class _Recorder(Regime):
    """Doubles the batch with flipped-sign copies and varies the drawn batch size."""

    def __init__(self):
        self.calls = {"setup": 0, "batch": 0, "before": 0, "end": 0}
        self.sizes = []

    def setup(self, model, train_ds, cfg):
        self.calls["setup"] += 1

    def batch_size(self, step, base):
        return base if step % 2 == 0 else base // 2

    def batch(self, x, y, step):
        self.calls["batch"] += 1
        self.sizes.append(len(x))
        return torch.cat([x, -x]), torch.cat([y, y])

    def before_optimizer_step(self, model, step):
        assert all(p.grad is not None for p in model.parameters())
        self.calls["before"] += 1

    def on_step_end(self, state):
        assert state.batch_size == 2 * self.sizes[-1]
        self.calls["end"] += 1


def test_regime_hooks_and_callbacks():
    reg, seen = _Recorder(), []
    fit(_mlp(), TrainConfig(optim={"steps": 6, "batch_size": 32}), _data(), regime=reg, progress=False,
        callbacks=[lambda s: seen.append((s.step, s.epoch, s.lr > 0, s.optimizer is not None))])
    assert reg.calls == {"setup": 1, "batch": 6, "before": 6, "end": 6}
    assert reg.sizes == [32, 16, 32, 16, 32, 16]
    assert [s[0] for s in seen] == [1, 2, 3, 4, 5, 6] and all(s[2] and s[3] for s in seen)


def test_save_load_model_roundtrip(tmp_path):
    from thrifty.models import create

    model = create("mlp", in_features=64, num_classes=10)
    save_model(model, tmp_path / "m", {"model": "mlp", "model_kwargs": {"in_features": 64, "num_classes": 10},
                                       "dataset": "digits"})
    loaded, meta = load_model(tmp_path / "m.safetensors")
    assert meta["dataset"] == "digits" and _same(loaded, model)
    (tmp_path / "m.yaml").unlink()
    with pytest.raises(FileNotFoundError, match="m.yaml"):
        load_model(tmp_path / "m")


def test_pretrained_caches(tmp_path, monkeypatch):
    import thrifty.train.recipes as pt

    monkeypatch.setenv("THRIFTY_CACHE", str(tmp_path))
    model, meta = pt.pretrained("mlp", "digits", epochs=2, return_meta=True, progress=False)
    assert meta["test_acc"] > 0.5 and meta["path"].startswith(str(tmp_path))

    def no_training(*a, **k):
        raise AssertionError("should have loaded from the cache")

    monkeypatch.setattr(pt, "fit", no_training)
    again = pt.pretrained("mlp", "digits", epochs=2, progress=False)
    assert _same(again, model)
    with pytest.raises(AssertionError):  # a different recipe is a different cache entry
        pt.pretrained("mlp", "digits", epochs=3, progress=False)


# ---------------------------------------------------------------- DDP: 2 processes == 1 process, 2x batch

def _first_step(into: list):
    """Callback recording the gradients used by the first optimizer step and the parameters it produced."""
    def cb(s) -> None:
        if s.step == 1:
            params = list(s.model.parameters())
            into.extend([[p.grad.clone() for p in params], [p.detach().clone() for p in params]])
    return cb


def _mlp_grad_magnitude(model: nn.Module, data: TensorDataset) -> list[torch.Tensor]:
    """Per parameter, the largest over samples of the gradient evaluated in absolute values (float64).

    A float gradient of the mean loss rounds every product and sum relative to these magnitudes: the forward
    |W| |x| + |b|, softmax's relative error of at most twice the logits' absolute error, the backward |W|^T |d|.
    """
    (l1, l2) = [m for m in model if isinstance(m, nn.Linear)]
    x, y = data.tensors
    w1, b1, w2, b2 = (t.detach().double() for t in (l1.weight, l1.bias, l2.weight, l2.bias))
    xa = x.double().abs()
    h = xa @ w1.abs().T + b1.abs()
    z = h @ w2.abs().T + b2.abs()
    p = torch.relu(x.double() @ w1.T + b1) @ w2.T + b2
    p = p.softmax(1)
    d2 = p + nn.functional.one_hot(y, p.shape[1]).double() + 2 * p * z.amax(1, keepdim=True)
    d1 = d2 @ w2.abs()
    per_sample = [d1[:, :, None] * xa[:, None, :], d1, d2[:, :, None] * h[:, None, :], d2]
    return [m.amax(0) for m in per_sample]


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank))
    torch.set_num_threads(1)
    import torch.distributed as dist

    model = _mlp(dropout=0.0)  # dropout masks are per-process random streams, so leave them out here
    first = []
    cfg = TrainConfig(optim={"steps": 4, "batch_size": 16, "lr": 0.1})
    fit(model, cfg, _data(), progress=False, ckpt_dir=out, callbacks=[_first_step(first)])
    torch.save({"state": model.state_dict(), "grads": first[0], "state1": first[1]}, os.path.join(out, f"ddp{rank}.pt"))
    # batch augmentation under DDP: each process augments its own shard; weights stay in sync
    from thrifty.train.regimes import BatchAugment

    torch.manual_seed(0)
    conv = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(4, 4))
    imgs = TensorDataset(torch.randn(32, 1, 12, 12, generator=torch.Generator().manual_seed(0)), torch.arange(32) % 4)
    sizes = []
    fit(conv, TrainConfig(optim={"steps": 3, "batch_size": 4, "lr": 0.1}), imgs, regime=BatchAugment(m=2),
        progress=False,
        callbacks=[lambda s: sizes.append(s.batch_size)])
    torch.save({"state": conv.state_dict(), "sizes": sizes}, os.path.join(out, f"aug{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


def test_ddp_two_processes_match_single_process(tmp_path):
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    ddp, ddp1 = torch.load(tmp_path / "ddp0.pt"), torch.load(tmp_path / "ddp1.pt")

    model, first, cfg = _mlp(dropout=0.0), [], TrainConfig(optim={"steps": 4, "batch_size": 32, "lr": 0.1})
    w0 = [p.detach().clone() for p in model.parameters()]
    mag = _mlp_grad_magnitude(model, _data())
    fit(model, cfg, _data(), progress=False, callbacks=[_first_step(first)])
    # the same mean over the same 32 samples, reduced in another order (two halves, then the all-reduce): each
    # within gamma(32 + fan-ins + a few) of the per-sample magnitudes, so the two within twice that
    g_bound = [2 * gamma(32 + 8 + 32 + 8) * m for m in mag]
    for i, (g_ddp, g) in enumerate(zip(ddp["grads"], first[0])):
        assert_within(g_ddp, g, g_bound[i], f"DDP gradient of parameter {i}")
    # first SGD step from the same weights: w - lr (1 + m) (g + wd w), a few roundings of its terms
    c = cfg.optim.lr * (1 + cfg.momentum)
    for i, (w_ddp, w1) in enumerate(zip(ddp["state1"], first[1])):
        terms = w0[i].double().abs() + c * (first[0][i].double().abs() + cfg.optim.weight_decay * w0[i].double().abs())
        assert_within(w_ddp, w1, c * g_bound[i] + 8 * unit_roundoff() * terms, f"DDP weights after step 1, {i}")
    # later steps: both ranks apply the same all-reduced gradients, so they stay bit-identical (the single
    # process drifts from them by the rounding above, amplified by the loss curvature: not a fixed bound)
    for k, v in ddp["state"].items():
        assert torch.equal(ddp1["state"][k], v), k
    assert (tmp_path / CKPT_NAME).is_file()  # rank 0 wrote the checkpoint
    a0, a1 = torch.load(tmp_path / "aug0.pt"), torch.load(tmp_path / "aug1.pt")
    assert a0["sizes"] == [8, 8, 8]  # m * per-process batch
    for k, v in a0["state"].items():
        if "running" not in k:  # BN running stats are per process (DDP broadcasts rank 0's before forward)
            torch.testing.assert_close(a1["state"][k], v)


def test_dataloader_workers_and_generic_datasets_match_fast_path():
    class Pairs(torch.utils.data.Dataset):  # not a TensorDataset: goes through per-sample collate
        def __init__(self, ds):
            self.ds = ds

        def __len__(self):
            return len(self.ds)

        def __getitem__(self, i):
            return self.ds[i]

    ds, cfg = _data(n=64), TrainConfig(optim={"steps": 5, "batch_size": 16})
    ref, generic, workers = _mlp(), _mlp(), _mlp()
    fit(ref, cfg, ds, progress=False)
    fit(generic, cfg, Pairs(ds), progress=False)
    fit(workers, TrainConfig(optim={"steps": 5, "batch_size": 16}, num_workers=1), Pairs(ds), progress=False)
    assert _same(ref, generic) and _same(ref, workers)
