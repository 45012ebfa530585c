"""Pieces shared across techniques: revert-if-worse, the progress policy, YAML-safe plain data."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import yaml

from thrifty.core import Outcome, from_dict, keep_if_better, to_dict
from thrifty.merge import DistillMerge, FSMerge
from thrifty.utils import plain_data, show_progress


def _weight_sum(layer: nn.Module):
    return lambda: float(layer.weight.detach().sum())


@pytest.mark.parametrize("scale,strict,kept", [(0.5, False, True), (2.0, False, False), (1.0, False, True),
                                               (1.0, True, False), (0.5, True, True)])
def test_keep_if_better_keeps_or_restores(scale, strict, kept):
    layer = nn.Linear(3, 2)
    with torch.no_grad():
        layer.weight.copy_(torch.rand(2, 3) + 0.1)  # positive: scaling by s scales the sum by s
    w0, p0 = layer.weight.detach().clone(), layer.weight
    reverted: list[str] = []
    with keep_if_better(layer, _weight_sum(layer), strict=strict, stage="scale", reverted=reverted) as out:
        with torch.no_grad():
            layer.weight.mul_(scale)
    assert out.kept is kept and reverted == ([] if kept else ["scale"])
    assert layer.weight is p0  # restored in place: optimizers holding it stay valid
    assert torch.equal(layer.weight, w0 * scale if kept else w0)
    assert out.after == (float((w0 * scale).sum()) if kept else out.before)


def test_keep_if_better_reverts_nan_and_errors_and_tensor_lists():
    w = torch.ones(4)
    with keep_if_better([w], lambda: float(w.sum())) as out:
        w[0] = math.nan
    assert not out.kept and torch.equal(w, torch.ones(4))
    with pytest.raises(RuntimeError, match="boom"):
        with keep_if_better([w], lambda: float(w.sum()), before=10.0):
            w.zero_()
            raise RuntimeError("boom")
    assert torch.equal(w, torch.ones(4))
    assert Outcome(before=1.0).kept


def test_adaprune_reports_reverted_layers():
    from thrifty.sparse import NM, adaprune

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    # lr so large that the reconstruction gets worse: AdaPrune must fall back to magnitude pruning
    report = adaprune(model, NM(2, 4), torch.randn(64, 8), steps=5, lr=1e3, progress=False)
    assert all(r["reverted"] and r["mse_after"] == r["mse_before"] for r in report.values())


def test_show_progress_policy(monkeypatch):
    monkeypatch.setenv("THRIFTY_PROGRESS", "1")
    assert show_progress() and not show_progress(False)
    monkeypatch.setenv("THRIFTY_PROGRESS", "0")
    assert not show_progress() and show_progress(True)
    monkeypatch.delenv("THRIFTY_PROGRESS")
    assert show_progress() is False  # pytest's captured stderr is no terminal


@pytest.mark.parametrize("cls", [FSMerge, DistillMerge])
def test_progress_is_no_config_field(cls):
    assert "progress" not in to_dict(cls())
    old = {**to_dict(cls()), "version": 1, "progress": False}  # a file written before the field went
    assert from_dict(old) == cls()
    with pytest.raises(ValueError, match="unknown field"):
        from_dict({**to_dict(cls()), "progress": False})
    with pytest.warns(DeprecationWarning, match="progress"):
        cfg = cls(progress=False)
    assert cfg == cls()


def test_plain_data_is_yaml_safe(tmp_path):
    class Version(str):
        pass

    data = {1: (np.float64(0.25), np.int64(3), np.bool_(True)), "p": tmp_path / "x", "t": torch.tensor(2.5),
            "v": Version("2.1"), "big": torch.zeros(2), "none": None}
    out = plain_data(data)
    assert out == {"1": [0.25, 3, True], "p": str(tmp_path / "x"), "t": 2.5, "v": "2.1", "big": str(torch.zeros(2)),
                   "none": None}
    assert yaml.safe_load(yaml.safe_dump(out)) == out


def test_save_model_meta_with_a_path(tmp_path):
    from thrifty.models import create
    from thrifty.train import load_model, save_model

    model = create("mlp", in_features=4, hidden=(8,), num_classes=2)
    save_model(model, tmp_path / "m", {"model": "mlp", "model_kwargs": {"in_features": 4, "hidden": (8,),
                                                                         "num_classes": 2}, "data": Path("d")})
    _, meta = load_model(tmp_path / "m")
    assert meta["data"] == "d"
