"""One YAML format: every config a command consumes round-trips through ``thrifty.to_yaml`` -> ``--config`` and
through its generated flags; every field of every registered config has help text (its CLI help).

Parsing only (``build_parser`` + each command's ``build_configs``): nothing is trained or loaded."""
from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib
import json
import typing
import warnings

import pytest
import torch
import yaml
from torch.utils.data import TensorDataset

import thrifty as th
from thrifty.cli import _common, build_parser, main
from thrifty.cli._fields import UNSET, Alias, add_config_flags, config_argv, config_from_args, field_docs
from thrifty.core import CONFIGS, Config, from_dict, import_config_modules, to_dict, to_yaml

import_config_modules()
KINDS = sorted(k for k, c in CONFIGS.items()
               if c.__module__.startswith("thrifty.") and c.__module__ != "thrifty.core.config")

_TRAIN = ["--model", "mlp", "--dataset", "digits"]
# kind -> (command, the command's required options, the config's role in build_configs / config.yaml)
CONSUMED = {
    "PTQ": ("quantize", ["--model", "m"], "ptq"),
    "Synth": ("quantize", ["--model", "m"], "synth"),
    "Distill": ("quantize", ["--model", "m"], "distill"),
    "NM": ("sparsify", ["--model", "m"], "sparsity"),
    "TrainConfig": ("train", _TRAIN, "train"),
    "Train8": ("train", _TRAIN, "train8"),
    "GradNM": ("train", _TRAIN, "grad"),
    "ActNM": ("train", _TRAIN, "act"),
    "FSMerge": ("merge", ["--models", "a", "b"], "merge"),
    "DistillMerge": ("merge", ["--models", "a", "b"], "merge"),
    "PermuteMerge": ("merge", ["--models", "a", "b"], "merge"),
    "ZipMerge": ("merge", ["--models", "a", "b"], "merge"),
    "AverageMerge": ("merge", ["--models", "a", "b"], "merge"),
    "BenchConfig": ("bench", ["--model", "m"], "bench"),
}
# registered configs no command builds, and why
NOT_ON_CLI = {
    "QuantConfig": "one layer's quantizers for thrifty.apply; `thrifty quantize` runs PTQ, which holds these fields",
    "AccumConfig": "a low-bit accumulator simulation studied in Python (experiments/accumulators.py), no command",
    "AugmentConfig": "the per-dataset augmentation of the training recipe, not a run option",
    "SignalAugmentConfig": "the per-dataset augmentation of the training recipe, not a run option",
    "EnsembleMerge": "keeps all K models; `thrifty merge` saves one merged model",
    "OptimConfig": "nested in TrainConfig, FSMerge, DistillMerge and Synth (their --optim.* flags), not a run on its own",
    "Plan": "per-layer configs that `thrifty plan` writes (plan.yaml) for thrifty.apply / quantize_plan; no "
            "command builds one from flags",
    "SparseQuant": "one layer's pruned-and-quantized choice inside a Plan (the int8-2:4 / int8-t4:8 candidates of "
                   "`thrifty plan --candidates`)",
}


def test_every_registered_config_is_consumed_or_listed_with_a_reason():
    assert set(CONSUMED) | set(NOT_ON_CLI) == set(KINDS)
    assert not set(CONSUMED) & set(NOT_ON_CLI)


@pytest.mark.parametrize("kind", KINDS)
def test_every_field_has_help(kind):
    cls = CONFIGS[kind]
    docs = field_docs(cls)
    missing = [f.name for f in dataclasses.fields(cls) if f.init and not docs.get(f.name)]
    assert not missing, f"{kind}: no help (docstring 'Args:' entry) for {missing}"
    assert not set(docs) - {f.name for f in dataclasses.fields(cls)}


def _candidates(tp, default):
    """Values other than ``default`` for a field annotated ``tp`` (the first valid ones are used)."""
    optional = typing.get_origin(tp) in (typing.Union, getattr(__import__("types"), "UnionType", None)) and \
        type(None) in typing.get_args(tp)
    base = next((a for a in typing.get_args(tp) if a is not type(None)), tp) if optional else tp
    out = []
    if typing.get_origin(base) is typing.Literal:
        out = [a for a in typing.get_args(base) if a != default]
    elif base is bool:
        out = [not default] if default is not None else [True, False]
    elif base is int:
        out = [1, 2, 4, 8, 16] if default is None else [default + 1, default * 2, default - 1, 3]
    elif base is float:
        out = [0.5, 2.0, 10.0] if default is None else [default * 2 or 0.5, default / 2, 0.25]
    elif typing.get_origin(base) is tuple and default:
        args = typing.get_args(base)
        out = [default[:1]] if len(args) == 2 and args[1] is Ellipsis else \
            [tuple(type(x)(x * 0.9) if isinstance(x, float) else x for x in default)]
    if optional and default is not None:
        out.append(None)
    return [v for v in out if v != default]


# fields the variation keeps: Synth's "gaussian" ignores the step fields, which `thrifty quantize` refuses
KEEP = {"Synth": {"method"}}


def _varied(cls, cfg=None):
    """A valid config with as many fields away from their defaults as validation allows (one at a time); a nested
    config (``optim``) is varied field by field too, from the outer config's default for it."""
    cfg, hints = cfg if cfg is not None else cls(), typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in KEEP.get(cls.__name__, ()):
            continue
        inner = getattr(cfg, f.name)
        if isinstance(inner, Config):
            cfg = dataclasses.replace(cfg, **{f.name: _varied(type(inner), inner)})
            continue
        for v in _candidates(hints[f.name], getattr(cfg, f.name)):
            try:
                cfg = dataclasses.replace(cfg, **{f.name: v})
                break
            except (ValueError, TypeError):
                continue
    return cfg


@functools.lru_cache(maxsize=1)
def _flags_parser():
    return build_parser()  # shared by the flag-only parses: only --config changes a parser's defaults


def _build(kind, argv):
    cmd, _, role = CONSUMED[kind]
    parser = build_parser() if "--config" in argv else _flags_parser()
    args = _common.parse_with_config(parser, argv)
    return importlib.import_module(f"thrifty.cli.{cmd}").build_configs(args)[role]


def _subparser(cmd):
    return _common._subparser(_flags_parser(), cmd)


@pytest.mark.parametrize("kind", sorted(CONSUMED))
def test_config_round_trips_through_yaml_and_flags(kind, tmp_path):
    cmd, required, _ = CONSUMED[kind]
    cls = CONFIGS[kind]
    for cfg in (cls(), _varied(cls)):
        f = tmp_path / "c.yaml"
        f.write_text(to_yaml(cfg))  # exactly what thrifty.to_yaml writes
        assert _build(kind, [cmd, *required, "--config", str(f)]) == cfg
        assert _build(kind, [cmd, *required, *config_argv(_subparser(cmd), cfg)]) == cfg
    varied = _varied(cls)
    changed = [f.name for f in dataclasses.fields(cls) if getattr(varied, f.name) != getattr(cls(), f.name)]
    assert not dataclasses.fields(cls) or changed, f"{kind}: no field could be varied"


def test_a_mapping_of_configs_with_options_and_explicit_flags(tmp_path):
    train = th.train.TrainConfig(optim={"steps": 7, "lr": 0.2}, milestones=(0.3,), nesterov=False)
    grad = th.sparse.GradNM(1, 4, method="mse", gemms=("weight",), seed=3)
    f = tmp_path / "run.yaml"
    f.write_text(yaml.safe_dump({"model": "mlp", "dataset": "digits", "train": to_dict(train),
                                 "grad": to_dict(grad), "t8": to_dict(th.Train8(bits=6, act_bits=7))}))
    parser = build_parser()
    args = _common.parse_with_config(parser, ["train", "--config", str(f), "--lr", "0.05", "--train8-grad-bits", "6"])
    from thrifty.cli.train import build_configs

    got = build_configs(args)
    assert got["train"] == train.replace(optim={"lr": 0.05})  # the explicit flag wins over the file
    assert got["grad"] == grad and got["act"] is None
    assert got["train8"] == th.Train8(bits=6, act_bits=7, grad_bits=6)
    # a list of configs is read the same way
    f.write_text(yaml.safe_dump([to_dict(train), to_dict(grad)]))
    got = build_configs(_common.parse_with_config(build_parser(), ["train", *_TRAIN, "--config", str(f)]))
    assert got["train"] == train and got["grad"] == grad


def test_written_config_yaml_is_kind_format_and_repeats_the_run(tmp_path):
    # what `thrifty train` writes next to its outputs (tests/test_cli.py runs it end to end)
    from thrifty.cli.train import build_configs

    args = _common.parse_with_config(build_parser(), ["train", *_TRAIN, "--optim.steps", "2", "--optim.batch-size", "16",
                                                      "--grad-nm", "2:4", "--grad-method", "mse", "--out", "o"])
    configs = build_configs(args)
    path = _common.write_resolved_config(tmp_path, args, configs=configs)
    saved = yaml.safe_load(path.read_text())
    assert saved["model"] == "mlp" and saved["out"] == "o" and "lr" not in saved  # fields live in their config
    assert from_dict(saved["grad"]) == th.sparse.GradNM(2, 4, method="mse") and "train8" not in saved
    train = from_dict(saved["train"])
    assert (train.optim.steps, train.optim.batch_size) == (2, 16)
    again = build_configs(_common.parse_with_config(build_parser(), ["train", "--config", str(path)]))
    assert again == configs


@pytest.mark.parametrize("text, needles", [
    ("kind: Nope\n", ["c.yaml", "'kind'", "unknown config kind 'Nope'"]),
    ("kind: TrainConfig\nlearning_rate: 0.1\n", ["c.yaml", "learning_rate"]),
    ("train: {kind: TrainConfig, optim: {lr: -1.0}}\n", ["c.yaml", "'train'", "TrainConfig.optim.lr: invalid value -1.0"]),
    ("train: {kind: TrainConfig, lr: 0.1}\n", ["c.yaml", "'train'", "lr is now optim.lr"]),
    ("x: {kind: NM, n: 2, m: 4}\n", ["c.yaml", "'x'", "no NM config", "TrainConfig"]),
    ("- kind: TrainConfig\n- 3\n", ["c.yaml", "list"]),
])
def test_bad_kind_yaml_is_one_line_naming_file_and_key(tmp_path, capsys, text, needles):
    f = tmp_path / "c.yaml"
    f.write_text(text)
    assert main(["train", *_TRAIN, "--config", str(f), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    for n in needles:
        assert n in err, (n, err)
    assert not (tmp_path / "o").exists()


@dataclasses.dataclass(frozen=True)
class _Inner(Config):
    """A nested config.

    Args:
        k: inner count.
    """

    k: int = 1


@dataclasses.dataclass(frozen=True)
class _Toy(Config):
    """A config exercising every annotation the generator maps.

    Args:
        bits: weight bits.
        act: activation bits; None is
            floating point.
        mode: one of three.
        sizes: a tuple.
        pair: two floats.
        on: a switch.
        auto: None decides itself.
        inner: a nested config.
    """

    bits: int = 4
    act: typing.Optional[int] = 8
    mode: typing.Literal["a", "b", "c"] = "a"
    sizes: tuple[int, ...] = (1, 2)
    pair: tuple[float, float] = (0.5, 1.5)
    on: bool = True
    auto: typing.Optional[bool] = None
    inner: _Inner = _Inner()

    def __post_init__(self) -> None:
        if self.bits < 2:
            raise ValueError(f"bits must be >= 2, got {self.bits}")


def _toy_parser(**kw):
    p = argparse.ArgumentParser(exit_on_error=False)
    add_config_flags(p, "toy", _Toy, zero_is_none=("act",), aliases={"--old-bits": Alias(("bits",)),
                                                                     "--off": Alias(("on",), const=False)}, **kw)
    return p


def test_generated_flags_types_help_and_back(capsys):
    p = _toy_parser()
    args = p.parse_args(["--bits", "8", "--act", "none", "--mode", "c", "--sizes", "3,4,5", "--pair", "1,2",
                         "--no-on", "--auto", "--inner.k", "7"])
    cfg = config_from_args(args, "toy")
    assert cfg == _Toy(bits=8, act=None, mode="c", sizes=(3, 4, 5), pair=(1.0, 2.0), on=False, auto=True,
                       inner=_Inner(7))
    assert config_from_args(p.parse_args(config_argv(p, cfg)), "toy") == cfg
    assert config_from_args(p.parse_args([]), "toy") == _Toy()
    assert config_from_args(p.parse_args(["--act", "0"]), "toy").act is None  # zero_is_none
    assert config_from_args(p.parse_args(["--old-bits", "6", "--off"]), "toy") == _Toy(bits=6, on=False)
    assert "--old-bits is deprecated" in capsys.readouterr().err
    text = p.format_help()
    for needle in ("weight bits. (default: 4)", "floating point", "{a,b,c}", "inner count", "--no-on"):
        assert needle in " ".join(text.split()), needle
    with pytest.raises(ValueError, match="^--bits: bits must be >= 2"):
        config_from_args(p.parse_args(["--bits", "1"]), "toy")
    with pytest.raises(argparse.ArgumentError, match="--mode"):
        p.parse_args(["--mode", "d"])
    with pytest.raises(argparse.ArgumentError, match="--pair"):
        p.parse_args(["--pair", "1,2,3"])


def test_base_config_fills_unset_flags_and_other_classes_flags_are_refused():
    p = _toy_parser()
    assert config_from_args(p.parse_args(["--bits", "5"]), "toy", base=_Toy(mode="b")) == _Toy(bits=5, mode="b")
    q = argparse.ArgumentParser()
    add_config_flags(q, "m", th.merge.FSMerge, th.merge.PermuteMerge)
    assert config_from_args(q.parse_args(["--max-iter", "3"]), "m", th.merge.PermuteMerge).max_iter == 3
    with pytest.raises(ValueError, match="--rank .*PermuteMerge"):
        config_from_args(q.parse_args(["--rank", "3"]), "m", th.merge.PermuteMerge)
    assert getattr(q.parse_args([]), "rank") is UNSET


def test_bench_run_takes_the_config_after_the_model(tmp_path):
    ds = TensorDataset(torch.randn(32, 8), torch.randint(0, 4, (32,)))
    cfg = th.bench.BenchConfig(min_duration_s=0.02, min_query_count=4)
    kw = dict(scenarios="SingleStream", isolate=False, accuracy=False, calib=None, variant="v")
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        new = th.bench.run(torch.nn.Linear(8, 4), cfg, ds, outdir=tmp_path / "a", **kw)
    with pytest.warns(DeprecationWarning, match=r"bench.run\(model, cfg, data\)"):
        old = th.bench.run(torch.nn.Linear(8, 4), ds, settings=cfg, outdir=tmp_path / "b", **kw)
    assert "SingleStream" in new["scenarios"] and "SingleStream" in old["scenarios"]
    jobs = [json.loads((tmp_path / d / "v" / "job.json").read_text()) for d in ("a", "b")]
    assert jobs[0]["settings"] == jobs[1]["settings"] == cfg.to_yaml()  # the same run either way


# config.yaml files as the previous release wrote them (flat option names; paths shortened)
OLD_FILES = {
    "train": ("model: mlp\ndataset: digits\nmodel_arg: []\nepochs: 30\nsteps: 2\nlr: 0.05\nbatch_size: 16\n"
              "optimizer: sgd\nweight_decay: 0.0005\nschedule: cosine\nwarmup: 0\nlabel_smoothing: 0.0\nseed: 0\n"
              "workers: 0\nout: runs/t\nresume: false\nquick: false\ngrad_nm: '2:4'\ngrad_method: mvue\n"
              "grad_gemms: weight\nact_nm: null\nrecipe: train8\ntrain8_bits: 6\ntrain8_grad_bits: 8\n"
              "train8_wgrad_bits: 16\ntrain8_no_bifurcation: false\nregime: none\ngrad_norm_adapt: false\n"),
    "quantize": ("model: runs/t2/model\ndataset: null\nbits: 6\na_bits: 0\nfirst_last_bits: 8\npipeline: rtn\n"
                 "budget: null\nbudget_kind: size\ncandidate_bits:\n- 2\n- 3\n- 4\n- 8\nadaquant_mode: sequential\n"
                 "adaquant_iters: 200\nbias_iters: 100\nestimator: minmax\ncalib_per_class: 10\ndata_free: null\n"
                 "synth_steps: null\ndistill_steps: 0\nfilter: null\nseed: 0\nout: runs/q\n"),
    "sparsify": ("model: runs/t2/model\ndataset: null\nnm: '4:8'\ntransposable: true\nmethod: approx\nfilter: null\n"
                 "adaprune: false\nadaprune_steps: 200\nadaprune_lr: 0.001\nremask_every: 1\ncalib_per_class: 10\n"
                 "no_bn: false\nfinetune_epochs: 0.0\nfinetune_lr: 0.01\nseed: 0\nout: runs/s\n"),
    "merge": ("models:\n- runs/a/model\n- runs/b/model\nmethod: fs-merge\ndata: null\nclasses: null\n"
              "data_per_task: 16\nparam: diag_lowrank\ninit: average\nmode: global\nrank: 4\nwidth_mult: 1.0\n"
              "steps: 2\nlr: null\naugment: 4\nmatching: activation\nseed: 0\nout: runs/m\n"),
}


def test_config_yaml_of_the_previous_release_still_reads(tmp_path):
    got = {}
    for cmd, text in OLD_FILES.items():
        f = tmp_path / f"{cmd}.yaml"
        f.write_text(text)
        args = _common.parse_with_config(build_parser(), [cmd, "--config", str(f)])  # --model from the file
        got[cmd] = importlib.import_module(f"thrifty.cli.{cmd}").build_configs(args)
    train = got["train"]["train"]
    assert (train.epochs, train.optim.steps, train.optim.lr, train.optim.batch_size, train.num_workers) == (30, 2, 0.05, 16, 0)
    assert got["train"]["grad"] == th.sparse.GradNM(2, 4, gemms=("weight",))
    assert got["train"]["train8"] == th.Train8(bits=6, act_bits=6)  # --train8-bits set both, as it did
    assert got["quantize"] == {"ptq": th.PTQ(w_bits=6, a_bits=None, pipeline="rtn", w_estimator="minmax",
                                             a_estimator="minmax"), "synth": None, "distill": None}
    assert got["sparsify"]["sparsity"] == th.sparse.NM(4, 8, transposable=True, method="approx")
    assert got["merge"]["merge"] == th.merge.FSMerge(rank=4, optim={"steps": 2})


def test_quick_with_a_trainconfig_file(tmp_path):
    from thrifty.cli.train import build_configs

    f = tmp_path / "t.yaml"
    f.write_text(to_yaml(th.train.TrainConfig(optim={"lr": 0.3})))  # steps 0 (use the epochs): no contradiction
    got = build_configs(_common.parse_with_config(build_parser(), ["train", *_TRAIN, "--config", str(f), "--quick"]))
    assert got["train"] == th.train.TrainConfig(optim={"lr": 0.3, "steps": 5})
    f.write_text(to_yaml(th.train.TrainConfig(optim={"steps": 7})))
    with pytest.raises(ValueError, match="--quick .* --optim.steps 7"):
        build_configs(_common.parse_with_config(build_parser(), ["train", *_TRAIN, "--config", str(f), "--quick"]))
