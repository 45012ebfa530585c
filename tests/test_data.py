"""Tests for thrifty.data: bundled datasets, splits, calibration subsets, user files."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from thrifty.data import (DATASETS, Splits, calibration_subset, load_dataset, load_image_folder, load_tensors,
                          load_texts, stratified_split, text_corpus)
from tolerance import gamma_prob, unit_roundoff

EXPECTED = {
    "digits": ((64,), 1797),
    "digits32": ((1, 32, 32), 1797),
    "mnist1d": ((40,), 5000),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_builtin_shapes_and_split(name):
    s = load_dataset(name, seed=0)
    shape, total = EXPECTED[name]
    assert isinstance(s, Splits) and s.name == name and s.num_classes == 10
    assert s.input_shape == shape
    xtr, ytr = s.train.tensors
    xte, yte = s.test.tensors
    assert xtr.dtype == torch.float32 and ytr.dtype == torch.long
    assert tuple(xtr.shape[1:]) == shape and tuple(xte.shape[1:]) == shape
    assert len(s.train) + len(s.test) == total
    assert torch.isfinite(xtr).all() and torch.isfinite(xte).all()
    # every class in both splits, stratified: class proportions close between splits
    assert set(ytr.tolist()) == set(yte.tolist()) == set(range(10))
    ptr = torch.bincount(ytr, minlength=10).float() / len(ytr)
    pte = torch.bincount(yte, minlength=10).float() / len(yte)
    assert (ptr - pte).abs().max() < 0.02
    if name != "mnist1d":  # digits* are standardised with train statistics
        # z = (x - m) / s with float32 m, s over N values: m is off by <= gamma_prob(N) mean|x| (= m: pixels >= 0,
        # so m / s = -min z), s relatively by <= gamma_prob(N) / 2 + u (a sum of squares, no cancellation); the
        # subtraction and division round each z by 2u. The check sums in float64 (its own error is negligible).
        z, n, u = xtr.double(), xtr.numel(), unit_roundoff()
        assert float(z.min()) < 0
        g = gamma_prob(n)
        assert abs(float(z.mean())) <= g * -float(z.min()) + 2 * u * float(z.abs().mean())
        assert abs(float(z.std()) - 1) <= g / 2 + 4 * u


@pytest.mark.parametrize("name", ["digits", "mnist1d"])
def test_split_deterministic_and_disjoint(name):
    a, b, c = load_dataset(name, seed=0), load_dataset(name, seed=0), load_dataset(name, seed=1)
    for x, y in zip(a.train.tensors + a.test.tensors, b.train.tensors + b.test.tensors):
        assert torch.equal(x, y)
    assert not torch.equal(a.train.tensors[0], c.train.tensors[0])
    # no sample shared by train and test (rows are distinct in these datasets)
    tr = {tuple(r) for r in a.train.tensors[0].flatten(1).numpy().round(5).tolist()}
    te = {tuple(r) for r in a.test.tensors[0].flatten(1).numpy().round(5).tolist()}
    assert not tr & te


def test_load_is_fresh_copy_and_side_effect_free():
    s = load_dataset("digits")
    s.train.tensors[0].zero_()  # caller mutates its tensors...
    assert load_dataset("digits").train.tensors[0].abs().sum() > 0  # ...the cache is unaffected
    np.random.seed(123)
    random.seed(123)
    expect_np, expect_py = np.random.rand(), random.random()
    np.random.seed(123)
    random.seed(123)
    load_dataset("mnist1d")  # mnist1d's generator reseeds global RNGs; we restore them
    assert np.random.rand() == expect_np and random.random() == expect_py


def test_digits32_is_upscaled_digits():
    a, b = load_dataset("digits"), load_dataset("digits32")
    assert torch.equal(a.train.tensors[1], b.train.tensors[1])
    # upscaled images keep the ordering of mean intensity per sample
    ma, mb = a.train.tensors[0].mean(1), b.train.tensors[0].mean((1, 2, 3))
    assert np.corrcoef(ma.numpy(), mb.numpy())[0, 1] > 0.99


def test_text_dataset():
    sents, labels = text_corpus()
    assert len(sents) >= 1000 and len(set(s.lower() for s in sents)) == len(sents)
    assert all(s[0].isupper() and s.endswith(".") and s.isascii() for s in sents)
    s = load_dataset("text", seed=0)
    assert len(s.train_texts) == len(s.train) and len(s.test_texts) == len(s.test)
    assert len(s.train) + len(s.test) == len(sents)
    assert not set(s.train_texts) & set(s.test_texts)
    idx, y = s.train[5]
    assert s.train_texts[int(idx)] in sents and labels[sents.index(s.train_texts[int(idx)])] == int(y)
    assert load_texts() == list(sents)
    assert load_texts(10, seed=3) == load_texts(10, seed=3) != load_texts(10, seed=4)
    with pytest.raises(ValueError, match="exceeds"):
        load_texts(10**6)


def test_unknown_dataset_error():
    with pytest.raises(ValueError, match="unknown dataset 'nope'.*digits"):
        load_dataset("nope")


def test_stratified_split_edge_cases():
    tr, te = stratified_split(np.array([0, 0, 0, 1]), 0.5, seed=0)  # singleton class stays in train
    assert 3 in tr and len(te) in (1, 2) and not set(tr) & set(te)
    assert sorted(np.concatenate([tr, te]).tolist()) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="test_fraction"):
        stratified_split(np.array([0, 1]), 1.0, seed=0)


def test_calibration_subset_counts_and_determinism():
    ds = load_dataset("digits").train
    c = calibration_subset(ds, per_class=7, seed=0)
    assert torch.equal(torch.bincount(c.tensors[1]), torch.full((10,), 7))
    c2 = calibration_subset(ds, per_class=7, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(c.tensors, c2.tensors))
    assert not torch.equal(c.tensors[0], calibration_subset(ds, per_class=7, seed=1).tensors[0])
    # fewer samples than per_class: all of them
    small = TensorDataset(torch.randn(5, 2), torch.tensor([0, 0, 0, 1, 2]))
    out = calibration_subset(small, per_class=2)
    assert torch.bincount(out.tensors[1]).tolist() == [2, 1, 1]
    with pytest.raises(ValueError, match="per_class"):
        calibration_subset(small, per_class=0)
    with pytest.raises(ValueError, match="empty"):
        calibration_subset(TensorDataset(torch.zeros(0, 2), torch.zeros(0, dtype=torch.long)))


def test_user_pt_npz_roundtrip(tmp_path):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(50, 3, 4, generator=g), torch.arange(50) % 5
    torch.save({"x": x, "y": y}, tmp_path / "d.pt")
    torch.save((x, y), tmp_path / "t.pt")
    np.savez(tmp_path / "n.npz", x=x.numpy(), y=y.numpy())
    ref = load_tensors(tmp_path / "d.pt", seed=0)
    assert ref.input_shape == (3, 4) and ref.num_classes == 5 and len(ref.train) + len(ref.test) == 50
    for p in ("t.pt", "n.npz"):
        s = load_tensors(tmp_path / p, seed=0)
        assert all(torch.equal(a, b) for a, b in zip(s.train.tensors + s.test.tensors,
                                                     ref.train.tensors + ref.test.tensors))
    # the union of the splits is exactly the original data
    allx = torch.cat([ref.train.tensors[0], ref.test.tensors[0]])
    assert sorted(map(tuple, allx.flatten(1).tolist())) == sorted(map(tuple, x.flatten(1).tolist()))
    # load_dataset finds user files via root
    s = load_dataset("n", root=str(tmp_path))
    assert torch.equal(s.test.tensors[0], ref.test.tensors[0])


def test_user_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_tensors(tmp_path / "missing.pt")
    (tmp_path / "bad.pt").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="bad.pt.*corrupt"):
        load_tensors(tmp_path / "bad.pt")
    (tmp_path / "bad.npz").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="bad.npz.*corrupt"):
        load_tensors(tmp_path / "bad.npz")
    np.savez(tmp_path / "empty.npz", x=np.zeros((0, 3)), y=np.zeros(0, dtype=np.int64))
    with pytest.raises(ValueError, match="empty"):
        load_tensors(tmp_path / "empty.npz")
    torch.save({"x": torch.zeros(4, 2), "y": torch.zeros(3, dtype=torch.long)}, tmp_path / "mis.pt")
    with pytest.raises(ValueError, match="mis.pt.*4 samples.*3 labels"):
        load_tensors(tmp_path / "mis.pt")
    np.savez(tmp_path / "nokeys.npz", a=np.zeros(3))
    with pytest.raises(ValueError, match="missing"):
        load_tensors(tmp_path / "nokeys.npz")
    torch.save({"x": torch.zeros(4, 2), "y": torch.rand(4)}, tmp_path / "floaty.pt")
    with pytest.raises(ValueError, match="integer class"):
        load_tensors(tmp_path / "floaty.pt")
    (tmp_path / "d.csv").write_text("1,2")
    with pytest.raises(ValueError, match="unsupported"):
        load_tensors(tmp_path / "d.csv")


def test_image_folder(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for c, level in (("cat", 40), ("dog", 200)):
        (tmp_path / "imgs" / c).mkdir(parents=True)
        for i in range(6):
            arr = np.clip(rng.normal(level, 10, (10, 12)), 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(tmp_path / "imgs" / c / f"{i}.png")
    s = load_image_folder(tmp_path / "imgs", size=8, seed=0)
    assert s.input_shape == (1, 8, 8) and s.num_classes == 2 and len(s.train) + len(s.test) == 12
    xtr, ytr = s.train.tensors
    assert xtr[ytr == 1].mean() > xtr[ytr == 0].mean()  # dog images are brighter
    assert load_image_folder(tmp_path / "imgs", size=(8, 6), channels=3).input_shape == (3, 8, 6)
    (tmp_path / "imgs" / "dog" / "broken.png").write_bytes(b"nope")
    with pytest.raises(ValueError, match="broken.png"):
        load_image_folder(tmp_path / "imgs", size=8)
    (tmp_path / "none" / "a").mkdir(parents=True)
    with pytest.raises(ValueError, match="no images"):
        load_image_folder(tmp_path / "none", size=8)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_image_folder(tmp_path / "nowhere", size=8)
