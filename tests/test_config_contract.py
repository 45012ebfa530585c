"""One contract for configs: every registered config constructs with defaults, round-trips through YAML and
goes through ``thrifty.apply`` or the one pipeline it names; the config comes first after the model(s)."""
from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn as nn
from torch.utils.data import TensorDataset

import thrifty as th
from thrifty.core import CONFIGS, HANDLERS, PIPELINES, Config, from_yaml, import_config_modules, to_yaml
from thrifty.nn import is_gemm

import_config_modules()
KINDS = sorted(k for k, c in CONFIGS.items()
               if c.__module__.startswith("thrifty.") and c.__module__ != "thrifty.core.config")


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4)).eval()


def _zoo(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return th.models.create("mlp", in_features=8, hidden=(16,), num_classes=2).eval()


def _x(n: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 8, generator=torch.Generator().manual_seed(seed))


def _merge(cfg: Config) -> None:
    merged = th.merge.merge([_zoo(1), _zoo(2)], cfg, [_x(16, 1), _x(16, 2)])
    assert merged(_x(4)).shape == (4, 4)


def _bench(cfg: Config, tmp_path) -> None:
    ds = TensorDataset(_x(64), torch.randint(0, 4, (64,)))
    cfg = cfg.replace(min_duration_s=0.05, min_query_count=8)
    r = th.bench.run(_net(), cfg, ds, scenarios="SingleStream", outdir=tmp_path, isolate=False,
                     accuracy=False, calib=None)
    assert "SingleStream" in r["scenarios"]


# kind -> how its documented pipeline runs on a tiny model (defaults, with the step counts cut for speed).
RUNNERS = {
    "PTQ": lambda cfg, tmp: th.quant.quantize(_net(), cfg, _x(), progress=False),
    "Synth": lambda cfg, tmp: th.datafree.synthesize(_net(), cfg.replace(optim={"steps": 2}), 8, input_shape=(8,),
                                                     progress=False),
    "TrainConfig": lambda cfg, tmp: th.train.fit(_net().train(), cfg.replace(optim={"steps": 2, "batch_size": 8}),
                                                 TensorDataset(_x(), torch.randint(0, 4, (32,))), progress=False),
    "OptimConfig": lambda cfg, tmp: th.train.fit(_net().train(), th.train.TrainConfig(optim=cfg.replace(
        steps=2, batch_size=8)), TensorDataset(_x(), torch.randint(0, 4, (32,))), progress=False),
    "Distill": lambda cfg, tmp: th.datafree.distill(_net(1), _net(), cfg.replace(steps=2), _x(), progress=False),
    "AugmentConfig": lambda cfg, tmp: th.train.augment(torch.randn(2, 1, 8, 8), cfg),
    "SignalAugmentConfig": lambda cfg, tmp: th.train.augment_signal(torch.randn(2, 1, 16), cfg),
    "BenchConfig": lambda cfg, tmp: _bench(cfg, tmp),
    "FSMerge": lambda cfg, tmp: _merge(cfg.replace(optim={"steps": 2})),
    "DistillMerge": lambda cfg, tmp: _merge(cfg.replace(optim={"steps": 2})),
    "AverageMerge": lambda cfg, tmp: _merge(cfg),
    "PermuteMerge": lambda cfg, tmp: _merge(cfg),
    "ZipMerge": lambda cfg, tmp: _merge(cfg),
    "EnsembleMerge": lambda cfg, tmp: _merge(cfg),
}


def test_registry_holds_thrifty_configs():
    assert {"PTQ", "QuantConfig", "NM", "Train8", "AccumConfig", "FSMerge", "Synth", "TrainConfig"} <= set(KINDS)


@pytest.mark.parametrize("kind", KINDS)
def test_every_config_applies_or_names_its_pipeline(kind, tmp_path):
    cls = CONFIGS[kind]
    cfg = cls()
    assert from_yaml(to_yaml(cfg)) == cfg
    slot = any(t in HANDLERS for t in cls.__mro__)
    pipe = next((PIPELINES[t] for t in cls.__mro__ if t in PIPELINES), None)
    assert slot != (pipe is not None), f"{kind}: needs exactly one of a slot handler or a registered pipeline"
    if slot:
        model = th.apply(_net().train(), cfg)
        assert sum(is_gemm(m) for m in model.modules()) == 2
        model(_x(4)).sum().backward()
        return
    with pytest.raises(TypeError) as e:
        th.apply(_net(), cfg)
    assert pipe[1] in str(e.value) and kind in str(e.value)
    assert kind in RUNNERS, f"{kind}: add how its pipeline {pipe[1]} runs to RUNNERS"
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)  # the documented call is the current one
        RUNNERS[kind](cfg, tmp_path)


def test_apply_ptq_names_quantize():
    msg = r"PTQ needs calibration data: use thrifty\.quant\.quantize\(model, cfg, data\)"
    with pytest.raises(TypeError, match=msg):
        th.apply(_net(), th.PTQ())


def test_apply_train8_swaps_batchnorm_like_prepare_train8():
    from thrifty.nn import RangeBatchNorm1d
    from thrifty.quant.train8 import prepare_train8

    a, b = th.apply(_net(), th.Train8()), prepare_train8(_net(), th.Train8())
    assert type(a[1]) is RangeBatchNorm1d and type(b[1]) is RangeBatchNorm1d
    x = _x(8)
    torch.manual_seed(3)
    ya = a.train()(x)
    torch.manual_seed(3)
    assert torch.equal(ya, b.train()(x))
    assert type(th.apply(_net(), th.Train8(range_bn=False))[1]) is nn.BatchNorm1d


def test_apply_restores_batchnorm_when_train8_fails():
    model = _net()
    bn = model[1]
    with pytest.raises(ValueError, match="no nn.Linear"):
        th.apply(model, th.Train8(), filter="nothing*")
    assert model[1] is bn


def test_unknown_config_lists_every_handler_in_a_fresh_interpreter():
    # Which handlers apply knows must not depend on what the caller happened to import first.
    code = ("import dataclasses, thrifty.core as c\n"
            "@dataclasses.dataclass(frozen=True)\nclass Odd(c.Config): pass\n"
            "try:\n    c.handler_for(Odd())\nexcept TypeError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    for name in ("NM", "Train8", "QuantConfig", "AccumConfig", "ActNM", "GradNM", "PTQ -> thrifty.quant.quantize"):
        assert name in out, out


def _same(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_merge_old_order_warns_and_matches():
    models, data = [_zoo(1), _zoo(2)], [_x(16, 1), _x(16, 2)]
    new = th.merge.merge(models, th.merge.PermuteMerge(), data)
    with pytest.warns(DeprecationWarning, match=r"merge\(models, cfg, data\)"):
        old = th.merge.merge(models, data, th.merge.PermuteMerge())
    assert _same(new, old)
    with pytest.warns(DeprecationWarning):
        kw = th.merge.fs_merge(models, data, cfg=th.merge.FSMerge(optim={"steps": 1}))
    assert _same(kw, th.merge.fs_merge(models, th.merge.FSMerge(optim={"steps": 1}), data))
    with pytest.raises(TypeError, match="expected a Config"):
        th.merge.merge(models, data, data)


def test_distill_renamed_with_alias():
    models, data = [_zoo(1), _zoo(2)], [_x(16, 1), _x(16, 2)]
    cfg = th.merge.DistillMerge(optim={"steps": 1})
    with pytest.warns(DeprecationWarning, match="distill_merge"):
        old = th.merge.distill(models, data, cfg)
    assert _same(old, th.merge.distill_merge(models, cfg, data))


def test_fit_old_order_warns_and_trains_the_same():
    ds = TensorDataset(_x(), torch.randint(0, 4, (32,)))
    cfg = th.train.TrainConfig(optim={"steps": 3, "batch_size": 8})
    a, b, c = _net().train(), _net().train(), _net().train()
    th.train.fit(a, cfg, ds, progress=False)
    with pytest.warns(DeprecationWarning, match="fit"):
        th.train.fit(b, ds, None, cfg, progress=False)
    with pytest.warns(DeprecationWarning, match="fit"):
        th.train.fit(c, ds, cfg=cfg, progress=False)
    assert _same(a, b) and _same(a, c)
    with pytest.raises(TypeError, match="train_ds"):
        th.train.fit(_net(), cfg)


def test_synthesize_and_adaprune_old_order_warn():
    net = _net()
    new = th.datafree.synthesize(net, th.datafree.Synth(optim={"steps": 2}), 8, input_shape=(8,), progress=False)
    with pytest.warns(DeprecationWarning, match=r"synthesize\(model, cfg, n\)"):
        old = th.datafree.synthesize(net, 8, "bns", input_shape=(8,), steps=2, progress=False)
    assert torch.equal(new.tensors[0], old.tensors[0])
    a, b = _net(), _net()
    ra = th.sparse.adaprune(a, th.NM(2, 4), _x(), steps=2, progress=False)
    with pytest.warns(DeprecationWarning, match=r"adaprune\(model, plan, data\)"):
        rb = th.sparse.adaprune(b, _x(), th.NM(2, 4), steps=2, progress=False)
    assert ra == rb and _same(a, b)


def test_distill_old_order_warns_and_matches():
    a, b, teacher = _net(1), _net(1), _net()
    new = th.datafree.distill(a, teacher, th.datafree.Distill(steps=3, lr=1e-2), _x(), progress=False)
    with pytest.warns(DeprecationWarning, match=r"distill\(student, teacher, cfg, data\)"):
        old = th.datafree.distill(b, teacher, _x(), steps=3, lr=1e-2, progress=False)
    assert new == old and _same(a, b)
