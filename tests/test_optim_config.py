"""The shared optimisation hyper-parameters (``OptimConfig``) nested in every config that trains something:
each owner's defaults are the numbers it had before the fields moved, older YAML files (flat ``lr:`` /
``steps:``) still read, the old keywords and CLI flags still work for one release, and a dict for a nested
config changes only the keys it names (in Python, YAML and on the command line alike).

Parsing and tiny runs only; nothing is trained beyond a few steps."""
from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
from torch.utils.data import TensorDataset

import thrifty as th
from thrifty.cli import _common, build_parser
from thrifty.core import CONFIGS, OptimConfig, from_dict, from_yaml, import_config_modules, to_yaml, with_overrides

import_config_modules()
OWNERS = sorted(k for k, c in CONFIGS.items() if any(f.name == "optim" for f in dataclasses.fields(c)))

# each owner's (steps, lr, batch_size, weight_decay) before the fields moved into ``optim`` (Synth had no
# weight decay: Adam's default 0)
BEFORE = {"FSMerge": (300, 1e-2, 64, 0.0), "DistillMerge": (300, 1e-3, 64, 0.0), "Synth": (60, 0.4, 256, 0.0),
          "TrainConfig": (0, 0.1, 128, 5e-4)}

# a file each owner's previous version wrote (flat keys), and what it holds now
OLD_YAML = {
    "FSMerge": ("kind: FSMerge\nversion: 2\nparam: diagonal\nsteps: 40\nlr: 0.05\nbatch_size: 16\naugment: 2\n",
                {"param": "diagonal", "augment": 2}, {"steps": 40, "lr": 0.05, "batch_size": 16}),
    "DistillMerge": ("kind: DistillMerge\nversion: 1\nsteps: 12\nweight_decay: 0.01\nprogress: false\n"
                     "temperature: 3.0\n", {"temperature": 3.0}, {"steps": 12, "weight_decay": 0.01}),
    "Synth": ("kind: Synth\nversion: 1\nmethod: inception\nsteps: 9\nlr: 0.1\nbatch_size: 32\nupsample: 1\n",
              {"method": "inception", "upsample": 1}, {"steps": 9, "lr": 0.1, "batch_size": 32}),
    "TrainConfig": ("kind: TrainConfig\nversion: 1\nepochs: 3\nsteps: 0\nbatch_size: 16\nlr: 0.05\n"
                    "optimizer: adamw\nweight_decay: 0.01\n", {"epochs": 3, "optimizer": "adamw"},
                    {"steps": 0, "batch_size": 16, "lr": 0.05, "weight_decay": 0.01}),
}
# owner -> (command, required options, role in build_configs, flag prefix of its fields)
CLI = {"FSMerge": ("merge", ["--models", "a", "b"], "merge", ""),
       "DistillMerge": ("merge", ["--models", "a", "b", "--method", "distill"], "merge", ""),
       "Synth": ("quantize", ["--model", "m", "--data-free", "bns"], "synth", "synth-"),
       "TrainConfig": ("train", ["--model", "mlp", "--dataset", "digits"], "train", "")}


def test_the_owners_are_the_configs_the_issue_names():
    assert OWNERS == sorted(BEFORE) == sorted(OLD_YAML) == sorted(CLI)


@pytest.mark.parametrize("kind", OWNERS)
def test_defaults_are_the_numbers_each_config_had(kind):
    assert CONFIGS[kind]().optim == OptimConfig(*BEFORE[kind])


@pytest.mark.parametrize("kind", OWNERS)
def test_older_yaml_with_flat_keys_reads_into_optim(kind):
    text, own, optim = OLD_YAML[kind]
    cls = CONFIGS[kind]
    cfg = from_yaml(text, "old.yaml")
    expected = cls().replace(**own, optim=optim)
    assert cfg == expected
    assert dataclasses.asdict(cfg.optim) == {**dataclasses.asdict(cls().optim), **optim}  # others: the owner's
    assert from_yaml(to_yaml(cfg)) == cfg and f"version: {cls.version}" in to_yaml(cfg)


@pytest.mark.parametrize("kind", OWNERS)
def test_a_partial_optim_mapping_keeps_the_owners_defaults(kind):
    cls = CONFIGS[kind]
    cfg = from_yaml(f"kind: {kind}\noptim: {{lr: 0.125}}\n")
    assert cfg.optim == cls().optim.replace(lr=0.125) == cls(optim={"lr": 0.125}).optim
    assert cls().replace(optim={"lr": 0.125}) == cfg


@pytest.mark.parametrize("kind", OWNERS)
def test_old_keywords_warn_and_reading_them_names_the_new_place(kind):
    cls = CONFIGS[kind]
    with pytest.warns(DeprecationWarning, match=rf"{kind}\(lr=\.\.\.\): moved to {kind}\.optim\.lr"):
        old = cls(lr=0.125)
    assert old == cls(optim={"lr": 0.125})
    with pytest.warns(DeprecationWarning):
        assert cls().replace(steps=7).optim.steps == 7
    with pytest.raises(AttributeError, match=rf"{kind}\.lr moved to {kind}\.optim\.lr"):
        cls().lr
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)  # a pipeline's own keyword overrides do not warn
        assert with_overrides(cls(), lr=0.125) == old
    with pytest.raises(ValueError, match="lr is now optim.lr"):
        from_yaml(f"kind: {kind}\nlr: 0.1\n")  # a current-version file with a flat key


@pytest.mark.parametrize("kind", OWNERS)
def test_old_cli_flag_is_an_alias_of_the_nested_one(kind, capsys):
    cmd, required, role, prefix = CLI[kind]
    import importlib

    build = importlib.import_module(f"thrifty.cli.{cmd}").build_configs
    new = build(_common.parse_with_config(build_parser(), [cmd, *required, f"--{prefix}optim.lr", "0.125"]))[role]
    capsys.readouterr()
    old = build(_common.parse_with_config(build_parser(), [cmd, *required, f"--{prefix}lr", "0.125"]))[role]
    assert f"--{prefix}lr is deprecated" in capsys.readouterr().err
    assert old == new and new.optim.lr == 0.125
    # the other optim fields keep the command's base (the owner's default, or the training recipe's)
    base = build(_common.parse_with_config(build_parser(), [cmd, *required]))[role]
    assert new.optim == base.optim.replace(lr=0.125)


def test_help_shows_each_owners_default():
    text = _common._subparser(build_parser(), "merge").format_help()
    assert "--optim.lr" in text and "FSMerge 0.01" in text and "DistillMerge 0.001" in text


def test_optim_validation_names_the_field_and_the_owner():
    with pytest.raises(ValueError, match=r"FSMerge\.optim\.lr: invalid value 0\.0"):
        th.merge.FSMerge(optim={"lr": 0.0})
    with pytest.raises(TypeError, match="FSMerge.optim: .*learning_rate"):
        th.merge.FSMerge(optim={"learning_rate": 0.1})
    with pytest.raises(ValueError, match=r"TrainConfig\.optim\.batch_size: invalid value 0"):
        from_dict({"kind": "TrainConfig", "optim": {"batch_size": 0}})
    with pytest.raises(ValueError, match="Synth.optim.steps must be >= 1"):
        th.datafree.Synth(optim={"steps": 0})


def test_a_checkpoint_of_the_older_version_resumes(tmp_path):
    """``fit(resume=True)`` compares the saved TrainConfig with the current one: a version-1 checkpoint of the
    same recipe resumes, a different lr is still refused."""
    import json

    from thrifty.train import CheckpointError, fit
    from thrifty.train.checkpoint import load_checkpoint, save_checkpoint
    from thrifty.train.recipes import flat_train_config

    x = torch.randn(32, 4)
    ds = TensorDataset(x, (x[:, 0] > 0).long())
    cfg = th.train.TrainConfig(optim={"steps": 4, "batch_size": 8})
    model = torch.nn.Linear(4, 2)
    fit(model, cfg, ds, ckpt_dir=tmp_path, progress=False, callbacks=[lambda s: setattr(s, "stop", s.step == 2)])
    ckpt = tmp_path / "last.safetensors"
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    info = load_checkpoint(ckpt, model, opt)
    save_checkpoint(ckpt, model, opt, info["step"], {**info["extra"], "cfg": json.dumps(flat_train_config(cfg))})
    assert fit(model, cfg, ds, ckpt_dir=tmp_path, resume=True, progress=False).final["step"] == 4
    with pytest.raises(CheckpointError, match="optim"):
        fit(model, cfg.replace(optim={"lr": 0.5}), ds, ckpt_dir=tmp_path, resume=True, progress=False)
