"""Deployable forms: an unstripped quantized or N:M-sparse model goes through torch.export and torch.jit.trace
with the eager outputs, and its stripped form loads into the original architecture (strict)."""
import copy
import warnings

import pytest
import torch
import torch.nn as nn

from thrifty.core import strip
from thrifty.quant import PTQ, UniformQuantizer, quantize
from thrifty.quant.fold import fold_bn
from thrifty.sparse import NM, sparsify


class _ResBlockNet(nn.Module):
    """A ResNet in miniature: conv-BN-ReLU stem, one residual block, pooled linear head."""

    def __init__(self):
        super().__init__()
        self.stem, self.bn = nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv1, self.bn1 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        h = torch.relu(self.bn(self.stem(x)))
        h = torch.relu(h + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(h))))))
        return self.head(h.mean((2, 3)))


def _resnet():
    torch.manual_seed(0)
    model = _ResBlockNet()
    for bn in (model.bn, model.bn1, model.bn2):  # non-trivial statistics, so folding them matters
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
    return model.eval(), torch.randn(4, 1, 8, 8)


def _encoder():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True)
    return nn.TransformerEncoder(layer, 1, enable_nested_tensor=False).eval(), torch.randn(3, 6, 16)


class _Bert(nn.Module):
    def __init__(self):
        super().__init__()
        tr = pytest.importorskip("transformers")
        cfg = tr.BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                            vocab_size=60, max_position_embeddings=16)
        self.bert = tr.BertModel(cfg)

    def forward(self, ids):
        return self.bert(input_ids=ids).last_hidden_state


def _bert():
    torch.manual_seed(0)
    return _Bert().eval(), torch.randint(0, 60, (4, 9))


def _compress(how, model, x):
    if how == "nm":
        return sparsify(copy.deepcopy(model), NM(2, 4)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # layers left in floating point (embeddings): named, not the point here
        cfg = PTQ(pipeline="rtn", w_bits=4, a_bits=8, w_estimator="minmax", a_estimator="minmax")
        return quantize(copy.deepcopy(model), cfg, x, progress=False).model.eval()


@pytest.mark.parametrize("make,how", [(_resnet, "ptq"), (_resnet, "nm"), (_encoder, "ptq"), (_encoder, "nm"),
                                      (_bert, "ptq")], ids=["resnet-ptq", "resnet-nm", "mha-ptq", "mha-nm", "bert-ptq"])
def test_export_and_trace_match_eager_and_strip_loads_into_the_original(make, how):
    model, x = make()
    comp = _compress(how, model, x)
    with torch.enable_grad():  # the module path (no fused inference kernel): what export records
        want = comp(x).detach()
    ep = torch.export.export(comp, (x,))  # before: GuardOnDataDependentSymNode on the quantizers' flags
    assert torch.equal(ep.module()(x), want)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings on the models' own shape checks
        traced = torch.jit.trace(comp, (x,), check_trace=False)
    x2 = x[:2] if x.dtype == torch.long else torch.randn_like(x)  # the trace is not specialised to x's values
    with torch.enable_grad():
        assert torch.equal(traced(x2).detach(), comp(x2).detach())
    plain = strip(copy.deepcopy(comp))
    fresh = copy.deepcopy(model)
    if how == "ptq":  # PTQ folds each BatchNorm into its conv first: the same folding on the original
        fold_bn(fresh, x)
    fresh.load_state_dict(plain.state_dict(), strict=True)
    gemm = {n: m for n, m in comp.named_modules() if hasattr(m, "effective_weight")}
    for name, layer in gemm.items():
        assert torch.equal(fresh.get_submodule(name.replace(".in_proj", "")).state_dict()[
            "in_proj_weight" if name.endswith("in_proj") else "weight"], layer.effective_weight())
    if how == "nm":  # weights only: the stripped model computes the same function
        with torch.enable_grad():
            assert torch.equal(fresh(x).detach(), want)


def test_a_stripped_model_scripts():
    model, x = _encoder()
    plain = strip(sparsify(copy.deepcopy(model), NM(2, 4)))
    assert type(plain.layers[0].self_attn) is nn.MultiheadAttention
    assert torch.equal(torch.jit.script(plain)(x), plain(x))


def test_quantizer_mode_survives_state_dict_round_trip():
    q = UniformQuantizer(4).init_from(torch.randn(5, 3))
    fresh = UniformQuantizer(4)
    assert fresh.mode == "dynamic"
    fresh.load_state_dict(q.state_dict())
    assert fresh.mode == "frozen" and torch.equal(fresh(torch.ones(2)), q(torch.ones(2)))
    fresh.calibrate()
    assert fresh.mode == "calibrate"
    fresh(torch.randn(4))
    assert fresh.freeze().mode == "frozen"
    with pytest.raises(ValueError, match="NaN"):  # the data check still runs outside export / trace
        fresh(torch.tensor([float("nan")]))
