"""The bad-input contract through the CLI (docs/bad-input.md): exit code 2 (argparse errors included), one
``thrifty <cmd>: error: ...`` line naming the argument, file, key or layer, no traceback, and the user's
files byte-identical afterwards. Most cases call ``main(argv)`` in-process (fast); a few run real processes."""
from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from thrifty.cli import main
from thrifty.models import create
from thrifty.train import save_model

ROOT = Path(__file__).resolve().parents[1]


def _snapshot(*roots: Path) -> dict[str, bytes]:
    """Every file under ``roots`` -> its bytes (to prove nothing was touched)."""
    files = {}
    for r in roots:
        for p in ([r] if r.is_file() else sorted(r.rglob("*"))):
            if p.is_file():
                files[str(p)] = p.read_bytes()
    return files


def _mlp(tmp_path: Path, name: str = "m", nan: bool = False) -> Path:
    model = create("mlp", in_features=64, num_classes=10)
    if nan:
        with torch.no_grad():
            next(p for n, p in model.named_parameters() if n.endswith("weight"))[0, 0] = float("nan")
    stem = tmp_path / name / "model"
    save_model(model, stem, {"model": "mlp", "model_kwargs": {"in_features": 64, "num_classes": 10},
                             "dataset": "digits"})
    return stem


def _data(tmp_path: Path, name: str, x: torch.Tensor, y: torch.Tensor) -> Path:
    p = tmp_path / name
    torch.save({"x": x, "y": y}, p)
    return p


def _fails(argv: list[str], capsys, *needles: str, files: tuple[Path, ...] = ()) -> str:
    """Run the CLI, expect exit code 2 with one error line holding every needle; files untouched."""
    before = _snapshot(*files)
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse: usage + "error: argument --x: ..."
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err
    for n in needles:
        assert n in err, (n, err)
    assert _snapshot(*files) == before
    return err


def test_eval_labels_beyond_the_model_outputs(tmp_path, capsys):
    stem = _mlp(tmp_path)
    data = _data(tmp_path, "lab12.pt", torch.randn(40, 64), torch.arange(40) % 12)
    _fails(["eval", str(stem), "--dataset", str(data), "--out", str(tmp_path / "ev")], capsys,
           str(data), "labels up to 11", "10 outputs", files=(stem.parent, data))
    assert not (tmp_path / "ev").exists()


def test_eval_wrong_channel_count_names_model_and_dataset(tmp_path, capsys):
    model = create("resnet20", num_classes=10, in_chans=1)
    stem = tmp_path / "r" / "model"
    save_model(model, stem, {"model": "resnet20", "model_kwargs": {"num_classes": 10, "in_chans": 1}})
    data = _data(tmp_path, "rgb.pt", torch.randn(20, 3, 8, 8), torch.arange(20) % 10)
    _fails(["eval", str(stem), "--dataset", str(data)], capsys, "cannot take", str(data), "(3, 8, 8)",
           files=(stem.parent, data))


def test_nan_weights_are_named_in_eval_and_quantize(tmp_path, capsys):
    stem = _mlp(tmp_path, nan=True)
    _fails(["eval", str(stem)], capsys, "parameter", "weight", "NaN", files=(stem.parent,))
    _fails(["quantize", "--model", str(stem), "--pipeline", "rtn", "--out", str(tmp_path / "q")], capsys,
           "parameter", "NaN", files=(stem.parent,))
    assert not (tmp_path / "q").exists()


def test_nan_inputs_in_train_are_named_not_blamed_on_the_learning_rate(tmp_path, capsys):
    x = torch.randn(40, 64)
    x[7, 3] = float("nan")
    data = _data(tmp_path, "nan.pt", x, torch.arange(40) % 10)
    err = _fails(["train", "--model", "mlp", "--dataset", str(data), "--optim.steps", "2", "--out", str(tmp_path / "t")],
                 capsys, str(data), "NaN or Inf", files=(data,))
    assert "learning rate" not in err


def test_model_that_cannot_take_the_dataset_names_the_ones_that_fit(tmp_path, capsys):
    _fails(["train", "--model", "resnet20", "--dataset", "digits", "--out", str(tmp_path / "t")], capsys,
           "resnet20", "--dataset digits", "fit --model resnet20: digits32")
    assert not (tmp_path / "t").exists()


@pytest.mark.parametrize("argv, needle", [
    (["eval", "m", "--batch-size", "0"], "--batch-size: must be >= 1"),
    (["bench", "--model", "m", "--scenario", "Foo"], "--scenario: unknown scenario(s) ['Foo']"),
    (["bench", "--model", "m", "--backend", "tensorrt"], "--backend: unknown backend(s) ['tensorrt']"),
    (["bench", "--model", "m", "--max-samples", "-1"], "--max-samples: must be >= 1, got -1"),
    (["train", "--optim.steps", "-3"], "--optim.steps: OptimConfig.steps: invalid value -3"),
    (["quantize", "--model", "m", "--calib-per-class", "0"], "--calib-per-class: must be >= 1"),
])
def test_counts_and_choices_are_refused_before_any_work(tmp_path, capsys, monkeypatch, argv, needle):
    monkeypatch.chdir(tmp_path)
    _fails(argv, capsys, needle)
    assert list(tmp_path.iterdir()) == []  # no output folder, no config.yaml


@pytest.mark.parametrize("text, needles", [
    ('lr: "fast"\n', ["'lr'", "c.yaml", "'fast'"]),
    ("batch_size: [1, 2]\n", ["'batch_size'", "c.yaml", "single value"]),
    ('quick: "no"\n', ["'quick'", "c.yaml", "true or false"]),
    ("steps: 2.5\n", ["'steps'", "c.yaml"]),
    ("steps: -1\n", ["--optim.steps", "OptimConfig.steps", "-1"]),
    ("optimizer: lion\n", ["'optimizer'", "sgd, adamw"]),
    ("batch_size: true\n", ["'batch_size'", "c.yaml"]),
    ("overwrite: true\n", ["'overwrite'", "c.yaml", "on the command line"]),
    ("!!python/object/apply:os.system ['touch pwned']\n", ["c.yaml", "not valid YAML"]),
    ("model: !!python/object/apply:os.system ['touch pwned']\n", ["c.yaml", "not valid YAML"]),
])
def test_yaml_config_values_are_checked_like_flags(tmp_path, capsys, monkeypatch, text, needles):
    monkeypatch.chdir(tmp_path)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text)
    _fails(["train", "--config", str(cfg), "--out", str(tmp_path / "t")], capsys, *needles, files=(cfg,))
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "t").exists()


def test_yaml_config_good_values_still_work(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: mlp\ndataset: digits\nsteps: 2\nbatch-size: 16\nlr: 1e-3\nquick: false\n"
                   "model_arg: [[hidden, [16]]]\n")
    out = tmp_path / "t"
    assert main(["train", "--config", str(cfg), "--out", str(out)]) == 0
    res = yaml.safe_load((out / "config.yaml").read_text())
    train = res["train"]  # the TrainConfig, as thrifty.to_yaml writes it; the other options flat
    optim = train["optim"]  # an older flat file's keys (aliases of the moved fields) land in the nested config
    assert train["kind"] == "TrainConfig" and optim["lr"] == 1e-3 and optim["steps"] == 2 and optim["batch_size"] == 16
    assert res["quick"] is False and "overwrite" not in res and res["model_arg"] == [["hidden", [16]]]


@pytest.mark.parametrize("argv, needles", [
    (["train", "--model", "mlp", "--dataset", "digits", "--quick", "--optim.steps", "9"], ["--quick", "--optim.steps 9"]),
    (["eval", "MODEL", "--calibrate-bn"], ["--calibrate-bn", "--sizes"]),
    (["quantize", "--model", "MODEL", "--synth-optim.steps", "5"], ["--synth-optim.steps", "--data-free"]),
    (["quantize", "--model", "MODEL", "--data-free", "gaussian", "--synth-optim.steps", "5"], ["--synth-optim.steps"]),
    (["quantize", "--model", "MODEL", "--budget-kind", "bops"], ["--budget-kind bops needs --budget"]),
    (["sparsify", "--model", "MODEL", "--method", "approx"], ["--method", "'approx'", "--transposable"]),
    (["merge", "--models", "MODEL", "MODEL", "--method", "average", "--optim.steps", "5"], ["--optim.steps", "AverageMerge"]),
    (["train", "--model", "mlp", "--dataset", "digits", "--train8-bits", "6"], ["--train8-bits", "--recipe train8"]),
    (["train", "--model", "mlp", "--dataset", "digits", "--grad-method", "mse"], ["--grad-method", "--grad-nm"]),
    (["quantize", "--model", "MODEL", "--distill-lr", "0.1"], ["--distill-lr", "--distill-steps"]),
    (["quantize", "--model", "MODEL", "--group-size", "8", "--w-estimator", "percentile"], ["group_size=8", "'percentile'"]),
])
def test_conflicting_or_ignored_flags_are_refused(tmp_path, capsys, monkeypatch, argv, needles):
    monkeypatch.chdir(tmp_path)
    stem = _mlp(tmp_path)
    _fails([str(stem) if a == "MODEL" else a for a in argv], capsys, *needles, files=(stem.parent,))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_merge_classes_outside_the_dataset(tmp_path, capsys):
    a, b = _mlp(tmp_path, "a"), _mlp(tmp_path, "b")
    _fails(["merge", "--models", str(a), str(b), "--classes", "0,1", "99", "--out", str(tmp_path / "mg")], capsys,
           "--classes '99'", "0..9", "[99]", files=(a.parent, b.parent))
    assert not (tmp_path / "mg").exists()


@pytest.mark.parametrize("cmd", [
    ["train", "--model", "mlp", "--dataset", "digits", "--optim.steps", "1"],
    ["demo", "--quick"],
    ["quantize", "--model", "MODEL", "--pipeline", "rtn"],
    ["sparsify", "--model", "MODEL"],
    ["bench", "--model", "MODEL"],
    ["merge", "--models", "MODEL", "MODEL"],
])
def test_an_existing_output_folder_is_never_overwritten_silently(tmp_path, capsys, cmd):
    stem = _mlp(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"the user's earlier result")
    (out / "config.yaml").write_text("lr: 0.5\n")
    argv = [str(stem) if a == "MODEL" else a for a in cmd] + ["--out", str(out)]
    _fails(argv, capsys, f"--out {out} already exists", "--overwrite", files=(out, stem.parent))


def test_train_overwrite_and_resume_hint(tmp_path, capsys):
    out = tmp_path / "t"
    argv = ["train", "--model", "mlp", "--dataset", "digits", "--optim.steps", "2", "--optim.batch-size", "16", "--out", str(out)]
    assert main(argv) == 0
    _fails(argv, capsys, "--resume", "--overwrite", files=(out,))
    assert main(argv + ["--overwrite"]) == 0
    assert main(argv + ["--resume"]) == 0


def test_train_resume_with_a_broken_checkpoint_and_conflicting_flags(tmp_path, capsys):
    out = tmp_path / "t"
    argv = ["train", "--model", "mlp", "--dataset", "digits", "--optim.steps", "2", "--optim.batch-size", "16", "--out", str(out)]
    assert main(argv) == 0
    ck = out / "ckpt" / "last.safetensors"
    ck.write_bytes(ck.read_bytes()[:200])
    _fails(argv + ["--resume"], capsys, "corrupt or unreadable checkpoint", str(ck), files=(out,))
    _fails(argv + ["--resume", "--overwrite"], capsys, "--resume", "--overwrite", files=(out,))


def test_train_resume_cleans_the_temp_file_of_a_killed_checkpoint_write(tmp_path):
    out = tmp_path / "t"
    argv = ["train", "--model", "mlp", "--dataset", "digits", "--optim.steps", "2", "--optim.batch-size", "16", "--out", str(out)]
    assert main(argv) == 0
    stale = out / "ckpt" / ".last.safetensors.k1ll3d.tmp"
    stale.write_bytes(b"half a checkpoint")
    assert main(argv + ["--resume"]) == 0
    assert not stale.exists() and sorted(p.name for p in (out / "ckpt").iterdir()) == ["last.safetensors"]


@pytest.fixture
def default_sigint():
    """Ctrl-C handling needs Python's default SIGINT handler; a shell starts background jobs (`make test &`)
    with SIGINT ignored, which a test process inherits."""
    import signal

    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, old)


def test_cli_sigint_saves_a_checkpoint_and_resume_matches(tmp_path, capsys, monkeypatch, default_sigint):
    import signal

    from thrifty.train import loop
    from thrifty.train.checkpoint import read_checkpoint

    def argv(out: Path) -> list[str]:
        return ["train", "--model", "mlp", "--dataset", "digits", "--optim.steps", "8", "--optim.batch-size", "16", "--optim.lr",
                "0.05", "--out", str(out)]

    assert main(argv(tmp_path / "ref")) == 0
    real, calls = loop._check_labels, [0]

    def ctrl_c_in_step_3(out, y, what):  # a real SIGINT, delivered while step 3 runs
        calls[0] += 1
        if calls[0] == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return real(out, y, what)

    monkeypatch.setattr(loop, "_check_labels", ctrl_c_in_step_3)
    out = tmp_path / "run"
    assert main(argv(out)) == 130
    err = capsys.readouterr().err
    assert "thrifty train: interrupted" in err and "after step 3 of 8; checkpoint saved" in err
    assert read_checkpoint(out / "ckpt" / "last.safetensors")[1]["step"] == "3"
    monkeypatch.setattr(loop, "_check_labels", real)
    assert main(argv(out) + ["--resume"]) == 0
    got, ref = load_file(out / "model.safetensors"), load_file(tmp_path / "ref" / "model.safetensors")
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)  # exact, not approximate


def test_files_layers_and_ranges_through_the_cli(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    stem = _mlp(tmp_path)
    ypath = stem.with_suffix(".yaml")
    text = ypath.read_text()
    ypath.write_text("- not\n- a model\n")
    _fails(["eval", str(stem)], capsys, "model.yaml is not thrifty model metadata", files=(stem.parent,))
    ypath.write_text(text.replace("num_classes: 10", "num_classes: 7"))
    _fails(["eval", str(stem)], capsys, "model.safetensors do not fit model 'mlp'", files=(stem.parent,))
    ypath.write_text(text)
    (tmp_path / "imgs" / "cat").mkdir(parents=True)
    _fails(["train", "--model", "mlp", "--dataset", str(tmp_path / "imgs"), "--out", "t"], capsys,
           "imgs: no images")
    _fails(["quantize", "--model", str(stem), "--w-bits", "1", "--out", "q"], capsys, "--w-bits", "w_bits must be in 2..16")
    _fails(["sparsify", "--model", str(stem), "--nm", "3:2", "--out", "s"], capsys, "3:2")
    small = tmp_path / "small" / "model"
    save_model(create("mlp", in_features=3, hidden=[8], num_classes=2), small,
               {"model": "mlp", "model_kwargs": {"in_features": 3, "hidden": [8], "num_classes": 2}})
    data = _data(tmp_path, "three.pt", torch.randn(40, 3), torch.arange(40) % 2)
    _fails(["sparsify", "--model", str(small), "--dataset", str(data), "--nm", "2:4", "--filter", "fc1", "--out",
            "s"], capsys, "layer 'fc1' cannot take 2:4 sparsity", "reduction dim (3)", files=(small.parent, data))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["imgs", "m", "small", "three.pt"]


def test_unsupported_layers_are_named_through_the_cli(tmp_path, capsys):
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*cannot be wrapped")  # cnn1d's Conv1d layers are wrapped
        assert main(["train", "--model", "cnn1d", "--dataset", "digits", "--optim.steps", "1", "--optim.batch-size", "8",
                     "--grad-nm", "2:4", "--out", str(tmp_path / "t")]) == 0
    stem = tmp_path / "c" / "model"
    save_model(create("cnn1d", num_classes=10), stem, {"model": "cnn1d", "model_kwargs": {"num_classes": 10},
                                                       "dataset": "digits"})
    _fails(["sparsify", "--model", str(stem), "--filter", "bn1", "--out", str(tmp_path / "s")], capsys,
           "layer 'bn1' cannot", "BatchNorm1d", files=(stem.parent,))
    assert not (tmp_path / "s").exists()


def test_failing_bench_leaves_the_report_folder_config_alone(tmp_path, capsys):
    out = tmp_path / "report"
    out.mkdir()
    (out / "config.yaml").write_text("model: resnet20\nscenario: all\n")
    (out / "results.json").write_text("{}")
    _fails(["bench", "--model", str(tmp_path / "missing"), "--out", str(out), "--overwrite"], capsys,
           "missing", files=(out,))


def _run(args: list[str], extra_env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(extra_env or {})}
    return subprocess.run([sys.executable, "-m", "thrifty.cli", *args], capture_output=True, text=True,
                          env=env, timeout=120)


def test_real_process_error_line(tmp_path):
    r = _run(["eval", str(tmp_path / "nothing")])
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("thrifty eval: error: saved model file not found")


def test_debug_shows_the_traceback(tmp_path, monkeypatch):
    monkeypatch.setenv("THRIFTY_DEBUG", "1")
    with pytest.raises(FileNotFoundError, match="nothing"):
        main(["eval", str(tmp_path / "nothing")])
    monkeypatch.delenv("THRIFTY_DEBUG")
    with pytest.raises(FileNotFoundError, match="nothing"):
        main(["--debug", "eval", str(tmp_path / "nothing")])
