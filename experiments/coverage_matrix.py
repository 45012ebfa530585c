"""Coverage matrix: which thrifty method works on which architecture, each cell with its numeric check.

Rows are architectures users already have, built from ``transformers`` configs with random weights (no download:
BERT, GPT-2, Llama, ViT, ResNet, ConvNeXt, MobileNetV2, Whisper's encoder), thrifty's own zoo and, when its
package is installed, the real pretrained all-MiniLM-L6-v2. Columns are methods. A cell is

- ``ok``: the method ran and its check passed (the number it measured is shown),
- ``fail``: the method ran but its check failed (the number says by how much),
- ``error``: the method raised; the cell shows the one-line message a user gets (type and text),
- ``n/a``: the method does not apply to the architecture, with the reason (BNS synthesis needs BatchNorm).

A crash with an unexplained traceback is what this matrix exists to catch: every ``error`` cell is either a clear
message naming the layer/argument or a bug to fix. Checks (relative error = ||y - y_fp32|| / ||y_fp32|| over the
model's main output on held-out inputs):

- exact: every GEMM the model has is wrapped with empty slots, forward and backward bit-identical, ``strip``
  gives back the original state_dict keys; the cell shows wrapped/total GEMMs and names the ones refused.
- W8A8: PTQ rtn, relative error < 0.1 (a unit-norm sentence embedding: mean cosine to FP32 >= 0.99, see
  ``W8A8_MIN_COS``).  W4A8 adv.: PTQ advanced pipeline, relative error < 0.5 and no larger than
  its RTN.  2:4+AdaPrune: every pruned weight is exactly 2:4 and the error is below magnitude pruning's (or
  equal). T 4:8: transposable 4:8 masks, checked 4:8 along both axes.  Train8 / GradNM: one training step,
  finite loss and gradients, weights changed.  Acc12: e4m7 accumulator forward, relative error < 0.05.
  BNS: 8 synthetic inputs whose BN statistics are closer to the model's than random inputs'.
  ONNX int8: int8 QDQ export run by ONNX Runtime, relative error to thrifty's simulated model < 0.05.
  LoadGen SS: the official LoadGen SingleStream scenario on ONNX Runtime, a valid run (at least LoadGen's
  early-stopping minimum of 64 queries; an INVALID cell gives LoadGen's reasons).

Random weights and deep BatchNorm networks: a random-init network whose BatchNorm statistics are estimated on real
inputs (``_make``; a trained model has such statistics) subtracts each channel's mean, which in a random ReLU network
removes part of every layer's signal and none of a perturbation's, so each layer amplifies relative perturbations
(Yang et al., "A Mean Field Theory of Batch Normalization", ICLR 2019). Over MobileNetV2's 53 GEMMs this compounds:
Gaussian noise of 0.1 % of each weight's std changes its output by 9 % (ResNet's 7 GEMMs here: 0.13 %, ConvNeXt 0.16 %), so 8-bit
rounding, a 12-bit accumulator, or ONNX Runtime's integer rounding one code away from the simulation's is multiplied
alike. A failing error check therefore reports the FP model's own amplification (``_gain``) when it exceeds 10x: that
error is the random model's, not the method's (a pretrained model is not chaotic).

    python experiments/coverage_matrix.py            # the whole matrix -> results/coverage_matrix.{json,md}
    python experiments/coverage_matrix.py --quick    # a small slice (what the tests run)
    python experiments/coverage_matrix.py --render   # rewrite the markdown from the JSON already in --out
"""
from __future__ import annotations

import copy
import os
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

import thrifty as th
from thrifty.bench.experiment import Experiment
from thrifty.core.select import layer_status
from thrifty.nn import is_gemm, wrap
from thrifty.ops.nm import is_nm, is_transposable
from thrifty.quant.calib import as_batches, run as run_batch


# ------------------------------------------------------------------------------------------------ architectures
class Arch:
    """One row: a model factory and its inputs (calibration and held-out batches, in the form the model takes)."""

    def __init__(self, name: str, build: Callable[[], nn.Module], inputs: Callable[[int, int], Any],
                 image_shape: tuple[int, ...] | None = None, source: str = "transformers",
                 unit_embedding: bool = False):
        self.name, self.build, self.inputs, self.image_shape, self.source = name, build, inputs, image_shape, source
        self.unit_embedding = unit_embedding  # the output is an L2-normalised embedding, judged by cosine


def _ids(vocab: int, seq: int = 16) -> Callable[[int, int], dict]:
    def make(n: int, seed: int) -> dict:
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, vocab, (n, seq), generator=g)
        mask = torch.ones(n, seq, dtype=torch.long)
        mask[n // 2:, seq * 3 // 4:] = 0  # some padded sequences: the attention mask must reach the model
        return {"input_ids": ids, "attention_mask": mask}
    return make


def _images(key: str | None, shape: tuple[int, ...]) -> Callable[[int, int], Any]:
    def make(n: int, seed: int) -> Any:
        x = torch.randn((n, *shape), generator=torch.Generator().manual_seed(seed))
        return {key: x} if key else x
    return make


def _hf(cls_name: str, cfg_name: str, **cfg: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import transformers
        torch.manual_seed(0)
        config = getattr(transformers, cfg_name)(**cfg)
        if hasattr(config, "_attn_implementation"):
            config._attn_implementation = "eager"
        return getattr(transformers, cls_name)(config).eval()
    return build


def _whisper_encoder() -> nn.Module:
    import transformers
    torch.manual_seed(0)
    cfg = transformers.WhisperConfig(d_model=64, encoder_layers=2, decoder_layers=1, encoder_attention_heads=2,
                                     decoder_attention_heads=2, encoder_ffn_dim=128, decoder_ffn_dim=128,
                                     num_mel_bins=16, max_source_positions=32, vocab_size=100,
                                     pad_token_id=0, bos_token_id=0, eos_token_id=0, decoder_start_token_id=0)
    cfg._attn_implementation = "eager"
    return transformers.WhisperModel(cfg).encoder.eval()


def _zoo(name: str, **kw: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        torch.manual_seed(0)
        return th.models.create(name, **kw).eval()
    return build


def _minilm() -> nn.Module:
    return th.models.create("minilm")


def _minilm_inputs(n: int, seed: int) -> Any:
    from thrifty.data.text import load_texts
    texts = load_texts(n, seed=seed)
    return _minilm_tokenizer().tokenize(texts, max_length=32)


_TOK: list = []


def _minilm_tokenizer() -> nn.Module:
    if not _TOK:
        _TOK.append(th.models.create("minilm"))
    return _TOK[0]


ARCHS: dict[str, Arch] = {a.name: a for a in [
    Arch("BERT", _hf("BertForSequenceClassification", "BertConfig", vocab_size=500, hidden_size=64,
                     num_hidden_layers=2, num_attention_heads=2, intermediate_size=128, num_labels=4),
         _ids(500)),
    Arch("GPT-2", _hf("GPT2LMHeadModel", "GPT2Config", vocab_size=500, n_embd=64, n_layer=2, n_head=2,
                      n_positions=64, bos_token_id=0, eos_token_id=0), _ids(500)),
    Arch("Llama", _hf("LlamaForCausalLM", "LlamaConfig", vocab_size=500, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=64), _ids(500)),
    Arch("ViT", _hf("ViTForImageClassification", "ViTConfig", image_size=32, patch_size=8, num_channels=3,
                    hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                    num_labels=10), _images("pixel_values", (3, 32, 32))),
    Arch("ResNet", _hf("ResNetForImageClassification", "ResNetConfig", num_channels=3, embedding_size=16,
                       hidden_sizes=[16, 32], depths=[1, 1], layer_type="basic", num_labels=10),
         _images("pixel_values", (3, 32, 32)), image_shape=(3, 32, 32)),
    Arch("ConvNeXt", _hf("ConvNextForImageClassification", "ConvNextConfig", num_channels=3, hidden_sizes=[16, 32],
                         depths=[1, 1], num_stages=2, num_labels=10), _images("pixel_values", (3, 32, 32))),
    Arch("MobileNetV2", _hf("MobileNetV2ForImageClassification", "MobileNetV2Config", num_channels=3,
                            image_size=32, depth_multiplier=0.35, num_labels=10),
         _images("pixel_values", (3, 32, 32)), image_shape=(3, 32, 32)),
    Arch("Whisper encoder", _whisper_encoder, _images("input_features", (16, 64))),
    Arch("resnet20 (zoo)", _zoo("resnet20", num_classes=10, in_chans=1), _images(None, (1, 32, 32)),
         image_shape=(1, 32, 32), source="thrifty"),
    Arch("mlp (zoo)", _zoo("mlp", in_features=64, num_classes=10), _images(None, (64,)), source="thrifty"),
    Arch("vit (zoo)", _zoo("vit", num_classes=10), _images(None, (1, 32, 32)), source="thrifty"),
    Arch("cnn1d (zoo)", _zoo("cnn1d", num_classes=10), _images(None, (1, 40)), source="thrifty"),
    Arch("MiniLM (real)", _minilm, _minilm_inputs, source="sentence-transformers", unit_embedding=True),
]}
QUICK_ROWS = ("BERT", "ResNet", "mlp (zoo)")


# ------------------------------------------------------------------------------------------------ helpers
class CellFail(Exception):
    """The method ran but its numeric check failed."""


class NotApplicable(Exception):
    """The method does not apply to this architecture (the message says why)."""


def _forward(model: nn.Module, data: Any) -> torch.Tensor:
    (b,) = as_batches(data, batch_size=10**9)
    return run_batch(model, b)


def _rel(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30))


def _set(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


def _gemm_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if is_gemm(m)]


def _make(arch: Arch, calib: Any) -> nn.Module:
    """The row's model with real BatchNorm statistics: random weights keep BN at its init (mean 0, var 1), which
    no trained model has and which AdaPrune's BN re-estimation would then change into another function."""
    model = arch.build()
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if bns:
        for m in bns:
            m.reset_running_stats()
            m.momentum = None  # a cumulative average over the passes
        model.train()
        with torch.no_grad():
            _forward(model, calib)
        for m in bns:
            m.momentum = 0.1
        model.eval()
    return model


def _gain(arch: Arch, calib: Any, test: Any, rel: float = 1e-3) -> float:
    """How much the FP model amplifies a small perturbation: the output's relative change per unit of relative
    Gaussian noise (``rel`` times each tensor's std) added to every GEMM weight (seeded)."""
    model = _make(arch, calib)
    y0 = _forward(model, test)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, _, why in layer_status(model):
            w = getattr(model.get_submodule(n), "weight", None) if why is None else None
            if isinstance(w, torch.Tensor) and w.numel() > 1:
                w.add_(torch.randn(w.shape, generator=g) * w.std() * rel)
        return _rel(_forward(model, test), y0) / rel


def _fail(msg: str, arch: Arch, calib: Any, test: Any) -> CellFail:
    """A failed error check; names the FP model's own amplification when it explains the error (module doc)."""
    gain = _gain(arch, calib, test)
    if gain > 10:
        msg += (f"; the FP model itself amplifies relative weight noise {gain:.0f}x (random-init deep BatchNorm "
                "network, see the module docstring)")
    return CellFail(msg)


def _check_finite(model: nn.Module, loss: torch.Tensor) -> None:
    if not torch.isfinite(loss):
        raise CellFail(f"loss {float(loss)}")
    bad = [n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
    if bad:
        raise CellFail(f"non-finite gradient in {bad[0]}")


def _train_step(model: nn.Module, data: Any) -> str:
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    # not the squared output: a normalised embedding (MiniLM) has a constant norm, so that loss has no gradient
    loss = (_forward(model, data).float() - 0.5).pow(2).mean()
    loss.backward()
    _check_finite(model, loss)
    opt.step()
    changed = sum(not torch.equal(before[n], p) for n, p in model.named_parameters())
    if changed == 0:
        raise CellFail("no weight changed")
    return f"loss {float(loss):.3g}, {changed} tensors updated"


# ------------------------------------------------------------------------------------------------ cells
def cell_exact(arch: Arch, calib: Any, test: Any) -> str:
    model = _make(arch, calib)
    ref = copy.deepcopy(model)
    status = list(layer_status(model))
    refused = {n: why for n, _, why in status if why is not None}
    names = [n for n, _, why in status if why is None]
    for n in names:
        _set(model, n, wrap(model.get_submodule(n), n))
    y, y0 = _forward(model, test), _forward(ref, test)
    if not torch.equal(y, y0):
        raise CellFail(f"forward differs by {_rel(y, y0):.2e}")
    y.float().pow(2).sum().backward()
    y0.float().pow(2).sum().backward()
    g, g0 = dict(model.named_parameters()), dict(ref.named_parameters())
    diff = [n for n in g0 if (g0[n].grad is None) != (g[n].grad is None)
            or (g0[n].grad is not None and not torch.equal(g0[n].grad, g[n].grad))]
    if diff:
        raise CellFail(f"gradient of {diff[0]} differs")
    plain = th.strip(model)
    if set(plain.state_dict()) != set(ref.state_dict()):
        raise CellFail("stripped state_dict keys differ from the original's")
    msg = f"{len(names)}/{len(status)} GEMMs bit-identical"
    if refused:
        msg += "; refused: " + ", ".join(f"{n} ({why.split(';')[0][:60]})" for n, why in list(refused.items())[:2])
    return msg


def _ptq(arch: Arch, calib: Any, test: Any, **kw: Any) -> tuple[float, Any]:
    model = _make(arch, calib)
    y0 = _forward(model, test)
    res = th.quantize(model, th.PTQ(**kw), calib, progress=False)
    return _rel(_forward(res.model, test), y0), res


# A unit-norm sentence embedding (MiniLM) is judged as its users judge it, by the cosine to FP32, at the bar of
# experiments/ptq.py (mean cosine >= 0.99 on 568 held-out sentences). For unit vectors rel. error = sqrt(2 (1 - cos)):
# "< 0.1" would demand cos >= 0.995, which per-tensor 8-bit activations miss on this pretrained model (0.9945 here,
# 0.9942 in ptq.py; outlier channels of its LayerNorm outputs stretch the FFN inputs' ranges). MSE ranges are the
# best estimator (min/max 0.9933, percentile 0.925), calibrating without padding does not help, and the loss is
# spread over all six layer groups (an FP32 input of any one of them: 0.993-0.997).
W8A8_MIN_COS = 0.99


def cell_w8a8(arch: Arch, calib: Any, test: Any) -> str:
    model = _make(arch, calib)
    y0 = _forward(model, test)
    res = th.quantize(model, th.PTQ(w_bits=8, a_bits=8, pipeline="rtn"), calib, progress=False)
    y = _forward(res.model, test)
    err, gemms = _rel(y, y0), len(_gemm_names(res.model))
    if arch.unit_embedding:
        cos = float(torch.nn.functional.cosine_similarity(y.float(), y0.float(), dim=-1).mean())
        if not cos >= W8A8_MIN_COS:
            raise CellFail(f"mean cosine to FP32 {cos:.4f} < {W8A8_MIN_COS} (rel. error {err:.3g})")
        return f"mean cosine to FP32 {cos:.4f} (rel. error {err:.4f}), {gemms} GEMMs"
    if not err < 0.1:
        raise _fail(f"rel. error {err:.3g} >= 0.1", arch, calib, test)
    return f"rel. error {err:.4f}, {gemms} GEMMs"


def cell_w4a8(arch: Arch, calib: Any, test: Any) -> str:
    rtn, _ = _ptq(arch, calib, test, w_bits=4, a_bits=8, pipeline="rtn")
    adv, _ = _ptq(arch, calib, test, w_bits=4, a_bits=8, pipeline="advanced", adaquant_iters=20, bias_iters=10)
    if not (adv < 0.5 and adv <= rtn * 1.0001):
        raise _fail(f"advanced {adv:.3g} vs rtn {rtn:.3g}", arch, calib, test)
    return f"rel. error {adv:.4f} (rtn {rtn:.4f})"


def _plain_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Strip ``model`` and return each formerly wrapped layer's weight in its GEMM layout ``[out, in, *k]`` (what
    :func:`thrifty.ops.nm.is_nm` / ``is_transposable`` read, channels last for a convolution)."""
    ops = {n: model.get_submodule(n).op for n in _gemm_names(model)}
    plain = th.strip(model)
    return {n: op.gemm_weight(plain.get_submodule(n).weight.detach()) for n, op in ops.items()}


def cell_nm_adaprune(arch: Arch, calib: Any, test: Any) -> str:
    base = _make(arch, calib)
    y0 = _forward(base, test)
    mag = th.sparse.sparsify(copy.deepcopy(base), th.NM(2, 4))
    e_mag = _rel(_forward(mag, test), y0)
    model = copy.deepcopy(base)
    th.sparse.adaprune(model, th.NM(2, 4), calib, steps=50)
    e_ada = _rel(_forward(model, test), y0)
    wrapped = _gemm_names(mag)
    for n, w in _plain_weights(model).items():
        if not is_nm(w, 2, 4):
            raise CellFail(f"{n} is not 2:4")
    if not e_ada <= e_mag * 1.0001:
        raise _fail(f"AdaPrune {e_ada:.3g} > magnitude {e_mag:.3g}", arch, calib, test)
    return f"rel. error {e_ada:.3f} (magnitude {e_mag:.3f}), {len(wrapped)} layers"


def cell_t48(arch: Arch, calib: Any, test: Any) -> str:
    model = _make(arch, calib)
    y0 = _forward(model, test)
    th.sparse.sparsify(model, th.NM(4, 8, transposable=True))
    names = _gemm_names(model)
    err = _rel(_forward(model, test), y0)
    for n, w in _plain_weights(model).items():
        if not is_transposable(w, 4, 8):
            raise CellFail(f"{n} is not transposable 4:8")
    return f"{len(names)} layers, rel. error {err:.3f}"


def cell_train8(arch: Arch, calib: Any, test: Any) -> str:
    model = _make(arch, calib)
    th.apply(model, th.Train8())
    return f"{len(_gemm_names(model))} GEMMs, " + _train_step(model, calib)


def cell_gradnm(arch: Arch, calib: Any, test: Any) -> str:
    model = _make(arch, calib)
    th.apply(model, th.GradNM(2, 4, method="mvue"))
    return f"{len(_gemm_names(model))} GEMMs, " + _train_step(model, calib)


def cell_acc12(arch: Arch, calib: Any, test: Any) -> str:
    model = _make(arch, calib)
    y0 = _forward(model, test)
    th.apply(model, th.AccumConfig(exp_bits=4, man_bits=7, chunk=16))
    with torch.no_grad():
        err = _rel(_forward(model, test), y0)
    if not err < 0.05:
        raise _fail(f"rel. error {err:.3g}", arch, calib, test)
    return f"rel. error {err:.4f}, {len(_gemm_names(model))} GEMMs"


def cell_bns(arch: Arch, calib: Any, test: Any) -> str:
    model = _make(arch, calib)
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns or arch.image_shape is None:
        raise NotApplicable("no BatchNorm statistics to match" if not bns else "input is not an image tensor")
    # BN statistics of inputs unlike the synthesiser's starting noise (mean 1, std 0.5, as image pixels are), so
    # that matching them is the synthesiser's work and not the noise's
    model.train()
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    with torch.no_grad():
        model(torch.randn((64, *arch.image_shape), generator=torch.Generator().manual_seed(2)) * 0.5 + 1.0)
    model.eval()
    syn = th.synthesize(model, th.datafree.Synth(method="bns", optim={"steps": 30}), 8, input_shape=arch.image_shape)
    x = syn.tensors[0]

    def bn_dist(inp: torch.Tensor) -> float:
        stats: list[float] = []
        hooks = [m.register_forward_hook(lambda mod, i, o: stats.append(
            float((i[0].transpose(0, 1).flatten(1).mean(1) - mod.running_mean).pow(2).mean()))) for m in bns]
        with torch.no_grad():
            model(inp)
        for h in hooks:
            h.remove()
        return sum(stats) / len(stats)

    d_syn, d_rand = bn_dist(x), bn_dist(torch.randn_like(x))
    if not d_syn < d_rand:
        raise CellFail(f"BN mean distance {d_syn:.3g} not below random inputs' {d_rand:.3g}")
    return f"BN mean distance {d_syn:.3g} (random {d_rand:.3g})"


def _onnx_inputs(test: Any) -> tuple[tuple, list[str] | None]:
    if isinstance(test, dict):
        return tuple(test.values()), list(test)
    return (test,), None


def cell_onnx(arch: Arch, calib: Any, test: Any) -> str:
    import numpy as np
    import onnxruntime as ort
    _, res = _ptq(arch, calib, test, w_bits=8, a_bits=8, pipeline="rtn")
    args, names = _onnx_inputs(test)
    with tempfile.TemporaryDirectory() as d, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = th.bench.export_onnx(res.model, args, Path(d) / "m.onnx", input_names=names)
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        feeds = {i.name: a.numpy() for i, a in zip(sess.get_inputs(), args)}
        y = torch.from_numpy(np.asarray(sess.run(None, feeds)[0]))
    ref = _forward(res.model, test)
    err = _rel(y, ref)
    if not err < 0.05:
        raise _fail(f"ORT vs simulated rel. error {err:.3g}", arch, calib, test)
    return f"ORT vs simulated rel. error {err:.4f}"


def cell_loadgen(arch: Arch, calib: Any, test: Any) -> str:
    _, res = _ptq(arch, calib, test, w_bits=8, a_bits=8, pipeline="rtn")
    with tempfile.TemporaryDirectory() as d:
        # min_query_count None: LoadGen's early-stopping minimum (64 SingleStream queries); fewer make a model
        # slower than min_duration / 64 (3 ms: Llama, MiniLM) INVALID however steady its latency
        settings = th.bench.BenchConfig(min_duration_s=0.2, workers=1, threads=1)
        rep = th.bench.run(res.model, settings, test, scenarios="SingleStream", backend="onnxruntime",
                           outdir=d, accuracy=False, isolate=False, calib=None)
    sc = rep["scenarios"]["SingleStream"]
    if not sc.get("valid", True):
        raise CellFail("LoadGen marked the run invalid: " + "; ".join(sc.get("reasons") or ["no reason given"]))
    return f"VALID, p90 latency {sc['value']:.3g} ms"


CELLS: dict[str, Callable[[Arch, Any, Any], str]] = {
    "exact": cell_exact, "W8A8": cell_w8a8, "W4A8 adv.": cell_w4a8, "2:4+AdaPrune": cell_nm_adaprune,
    "T 4:8": cell_t48, "Train8": cell_train8, "GradNM": cell_gradnm, "Acc12": cell_acc12, "BNS": cell_bns,
    "ONNX int8": cell_onnx, "LoadGen SS": cell_loadgen,
}
QUICK_COLS = ("exact", "W8A8", "2:4+AdaPrune", "GradNM")


def run_cell(arch: Arch, col: str, calib: Any, test: Any) -> dict[str, Any]:
    t0 = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            msg, status = CELLS[col](arch, calib, test), "ok"
    except NotApplicable as e:
        msg, status = str(e), "n/a"
    except CellFail as e:
        msg, status = str(e), "fail"
    except Exception as e:  # noqa: BLE001 - the matrix records what a user would see
        msg, status = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300], "error"
        if os.environ.get("THRIFTY_DEBUG"):
            traceback.print_exc()
    return {"status": status, "detail": msg, "seconds": round(time.perf_counter() - t0, 2)}


def run_matrix(rows: list[str], cols: list[str], n_calib: int = 16, n_test: int = 8,
               progress: bool | None = None) -> dict[str, dict[str, dict[str, Any]]]:
    """Run every (row, column) cell; returns ``{row: {col: {"status", "detail", "seconds"}}}``."""
    from thrifty.utils import show_progress
    from tqdm.auto import tqdm
    out: dict[str, dict[str, dict[str, Any]]] = {}
    bar = tqdm(total=len(rows) * len(cols), disable=not show_progress(progress), desc="coverage")
    for r in rows:
        arch = ARCHS[r]
        out[r] = {}
        try:
            calib, test = arch.inputs(n_calib, 0), arch.inputs(n_test, 1)
        except Exception as e:  # noqa: BLE001
            out[r] = {c: {"status": "error", "detail": f"inputs: {type(e).__name__}: {e}"[:300], "seconds": 0.0}
                      for c in cols}
            bar.update(len(cols))
            continue
        for c in cols:
            bar.set_postfix_str(f"{r} / {c}")
            out[r][c] = run_cell(arch, c, calib, test)
            bar.update(1)
            if bar.disable:  # a log still shows where a long run is
                cell = out[r][c]
                print(f"coverage: {r} / {c}: {cell['status']} ({cell['seconds']:.1f} s)", file=sys.stderr, flush=True)
    bar.close()
    return out


_MARK = {"ok": "ok", "fail": "FAIL", "error": "error", "n/a": "n/a"}


def to_markdown(matrix: dict[str, dict[str, dict[str, Any]]], cols: list[str]) -> str:
    lines = ["| architecture | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for r, cells in matrix.items():
        lines.append(f"| {r} | " + " | ".join(_MARK[cells[c]["status"]] for c in cols) + " |")
    lines += ["", "Details (the numeric check of every cell, or the message a user gets):", ""]
    for r, cells in matrix.items():
        for c in cols:
            cell = cells[c]
            lines.append(f"- {r} / {c}: **{cell['status']}** - {cell['detail']} ({cell['seconds']:.1f} s)")
    return "\n".join(lines) + "\n"


def _markdown(res: dict[str, Any]) -> str:
    counts = res["counts"]
    head = (f"# Coverage matrix\n\n`{res['command']}`: {len(res['rows'])} architectures x {len(res['cols'])} methods "
            f"in {res['wall_s']:.0f} s ({res['threads']} threads); "
            + ", ".join(f"{v} {k}" for k, v in counts.items()) + ".\n\n")
    return head + to_markdown(res["matrix"], res["cols"])


def science(args: Any, exp: Experiment) -> dict[str, Any]:
    rows = args.rows or list(QUICK_ROWS if args.quick else ARCHS)
    cols = args.cols or list(QUICK_COLS if args.quick else CELLS)
    unknown = [r for r in rows if r not in ARCHS] + [c for c in cols if c not in CELLS]
    if unknown:
        exp.parser.error(f"unknown rows/columns {unknown}; rows: {list(ARCHS)}; columns: {list(CELLS)}")
    matrix = run_matrix(rows, cols)
    counts = {s: sum(c["status"] == s for cells in matrix.values() for c in cells.values()) for s in _MARK}
    return {"rows": rows, "cols": cols, "matrix": matrix, "counts": counts, "wall_s": exp.seconds(),
            "threads": args.threads, "quick": args.quick, "command": exp.command}


def main(argv: list[str] | None = None) -> int:
    exp = Experiment("coverage_matrix", __doc__, threads=2)
    exp.parser.add_argument("--rows", nargs="*", default=None, help="architectures (default: all)")
    exp.parser.add_argument("--cols", nargs="*", default=None, help="methods (default: all)")
    exp.parser.epilog = f"--quick runs rows {QUICK_ROWS} x columns {QUICK_COLS}"
    return exp.run(lambda args: science(args, exp), _markdown, argv=argv)


if __name__ == "__main__":
    raise SystemExit(main())
