"""``thrifty sparsify``: saved model in, N:M model + compressed weights + report out; clear errors."""
from __future__ import annotations

import json

import torch
import yaml

from thrifty.cli import main
from thrifty.models import create
from thrifty.ops import nm as nmops
from thrifty.sparse import load_sparse
from thrifty.train import load_model, model_kwargs_for, save_model


def _saved_mlp(tmp_path):
    torch.manual_seed(0)
    kw = model_kwargs_for("mlp", (64,), 10)
    stem = tmp_path / "dense"
    save_model(create("mlp", **kw), stem, {"model": "mlp", "model_kwargs": kw, "dataset": "digits"})
    return stem


def test_sparsify_cli_transposable_adaprune(tmp_path, capsys):
    stem, out = _saved_mlp(tmp_path), tmp_path / "out"
    assert main(["sparsify", "--model", str(stem), "--nm", "4:8", "--transposable", "--method", "approx",
                 "--adaprune", "--adaprune-steps", "3", "--calib-per-class", "2", "--finetune-epochs", "0.2",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "T4:8" in printed and "stored" in printed
    report = json.loads((out / "report.json").read_text())
    assert set(report["layer_density"]) == {"fc1", "fc2", "head"}
    assert report["storage"]["stored_bytes"] < 0.6 * report["storage"]["dense_bytes"]
    model, meta = load_model(out / "model")
    assert meta["sparsity"]["config"]["kind"] == "NM" and meta["sparsity"]["adaprune"]
    for name in ("fc1", "fc2", "head"):
        w = getattr(model, name).effective_weight()  # the saved model keeps its masks
        assert nmops.is_transposable(w, 4, 8)
        assert torch.equal(load_sparse(out / "model.nm.safetensors")[f"{name}.weight"], w)
    saved = yaml.safe_load((out / "config.yaml").read_text())["sparsity"]
    assert saved["kind"] == "NM" and (saved["n"], saved["m"], saved["method"]) == (4, 8, "approx")


def test_sparsify_cli_errors(tmp_path, capsys):
    stem = _saved_mlp(tmp_path)
    assert main(["sparsify", "--model", str(stem), "--nm", "4:4", "--out", str(tmp_path / "o")]) == 2
    assert "N < M" in capsys.readouterr().err
    assert main(["sparsify", "--model", str(stem), "--nm", "two:four"]) == 2
    assert "--nm" in capsys.readouterr().err
    assert main(["sparsify", "--model", str(tmp_path / "nope"), "--nm", "2:4"]) == 2
    assert "neither a saved model" in capsys.readouterr().err
    assert main(["sparsify", "--model", str(stem), "--filter", "fc9", "--out", str(tmp_path / "o2")]) == 2
    assert not (tmp_path / "o2").exists()
