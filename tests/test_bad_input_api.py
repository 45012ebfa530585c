"""The bad-input contract through the Python API (docs/bad-input.md): each kind of bad input gets a
ValueError/TypeError naming the argument, layer or file, and leaves the caller's model and files as they were."""
from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from thrifty.core import from_yaml
from thrifty.data import load_image_folder, load_tensors
from thrifty.datafree import Synth, synthesize
from thrifty.models import create
from thrifty.train import TrainConfig, evaluate, fit, load_model, save_model
from thrifty.train.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from thrifty.utils import atomic_save, atomic_write_text

ROOT = Path(__file__).resolve().parents[1]


def _bn_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 8 * 8, 3)).eval()


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the old argument order is what conflicts
def test_synthesize_refuses_a_method_that_conflicts_with_cfg():
    net = _bn_net()
    with pytest.raises(ValueError, match=r"method='gaussian' conflicts with cfg.method='bns'"):
        synthesize(net, 4, "gaussian", cfg=Synth(), input_shape=(1, 8, 8), progress=False)
    # agreeing arguments are fine, and the method actually used is the one asked for
    ds = synthesize(net, 4, "gaussian", cfg=Synth(method="gaussian"), input_shape=(1, 8, 8), progress=False)
    assert ds.tensors[0].shape == (4, 1, 8, 8)
    with pytest.raises(TypeError, match="cfg must be a Synth"):
        synthesize(net, 4, cfg={"method": "bns"}, input_shape=(1, 8, 8), progress=False)
    with pytest.raises(ValueError, match="n must be a positive integer"):
        synthesize(net, True, "gaussian", input_shape=(1, 8, 8), progress=False)


# ---- files: missing, truncated, corrupt, not a model; writes are atomic and keep the user's umask

def test_other_arguments_that_would_be_silently_ignored():
    from thrifty.data import load_dataset
    from thrifty.sparse import NM

    with pytest.raises(ValueError, match="method='approx' applies to transposable masks only"):
        NM(2, 4, method="approx")
    assert NM(2, 4, transposable=True, method="approx").method == "approx"
    with pytest.raises(ValueError, match="root='/data' applies to user datasets only; 'digits' is bundled"):
        load_dataset("digits", root="/data")


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _mlp_files(tmp_path: Path) -> Path:
    stem = tmp_path / "model"
    save_model(create("mlp", in_features=64, num_classes=10), stem,
               {"model": "mlp", "model_kwargs": {"in_features": 64, "num_classes": 10}})
    return stem


def test_checkpoint_missing_truncated_corrupt_or_not_a_checkpoint(tmp_path):
    model = nn.Linear(4, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    good = tmp_path / "last.safetensors"
    save_checkpoint(good, model, opt, step=2)
    data = good.read_bytes()
    before = _state(model)
    with pytest.raises(CheckpointError, match="checkpoint not found: .*nope.safetensors"):
        load_checkpoint(tmp_path / "nope.safetensors", model, opt)
    for name, blob in [("trunc.safetensors", data[: len(data) // 2]), ("garbage.safetensors", b"\x00" * 64),
                       ("empty.safetensors", b"")]:
        p = tmp_path / name
        p.write_bytes(blob)
        with pytest.raises(CheckpointError, match=f"corrupt or unreadable checkpoint .*{name}"):
            load_checkpoint(p, model, opt)
        assert p.read_bytes() == blob
    stem = _mlp_files(tmp_path)  # a saved model is a safetensors file, but not a training checkpoint
    with pytest.raises(CheckpointError, match="model.safetensors is not a thrifty training checkpoint"):
        load_checkpoint(stem.with_suffix(".safetensors"), model, opt)
    with pytest.raises(CheckpointError, match="does not match the model"):  # mismatched shapes
        load_checkpoint(good, nn.Linear(5, 3))
    assert _same(_state(model), before) and good.read_bytes() == data


def test_saved_model_missing_truncated_corrupt_or_mismatched(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    stem = _mlp_files(tmp_path)
    w, y = stem.with_suffix(".safetensors"), stem.with_suffix(".yaml")
    wbytes, ytext = w.read_bytes(), y.read_text()
    with pytest.raises(FileNotFoundError, match="saved model file not found: .*other.safetensors"):
        load_model(tmp_path / "other")
    w.write_bytes(wbytes[:100])
    with pytest.raises(ValueError, match="corrupt or unreadable weights .*model.safetensors"):
        load_model(stem)
    w.write_bytes(wbytes)
    y.write_text("- just\n- a list\n")
    with pytest.raises(ValueError, match="model.yaml is not thrifty model metadata"):
        load_model(stem)
    y.write_text("model: !!python/object/apply:os.system ['touch pwned']\n")
    with pytest.raises(ValueError, match="corrupt model metadata .*model.yaml"):
        load_model(stem)
    assert not Path("pwned").exists()
    y.write_text(ytext.replace("num_classes: 10", "num_classes: 7"))  # mismatched num_classes
    with pytest.raises(ValueError, match="weights .*model.safetensors do not fit model 'mlp'"):
        load_model(stem)
    assert w.read_bytes() == wbytes


def test_config_yaml_unknown_keys_wrong_types_and_python_tags(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['foo'\]"):
        from_yaml("kind: NM\nn: 2\nm: 4\nfoo: 1\n")
    with pytest.raises(TypeError, match="n must be an int, got str"):
        from_yaml("kind: NM\nn: two\nm: 4\n")
    with pytest.raises(ValueError, match=r"c\.yaml: not valid thrifty YAML.*python/object/apply"):  # never executed
        from_yaml("!!python/object/apply:os.system ['touch pwned']\n", source="c.yaml")
    with pytest.raises(ValueError, match="expected a mapping"):
        from_yaml("- 1\n- 2\n")
    assert not Path("pwned").exists()


def test_failed_atomic_write_leaves_the_old_file_and_no_temp(tmp_path):
    p = tmp_path / "result.json"
    p.write_text("old")

    def boom(f):
        f.write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_save(boom, p)
    assert p.read_text() == "old" and sorted(x.name for x in tmp_path.iterdir()) == ["result.json"]


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_outputs_get_the_users_umask_not_0600(tmp_path, umask):
    old = os.umask(umask)
    try:
        p = atomic_write_text(tmp_path / "out.txt", "x")
    finally:
        os.umask(old)
    assert p.stat().st_mode & 0o777 == 0o666 & ~umask


# ---- datasets: empty, labels out of range, NaN/Inf inputs and weights, wrong input shape

def test_empty_dataset_and_empty_image_folder(tmp_path):
    with pytest.raises(ValueError, match="train_ds is empty"):
        fit(nn.Linear(3, 2), TrainConfig(optim={"steps": 1}), TensorDataset(torch.zeros(0, 3), torch.zeros(0).long()),
            progress=False)
    (tmp_path / "imgs" / "cat").mkdir(parents=True)
    with pytest.raises(ValueError, match="imgs: no images"):
        load_image_folder(tmp_path / "imgs", size=8)
    p = tmp_path / "empty.pt"
    torch.save({"x": torch.zeros(0, 3), "y": torch.zeros(0).long()}, p)
    with pytest.raises(ValueError, match="empty.pt: dataset is empty"):
        load_tensors(p)


def test_labels_out_of_range_are_named_not_an_index_error():
    model = nn.Linear(3, 4)
    before = _state(model)
    ds = TensorDataset(torch.randn(8, 3), torch.tensor([0, 1, 2, 3, 4, 0, 1, 2]))
    with pytest.raises(ValueError, match="evaluation dataset has label 4, but the model has 4 outputs"):
        evaluate(model, ds)
    with pytest.raises(ValueError, match="train_ds has label 4, but the model has 4 outputs"):
        fit(model, TrainConfig(optim={"steps": 2, "batch_size": 8}), ds, progress=False)
    assert _same(_state(model), before)


def test_inputs_of_the_wrong_shape_are_named():
    model = nn.Linear(3, 2)
    ds = TensorDataset(torch.randn(8, 4), torch.zeros(8).long())
    with pytest.raises(ValueError, match=r"cannot take the evaluation dataset inputs of shape \(4,\)"):
        evaluate(model, ds)
    with pytest.raises(ValueError, match=r"cannot take the train_ds inputs of shape \(4,\)"):
        fit(model, TrainConfig(optim={"steps": 1}), ds, progress=False)


def test_nan_inf_inputs_and_weights_are_named():
    x = torch.randn(10, 3)
    x[6, 1] = float("inf")
    ds = TensorDataset(x, torch.zeros(10).long())
    model = nn.Linear(3, 2)
    with pytest.raises(ValueError, match="train_ds: inputs hold NaN or Inf .*first at index 6"):
        fit(model, TrainConfig(optim={"steps": 1}), ds, progress=False)
    with pytest.raises(ValueError, match="evaluation dataset: inputs hold NaN or Inf"):
        evaluate(model, ds)
    with torch.no_grad():
        model.bias[1] = float("nan")
    with pytest.raises(ValueError, match="parameter 'bias' contains NaN"):
        fit(model, TrainConfig(optim={"steps": 1}), TensorDataset(torch.randn(4, 3), torch.zeros(4).long()),
            progress=False)
    from thrifty.quant import PTQ, quantize

    bn_model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2)).eval()
    with torch.no_grad():
        bn_model[0].weight[2, 0] = float("nan")
    before = copy.deepcopy(bn_model.state_dict())
    with pytest.raises(ValueError, match=r"quantize: the model's parameter '0\.weight' contains NaN"):
        quantize(bn_model, PTQ(pipeline="rtn"), torch.randn(8, 3), progress=False)
    assert all(torch.equal(v.nan_to_num(), before[k].nan_to_num()) for k, v in bn_model.state_dict().items())


# ---- configs: bits out of range, N > M, shapes not divisible by M, negative counts

def test_config_ranges_are_checked_at_construction():
    from thrifty.data import calibration_subset
    from thrifty.quant import PTQ
    from thrifty.sparse import NM

    for bad in (dict(w_bits=1), dict(w_bits=33), dict(a_bits=0)):
        with pytest.raises(ValueError, match=f"{next(iter(bad))} must be in 2..16"):
            PTQ(**bad)
    with pytest.raises(ValueError, match="1 <= N < M, got 3:2"):
        NM(3, 2)
    with pytest.raises(ValueError, match="TrainConfig.optim.steps"):
        TrainConfig(optim={"steps": -1})
    with pytest.raises(ValueError, match="Synth.optim.steps must be >= 1"):
        Synth(optim={"steps": 0})
    with pytest.raises(ValueError, match="per_class must be a positive int"):
        calibration_subset(TensorDataset(torch.zeros(4, 2), torch.zeros(4).long()), per_class=-1)
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        evaluate(nn.Linear(2, 2), TensorDataset(torch.zeros(4, 2), torch.zeros(4).long()), batch_size=0)
    from thrifty.bench import load_workload

    for v in (0, -1):
        with pytest.raises(ValueError, match=f"max_samples must be a positive integer or None, got {v}"):
            load_workload(nn.Linear(2, 2), max_samples=v)


def test_nm_on_a_layer_shorter_than_m_names_the_layer_and_keeps_the_model():
    import thrifty as th
    from thrifty.sparse import NM

    model = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 2))
    before = _state(model)
    with pytest.raises(ValueError, match="layer '0' cannot take 2:4 sparsity: its reduction dim \\(3\\)"):
        th.apply(model, NM(2, 4), filter="0")
    assert isinstance(model[0], nn.Linear) and _same(_state(model), before)


def test_unsupported_layers_are_named_never_skipped_silently():
    import thrifty as th
    from thrifty.sparse import GradNM

    from collections import OrderedDict

    def make():  # Conv3d: a GEMM thrifty does not wrap
        return nn.Sequential(OrderedDict(conv1=nn.Conv3d(1, 4, 1), conv2=nn.Conv3d(4, 4, 1), conv3=nn.Conv3d(4, 4, 1),
                                         head=nn.Linear(4, 2)))

    model = make()
    with pytest.warns(UserWarning, match="cannot be wrapped.*'conv1'.*'conv2'.*'conv3'"):
        th.apply(model, GradNM(2, 4))
    other = make()
    before = _state(other)
    with pytest.raises(TypeError, match="layer 'conv1' cannot be wrapped: Conv3d is not supported"):
        th.apply(other, GradNM(2, 4), filter="conv1")
    assert isinstance(other.conv1, nn.Conv3d) and _same(_state(other), before)


# ---- SIGKILL / SIGINT during training: a real process, the previous checkpoint stays loadable, resume is exact

_SETUP = """
import torch
from torch.utils.data import TensorDataset
from thrifty.train import TrainConfig, fit

def make(ckpt_every):
    torch.manual_seed(0)
    x = torch.randn(96, 8)
    ds = TensorDataset(x, (x[:, 0] + x[:, 1] > 0).long())
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    return model, ds, TrainConfig(optim={"steps": 12, "batch_size": 16, "lr": 0.05}, eval_every=0, ckpt_every=ckpt_every)
"""

# one process (one interpreter start): first Ctrl-C at step 5 in ckpt dir argv[1], then a SIGKILL half-way
# through the 4th checkpoint write in argv[2]
_CHILD = _SETUP + """
import os, signal, sys, traceback
signal.signal(signal.SIGINT, signal.default_int_handler)  # a background job inherits SIGINT ignored
import thrifty.train.checkpoint as ck
from thrifty.utils import _atomic_write

model, ds, cfg = make(0)  # no periodic checkpoint: only the interrupt writes one
try:
    fit(model, cfg, ds, None, ckpt_dir=sys.argv[1], progress=False,
        callbacks=[lambda s: os.kill(os.getpid(), signal.SIGINT) if s.step == 5 else None])
except KeyboardInterrupt:
    traceback.print_exc()

calls = [0]
def dying_write(path, data):
    calls[0] += 1
    if calls[0] == 4:
        def half(f):
            f.write(data[: len(data) // 2]); f.flush(); os.kill(os.getpid(), signal.SIGKILL)
        _atomic_write(path, half)
    return _atomic_write(path, lambda f: f.write(data))

ck.atomic_write_bytes = dying_write
model, ds, cfg = make(1)
fit(model, cfg, ds, None, ckpt_dir=sys.argv[2], progress=False)
"""


def _reference(ckpt_every: int) -> dict[str, torch.Tensor]:
    ns: dict = {}
    exec(_SETUP, ns)
    model, ds, cfg = ns["make"](ckpt_every)
    fit(model, cfg, ds, None, progress=False)
    return _state(model)


def _resume(ckdir: Path, ckpt_every: int) -> dict[str, torch.Tensor]:
    ns: dict = {}
    exec(_SETUP, ns)
    model, ds, cfg = ns["make"](ckpt_every)
    fit(model, cfg, ds, None, ckpt_dir=ckdir, resume=True, progress=False)
    return _state(model)


def _step(ckpt: Path) -> int:
    return load_checkpoint(ckpt, nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2)))["step"]


def test_sigint_and_sigkill_during_training_in_a_real_process(tmp_path):
    interrupted, killed = tmp_path / "int", tmp_path / "kill"
    threads = str(torch.get_num_threads())  # as this process, which computes the references
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": threads}
    code = f"import torch; torch.set_num_threads({threads})\n" + _CHILD
    r = subprocess.run([sys.executable, "-c", code, str(interrupted), str(killed)], capture_output=True, text=True,
                       env=env, timeout=180)
    assert r.returncode == -9, r.stderr
    # SIGINT: the step in progress finished, its checkpoint was saved, and resume gives the uninterrupted weights
    assert "KeyboardInterrupt: interrupted after step 5 of 12; checkpoint saved" in r.stderr
    assert _step(interrupted / "last.safetensors") == 5
    assert _same(_resume(interrupted, 0), _reference(0))
    # SIGKILL during a checkpoint write: the previous checkpoint is intact, the temp file is cleaned on resume
    stale = list(killed.glob(".last.safetensors.*.tmp"))
    assert len(stale) == 1 and _step(killed / "last.safetensors") == 3
    assert _same(_resume(killed, 1), _reference(1))
    assert sorted(p.name for p in killed.iterdir()) == ["last.safetensors"]
