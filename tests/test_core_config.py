"""Configs round-trip YAML; apply/strip walk any nn.Module and never leave it half-changed."""
import copy
from dataclasses import FrozenInstanceError, dataclass
from typing import Optional

import pytest
import torch
import torch.nn as nn

from thrifty.core import Config, apply, from_yaml, register_config, register_handler, strip, to_yaml, wrap_layers
from thrifty.nn import GemmLinear, is_gemm
from thrifty.ops import ste


@register_config
@dataclass(frozen=True)
class _RoundCfg(Config):
    scale: float = 4.0
    names: tuple[str, ...] = ("a", "b")
    inner: Optional["_InnerCfg"] = None


@register_config
@dataclass(frozen=True)
class _InnerCfg(Config):
    k: int = 3


class _RoundTo(nn.Module):
    def __init__(self, scale):
        super().__init__()
        self.scale = scale

    def forward(self, w):
        return ste(w, torch.round(w * self.scale) / self.scale)


@register_handler(_RoundCfg)
def _handle(layer, name, cfg):
    if cfg.scale <= 0:
        raise ValueError(f"layer {name}: scale must be positive")
    layer.add("weight", _RoundTo(cfg.scale))


def test_yaml_roundtrip_nested_and_version():
    cfg = _RoundCfg(scale=2, names=("x",), inner=_InnerCfg(k=5))
    text = to_yaml(cfg)
    assert "kind: _RoundCfg" in text and "version: 1" in text
    back = from_yaml(text)
    assert back == cfg and isinstance(back.scale, float) and isinstance(back.names, tuple)
    with pytest.raises(FrozenInstanceError):
        cfg.scale = 3  # type: ignore[misc]


def test_yaml_errors_are_clear():
    with pytest.raises(ValueError, match="unknown config kind 'Nope'"):
        from_yaml("kind: Nope\n")
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['bogus'\]"):
        from_yaml("kind: _InnerCfg\nbogus: 1\n")
    with pytest.raises(ValueError, match="newer"):
        from_yaml("kind: _InnerCfg\nversion: 99\n")


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8)), nn.Linear(8, 2))


def test_apply_filter_patterns_and_predicate():
    m = _mlp()
    apply(m, _RoundCfg(), filter="2.*")
    assert [n for n, x in m.named_modules() if is_gemm(x)] == ["2.0"]
    m = _mlp()
    apply(m, _RoundCfg(), filter=lambda mod, name: isinstance(mod, nn.Linear) and mod.out_features == 8)
    assert [n for n, x in m.named_modules() if is_gemm(x)] == ["0", "2.0"]


def test_apply_then_strip_bakes_weights():
    m = _mlp().eval()
    x = torch.randn(5, 4)
    apply(m, _RoundCfg(scale=2.0))
    y_q = m(x)
    s = strip(m)
    assert not any(is_gemm(x) for x in s.modules())
    assert all(type(x) is nn.Linear for x in s.modules() if isinstance(x, nn.Linear))
    assert torch.equal(s(x), y_q)  # the baked weight is the effective one: the same op on the same tensors


def test_apply_explicit_name_of_unsupported_layer():
    m = _mlp()
    with pytest.raises(TypeError, match="'2.1' cannot be wrapped: BatchNorm1d is not supported"):
        apply(m, _RoundCfg(), filter="2.1")
    with pytest.raises(ValueError, match="no GEMM layer"):
        apply(m, _RoundCfg(), filter="missing")


def test_apply_failure_leaves_model_unchanged():
    m = _mlp()
    ref = copy.deepcopy(m)
    with pytest.raises(ValueError, match="scale must be positive"):
        apply(m, _RoundCfg(scale=-1.0))
    assert not any(is_gemm(x) for x in m.modules())
    x = torch.randn(3, 4)
    m.eval(), ref.eval()
    assert torch.equal(m(x), ref(x))
    # composition on an already-wrapped model fails cleanly too
    apply(m, _RoundCfg(scale=2.0))
    before = [type(lay.slots.weight) for lay in m.modules() if is_gemm(lay)]
    with pytest.raises(ValueError):
        apply(m, _RoundCfg(scale=-1.0))
    assert [type(lay.slots.weight) for lay in m.modules() if is_gemm(lay)] == before


def test_apply_on_no_gemm_model_errors():
    with pytest.raises(ValueError, match="no nn.Linear/nn.Conv2d"):
        apply(nn.Sequential(nn.ReLU()), _RoundCfg())


def test_wrap_layers_in_place_shares_weights():
    m = _mlp()
    w = m[0].weight
    wrap_layers(m)
    assert isinstance(m[0], GemmLinear) and m[0].weight is w


def test_apply_on_a_bare_layer_wraps_it_in_place_and_strip_returns_plain():
    lin = nn.Linear(4, 3)
    w = lin.weight
    out = apply(lin, _RoundCfg(scale=2.0))
    assert out is lin and isinstance(lin, GemmLinear) and lin.weight is w
    x = torch.randn(2, 4)
    plain = strip(lin)
    assert type(plain) is nn.Linear and torch.equal(plain(x), lin(x))  # the same op on the same tensors
    bare = nn.Conv2d(2, 2, 3)
    with pytest.raises(ValueError, match="scale must be positive"):
        apply(bare, _RoundCfg(scale=-1.0))
    assert type(bare) is nn.Conv2d and not hasattr(bare, "slots")


def test_from_yaml_finds_thrifty_configs_without_prior_imports():
    import subprocess
    import sys

    code = ("from thrifty.core import from_yaml; "
            "print(type(from_yaml('kind: GradNM\\nn: 1\\nm: 2\\n')).__name__, from_yaml('kind: Train8\\n').bits)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["GradNM", "8"]
