"""The one saved-model format: thrifty.save / thrifty.load round trips, the plain export, bad files, run folders."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import yaml
from safetensors.torch import load_file

import thrifty as th
from thrifty.core.saved import model_paths, resolve_model_path
from thrifty.models import create
from thrifty.nn import is_gemm
from thrifty.quant import PTQ, AccumConfig, Train8, quantize
from thrifty.sparse import NM, ActNM, GradNM

_EPS = torch.finfo(torch.float32).eps


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return create("mlp", in_features=16, hidden=(16,), num_classes=4)


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    m = create("cnn1d", num_classes=4)
    with torch.no_grad():  # non-trivial BatchNorm statistics, so folding them changes the weights
        for bn in (m.bn1, m.bn2, m.bn3):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
    return m.eval()


def _ptq(m: nn.Module) -> object:
    cfg = PTQ(w_bits=4, a_bits=8, pipeline="rtn", w_estimator="minmax", a_estimator="minmax")
    return quantize(m, cfg, torch.randn(16, 1, 40), progress=False)


CASES = {
    "plain": (_mlp, lambda m: m, (3, 16)),
    "nm-transposable": (_mlp, lambda m: th.apply(m, NM(2, 4, transposable=True)), (3, 16)),
    "ptq-rtn-folded": (_cnn, lambda m: _ptq(m), (3, 1, 40)),
    "train8-range-bn": (_cnn, lambda m: th.apply(m, Train8(range_bn=True)), (3, 1, 40)),
    "nm+quant+act+grad+accum": (_mlp, lambda m: th.apply(th.apply(th.apply(th.apply(
        th.apply(m, NM(2, 4)), th.QuantConfig(w_bits=4, a_bits=None)), ActNM(2, 4)), GradNM(2, 4)),
        AccumConfig(5, 10)), (3, 16)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_round_trip_identical_outputs_and_plain_export(case, tmp_path):
    build, transform, shape = CASES[case]
    arch = build()
    obj = transform(copy.deepcopy(arch))
    model = obj.model if hasattr(obj, "folded") else obj
    model.eval()
    path = th.save(obj, tmp_path / "run" / "model", provenance={"command": "test"})
    back = th.load(tmp_path / "run")  # the run folder resolves to its model
    x = torch.randn(*shape)
    with torch.no_grad():
        ref, got = model(x), back(x)
    assert torch.equal(got, ref)
    assert [type(m) for m in back.modules()] == [type(m) for m in model.modules()]
    assert back.state_dict().keys() == model.state_dict().keys()
    meta = yaml.safe_load(model_paths(path)[1].read_text())
    assert meta["provenance"]["command"] == "test" and meta["provenance"]["thrifty_version"] == th.__version__
    # the plain export loads strictly into the untouched architecture and computes what the stripped model does
    plain = copy.deepcopy(arch)
    plain.load_state_dict(load_file(path.with_name("model.plain.safetensors")), strict=True)
    assert not any(is_gemm(m) for m in plain.modules())
    with torch.no_grad():
        stripped = th.strip(copy.deepcopy(model))(x)
        out = plain.eval()(x)
    # a folded BN comes back as an identity BN: (x - 0) / sqrt((1 - eps) + eps) is x to a few roundings
    tol = 8 * _EPS * stripped.abs().max().item() * len(list(plain.modules()))
    assert torch.allclose(out, stripped, rtol=0, atol=tol), (out - stripped).abs().max()


def test_wrapped_state_dict_needs_th_load_and_an_architecture_without_registry(tmp_path):
    user = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))  # not from the registry
    th.apply(user, NM(2, 4))
    th.save(user, tmp_path / "m")
    with pytest.raises(ValueError, match=r"m\.yaml names no registry model; pass the architecture"):
        th.load(tmp_path / "m")
    arch = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    back = th.load(tmp_path / "m.safetensors", model=arch)
    assert isinstance(arch[0], nn.Linear) and not is_gemm(arch[0])  # the architecture passed in is untouched
    x = torch.randn(5, 8)
    assert torch.equal(back(x), user.eval()(x))
    arch.load_state_dict(load_file(tmp_path / "m.plain.safetensors"), strict=True)
    assert torch.equal(arch(x), th.strip(user)(x))


def test_bad_files_are_clear_errors_naming_the_file(tmp_path):
    m = th.apply(_mlp(), NM(2, 4))
    w = th.save(m, tmp_path / "model")
    y = w.with_suffix(".yaml")
    good_w, good_y = w.read_bytes(), y.read_text()
    w.write_bytes(good_w[: len(good_w) // 2])
    with pytest.raises(ValueError, match=r"corrupt or unreadable weights .*model\.safetensors"):
        th.load(w)
    w.write_bytes(good_w)
    y.unlink()
    with pytest.raises(FileNotFoundError, match=r"saved model file not found: .*model\.yaml"):
        th.load(w)
    y.write_text("lr: 0.1\nepochs: 3\n")  # a config.yaml, not a model
    with pytest.raises(ValueError, match=r"model\.yaml is not thrifty model metadata"):
        th.load(w)
    y.write_text(good_y.replace("thrifty.sparse.weights:NMMask", "os:system"))
    with pytest.raises(ValueError, match=r"model\.yaml.*'os:system' is not a thrifty class"):
        th.load(w)
    y.write_text(good_y.replace("in_features: 16", "in_features: 12"))
    with pytest.raises(ValueError, match=r"weights .*model\.safetensors do not fit model 'mlp'"):
        th.load(w)


class _NoSpec(nn.Module):
    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w


def test_unsaveable_slot_refused_before_writing(tmp_path):
    m = th.wrap(nn.Linear(4, 4))
    m.add("weight", _NoSpec())
    with pytest.raises(TypeError, match="weight slot holds _NoSpec"):
        th.save(m, tmp_path / "m")
    assert list(tmp_path.iterdir()) == []


def test_run_folder_resolution(tmp_path):
    m = _mlp()
    th.save(m, tmp_path / "a" / "q")
    assert resolve_model_path(tmp_path / "a") == tmp_path / "a" / "q"  # the only model in the folder
    th.save(m, tmp_path / "a" / "r")
    with pytest.raises(FileNotFoundError, match=r"several saved models: q\.safetensors, r\.safetensors"):
        th.load(tmp_path / "a")
    th.save(m, tmp_path / "a" / "model")
    assert resolve_model_path(tmp_path / "a") == tmp_path / "a" / "model"  # the name every command writes
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no saved model"):
        th.load(tmp_path / "empty")


def test_files_of_the_earlier_formats_still_load(tmp_path):
    """``thrifty-quantized-1`` (quantizer specs under ``quantization``; the metadata copied from its parent model,
    which may hold a newer file's ``structure``) and ``thrifty-model-1`` (a plain model)."""
    res = _ptq(_cnn())
    w = th.save(res, tmp_path / "q")
    doc = yaml.safe_load(w.with_suffix(".yaml").read_text())
    layers = {n: {s: entries[0]["spec"] for s, entries in rec.items()} for n, rec in doc["structure"]["layers"].items()}
    old = {"format": "thrifty-quantized-1", "model": doc["model"], "model_kwargs": doc["model_kwargs"],
           "structure": {"folded": [], "range_bn": {}, "layers": {}},  # the FP parent's, copied along
           "quantization": {"layers": layers, "folded": doc["structure"]["folded"], "config": doc["quantization"]["config"]}}
    w.with_suffix(".yaml").write_text(yaml.safe_dump(old))
    x = torch.randn(2, 1, 40)
    assert torch.equal(th.load(w)(x), res.model.eval()(x))
    plain = _mlp()
    th.save(plain, tmp_path / "p")
    doc = yaml.safe_load((tmp_path / "p.yaml").read_text())
    (tmp_path / "p.yaml").write_text(yaml.safe_dump({"format": "thrifty-model-1", "model": doc["model"],
                                                     "model_kwargs": doc["model_kwargs"]}))
    y = torch.randn(2, 16)
    assert torch.equal(th.load(tmp_path / "p")(y), plain.eval()(y))
