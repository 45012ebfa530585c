"""thrifty.merge: FS-Merge folding exactness, permutation matching, self-merge, baselines, bad input."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn

from thrifty.core import from_yaml, to_yaml
from thrifty.merge import (
    AverageMerge, DistillMerge, Ensemble, FSMerge, PermuteMerge, SuperNet, ZipMerge, augment_tasks, average, distill_merge,
    evaluate_tasks, fs_merge, match_permutations, merge, permute_and_average, train_supernet, zip_merge,
)
from thrifty.merge.arch import arch_for
from thrifty.merge.baselines import _points_from_perms
from thrifty.merge.matching import (
    assign, correlation, head_aware_match, match_features, weight_matching, zip_pairs,
)
from thrifty.models import create
from tolerance import assert_within, forward_bound, gamma

PARAMS = ("diagonal", "lowrank", "diag_lowrank", "full")


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny matrices: extra intra-op threads only spin on a shared machine."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _mlp(seed: int, classes: int = 3, bn: bool = False) -> nn.Module:
    torch.manual_seed(seed)
    m = create("mlp", in_features=8, hidden=(16, 12), num_classes=classes, batchnorm=bn)
    if bn:
        for l in (1, 2):
            getattr(m, f"bn{l}").running_mean.normal_()
            getattr(m, f"bn{l}").running_var.uniform_(0.5, 2.0)
            getattr(m, f"bn{l}").weight.data.uniform_(0.5, 1.5)
    return m.eval()


def _vit(seed: int, classes: int = 3) -> nn.Module:
    torch.manual_seed(seed)
    m = create("vit", img_size=8, patch_size=4, dim=16, depth=2, heads=2, num_classes=classes)
    with torch.no_grad():  # move away from the zoo's tiny init so LayerNorm affines and biases matter
        for p in m.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return m.eval()


def _x(kind: str, n: int = 6, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 8, generator=g) if kind == "mlp" else torch.randn(n, 1, 8, 8, generator=g)


def _models(kind: str, k: int = 2) -> list[nn.Module]:
    return [(_mlp if kind == "mlp" else _vit)(10 + i, classes=3 + i % 2) for i in range(k)]


def _perturb(net: SuperNet, scale: float = 0.1) -> None:
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for p in net.points.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("kind", ["mlp", "mlp_bn", "vit"])
@pytest.mark.parametrize("param", PARAMS)
def test_fold_matches_explicit_supernet(kind: str, param: str) -> None:
    models = [_mlp(i, bn=True) for i in range(2)] if kind == "mlp_bn" else _models(kind.split("_")[0], k=3)
    for wm in (1.0, 1.5, 0.5):
        net = SuperNet(models, FSMerge(param=param, width_mult=wm, rank=4, init="average"))
        _perturb(net)
        folded = net.fold()
        assert type(folded) is type(models[0])
        x = _x(kind.split("_")[0])
        ref = net.explicit(x)
        assert_within(folded(x), ref, forward_bound(folded, ref), f"{kind} {param} {wm}")
        assert torch.equal(net(x)[0], folded(x))


@pytest.mark.parametrize("kind", ["mlp", "vit"])
@pytest.mark.parametrize("mode", ["global", "local"])
def test_trained_supernet_folds_exactly(kind: str, mode: str) -> None:
    models = _models(kind)
    cfg = FSMerge(mode=mode, optim={"steps": 12, "batch_size": 8, "lr": 1e-2})
    net = SuperNet(models, cfg)
    hist = train_supernet(net, augment_tasks([_x(kind, 8, 1), _x(kind, 8, 2)], 1), cfg)
    assert len(hist) >= 6 and all(math.isfinite(h) for h in hist)
    moved = any(float(p.detach().abs().sum()) > 0 for n, p in net.points.named_parameters() if n.endswith(".a"))
    assert moved, "training did not move the low-rank factors"
    x = _x(kind, 5, 3)
    ref = net.explicit(x)
    assert_within(net.fold()(x), ref, forward_bound(models[0], ref), "folded")


def test_fs_merge_improves_over_init_on_reconstruction() -> None:
    models = _models("mlp")
    data = [_x("mlp", 32, 1), _x("mlp", 32, 2)]
    cfg = FSMerge(optim={"steps": 150, "batch_size": 32, "lr": 1e-2})
    net = SuperNet(models, cfg)
    hist = train_supernet(net, augment_tasks(data, 0), cfg)
    assert sum(hist[-10:]) / 10 < 0.5 * sum(hist[:10]) / 10


def _permuted(model: nn.Module, seed: int) -> tuple[nn.Module, dict]:
    """A function-equivalent copy of ``model`` with hidden units (and ViT heads / residual dims) shuffled."""
    arch = arch_for([model])
    g = torch.Generator().manual_seed(seed)
    if arch.kind == "mlp":
        perms = {f"h{l + 1}": [torch.randperm(d, generator=g)] for l, d in enumerate(arch.dims())}
    else:
        d, heads, hid, depth = arch.dims()
        dh = d // heads
        perms = {"res": [torch.randperm(d, generator=g)]}
        for l in range(depth):
            hp = torch.randperm(heads, generator=g)
            perms[f"b{l}_qk"] = [torch.cat([hp[i] * dh + torch.randperm(dh, generator=g) for i in range(heads)])]
            perms[f"b{l}_v"] = [torch.cat([hp[i] * dh + torch.randperm(dh, generator=g) for i in range(heads)])]
            perms[f"b{l}_h"] = [torch.randperm(hid, generator=g)]
    return SuperNet([model], points=_points_from_perms(arch, perms)).fold(), perms


@pytest.mark.parametrize("kind,matching", [("mlp", "weight"), ("mlp", "activation"), ("vit", "activation")])
def test_permutation_matching_recovers_known_permutation(kind: str, matching: str) -> None:
    a = _models(kind, 1)[0]
    b, perms = _permuted(a, seed=5)
    x = _x(kind, 64, 4)
    assert_within(a(x), b(x), forward_bound(a, a(x)), "permuted copy")  # the same sums, reordered
    assert not torch.allclose(a.state_dict()["blocks.0.mlp.fc1.weight" if kind == "vit" else "fc1.weight"],
                              b.state_dict()["blocks.0.mlp.fc1.weight" if kind == "vit" else "fc1.weight"])
    got = match_permutations([a, b], x, matching)
    for name, (p,) in perms.items():  # b's unit j is a's unit p[j]; got[j] is b's unit matched to a's j
        assert torch.equal(p[got[name][1]], torch.arange(len(p))), name
    merged = permute_and_average([a, b], PermuteMerge(matching=matching), [x[:32], x[32:]])
    out, ref = merged(x), a(x)
    for part in (out[:, :3], out[:, 3:]):
        assert_within(part, ref, forward_bound(a, ref), "merged with its permuted copy")


def test_matching_math() -> None:
    assert assign(torch.tensor([[0.0, 1.0], [1.0, 0.0]])).tolist() == [1, 0]
    a = torch.randn(50, 6)
    # cov / (std std) of one column with itself: sums of 50 squares and a few operations
    assert_within(torch.diagonal(correlation(a, a)), torch.ones(6), 4 * gamma(50 + 8), "self-correlation")
    assert torch.equal(correlation(torch.ones(5, 2), a[:5, :2]), torch.zeros(2, 2))  # constant columns -> 0
    perm = torch.tensor([2, 0, 1, 5, 3, 4])
    assert torch.equal(match_features(a[:, perm], a)[torch.arange(6)], perm)
    c = correlation(a[:, :4], a[:, [2, 3, 0, 1]])  # heads (of 2 dims) swapped
    pqk, pv = head_aware_match(c, c, heads=2)
    assert pqk.tolist() == [2, 3, 0, 1] and pv.tolist() == [2, 3, 0, 1]
    w1, w2 = torch.randn(5, 3), torch.randn(4, 5)
    p = torch.tensor([3, 1, 4, 0, 2])
    got = weight_matching([w1, w2], [torch.zeros(5), torch.zeros(4)], [w1[p], w2[:, p]],
                          [torch.zeros(5), torch.zeros(4)])
    assert torch.equal(p[got[0]], torch.arange(5))
    with pytest.raises(ValueError):
        assign(torch.ones(2, 3))
    b = torch.randn(40, 3)
    feats = torch.cat([b, b[:, [2, 0, 1]]], 1)  # model 2 = model 1 with units shuffled
    assert zip_pairs(correlation(feats, feats)) == [(0, 4), (1, 5), (2, 3)]


@pytest.mark.parametrize("kind", ["mlp", "vit"])
def test_permute_init_merges_a_permuted_copy_exactly(kind: str) -> None:
    a = _models(kind, 1)[0]
    b, _ = _permuted(a, seed=4)
    x = _x(kind, 64, 5)
    merged = fs_merge([a, b], FSMerge(init="permute", optim={"steps": 3, "batch_size": 8}), [x[:32], x[32:]])
    out, ref = merged(x), a(x)
    # the permuted copy fits exactly: the loss is squared rounding noise (~1e-13) < cfg.tol, so no AdamW step (whose
    # normalised update would move the weights by ~lr however small the gradient) is taken; what is left is the
    # rounding of two evaluations of one function
    for part in (out[:, :3], out[:, 3:]):
        assert_within(part, ref, forward_bound(a, ref), "permute-merged with its permuted copy")
    with pytest.raises(ValueError, match="permute"):
        SuperNet([a, b], FSMerge(init="permute"))


def test_zip_merge_of_a_model_with_a_permuted_copy_is_equivalent() -> None:
    a = _models("mlp", 1)[0]
    b, _ = _permuted(a, seed=3)
    x = _x("mlp", 64, 2)
    out, ref = zip_merge([a, b], ZipMerge(), [x[:32], x[32:]])(x), a(x)
    for part in (out[:, :3], out[:, 3:]):
        assert_within(part, ref, forward_bound(a, ref), "zip-merged with its permuted copy")
    with pytest.raises(ValueError, match="two MLPs"):
        zip_merge(_models("mlp", 3), data=[x, x, x])


@pytest.mark.parametrize("kind", ["mlp", "vit"])
@pytest.mark.parametrize("init", ["first", "average"])
def test_merging_a_model_with_itself_is_equivalent(kind: str, init: str) -> None:
    a = _models(kind, 1)[0]
    x = _x(kind, 16, 7)
    cfg = FSMerge(init=init, optim={"steps": 5, "batch_size": 8})
    merged = fs_merge([a, copy.deepcopy(a)], cfg, [x[:8], x[8:]])
    out, ref = merged(x), a(x)
    # exact start: the loss is rounding noise below cfg.tol, no AdamW step is taken (see the permute test above)
    for part in (out[:, :3], out[:, 3:]):
        assert_within(part, ref, forward_bound(a, ref), "merged with itself")
    fold0 = SuperNet([a, copy.deepcopy(a)], cfg).fold()  # untrained: exact
    assert_within(fold0(x)[:, :3], ref, forward_bound(a, ref), "untrained fold")
    avg = average([a, copy.deepcopy(a)])
    assert_within(avg(x)[:, 3:], ref, forward_bound(a, ref), "average of two copies")


def test_baselines_shapes_and_front_door() -> None:
    models = _models("mlp", 3)
    data = [_x("mlp", 10, i) for i in range(3)]
    tests = [torch.utils.data.TensorDataset(_x("mlp", 7, 9), torch.randint(0, m.head.out_features, (7,)))
             for m in models]
    for cfg in (AverageMerge(), PermuteMerge(), PermuteMerge(matching="weight"),
                DistillMerge(optim={"steps": 3}),
                FSMerge(optim={"steps": 3}, width_mult=2.0)):
        m = merge(models, cfg, data)
        assert m(data[0]).shape == (10, 3 + 4 + 3)
        assert len(evaluate_tasks(m, tests)) == 3
    ens = Ensemble(models)
    assert torch.equal(ens(data[0])[:, 3:7], models[1](data[0]))  # the ensemble runs the model itself
    assert evaluate_tasks(ens, tests) == [evaluate_tasks(m, [t], [(0, m.head.out_features)])[0]
                                          for m, t in zip(models, tests)]
    assert from_yaml(to_yaml(FSMerge(param="full", mode="local"))) == FSMerge(param="full", mode="local")
    student = distill_merge(models[:2], DistillMerge(optim={"steps": 2}, init="random"), data[:2])
    assert student(data[0]).shape == (10, 7)


def test_augment() -> None:
    img = torch.randn(4, 1, 8, 8)
    pool = augment_tasks([img, img[:2]], copies=3, noise=0.0, mixup=0.0, shift=1)
    assert [tuple(p.shape) for p in pool.x] == [(16, 1, 8, 8), (8, 1, 8, 8)]
    assert torch.equal(pool.x[0][:4], img)
    assert augment_tasks([img], 0).x[0].shape == img.shape


def test_bad_inputs_and_inputs_untouched() -> None:
    a, b = _models("mlp")
    data = [_x("mlp", 8, 1), _x("mlp", 8, 2)]
    before = [copy.deepcopy(m.state_dict()) for m in (a, b)]
    cfg = FSMerge(optim={"steps": 3})
    fs_merge([a, b], cfg, data)
    permute_and_average([a, b], data=data)
    distill_merge([a, b], DistillMerge(optim={"steps": 2}), data)
    for m, sd in zip((a, b), before):
        assert all(torch.equal(sd[k], v) for k, v in m.state_dict().items())
        assert all(p.requires_grad for p in m.parameters()) and not m.training
    wide = create("mlp", in_features=8, hidden=(16, 13), num_classes=3).eval()
    with pytest.raises(ValueError, match="fc2.weight"):
        fs_merge([a, wide], cfg, data)
    with pytest.raises(ValueError, match="MLP"):
        fs_merge([a, _vit(0)], cfg, data)
    with pytest.raises(ValueError, match="training mode"):
        fs_merge([a, copy.deepcopy(b).train()], cfg, data)
    with pytest.raises(ValueError, match="at least 2"):
        fs_merge([a, b], cfg, [data[0], data[1][:1]])
    with pytest.raises(ValueError, match="one per task"):
        fs_merge([a, b], cfg, data[:1])
    with pytest.raises(ValueError, match="cannot run"):
        fs_merge([a, b], cfg, [torch.randn(4, 9), torch.randn(4, 9)])
    with pytest.raises(ValueError, match="at least 2 models"):
        fs_merge([a], cfg, data[:1])
    with pytest.raises(TypeError):
        fs_merge([a, nn.Linear(2, 2)], cfg, data)
    with pytest.raises(ValueError, match="NaN"):
        fs_merge([a, b], cfg, [data[0], torch.full((4, 8), float("nan"))])
    with pytest.raises(ValueError, match="param"):
        FSMerge(param="banana")
    with pytest.raises(ValueError, match="MLP only"):
        permute_and_average(_models("vit"), PermuteMerge(matching="weight"), [_x("vit"), _x("vit")])
    from thrifty.nn import wrap
    g = copy.deepcopy(b)
    g.fc1 = wrap(g.fc1)
    with pytest.raises(ValueError, match="strip"):
        fs_merge([a, g], cfg, data)
    for m, sd in zip((a, b), before):
        assert all(torch.equal(sd[k], v) for k, v in m.state_dict().items())
