"""Data-free synthesis: BNS objective falls, statistics approach the stored ones, the model is untouched."""
import copy
import json

import pytest
import torch
import torch.nn as nn

from thrifty.datafree import Synth, bn_similarity, bns_loss, gaussian_kl, synthesize
from thrifty.datafree.synth import _bn_taps, _frozen_eval, _lr_factor, _NormalisedTaps


def _net():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, stride=2), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4),
    )
    # give the BN layers distinctive running statistics, as training would
    net.train()
    with torch.no_grad():
        for _ in range(20):
            net(torch.randn(32, 1, 8, 8) * 2.0 + 1.5)
    return net.eval()


def _bns_value(net, x):
    with _frozen_eval(net), _bn_taps(net) as taps, torch.no_grad():
        net(x)
        return float(bns_loss(taps))


def test_gaussian_kl_closed_form():
    mu0, v0, mu1, v1 = torch.tensor(0.3), torch.tensor(2.0), torch.tensor(-1.0), torch.tensor(0.5)
    ref = 0.5 * (torch.log(v1 / v0) + (v0 + (mu0 - mu1) ** 2) / v1 - 1)
    assert torch.allclose(gaussian_kl(mu0, v0, mu1, v1, eps=0), ref)
    assert float(gaussian_kl(mu0, v0, mu0, v0)) == pytest.approx(0.0, abs=1e-7)


def test_bns_objective_decreases_and_stats_approach():
    net = _net()
    noise = torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    before = _bns_value(net, noise)
    ds = synthesize(net, n=64, method="bns", input_shape=(1, 8, 8), steps=60, batch_size=64, upsample=1,
                    progress=False)
    after = _bns_value(net, ds.tensors[0])
    assert after < 0.2 * before
    # the first BN input's batch mean moves towards the running mean
    with torch.no_grad():
        h0 = net[0](noise).mean((0, 2, 3))
        h1 = net[0](ds.tensors[0]).mean((0, 2, 3))
    rm = net[1].running_mean
    assert (h1 - rm).abs().mean() < (h0 - rm).abs().mean()


def test_normalised_taps_equal_reference_loss_and_gradient():
    net = _net()
    bn1d = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6))
    bn1d.train()
    with torch.no_grad():
        for _ in range(5):
            bn1d(torch.randn(30, 5) * 3 + 1)
    for model, x in ((net, torch.randn(16, 1, 8, 8) * 1.5 + 0.5), (bn1d.eval(), torch.randn(9, 5))):
        x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        with _frozen_eval(model):
            with _bn_taps(model) as taps:
                model(x1)
            ref = bns_loss(taps)
            fast = _NormalisedTaps(model)
            model(x2)
            val = fast.pop()
            fast.close()
        assert float(val.detach()) == pytest.approx(float(ref.detach()), rel=1e-4)
        (g1,) = torch.autograd.grad(ref, x1)
        (g2,) = torch.autograd.grad(val, x2)
        assert torch.allclose(g1, g2, rtol=1e-3, atol=1e-6)
    assert all(not m._forward_pre_hooks for m in net.modules())  # hooks removed


def test_schedule_upsample_and_early_stop():
    cfg = Synth(steps=10, warmup=0.2)
    f = [_lr_factor(s, cfg) for s in range(10)]
    assert f[0] == pytest.approx(0.5) and f[1] == pytest.approx(1.0) and f[2] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[1:], f[2:])) and f[-1] < 0.05
    net = _net()
    up = synthesize(net, n=16, method="bns", input_shape=(1, 8, 8), steps=5, upsample=4, progress=False)
    x = up.tensors[0]
    assert x.shape == (16, 1, 8, 8)
    # optimised on a 2x2 grid and upsampled bilinearly: far smoother than full-resolution noise
    tv = lambda t: (t[..., 1:, :] - t[..., :-1, :]).abs().mean()  # noqa: E731
    assert tv(x) < 0.5 * tv(torch.randn(16, 1, 8, 8))
    flat = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.Linear(5, 3)).eval()
    ds = synthesize(flat, Synth(steps=2, upsample=2), 4, input_shape=(6,), progress=False)
    assert ds.tensors[0].shape == (4, 6)
    # a plateau threshold close to 1 stops a batch as soon as the window allows: same result as fewer steps
    a = synthesize(net, n=16, method="bns", input_shape=(1, 8, 8), steps=50, plateau=0.99, progress=False)
    full = synthesize(net, n=16, method="bns", input_shape=(1, 8, 8), steps=50, progress=False)
    assert not torch.equal(a.tensors[0], full.tensors[0])
    assert _bns_value(net, full.tensors[0]) < _bns_value(net, a.tensors[0])


def test_model_untouched_and_mode_restored():
    net = _net()
    net.train()
    net[0].weight.requires_grad_(False)
    state = copy.deepcopy(net.state_dict())
    synthesize(net, n=10, method="bns", input_shape=(1, 8, 8), steps=3, progress=False)
    synthesize(net, n=10, method="inception", input_shape=(1, 8, 8), steps=3, progress=False)
    for k, v in net.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert net.training and all(m.training for m in net.modules())
    assert not net[0].weight.requires_grad and net[3].weight.requires_grad
    assert all(p.grad is None for p in net.parameters())


def test_deterministic_with_seed_and_label_kinds():
    net = _net()
    a = synthesize(net, n=12, method="bns", input_shape=(1, 8, 8), steps=5, progress=False, seed=3)
    b = synthesize(net, n=12, method="bns", input_shape=(1, 8, 8), steps=5, progress=False, seed=3)
    c = synthesize(net, n=12, method="bns", input_shape=(1, 8, 8), steps=5, progress=False, seed=4)
    assert torch.equal(a.tensors[0], b.tensors[0]) and not torch.equal(a.tensors[0], c.tensors[0])
    assert a.tensors[1].dtype == torch.long and a.tensors[1].shape == (12,)
    soft = synthesize(net, n=5, method="gaussian", input_shape=(1, 8, 8), soft_labels=True, progress=False)
    assert soft.tensors[1].shape == (5, 4) and torch.allclose(soft.tensors[1].sum(1), torch.ones(5))


def test_inception_targets_classes():
    net = _net()
    ds = synthesize(net, n=8, method="inception", input_shape=(1, 8, 8), steps=80, lr=0.3, upsample=1, progress=False)
    # each sample was pushed towards class i % 4
    assert (ds.tensors[1] == torch.arange(8) % 4).float().mean() >= 0.75


def test_similarity_ranks_matching_data_first():
    net = _net()
    matching = torch.randn(256, 1, 8, 8) * 2.0 + 1.5
    foreign = torch.randn(256, 1, 8, 8) * 0.2 - 3.0
    assert bn_similarity(net, matching) < bn_similarity(net, foreign)
    per = bn_similarity(net, matching, per_layer=True)
    assert set(per) == {"1", "4"}


def test_bad_inputs():
    net = _net()
    with pytest.raises(ValueError, match="input_shape"):
        synthesize(net, n=4, method="bns")
    with pytest.raises(ValueError, match="positive integer"):
        synthesize(net, n=0, method="bns", input_shape=(1, 8, 8))
    no_bn = nn.Sequential(nn.Flatten(), nn.Linear(64, 3))
    with pytest.raises(ValueError, match="no BatchNorm.*gaussian"):
        synthesize(no_bn, n=4, method="bns", input_shape=(64,))
    assert len(synthesize(no_bn, n=4, method="gaussian", input_shape=(64,), progress=False)) == 4
    with pytest.raises(ValueError, match="Synth.method"):
        Synth(method="dream")
    with pytest.raises(ValueError, match="upsample"):
        Synth(upsample=0)
    with pytest.raises(ValueError, match="warmup"):
        Synth(warmup=1.0)
    with pytest.raises(ValueError, match="empty"):
        bn_similarity(net, torch.zeros(0, 1, 8, 8))
    with pytest.raises(ValueError, match="no BatchNorm"):
        bn_similarity(no_bn, torch.zeros(2, 64))


def test_cli_quantize_data_free(tmp_path, capsys):
    from thrifty.cli import main
    from thrifty.models import create
    from thrifty.train import save_model

    torch.manual_seed(0)
    m = create("resnet20", in_chans=1, num_classes=10, width=4)
    meta = {"model": "resnet20", "model_kwargs": {"in_chans": 1, "num_classes": 10, "width": 4}, "dataset": "digits32"}
    save_model(m, tmp_path / "fp", meta)
    out = tmp_path / "q"
    rc = main(["quantize", "--model", str(tmp_path / "fp"), "--bits", "4", "--pipeline", "rtn", "--calib-per-class", "2",
               "--data-free", "bns", "--synth-steps", "3", "--distill-steps", "2", "--out", str(out)])
    assert rc == 0 and "quantized" in capsys.readouterr().out
    assert (out / "model.safetensors").is_file()
    report = json.loads((out / "report.json").read_text())
    assert report["distill"]["steps"] == 2 and report["distill"]["kl_after"] <= report["distill"]["kl_before"]
    # the model without BN is refused with the fallback named
    mlp = create("mlp", in_features=64, num_classes=10)
    save_model(mlp, tmp_path / "mlp", {"model": "mlp", "model_kwargs": {"in_features": 64, "num_classes": 10},
                                       "dataset": "digits"})
    assert main(["quantize", "--model", str(tmp_path / "mlp"), "--data-free", "bns", "--out", str(tmp_path / "q2")]) != 0
    assert "gaussian" in capsys.readouterr().err
