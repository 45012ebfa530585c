"""The thrifty CLI: discovery, train/eval/demo smoke runs, --config YAML defaults, resolved configs."""
from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

import thrifty as th
from thrifty.cli import build_parser, main


def test_subcommands_are_discovered():
    choices = next(a for a in build_parser()._actions if a.dest == "command").choices
    assert {"train", "eval", "demo"} <= set(choices)
    assert all(any(x.dest == "config" for x in p._actions) for p in choices.values())


def test_train_then_eval(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--model", "mlp", "--dataset", "digits", "--optim.steps", "30", "--optim.batch-size", "64",
                 "--optim.lr", "0.05", "--out", str(out)]) == 0
    for name in ("model.safetensors", "model.yaml", "history.json", "config.yaml", "ckpt/last.safetensors"):
        assert (out / name).is_file(), name
    meta = yaml.safe_load((out / "model.yaml").read_text())
    assert meta["model"] == "mlp" and meta["dataset"] == "digits" and meta["test_acc"] > 0.8
    assert main(["eval", str(out / "model")]) == 0
    assert f"acc {100 * meta['test_acc']:.2f}%" in capsys.readouterr().out
    ev = json.loads((out / "eval" / "eval.json").read_text())
    assert ev["rows"][0]["acc"] == pytest.approx(meta["test_acc"])
    assert (out / "eval" / "config.yaml").is_file()


def test_config_file_defaults_and_flag_override(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"model": "mlp", "dataset": "digits", "steps": 3, "lr": 0.5, "batch-size": 16}))
    out = tmp_path / "run"
    assert main(["train", "--config", str(cfg), "--optim.lr", "0.01", "--out", str(out)]) == 0
    res = yaml.safe_load((out / "config.yaml").read_text())
    train = res["train"]  # the TrainConfig as thrifty.to_yaml writes it; options such as model stay flat
    assert train["kind"] == "TrainConfig" and res["model"] == "mlp"
    optim = train["optim"]
    assert optim["lr"] == 0.01 and optim["steps"] == 3 and optim["batch_size"] == 16
    assert train["epochs"] == th.train.recipe("mlp", "digits")[1].epochs  # effective recipe values are filled in
    # the resolved config repeats the run
    assert main(["train", "--config", str(out / "config.yaml"), "--out", str(tmp_path / "again")]) == 0
    again = yaml.safe_load((tmp_path / "again" / "config.yaml").read_text())
    assert {k: v for k, v in again.items() if k != "out"} == {k: v for k, v in res.items() if k != "out"}


def test_config_file_errors(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: mlp\nlearning_rate: 0.1\n")
    assert main(["train", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "learning_rate" in err and "bad.yaml" in err
    assert main(["train", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml" in capsys.readouterr().err


def test_eval_missing_model(tmp_path, capsys):
    assert main(["eval", str(tmp_path / "nothing")]) == 2
    assert "nothing.safetensors" in capsys.readouterr().err


def test_resume_via_cli(tmp_path):
    out = str(tmp_path / "r")
    args = ["train", "--model", "mlp", "--dataset", "digits", "--optim.steps", "6", "--optim.batch-size", "32", "--out", out]
    assert main(args) == 0
    first = load_file(tmp_path / "r" / "model.safetensors")
    assert main(args + ["--resume"]) == 0  # nothing left to do: same weights
    again = load_file(tmp_path / "r" / "model.safetensors")
    assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first)


def test_demo_quick(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out), "--only", "evaluate"]) == 0
    for name in ("results.json", "summary.md", "training_curve.png", "config.yaml"):
        assert (out / name).is_file(), name
    res = json.loads((out / "results.json").read_text())
    assert res["train"]["model"] == "resnet20" and "evaluate" in res["stages"]
    assert res["stages"]["evaluate"]["test_acc"] == pytest.approx(res["train"]["test_acc"])
    assert "test acc" in capsys.readouterr().out
    # the trained model is in the report folder, which every command takes as a model
    assert main(["eval", str(out)]) == 0 and "resnet20 on digits32 [test]: acc " in capsys.readouterr().out
    assert yaml.safe_load((out / "model.yaml").read_text())["test_acc"] == res["train"]["test_acc"]
