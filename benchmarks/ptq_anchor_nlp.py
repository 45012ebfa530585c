"""The transformer workloads of benchmarks/ptq_anchor.py: all-MiniLM-L6-v2 (W4A8) and the causal LM (W4A16).

Both sides of each workload live here: ``*_bundle`` (thrifty's python) builds the FP32 model, the calibration and
held-out tensors and the quantizer placement; ``aimet_linears`` (the anchor's python: torch, transformers and
aimet-torch, no thrifty) runs AIMET AdaRound on every nn.Linear; ``*_thrifty_rows`` runs thrifty on the same
bundle. The models travel in the bundle file as transformers modules (the anchor's python needs transformers).

MiniLM: the calibration and held-out sentences of experiments/ptq.py, tokenized once each and padded to the
longest sentence of their set (AdaRound concatenates the cached layer inputs of all batches, so every batch has
one length; thrifty gets the same tensors). Placement as thrifty's: every Linear of the encoder and the pooler
gets per-channel asymmetric weights and a per-tensor asymmetric 8-bit input quantizer, the first and last GEMM
(layer 0's query, the pooler) at 8/8 bit; embeddings, LayerNorms and the attention products stay FP32. Metric:
mean cosine of the sentence embeddings (mean pooling, L2 norm) to FP32's on the held-out sentences.

Causal LM: tinyllama of thrifty.train.lm.pretrained_lm and the windows of experiments/causal_lm.py (64 training
windows for calibration, the held-out windows for perplexity), every Linear (LM head included) at W4, activations
FP (W4A16), per channel or per group of 64; thrifty AdaQuant with causal_lm.py's settings. AIMET per group: its
block-wise weight quantizers (set_blockwise_quantization_for_weights) on AdaRound's QuantSim and on the final one;
aimet-torch 2.42.0's AdaRound wrapper cannot take a block-wise grid itself (blockwise_adaround gives it per element).
Each AIMET row records AdaRound's per-layer CPU seconds (adaround_costs), from which a smaller run (``--quick``:
50 iterations, 16 windows) extrapolates the full run's cost (aimet_estimate).
"""
from __future__ import annotations

import contextlib
import json
import math
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

GROUP = 64
LM_CALIB, LM_CALIB_QUICK = 64, 16  # calibration windows, as experiments/causal_lm.py


# ------------------------------------------------------------------------------------------------ anchor side
class Embedder(torch.nn.Module):
    """MiniLM's sentence embedding (thrifty.models.minilm.MiniLM.forward) around a transformers BertModel."""

    def __init__(self, bert: torch.nn.Module) -> None:
        super().__init__()
        self.bert = bert

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        tokens = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(tokens.dtype)
        return F.normalize((tokens * mask).sum(1) / mask.sum(1).clamp_min(1e-9), p=2, dim=1)


class Logits(torch.nn.Module):
    """A causal LM's logits (the transformers output object does not trace)."""

    def __init__(self, lm: torch.nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.lm(input_ids=input_ids).logits


def wrap(bundle: dict) -> torch.nn.Module:
    return (Embedder if bundle["workload"] == "minilm" else Logits)(bundle["model"]).eval()


# per-channel asymmetric weights, FP32 biases; activation quantizers are placed by hand (drop_act_quantizers)
AIMET_CONFIG = {"defaults": {"ops": {"is_output_quantized": "True"},
                             "params": {"is_quantized": "True", "is_symmetric": "False"},
                             "strict_symmetric": "False", "per_channel_quantization": "True"},
                "params": {"bias": {"is_quantized": "False"}},
                "op_type": {}, "supergroups": [], "model_input": {"is_input_quantized": "True"}, "model_output": {}}


def drop_act_quantizers(qm: torch.nn.Module) -> None:
    """Remove the input/output quantizers AIMET's QuantSim put on module ``qm`` (thrifty's placement is set after)."""
    for attr in ("input_quantizers", "output_quantizers"):
        qs = getattr(qm, attr, None)
        if qs is not None:
            for i in range(len(qs)):
                qs[i] = None


def expand_blocks(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A quantizer's scale or offset as one value per weight element: a block-wise (per-group) one, shape
    [out, in / group], has each block's value repeated over its group (blocks are contiguous along that axis)."""
    if t.dim() != like.dim():
        raise ValueError(f"quantizer parameter of shape {tuple(t.shape)} does not match weight {tuple(like.shape)}")
    for d, (n, m) in enumerate(zip(t.shape, like.shape)):
        if n not in (1, m):
            if m % n:
                raise ValueError(f"weight axis {d} of size {m} is not a multiple of {n} blocks")
            t = t.repeat_interleave(m // n, dim=d)
    return t.expand_as(like)


@contextlib.contextmanager
def blockwise_adaround():
    """Let AIMET's AdaRound handle block-wise weight quantizers. aimet-torch 2.42.0's AdaroundWrapper takes the
    weight grid as ``scale.expand_as(weight)``, which works per tensor and per channel but raises for a per-group
    scale ([out, in / group]). AdaRound itself learns one rounding decision per element on a fixed grid, so the
    grid is given per element here (expand_blocks); everything else is AIMET's own code."""
    from aimet_torch.adaround.adaround_weight import AdaroundWrapper

    original = AdaroundWrapper._get_weight_quantizer_delta_and_offset

    def per_element(self):
        q = self.module_to_wrap.param_quantizers[self.weight_name]
        return expand_blocks(q.get_scale(), self.weight), expand_blocks(q.get_offset(), self.weight)

    AdaroundWrapper._get_weight_quantizer_delta_and_offset = per_element
    try:
        yield
    finally:
        AdaroundWrapper._get_weight_quantizer_delta_and_offset = original


@contextlib.contextmanager
def adaround_costs(costs: dict):
    """Record AIMET AdaRound's CPU seconds per layer into ``costs``: ``layers`` (layers optimised), ``layer_cpu_s``
    (all the per-layer work), ``loop_cpu_s`` (the optimisation loop: scales with the iterations and the samples per
    step) and ``sampling_cpu_s`` (caching the layer's input/output activations on every calibration batch, once per
    layer: scales with the calibration set). Everything outside (QuantSim building, the graph trace) is not counted
    here."""
    import time

    from aimet_torch._base.adaround.activation_sampler import ActivationSampler
    from aimet_torch._base.adaround.adaround_optimizer import AdaroundOptimizer

    costs.update(layers=0, layer_cpu_s=0.0, loop_cpu_s=0.0, sampling_cpu_s=0.0)
    originals = {"adaround_module": AdaroundOptimizer.adaround_module,
                 "_optimize_rounding": AdaroundOptimizer._optimize_rounding}
    sample_all = ActivationSampler.sample_and_place_all_acts_on_cpu

    def timed(key, fn, count=False):
        def run(*args, **kwargs):
            c = time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                costs[key] += time.process_time() - c
                costs["layers"] += int(count)
        return run

    AdaroundOptimizer.adaround_module = classmethod(
        lambda cls, *a, **k: timed("layer_cpu_s", originals["adaround_module"], count=True)(*a, **k))
    AdaroundOptimizer._optimize_rounding = classmethod(
        lambda cls, *a, **k: timed("loop_cpu_s", originals["_optimize_rounding"])(*a, **k))
    ActivationSampler.sample_and_place_all_acts_on_cpu = timed("sampling_cpu_s", sample_all)
    try:
        yield costs
    finally:
        for name, fn in originals.items():
            setattr(AdaroundOptimizer, name, classmethod(fn.__func__))
        ActivationSampler.sample_and_place_all_acts_on_cpu = sample_all
        costs["loop_cpu_s"] -= costs["sampling_cpu_s"]  # the sampling runs inside _optimize_rounding


def aimet_linears(bundle: dict, w_bits: int, a_bits: int | None, iters: int, group: int | None = None,
                  costs: dict | None = None):
    """AIMET AdaRound (``iters`` per layer) on every nn.Linear of the bundle's model, then a QuantSim with one
    per-tensor asymmetric input quantizer on each Linear (none when ``a_bits`` is None) and no other quantizer:
    thrifty's placement. Modules that are not Linear (embeddings, norms) are left out of quantization. With
    ``group``, the weight quantizers are block-wise (per group of ``group`` input channels) both during AdaRound
    and in the final QuantSim. ``costs`` (a dict) receives AdaRound's per-layer CPU seconds (adaround_costs)."""
    import copy

    from aimet_torch.adaround.adaround_weight import Adaround, AdaroundParameters
    from aimet_torch.common.defs import QuantScheme
    from aimet_torch.quantization.affine import QuantizeDequantize
    from aimet_torch.quantization.encoding_analyzer import SqnrEncodingAnalyzer
    from aimet_torch.quantsim import QuantizationSimModel
    from aimet_torch.quantsim.config_utils import set_blockwise_quantization_for_weights

    model = wrap({**bundle, "model": copy.deepcopy(bundle["model"])})
    batches = [tuple(b) for b in bundle["calib"]]
    dummy = tuple(t[:1] for t in batches[0])
    linears = {n for n, m in model.named_modules() if type(m) is torch.nn.Linear}
    first_last = {"bert." + n if bundle["workload"] == "minilm" else "lm." + n for n in bundle["first_last"]}
    fl_bits = bundle["first_last_bits"]
    others = [m for n, m in model.named_modules()
              if n not in linears and any(True for _ in m.parameters(recurse=False))]
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Path(tmp) / "config.json"
        cfg.write_text(json.dumps(AIMET_CONFIG))
        params = AdaroundParameters(data_loader=batches, num_batches=len(batches), default_num_iterations=iters,
                                    forward_fn=lambda m, b: m(*b))
        overrides = [(model.get_submodule(n), fl_bits) for n in sorted(first_last)] if fl_bits != w_bits else None
        scheme = QuantScheme.post_training_tf_enhanced
        timed = adaround_costs({} if costs is None else costs)
        if group is None:
            with timed:
                ada = Adaround.apply_adaround(model, dummy, params, path=tmp, filename_prefix="ada",
                                              default_param_bw=w_bits, param_bw_override_list=overrides,
                                              ignore_quant_ops_list=others, default_quant_scheme=scheme,
                                              default_config_file=str(cfg))
        else:  # apply_adaround's own steps, with block-wise (per-group) weight quantizers set on its QuantSim
            if overrides:
                raise ValueError("per-group AdaRound here assumes every Linear at the same bit-width")
            ada_sim = Adaround._get_quantsim(model, dummy_input=dummy, quant_scheme=scheme, default_param_bw=w_bits,
                                             config_file=str(cfg))
            set_blockwise_quantization_for_weights(ada_sim, [torch.nn.Linear], w_bits, False, group)
            Adaround._exclude_modules(model, ada_sim, others)
            Adaround._compute_param_encodings(ada_sim)
            with blockwise_adaround(), timed:
                ada = Adaround._apply_adaround(ada_sim, model, dummy, params, tmp, "ada")
        sim = QuantizationSimModel(ada, dummy, quant_scheme=scheme, default_output_bw=a_bits or 8,
                                   default_param_bw=w_bits, config_file=str(cfg))
        if group is not None:
            set_blockwise_quantization_for_weights(sim, [torch.nn.Linear], w_bits, False, group)
        sim.set_and_freeze_param_encodings(encoding_path=str(Path(tmp) / "ada.encodings"))
    for name, qm in sim.model.named_modules():
        drop_act_quantizers(qm)
        pq = getattr(qm, "param_quantizers", None)
        if pq is not None and name not in linears:
            for k in list(pq.keys()):
                pq[k] = None
        if name in linears and a_bits is not None:
            bits = fl_bits if name in first_last else a_bits
            qm.input_quantizers[0] = QuantizeDequantize((), bits, symmetric=False,
                                                        encoding_analyzer=SqnrEncodingAnalyzer(()))
    if a_bits is not None:
        with torch.no_grad():
            sim.compute_encodings(lambda m: [m(*b) for b in batches])
    shape = {n: tuple(getattr(sim.model.get_submodule(n).param_quantizers["weight"], "shape", ())) for n in linears}
    return sim.model.eval(), shape


# ------------------------------------------------------------------------------------ AdaRound cost (rendering)

FULL_ITERS = 2000  # AdaRound's default budget (--aimet-iters)
AIMET_STEP = 32  # samples (sentences / windows) per AdaRound step: aimet-torch's adaround_optimizer.BATCH_SIZE


def aimet_estimate(a: dict, cpu_s: float, n_full: int, iters: int = FULL_ITERS) -> float:
    """AIMET's CPU seconds for a run at ``iters`` iterations on ``n_full`` calibration samples, extrapolated from
    a measured row (``a``: its per-layer costs, ``cpu_s``: the row's total): the optimisation loop scales with the
    iterations and the samples per step (min(32, calibration set)), the activation caching with the calibration
    set, the rest (graph tracing, QuantSim, per-layer set-up, scoring) is kept as measured."""
    step = min(AIMET_STEP, n_full) / min(AIMET_STEP, a["n_calib"])
    return (cpu_s - a["loop_cpu_s"] - a["sampling_cpu_s"] + a["sampling_cpu_s"] * n_full / a["n_calib"]
            + a["loop_cpu_s"] * iters / a["iters"] * step)


def aimet_cost(part: dict) -> list[str]:
    """AIMET AdaRound's measured per-layer cost and, for a smaller run, the full run's estimate."""
    out = []
    for r in part["rows"]:
        a = r.get("adaround")
        if not a:
            continue
        n = a["layers"]
        line = (f"- AIMET {r['precision']}: {n} layers, {a['layer_cpu_s'] / n:.2f} CPU s per layer at {a['iters']} "
                f"iterations ({a['loop_cpu_s'] / n:.2f} optimisation loop, {a['sampling_cpu_s'] / n:.2f} caching the "
                f"layer's activations on {a['n_calib']} calibration samples), {r['cpu_s'] - a['layer_cpu_s']:.0f} CPU "
                "s outside the layers (graph tracing, QuantSim, scoring).")
        full = part.get("n_calib_full", a["n_calib"])
        if a["iters"] != FULL_ITERS or full != a["n_calib"]:
            est = aimet_estimate(a, r["cpu_s"], full)
            line += (f" Extrapolated to {FULL_ITERS} iterations on {full} calibration samples (loop x iterations x "
                     f"samples per step, min({AIMET_STEP}, set); caching x set size): about {est:.0f} CPU s "
                     f"({est / 60:.0f} CPU minutes).")
        out.append(line)
    return ["", "AdaRound cost (CPU s, 1 torch thread):", "", *out] if out else []


# ------------------------------------------------------------------------------------------ metrics (both sides)
@torch.no_grad()
def score(bundle: dict, model: torch.nn.Module) -> dict:
    if bundle["workload"] == "minilm":
        emb = torch.cat([model(*b) for b in bundle["test"]])
        cos = F.cosine_similarity(emb, bundle["ref"]).float()
        return dict(mean_cos=float(cos.mean()), min_cos=float(cos.min()))
    nll, n = 0.0, 0
    for x in bundle["test"].split(32):
        logits = model(x)
        nll += float(F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                                     reduction="sum"))
        n += x[:, 1:].numel()
    return dict(ppl=math.exp(nll / n))


# ----------------------------------------------------------------------------------------------- thrifty side
def minilm_bundle(quick: bool) -> dict:
    from thrifty.data import calibration_subset, load_dataset
    from thrifty.models import create

    fp = create("minilm")
    splits = load_dataset("text")
    train_texts, test_texts = list(splits.train_texts), list(splits.test_texts)
    idx = calibration_subset(splits.train, per_class=10, seed=0).tensors[0].tolist()  # as experiments/ptq.py
    calib_texts = [train_texts[int(i)] for i in idx]
    n_full = len(calib_texts)
    if quick:
        calib_texts, test_texts = calib_texts[:32], test_texts[:64]

    def tok(texts):  # one padding length for the whole set (see the module docstring), batches of 32
        enc = fp.tokenize(texts, max_length=128)
        return list(zip(enc["input_ids"].split(32), enc["attention_mask"].split(32)))

    calib, test = tok(calib_texts), tok(test_texts)
    with torch.no_grad():
        ref = torch.cat([fp(*b) for b in test])
    gemms = [n for n, m in fp.bert.named_modules() if isinstance(m, torch.nn.Linear)]
    return dict(workload="minilm", model=fp.bert, calib=calib, test=test, ref=ref, first_last=[gemms[0], gemms[-1]],
                first_last_bits=8, precisions=[(4, 8, None)], n_calib=len(calib_texts), n_calib_full=n_full,
                n_test=len(test_texts))


def precision_name(w_bits: int, a_bits: int | None, group: int | None) -> str:
    """The table's name of a precision: ``precision_name(4, None, 64) == "W4A16 g64"``."""
    return f"W{w_bits}A{a_bits or 16}" + (f" g{group}" if group else "")


def lm_bundle(quick: bool) -> dict:
    from thrifty.data.lm import lm_tokens, lm_windows
    from thrifty.train.lm import LM_SEQ_LEN, pretrained_lm

    fp = pretrained_lm().eval()
    t = lm_tokens("train")  # 64 random training windows, as experiments/causal_lm.py's _calib
    g = torch.Generator().manual_seed(0)
    starts = torch.randint(0, t.numel() - LM_SEQ_LEN + 1, (LM_CALIB_QUICK if quick else LM_CALIB,), generator=g)
    calib = t[starts[:, None] + torch.arange(LM_SEQ_LEN)]
    test = lm_windows("test", LM_SEQ_LEN, n=32 if quick else None)
    gemms = [n for n, m in fp.named_modules() if isinstance(m, torch.nn.Linear)]
    b = dict(workload="lm", model=fp, calib=[(x,) for x in calib.split(32)], test=test,
             first_last=[gemms[0], gemms[-1]], first_last_bits=4, precisions=[(4, None, None), (4, None, GROUP)],
             n_calib=int(calib.shape[0]), n_calib_full=LM_CALIB, n_test=int(test.shape[0]))
    b["fp32_ppl"] = score(b, wrap(b))["ppl"]
    return b


def thrifty_rows(bundle: dict, quick: bool, timed) -> list[dict]:
    """thrifty on the bundle: MiniLM W4A8 rtn + advanced (library defaults); LM W4A16 rtn + AdaQuant
    (experiments/causal_lm.py's settings). ``timed(fn)`` -> (result, wall, cpu)."""
    import warnings

    from thrifty.quant import PTQ, quantize

    rows = []
    if bundle["workload"] == "minilm":
        fp = wrap(bundle)
        calib = [{"input_ids": i, "attention_mask": a} for i, a in bundle["calib"]]
        quick_kw = dict(adaquant_iters=30, bias_iters=20) if quick else {}
        cfgs = [("rtn", PTQ(w_bits=4, a_bits=8, pipeline="rtn")),
                ("advanced (quick: AdaQuant 30, bias tuning 20 iterations)" if quick else "advanced (library defaults)",
                 PTQ(w_bits=4, a_bits=8, pipeline="advanced", **quick_kw))]
    else:
        fp = wrap(bundle)
        calib = [{"input_ids": x} for (x,) in bundle["calib"]]
        iters = 20 if quick else 100
        cfgs = [(f"{p} ({iters} iterations)" if p == "adaquant" else p,
                 PTQ(w_bits=4, a_bits=None, first_last_bits=4, pipeline=p, group_size=g, loss="kl",
                     adaquant_iters=iters, batch_size=32, adaquant_batch=8))
                for _, _, g in bundle["precisions"] for p in ("rtn", "adaquant")]
    for method, cfg in cfgs:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # embeddings / norms stay FP32 (listed in the warning)
            res, wall, cpu = timed(lambda: quantize(fp, cfg, calib, progress=False))
        prec = precision_name(cfg.w_bits, cfg.a_bits, cfg.group_size)
        rows.append(dict(tool="thrifty", method=method, precision=prec, **score(bundle, res.model),
                         cpu_s=cpu, wall_s=wall))
        print(json.dumps(rows[-1]), flush=True)
    return rows
