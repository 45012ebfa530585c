"""Every command reads what every other command writes: files and run folders, through one model resolver."""
from __future__ import annotations

import json

import pytest
import torch

import thrifty as th
from thrifty.cli import main
from thrifty.models import create
from thrifty.nn import is_gemm
from thrifty.train import save_model


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A trained-looking mlp on digits, quantized by ``thrifty quantize`` into a run folder."""
    root = tmp_path_factory.mktemp("runs")
    torch.manual_seed(0)
    kw = {"in_features": 64, "num_classes": 10}
    save_model(create("mlp", **kw), root / "fp" / "model", {"model": "mlp", "model_kwargs": kw, "dataset": "digits"})
    assert main(["quantize", "--model", str(root / "fp"), "--bits", "4", "--pipeline", "rtn", "--estimator", "minmax",
                 "--calib-per-class", "2", "--out", str(root / "q")]) == 0
    return root


def test_quantize_output_is_read_by_load_eval_sparsify_merge_bench(runs, capsys):
    q = th.load(runs / "q")  # the run folder
    assert is_gemm(q.fc1) and q.fc2.slots.weight.bits == 4  # (first and last layer: 8 bits)
    report = json.loads((runs / "q" / "report.json").read_text())
    x = torch.randn(4, 64)
    assert torch.equal(q(x), th.load(runs / "q" / "model.safetensors")(x))
    meta = (runs / "q" / "model.yaml").read_text()
    assert "command: thrifty quantize" in meta and str(runs / "fp" / "model.safetensors") in meta

    assert main(["eval", str(runs / "q")]) == 0
    out = json.loads((runs / "q" / "eval" / "eval.json").read_text())
    assert out["rows"][0]["acc"] == pytest.approx(report["test_acc"], abs=0)  # the same model, the same numbers

    assert main(["sparsify", "--model", str(runs / "q"), "--nm", "2:4", "--calib-per-class", "2", "--no-bn",
                 "--out", str(runs / "s")]) == 0
    s = th.load(runs / "s")
    assert float(s.fc1.effective_weight().ne(0).float().mean()) <= 0.5

    assert main(["merge", "--models", str(runs / "q"), str(runs / "fp"), "--method", "average",
                 "--data-per-task", "4", "--out", str(runs / "m")]) == 0
    assert "wrapped (quantized / sparse) layers" in capsys.readouterr().err
    assert th.load(runs / "m")(x).shape == (4, 20)

    from thrifty.bench.api import load_workload

    wl = load_workload(str(runs / "q"), max_samples=8)
    assert torch.equal(wl.model(x), q(x))


def test_model_argument_errors(runs, capsys):
    assert main(["eval", str(runs / "nowhere")]) == 2
    assert "saved model file not found" in capsys.readouterr().err
    assert main(["quantize", "--model", "mlp", "--out", str(runs / "x")]) == 2
    assert "--model mlp is a registry name: give --dataset" in capsys.readouterr().err
    save_model(create("mlp", in_features=64, num_classes=10), runs / "two" / "a",
               {"model": "mlp", "model_kwargs": {"in_features": 64, "num_classes": 10}, "dataset": "digits"})
    save_model(create("mlp", in_features=64, num_classes=10), runs / "two" / "b",
               {"model": "mlp", "model_kwargs": {"in_features": 64, "num_classes": 10}, "dataset": "digits"})
    assert main(["eval", str(runs / "two")]) == 2
    assert "several saved models: a.safetensors, b.safetensors" in capsys.readouterr().err


def test_registry_name_announces_the_baseline_it_trains(tmp_path, monkeypatch, capsys):
    from thrifty.train import recipes

    monkeypatch.setenv("THRIFTY_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(recipes.RECIPES, ("mlp", "digits"), ({}, recipes.TrainConfig(optim={"steps": 2,
                                                                                            "batch_size": 16})))
    args = ["sparsify", "--model", "mlp", "--dataset", "digits", "--calib-per-class", "2", "--no-bn"]
    assert main(args + ["--out", str(tmp_path / "a")]) == 0
    err = capsys.readouterr().err
    assert "--model mlp names an architecture, not trained weights: training its digits baseline first (2 steps" in err
    from thrifty.cli._common import announce_baseline

    assert not announce_baseline("mlp", "digits")  # cached now: nothing to announce
    assert capsys.readouterr().err == ""


def test_summary_prints_accuracies_as_percent_and_says_when_a_target_is_missed():
    from thrifty.demo import TARGET_SECONDS, _summary

    results = {"train": {"test_acc": 0.9814471243042672, "steps": 10, "train_seconds": 1.0},
               "env": {"threads": 2, "quick": False}, "history": {"records": []},
               "total_seconds": TARGET_SECONDS + 0.5,
               "stages": {"quantize": {"w4a8_advanced_acc": 0.9721, "size_fraction": 0.15791234, "seconds": 12.0}}}
    md = _summary(results)
    assert "0.98144" not in md and "**98.14%**" in md and "| w4a8_advanced_acc | 97.21% |" in md
    assert "| size_fraction | 0.1579 |" in md
    assert f"target < {TARGET_SECONDS:.0f} s: NOT met" in md
    results["total_seconds"] = TARGET_SECONDS - 1
    assert f"target < {TARGET_SECONDS:.0f} s: met" in _summary(results)


class _Seen(Exception):
    pass


def _record_progress(*args, progress=None, **kwargs):
    raise _Seen(progress)


@pytest.mark.parametrize("stage, patch", [("quantize", "thrifty.quant.quantize"),
                                          ("datafree", "thrifty.datafree.synthesize"),
                                          ("bench", "thrifty.quant.quantize")])
@pytest.mark.parametrize("show", [True, False])
def test_demo_stages_follow_the_progress_policy(stage, patch, show, monkeypatch, tmp_path):
    from thrifty.data import load_dataset
    from thrifty.demo import DemoContext, stages

    monkeypatch.setattr(patch, _record_progress)
    fn = {name: f for name, _, f in stages()}[stage]
    ctx = DemoContext(create("mlp", in_features=64, num_classes=10), load_dataset("digits", seed=0), tmp_path,
                      quick=True, seed=0, results={"train": {"test_acc": 0.5}}, progress=show)
    with pytest.raises(_Seen) as seen:
        fn(ctx)
    assert seen.value.args[0] is show


def test_bench_announces_the_resnet20_baseline_it_would_train(tmp_path, monkeypatch, capsys):
    import thrifty.bench.api

    def stop(*args, **kwargs):
        raise ValueError("stopped before any work")

    monkeypatch.setenv("THRIFTY_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(thrifty.bench.api, "load_workload", stop)
    assert main(["bench", "--model", "resnet20", "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert "--model resnet20 names an architecture, not trained weights: training its digits32 baseline" in err
