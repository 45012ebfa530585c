"""int8 ONNX export and LoadGen runs of transformers decoders: GPT-2's Conv1D (weight stored [in, out]) as a
per-channel QDQ Gemm that ONNX Runtime fuses, keyword-called models (GPT-2's cache sits between input_ids and
attention_mask; decoders return a cache object), and a tied embedding that stays float as in the simulated
model. Tiny configs with random weights."""
from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn

transformers = pytest.importorskip("transformers")
pytest.importorskip("onnxruntime")

import thrifty as th  # noqa: E402
from thrifty.bench import TorchBackend, export_onnx, quant_layers  # noqa: E402
from thrifty.bench.adapter import KeywordCall, needs_keywords  # noqa: E402
from thrifty.bench.layout import fused_report  # noqa: E402
from thrifty.core import apply  # noqa: E402
from thrifty.quant import QuantConfig, calibrate_inputs  # noqa: E402


def _run(path, feeds: dict, optimize: bool = True) -> np.ndarray:
    from thrifty.bench.backends import ort_session

    sess = ort_session(path, threads=1, optimize=optimize)
    return sess.run(None, {i.name: np.asarray(feeds[i.name]) for i in sess.get_inputs()})[0]


class OneConv1D(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        self.proj = Conv1D(12, 16)  # nf=12 outputs, nx=16 inputs: weight [16, 12]

    def forward(self, x):
        return self.proj(x)


def _quantized_conv1d():
    torch.manual_seed(0)
    # asymmetric (uint8) weight codes, as PTQ makes them: export_onnx stores them signed only on a CPU with VNNI,
    # whose u8s8 kernels are exact (without VNNI, u8 x s8 pair sums saturate 16 bits: not what is tested here)
    q = apply(OneConv1D().eval(), QuantConfig(w_bits=8, a_bits=8, w_symmetric=False, w_estimator="minmax",
                                              a_estimator="minmax"))
    calibrate_inputs(q, torch.randn(64, 5, 16))
    return q


def test_gpt2_conv1d_exports_as_fused_qgemm_matching_simulation(tmp_path):
    q = _quantized_conv1d()
    assert q.proj.slots.weight.axis == 1  # per output channel of the stored [in, out] weight
    (lq,) = quant_layers(q)
    assert lq.codes.shape == (12, 16) and lq.w_scale.shape == (12,)  # GEMM layout [out, in]
    x = torch.randn(32, 5, 16)
    path = export_onnx(q, (x[:2],), tmp_path / "c.onnx")
    (rep,) = fused_report(path)
    assert rep["op"] == "Gemm" and rep["fused"] and rep["kernel"] == "QGemm", rep
    dq = next(n for n in onnx.load(str(path)).graph.node if n.op_type == "DequantizeLinear" and ".wq" in n.input[0])
    assert [a.i for a in dq.attribute if a.name == "axis"] == [1]  # the codes stay [in, out]: scales along dim 1
    # After the input's rounding nothing is rounded again: the integer kernel requantizes with a float multiplier,
    # so an input near a rounding midpoint may land one step away (rare: one step of every input at most, far
    # less on average); the int32 bias adds at most half an accumulator step s_x * s_w / 2 (as in test_bench_layout)
    sx = float(q.proj.slots.input.scale)
    w = q.proj.effective_weight().detach().double()  # [in, out]
    sw = q.proj.slots.weight.scale.detach().double().reshape(-1)
    unit = sx * w.abs().sum(0).numpy()
    err = np.abs(_run(path, {"input_0": x.numpy()}) - TorchBackend(q)((x.numpy(),))) - (sx * sw / 2).numpy()
    assert (err / unit).max() <= 1 and (err / unit).mean() <= 0.25, ((err / unit).max(), (err / unit).mean())


def test_a_conv1d_quantized_along_the_wrong_axis_is_named():
    q = _quantized_conv1d()
    q.proj.slots.weight.axis = 0
    with pytest.raises(ValueError, match=r"'proj'.*output axis 1 of its stored weight, got axis 0"):
        quant_layers(q)


def _tiny(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "gpt2":  # tie_word_embeddings: the LM head shares the token embedding's Parameter
        cfg = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=2, n_positions=32,
                                      bos_token_id=0, eos_token_id=0)
        cls = transformers.GPT2LMHeadModel
    else:
        cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
        cls = transformers.LlamaForCausalLM
    cfg._attn_implementation = "eager"
    return cls(cfg).eval()


def _ids(n: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(n, 12, dtype=torch.long)
    mask[n // 2:, 9:] = 0
    return {"input_ids": torch.randint(0, 64, (n, 12), generator=g), "attention_mask": mask}


def test_keyword_call_is_the_models_own_logits_without_a_cache():
    m = _tiny("gpt2")
    assert needs_keywords(m, ["input_ids", "attention_mask"])  # GPT-2's forward: (input_ids, cache, attention_mask)
    assert not needs_keywords(nn.Linear(2, 2), ["input"])
    d = _ids(4, 0)
    with torch.no_grad():
        y = KeywordCall(m, list(d))(*d.values())
        ref = m(**d, use_cache=False).logits
    assert torch.equal(y, ref)  # the same call, the same ops: bit-identical
    with pytest.raises(TypeError, match="no parameters \\['mask'\\]"):
        KeywordCall(m, ["input_ids", "mask"])


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_decoder_int8_export_matches_the_simulated_model(tmp_path, kind):
    fp = _tiny(kind)
    calib, test = _ids(16, 0), _ids(8, 1)
    res = th.quantize(copy.deepcopy(fp), th.PTQ(w_bits=8, a_bits=8, pipeline="rtn"), calib, progress=False)
    path = export_onnx(res.model, tuple(test.values()), tmp_path / "m.onnx", input_names=list(test))
    with torch.no_grad():
        sim = res.model(**test, use_cache=False).logits
        ref = fp(**test, use_cache=False).logits
    y = torch.from_numpy(_run(path, {k: v.numpy() for k, v in test.items()}))
    assert y.shape == sim.shape  # the graph's output is the logits (no cache)
    rep = fused_report(path)
    gemms = [r for r in rep if "product of two float activations" not in (r["reason"] or "")]
    assert gemms and all(r["fused"] for r in gemms), [r for r in gemms if not r["fused"]]
    # The export must add far less error than quantization itself makes. Quantization noise is ~ one step per
    # element everywhere; the export's own differences are float roundings, half-step int32 biases and (rarely,
    # ~1e-5 of the elements) an activation that rounds to the neighbouring code: all within a tenth of it. A
    # wrong graph (transposed codes, the tied embedding read quantized) errs as much as quantization (ratio ~1).
    export_err, quant_err = float((y - sim).norm()), float((sim - ref).norm())
    assert export_err < 0.1 * quant_err, (export_err, quant_err)


def test_gpt2_loadgen_single_stream_with_an_attention_mask(tmp_path):
    res = th.quantize(_tiny("gpt2"), th.PTQ(w_bits=8, a_bits=8, pipeline="rtn"), _ids(8, 0), progress=False)
    cfg = th.bench.BenchConfig(min_duration_s=0.05, workers=1, threads=1)
    rep = th.bench.run(res.model, cfg, _ids(8, 1), scenarios="SingleStream", backend="onnxruntime", outdir=tmp_path,
                       accuracy=False, isolate=False, calib=None)
    sc = rep["scenarios"]["SingleStream"]
    assert sc["valid"], sc.get("reasons")


def test_a_quantized_transposed_conv_is_named_not_exported_in_float_silently():
    q = apply(nn.Sequential(nn.ConvTranspose1d(4, 4, 3)).eval(), QuantConfig(w_bits=8, a_bits=None))
    with pytest.raises(ValueError, match=r"'0': a transposed convolution has no int8 ONNX form"):
        quant_layers(q)
