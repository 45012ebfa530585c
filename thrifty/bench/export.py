"""ONNX export: float32, and int8 QuantizeLinear/DequantizeLinear graphs that reuse thrifty's own quantizers.

For every Gemm layer whose weight slot ends in a frozen quantizer (``thrifty.quant.UniformQuantizer`` or anything
with ``bits/symmetric/per_channel/axis/scale/zero_point``), the exported graph stores the quantizer's integer codes
with its per-channel scales/zero points behind a DequantizeLinear, in the int8 or uint8 container that runs
fastest and exactly on this CPU (:func:`weight_container`; codes and zero points shift by ``2^(b-1)``); the input
quantizer becomes a per-tensor QuantizeLinear -> DequantizeLinear pair with the same scale/zero point. A
BatchNormalization right after a quantized Conv is folded into that Conv's per-channel weight scales (codes keep
their values, up to sign), so ONNX Runtime can fuse DQ -> Conv -> Q into QLinearConv. Nothing is re-quantized:
the parameters are exactly the PTQ result's (the container's shift leaves every dequantized weight unchanged).
Given calibration data, residual Adds become integer too (:mod:`thrifty.bench.int8_graph`), which adds a few
calibrated output quantizers the simulated model lacks.

Example:
    >>> import torch, torch.nn as nn
    >>> from thrifty.bench.export import export_onnx
    >>> p = export_onnx(nn.Sequential(nn.Linear(4, 2)), (torch.randn(1, 4),), "/tmp/thrifty_doc.onnx")
    >>> p.name
    'thrifty_doc.onnx'
"""
from __future__ import annotations

import copy
import io
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn

from thrifty.bench.adapter import keyword_call
from thrifty.bench.layout import default_activation_dtype, hoist_quantize, quantize_biases, set_activation_dtype
from thrifty.utils import atomic_write_bytes

__all__ = ["export_onnx", "weight_codes_name", "LayerQuant", "quant_layers", "cpu_has_vnni", "weight_container",
           "exact_fast_w_bits", "U8S8_EXACT_MAX_CODE"]

# Without VNNI, ONNX Runtime's x86 u8s8 kernels multiply with VPMADDUBSW: two u8 x s8 products summed into a
# saturating int16. The sum is exact for every u8 activation when each stored weight code has |code| <= 64
# (255 * 64 * 2 = 32640 <= 32767); one code of 65 already allows 255 * 65 * 2 = 33150.
U8S8_EXACT_MAX_CODE = 64


@dataclass
class LayerQuant:
    """The integer form of one quantized Gemm layer, read from its slot quantizers."""

    name: str
    weight: np.ndarray           # W_eff, float32, GEMM layout [out, in, *k] (strip() bakes it in; a GPT-2
    codes: np.ndarray            # Conv1D stores it transposed, [in, out]); integer codes, same layout
    w_scale: np.ndarray          # (out,) per-channel or () per-tensor
    w_zp: np.ndarray             # same shape as w_scale, integer
    w_signed: bool
    w_bits: int
    x_qparams: Optional[tuple[float, int, int, int, bool]]  # (scale, zp, qmin, qmax, signed) or None


def _is_quantizer(m: Any) -> bool:
    return all(hasattr(m, a) for a in ("bits", "symmetric", "per_channel", "scale", "zero_point"))


def _last_quantizer(slot: Optional[nn.Module]) -> tuple[Optional[nn.Module], int]:
    """The slot's quantizer if it is the slot's last transform, and how many transforms the slot has."""
    if slot is None:
        return None, 0
    mods = list(slot.children()) if isinstance(slot, nn.Sequential) else [slot]
    last = mods[-1] if mods else None
    return (last if _is_quantizer(last) else None), len(mods)


def _weight_quantizer(slot: Optional[nn.Module]) -> Optional[nn.Module]:
    """The weight slot's last quantizer. Transforms after it (an N:M mask zeroing weights) are fine when the
    effective weight stays on the quantizer's grid, which :func:`quant_layers` checks."""
    if slot is None:
        return None
    mods = list(slot.children()) if isinstance(slot, nn.Sequential) else [slot]
    return next((m for m in reversed(mods) if _is_quantizer(m)), None)


def _qparams(q: nn.Module, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    from thrifty.ops import quant as Q

    if getattr(q, "mode", "frozen") != "frozen":  # dynamic quantizers: the same range they would use now
        lo, hi = Q.estimate_range(t, getattr(q, "estimator", "minmax"), bits=q.bits, symmetric=q.symmetric,
                                  axis=q.axis if q.per_channel else None, **getattr(q, "estimator_kw", {}))
        return Q.qparams_from_range(lo, hi, q.bits, q.symmetric)
    return q.scale.detach().float(), q.zero_point.detach().float()


@torch.no_grad()
def quant_layers(model: nn.Module, skip: Sequence[str] = ()) -> list[LayerQuant]:
    """Integer codes/scales of every Gemm layer with a weight quantizer (ValueError for unexportable ones);
    ``skip``: layers deployed another way (:func:`thrifty.bench.w4.nbits_layers`)."""
    from thrifty.nn import gemm_layers
    from thrifty.ops import quant as Q

    out = []
    for name, layer in gemm_layers(model):
        if name in skip:
            continue
        wq = _weight_quantizer(getattr(layer.slots, "weight", None))
        xq, nx = _last_quantizer(getattr(layer.slots, "input", None))
        if wq is None:
            if xq is not None:
                raise ValueError(f"layer {name!r}: input is quantized but the weight is not; int8 export needs both")
            continue
        if nx > 1:
            raise ValueError(f"layer {name!r}: the input slot has {nx} transforms; only a single quantizer "
                             f"can be exported to ONNX")
        if wq.bits > 8 or (xq is not None and xq.bits > 8):
            raise ValueError(f"layer {name!r}: {max(wq.bits, getattr(xq, 'bits', 0))}-bit quantizers do not fit "
                             f"int8/uint8 ONNX tensors")
        if getattr(wq, "group_size", None) is not None:
            raise ValueError(f"layer {name!r}: per-group weight quantization (group_size={wq.group_size}) has no "
                             f"int8 ONNX form here (one weight scale per output channel); only weight-only "
                             f"nn.Linear layers of at most 4 bits deploy per group (MatMulNBits); strip() the model "
                             f"and export it in float, or quantize without group_size")
        kind = getattr(getattr(layer, "op", None), "kind", None)
        out_axis = 1 if kind == "linear_t" else 0  # GPT-2's Conv1D stores its weight [in, out]
        if kind is not None and kind.startswith("conv_transpose"):
            raise ValueError(f"layer {name!r}: a transposed convolution has no int8 ONNX form here; strip() the "
                             f"model and export it in float")
        if wq.per_channel and wq.axis != out_axis:
            raise ValueError(f"layer {name!r}: per-channel weight quantization must be along the output axis "
                             f"{out_axis} of its stored weight, got axis {wq.axis}")
        w_eff = layer.effective_weight().detach().float()
        s, zp = _qparams(wq, w_eff)
        if out_axis == 1:  # LayerQuant holds the GEMM layout [out, in]: what Linear stores and _find_node matches
            w_eff = w_eff.t().contiguous()
        zp = torch.zeros_like(s) if wq.symmetric else torch.round(zp)
        shape = [-1] + [1] * (w_eff.ndim - 1) if s.ndim else []
        sb, zb = (s.reshape(shape), zp.reshape(shape)) if shape else (s, zp)
        qmin, qmax = Q.qrange(wq.bits, wq.symmetric)
        codes = torch.clamp(torch.round(w_eff / sb) + zb, qmin, qmax)
        if not torch.allclose((codes - zb) * sb, w_eff, rtol=1e-4, atol=1e-6 * float(s.max())):
            raise ValueError(f"layer {name!r}: the effective weight is not on its quantizer's grid (a transform "
                             f"after the quantizer?); cannot export integer codes")
        xqp = None
        if xq is not None:
            xs, xz = _qparams(xq, torch.zeros(1))
            if xs.numel() != 1:
                raise ValueError(f"layer {name!r}: per-channel activation quantization is not supported by the "
                                 f"int8 export (needs per-tensor)")
            xlo, xhi = Q.qrange(xq.bits, xq.symmetric)
            xqp = (float(xs), 0 if xq.symmetric else int(round(float(xz))), xlo, xhi, bool(xq.symmetric))
        out.append(LayerQuant(name, w_eff.numpy(), codes.numpy().astype(np.int64), s.numpy().astype(np.float32),
                              zp.numpy().astype(np.int64), bool(wq.symmetric), int(wq.bits), xqp))
    return out


def _check_inputs(who: str, model: Any, example_inputs: Any,
                  input_names: Optional[Sequence[str]]) -> tuple[tuple, list[str]]:
    """(example inputs as a tuple, their ONNX names) for exporter ``who``; TypeError/ValueError on bad arguments."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{who} needs an nn.Module, got {type(model).__name__}")
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    names = list(input_names or [f"input_{i}" for i in range(len(example_inputs))])
    if len(names) != len(example_inputs):
        raise ValueError(f"{len(names)} input names for {len(example_inputs)} example inputs")
    return tuple(example_inputs), names


def _torch_export(model: nn.Module, example: tuple, input_names: Sequence[str], opset: int) -> bytes:
    """The plain (legacy exporter) ONNX bytes of ``model``; ValueError naming the model if torch cannot export it."""
    try:
        return _torch_export_raw(model, example, input_names, opset)
    except Exception as e:
        raise ValueError(f"torch.onnx.export failed for {type(model).__name__}: {type(e).__name__}: {e}") from e


def _torch_export_raw(model: nn.Module, example: tuple, input_names: Sequence[str], opset: int) -> bytes:
    f = io.BytesIO()
    # Batch is dynamic; so is the length of integer (token) inputs, for batches padded to their longest sample.
    dyn = {n: ({0: "batch", 1: "seq"} if not t.is_floating_point() and t.ndim == 2 else {0: "batch"})
           for n, t in zip(input_names, example)}
    dyn["output"] = {0: "batch"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # Legacy exporter: keeps module scopes and initializer names; PRESERVE keeps BatchNormalization
        # separate so that its folding happens on the integer weights (below), not on float ones.
        torch.onnx.export(model, example, f, dynamo=False, opset_version=opset, input_names=list(input_names),
                          output_names=["output"], dynamic_axes=dyn, do_constant_folding=True,
                          training=torch.onnx.TrainingMode.PRESERVE)
    return f.getvalue()


def export_onnx(model: nn.Module, example_inputs: tuple, path: str | os.PathLike,
                input_names: Optional[Sequence[str]] = None, opset: int = 17, calib: Any = None,
                signed_weights: Optional[bool] = None, int_bias: bool = True,
                act_dtype: Optional[str] = None, output: Any = None, w4_accuracy_level: int = 4,
                residual_ranges: Optional[dict] = None) -> Path:
    """Export ``model`` to ONNX at ``path`` (atomic); quantized Gemm layers become int8 QDQ (see module doc).

    ``example_inputs``: a tuple of tensors with a batch dimension (it is made dynamic). The model is not modified.
    ``input_names``: the inputs' names; where they are keyword parameters of the model's ``forward`` that a
    positional call would misplace (GPT-2's ``attention_mask``), or the forward takes ``use_cache`` (decoders),
    the model is exported through :class:`thrifty.bench.adapter.KeywordCall`: called by keyword, without a
    cache, its graph output being the compared tensor (``output``: a field name or callable, default
    :func:`thrifty.quant.calib.model_output`'s rule, ``logits`` for a language model).
    ``calib``: calibration data (anything ``thrifty.quant.calib.as_batches`` takes, e.g. the PTQ's calibration
    set). With it, residual Adds after quantized Convs become integer too (:mod:`thrifty.bench.int8_graph`:
    the few output quantizers this needs are calibrated like the PTQ's activation quantizers); without it
    those Convs run in float on dequantized tensors (exactly the simulated PTQ model).
    ``signed_weights``: the weight codes' container. True: int8 (asymmetric codes shifted by ``2^(b-1)``, zero
    points alike), so ONNX Runtime runs its u8s8 kernels, ~1.5x faster than u8u8 on an AVX-512 VNNI CPU. False:
    uint8 (symmetric codes shifted by ``2^(b-1)``, zero point ``2^(b-1)``), so it runs u8u8 kernels, which widen
    to 16 bits before multiplying and are exact on every x86 CPU. Either way the dequantized weights are the same.
    None (default): per layer, the fastest container that is exact on this CPU (:func:`weight_container`): int8
    on a CPU with VNNI; without VNNI, int8 only for a layer whose stored codes all have ``|code| <= 64`` (e.g.
    7-bit weights, :func:`exact_fast_w_bits`), uint8 otherwise: there ONNX Runtime's u8s8 kernels use
    VPMADDUBSW, whose 16-bit sums of two u8 x s8 products saturate above that (255 * 127 * 2 > 32767), so outputs
    would drift from the simulated model. The metadata's ``weight_containers`` records each layer's choice and why.
    ``int_bias``: store the bias of a layer with quantized input and weight as int32 codes on the accumulator's
    grid (scale ``s_x * s_w``) behind a DequantizeLinear, so ONNX Runtime fuses it even when its output stays
    float (the classifier head becomes QGemm); this moves each output by at most ``s_x * s_w / 2``.
    ``act_dtype``: ``"uint8"`` or ``"int8"`` activation codes (None: uint8 on x86, see
    :func:`thrifty.bench.layout.default_activation_dtype`); codes shift by 128, values do not. Quantizers behind
    Flatten/Reshape move in front of them (:func:`thrifty.bench.layout.hoist_quantize`);
    :func:`thrifty.bench.layout.fused_report` lists which GEMMs ONNX Runtime fused. What was added is recorded
    in the ``thrifty.int8`` metadata of the model. ``residual_ranges``: a dict shared by the exports of one
    model's timing graphs (:func:`thrifty.bench.int8_graph.quantize_residuals`): the residual quantizers'
    ranges are calibrated once, not once per graph.

    Weight-only Linear layers with a per-group quantizer of at most 4 bits (``QuantConfig(w_bits=4, a_bits=None,
    group_size=32)``, :func:`thrifty.bench.w4.nbits_layers`) become ONNX Runtime's ``MatMulNBits`` (their codes,
    scales and zero points packed as they are, the group being the block; :mod:`thrifty.bench.w4`), in the same
    graph as the int8 layers: one export deploys a plan that mixes them. ``w4_accuracy_level``: MatMulNBits'
    ``accuracy_level`` (4: activations quantized to int8 per block, integer dot products, fastest on x86; 0: float
    on the dequantized weights, exactly the simulated model). Recorded under ``w4_layers`` in the metadata.
    """
    from thrifty.core import strip

    example_inputs, names = _check_inputs("export_onnx", model, example_inputs, input_names)
    if signed_weights not in (None, True, False):
        raise ValueError(f"export_onnx: signed_weights must be None (per layer, the fastest exact container), True "
                         f"(int8) or False (uint8), got {signed_weights!r}")
    if w4_accuracy_level not in (0, 1, 2, 3, 4):
        raise ValueError(f"export_onnx: w4_accuracy_level must be 0..4 (MatMulNBits), got {w4_accuracy_level!r}")
    from thrifty.bench.w4 import insert_nbits, nbits_layers, nbits_params

    m = copy.deepcopy(model).eval()
    nbits = nbits_layers(m)
    layers = quant_layers(m, skip=nbits)
    # quantized embedding tables: a Gather on their codes (thrifty.bench.gather_int8), not a QDQ GEMM
    from thrifty.nn import gemm_layers

    tables = {n for n, layer in gemm_layers(m) if isinstance(layer, nn.Embedding)}
    gathers, layers = [q for q in layers if q.name in tables], [q for q in layers if q.name not in tables]
    spec = _activation_spec(m)
    w4, w4_weights = nbits_params(m, nbits)  # before strip() bakes the weights
    # untie: an embedding tied to a quantized LM head (GPT-2) reads the float table in the simulated model, and
    # so it does in the graph (the head's int8 codes are a separate initializer either way: no size cost)
    m = strip(m, tied="untie")
    if input_names is not None:  # named inputs: called by keyword where the forward needs it (adapter.py)
        m = keyword_call(m, names, output)
    data = _torch_export(m, example_inputs, names, opset)
    if layers or nbits or gathers:
        import onnx

        from thrifty.bench.gather_int8 import insert_int8_gather

        proto = onnx.load_from_string(data)
        w4_done = insert_nbits(proto, w4, w4_weights, w4_accuracy_level) if nbits else {}
        vnni = cpu_has_vnni()
        containers = _insert_qdq(proto, layers, signed_weights, vnni=vnni)
        kinds = {c["container"] for c in containers.values()}
        meta: dict[str, Any] = {"quantized_layers": len(layers), "cpu_vnni": vnni,
                                "signed_weights": "mixed" if len(kinds) > 1 else kinds == {"int8"},
                                "weight_containers": containers}
        if gathers:
            meta["int8_embeddings"] = insert_int8_gather(proto, gathers)
        if nbits:
            meta["w4_layers"] = {n: {"block_size": nbits[n], "accuracy_level": w4_accuracy_level, "source": src}
                                 for n, src in w4_done.items()}
        if calib is not None and spec is not None:
            from thrifty.bench.int8_graph import onnx_feeds, quantize_residuals
            from thrifty.quant.calib import as_batches

            meta.update(quantize_residuals(proto, lambda: onnx_feeds(as_batches(calib), names), spec,
                                           ranges=residual_ranges))
        if int_bias:  # after the residual calibration, which runs the PTQ-exact (float bias) graph
            meta["int32_biases"], meta["float_biases"] = quantize_biases(proto)
        meta["hoisted_quantizers"] = hoist_quantize(proto)
        meta["activation_dtype"] = act_dtype or default_activation_dtype()
        meta["activation_zero_points_shifted"] = set_activation_dtype(proto, meta["activation_dtype"])
        proto.metadata_props.add(key="thrifty.int8", value=json.dumps(meta))
        onnx.checker.check_model(proto)
        data = proto.SerializeToString()
    return atomic_write_bytes(path, data)


# ----------------------------------------------------------------------------------------- graph surgery
def cpu_has_vnni() -> bool:
    """Whether this x86 CPU has AVX-512 VNNI or AVX-VNNI (ONNX Runtime's exact, fast u8s8 int8 GEMM)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f in flags.split() for f in ("avx512_vnni", "avx_vnni"))


def weight_container(codes: np.ndarray, vnni: bool, forced: Optional[bool] = None) -> tuple[str, str]:
    """``(container, reason)`` for one layer's weight codes as they would be stored in int8 (signed codes as they
    are, unsigned ones shifted by ``2^(b-1)``): ``"int8"`` (ONNX Runtime's u8s8 kernels) or ``"uint8"`` (u8u8).

    u8s8 is the faster kernel on x86 and exact with VNNI; without VNNI only when every ``|code| <= 64``
    (:data:`U8S8_EXACT_MAX_CODE`), else u8u8, which is exact everywhere. ``forced``: True/False picks int8/uint8
    whatever the codes (the reason then says whether that is exact here).

    Example:
        >>> weight_container(np.array([-64, 3, 64]), vnni=False)[0], weight_container(np.array([-65, 3]), vnni=False)[0]
        ('int8', 'uint8')
        >>> weight_container(np.array([-127, 127]), vnni=True)[0]
        'int8'
    """
    top = int(np.abs(np.asarray(codes, dtype=np.int64)).max()) if np.size(codes) else 0
    fits = top <= U8S8_EXACT_MAX_CODE
    if forced is not None:
        if not forced:
            return "uint8", "forced uint8 (u8u8 kernels, exact on every x86 CPU)"
        exact = "exact with VNNI" if vnni else ("exact without VNNI: max |code| "
                                                 f"{top} <= {U8S8_EXACT_MAX_CODE}" if fits else
                                                 f"NOT exact here: no VNNI and max |code| {top} > "
                                                 f"{U8S8_EXACT_MAX_CODE} (16-bit pair sums may saturate)")
        return "int8", f"forced int8 (u8s8 kernels, {exact})"
    if vnni:
        return "int8", "VNNI: u8s8 kernels are exact and fastest"
    if fits:
        return "int8", (f"no VNNI, max |code| {top} <= {U8S8_EXACT_MAX_CODE}: u8s8 pair sums fit int16 "
                        f"(255 * {U8S8_EXACT_MAX_CODE} * 2 = {255 * U8S8_EXACT_MAX_CODE * 2} <= 32767)")
    return "uint8", (f"no VNNI, max |code| {top} > {U8S8_EXACT_MAX_CODE}: u8s8 pair sums could saturate int16; "
                     f"u8u8 kernels are exact")


def exact_fast_w_bits(vnni: Optional[bool] = None) -> int:
    """The most weight bits whose int8 container runs ONNX Runtime's fast u8s8 kernels exactly on this CPU: 8 with
    VNNI, 7 without (a symmetric 7-bit grid has codes -63..63, an asymmetric one -64..63 after its shift; both
    within :data:`U8S8_EXACT_MAX_CODE`). ONNX Runtime gives the same advice for AVX2 (``reduce_range``).

    Example:
        >>> exact_fast_w_bits(vnni=True), exact_fast_w_bits(vnni=False)
        (8, 7)
    """
    return 8 if (cpu_has_vnni() if vnni is None else vnni) else 7


def _activation_spec(model: nn.Module) -> Optional[dict[str, Any]]:
    """The most common activation-quantizer spec (estimator, symmetry) at 8 bits, for new output quantizers."""
    from collections import Counter

    from thrifty.nn import gemm_layers

    specs = [q.spec() for _, layer in gemm_layers(model)
             if (q := _last_quantizer(getattr(layer.slots, "input", None))[0]) is not None and hasattr(q, "spec")]
    if not specs:
        return None
    spec = dict(json.loads(Counter(json.dumps(s, sort_keys=True) for s in specs).most_common(1)[0][0]))
    spec.update(bits=8, learnable=False, per_channel=False)
    return spec


def _insert_qdq(proto, layers: list[LayerQuant], signed_weights: Optional[bool] = True,
                vnni: bool = False) -> dict[str, dict[str, Any]]:
    """Insert the QDQ nodes in place; returns each deployed layer's weight container, its max |stored int8 code|
    and the reason for the container (:func:`weight_container`)."""
    from onnx import helper, numpy_helper

    g = proto.graph
    inits = {i.name: i for i in g.initializer}
    arrays = {n: numpy_helper.to_array(i) for n, i in inits.items()}
    producers = {o: n for n in g.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)

    def const(name: str) -> Optional[np.ndarray]:
        while name not in arrays and name in producers and producers[name].op_type == "Identity":
            name = producers[name].input[0]
        if name in arrays:
            return arrays[name]
        p = producers.get(name)
        if p is not None and p.op_type == "Constant":
            return numpy_helper.to_array(p.attribute[0].t)
        return None

    new_inits, new_nodes, removed = [], [], set()
    chosen: dict[str, dict[str, Any]] = {}
    for lq in layers:
        found = _find_node(g.node, arrays, lq)
        if found is None:  # not on the forward path (e.g. an unused pooler): nothing to deploy
            continue
        node, layout = found
        tag = _tag(lq.name)
        codes, scale, zp = lq.codes, lq.w_scale.copy(), lq.w_zp.copy()
        bias_name = node.input[2] if len(node.input) > 2 and node.input[2] else None
        bias = const(bias_name) if bias_name else None
        if node.op_type == "Conv" and scale.ndim == 1:
            bn = consumers.get(node.output[0], [])
            if len(bn) == 1 and bn[0].op_type == "BatchNormalization" and len(bn[0].output) == 1:
                bn = bn[0]
                gamma, beta, mean, var = (const(x) for x in bn.input[1:5])
                eps = next((a.f for a in bn.attribute if a.name == "epsilon"), 1e-5)
                if all(v is not None for v in (gamma, beta, mean, var)):
                    a = (gamma / np.sqrt(var + eps)).astype(np.float64)
                    c = np.zeros_like(a) if bias is None else bias.astype(np.float64)
                    bias = (a * c + beta - a * mean).astype(np.float32)
                    flip = a < 0
                    top = (1 << lq.w_bits) - 1 if not lq.w_signed else 0
                    codes = codes.copy()
                    codes[flip] = (-codes[flip]) if lq.w_signed else (top - codes[flip])
                    zp = np.where(flip, (-zp) if lq.w_signed else (top - zp), zp)
                    scale = (scale * np.abs(a)).astype(np.float32)
                    node.output[0] = bn.output[0]  # the Conv now produces what the BN produced
                    removed.add(id(bn))
        shift = 1 << (lq.w_bits - 1)
        s8 = codes if lq.w_signed else codes - shift  # the codes as an int8 container would hold them
        container, why = weight_container(s8, vnni, signed_weights)
        chosen[lq.name] = {"container": container, "max_abs_code": int(np.abs(s8).max()) if s8.size else 0,
                           "reason": why}
        qdtype = np.int8 if lq.w_signed else np.uint8
        if container == "int8" and not lq.w_signed:  # same values, signed container: u8s8 kernels
            codes, zp, qdtype = codes - shift, zp - shift, np.int8
        elif container == "uint8" and lq.w_signed:  # same values, unsigned container: u8u8 kernels, exact on any CPU
            codes, zp, qdtype = codes + shift, zp + shift, np.uint8
        gcodes = codes.T if layout == "matmul" else codes
        axis = 1 if layout == "matmul" else 0
        wq_name, ws_name, wz_name, wdq = weight_codes_name(lq.name), f"{tag}.w_scale", f"{tag}.w_zp", f"{tag}.w_dq"
        new_inits += [numpy_helper.from_array(np.ascontiguousarray(gcodes).astype(qdtype), wq_name),
                      numpy_helper.from_array(scale.astype(np.float32), ws_name),
                      numpy_helper.from_array(zp.astype(qdtype), wz_name)]
        kw = {"axis": axis} if scale.ndim == 1 else {}
        new_nodes.append((node, helper.make_node("DequantizeLinear", [wq_name, ws_name, wz_name], [wdq],
                                                 name=f"{tag}/w_DequantizeLinear", **kw)))
        node.input[1] = wdq
        if bias is not None:
            b_name = f"{tag}.bias_folded"
            new_inits.append(numpy_helper.from_array(bias.astype(np.float32), b_name))
            if len(node.input) > 2:
                node.input[2] = b_name
            else:
                node.input.append(b_name)
        if lq.x_qparams is not None:
            s, z, qmin, qmax, signed = lq.x_qparams
            xdt = np.int8 if signed else np.uint8
            src = node.input[0]
            names = [f"{tag}.x_scale", f"{tag}.x_zp"]
            new_inits += [numpy_helper.from_array(np.array(s, dtype=np.float32), names[0]),
                          numpy_helper.from_array(np.array(z, dtype=xdt), names[1])]
            info = np.iinfo(xdt)
            if (qmin, qmax) != (info.min, info.max):  # narrower grid than the container: clip like thrifty does
                lo, hi = f"{tag}.x_lo", f"{tag}.x_hi"
                new_inits += [numpy_helper.from_array(np.array((qmin - z) * s, dtype=np.float32), lo),
                              numpy_helper.from_array(np.array((qmax - z) * s, dtype=np.float32), hi)]
                new_nodes.append((node, helper.make_node("Clip", [src, lo, hi], [f"{tag}.x_clip"],
                                                         name=f"{tag}/x_Clip")))
                src = f"{tag}.x_clip"
            new_nodes.append((node, helper.make_node("QuantizeLinear", [src] + names, [f"{tag}.x_q"],
                                                     name=f"{tag}/x_QuantizeLinear")))
            new_nodes.append((node, helper.make_node("DequantizeLinear", [f"{tag}.x_q"] + names, [f"{tag}.x_dq"],
                                                     name=f"{tag}/x_DequantizeLinear")))
            node.input[0] = f"{tag}.x_dq"
    # Rebuild the node list in topological order: inserted nodes go right before their consumer.
    before: dict[int, list] = {}
    for anchor, n in new_nodes:
        before.setdefault(id(anchor), []).append(n)
    nodes = []
    for n in g.node:
        if id(n) in removed:
            continue
        nodes.extend(before.get(id(n), []))
        nodes.append(n)
    del g.node[:]
    g.node.extend(nodes)
    g.initializer.extend(new_inits)
    used = {i for n in g.node for i in n.input}
    keep = [i for i in g.initializer if i.name in used or i.name in {x.name for x in g.input}]
    del g.initializer[:]
    g.initializer.extend(keep)
    return chosen


def _tag(layer: str) -> str:
    return layer.replace(".", "_") or "root"


def weight_codes_name(layer: str) -> str:
    """The initializer holding the integer weight codes of quantized ``layer`` in an :func:`export_onnx` graph.

    Example:
        >>> weight_codes_name("encoder.layer.0.output.dense")
        'encoder_layer_0_output_dense.wq'
    """
    return f"{_tag(layer)}.wq"


def _find_node(nodes, arrays: dict[str, np.ndarray], lq: LayerQuant):
    """The Conv/Gemm/MatMul node computing layer ``lq`` (its weight initializer equals W_eff or W_eff^T), or
    None when the layer is not in the graph (unused in forward)."""
    w = lq.weight
    hits = []
    for n in nodes:
        if n.op_type not in ("Conv", "Gemm", "MatMul") or len(n.input) < 2 or n.input[1] not in arrays:
            continue
        a = arrays[n.input[1]]
        if n.op_type == "Conv" and a.shape == w.shape and np.array_equal(a, w):
            hits.append((n, "conv"))
        elif n.op_type == "Gemm":
            tb = next((att.i for att in n.attribute if att.name == "transB"), 0)
            if tb and a.shape == w.shape and np.array_equal(a, w):
                hits.append((n, "gemm"))
            elif not tb and a.shape == w.T.shape and np.array_equal(a, w.T):
                hits.append((n, "matmul"))
        elif n.op_type == "MatMul" and a.shape == w.T.shape and np.array_equal(a, w.T):
            hits.append((n, "matmul"))
    if len(hits) > 1:  # identical weights: use the module scope in the node name to disambiguate
        scoped = [h for h in hits if "/" + lq.name.replace(".", "/") + "/" in h[0].name
                  or f"/{lq.name}/" in h[0].name]
        hits = scoped or hits[:1]
    return hits[0] if hits else None
