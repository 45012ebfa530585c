"""`thrifty merge` end to end: saved models in, a saved merged model out that loads and evaluates."""
from __future__ import annotations

import json

import pytest
import torch

from thrifty.cli import main
from thrifty.models import create
from thrifty.train import load_model, save_model


@pytest.fixture(autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _save(tmp_path, name: str, seed: int, hidden=(32,), classes: int = 10) -> str:
    torch.manual_seed(seed)
    kw = {"in_features": 64, "hidden": list(hidden), "num_classes": classes}
    save_model(create("mlp", **kw), tmp_path / name, {"model": "mlp", "model_kwargs": kw, "dataset": "digits"})
    return str(tmp_path / name)


@pytest.mark.parametrize("method", ["fs-merge", "permute", "zip", "average", "distill"])
def test_merge_cli_saves_a_loadable_model(tmp_path, capsys, method: str) -> None:
    a, b = _save(tmp_path, "a", 0, classes=5), _save(tmp_path, "b", 1, classes=5)
    before = open(a + ".safetensors", "rb").read()
    out = tmp_path / "merged"
    steps = ["--optim.steps", "3"] if method in ("fs-merge", "distill") else []  # the others have no steps
    rc = main(["merge", "--models", a, b + ".safetensors", "--method", method, "--data-per-task", "16",
               *steps, "--classes", "0,1,2,3,4", "5,6,7,8,9", "--out", str(out)])
    assert rc == 0
    assert "relative" in capsys.readouterr().out
    model, meta = load_model(out / "model")
    assert meta["task_slices"] == [[0, 5], [5, 10]] and model.head.out_features == 10
    assert len(json.loads((out / "merge.json").read_text())["per_task_acc"]) == 2
    assert open(a + ".safetensors", "rb").read() == before
    assert main(["eval", str(out / "model"), "--out", str(tmp_path / "ev")]) == 0


def test_merge_cli_errors(tmp_path, capsys) -> None:
    a, b = _save(tmp_path, "a", 0), _save(tmp_path, "c", 2, hidden=(16,))
    assert main(["merge", "--models", a, b, "--data-per-task", "8", "--out", str(tmp_path / "x")]) == 2
    assert "fc1.weight" in capsys.readouterr().err
    a2 = _save(tmp_path, "a2", 3)
    assert main(["merge", "--models", a, a2, "--data-per-task", "100000", "--out", str(tmp_path / "x")]) == 2
    assert "too many" in capsys.readouterr().err
    assert main(["merge", "--models", a, "--out", str(tmp_path / "x")]) == 2
    assert main(["merge", "--models", a, a2, "--classes", "0,1", "--out", str(tmp_path / "x")]) == 2
    assert not (tmp_path / "x" / "model.safetensors").exists()
