"""``quantize(model, PTQ(...), calib_data) -> QuantResult``: the post-training quantization pipeline.

Stages (each optional, chosen by the :class:`~thrifty.quant.config.PTQ` config):

1. fold BatchNorms into the preceding conv/linear (exact), wrap every quantizable Linear/Conv2d;
2. weight quantizers (per output channel) and input quantizers (per tensor) calibrated on the calibration data;
3. bit allocation: per-layer sensitivities, then one exact ILP under a size / bit-operation budget;
4. AdaQuant (sequential or parallel), 5. BN tuning, 6. bias tuning.

The user's model is never modified: the pipeline works on a deep copy (returned as ``QuantResult.model``), so a
bad input raises before anything is touched. Loss values are divergences from the FP model's outputs on the
calibration data (KL for classifiers, i.e. when the data carries labels; MSE otherwise), so the FP model's
loss is 0.

Example:
    >>> import torch, torch.nn as nn
    >>> model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    >>> res = quantize(model, PTQ(w_bits=4, a_bits=8, pipeline="rtn"), torch.randn(64, 8), progress=False)
    >>> res.bits["2"]
    (4, 8)
"""
from __future__ import annotations

import contextlib
import copy
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Optional

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from thrifty.core import Filter, explicit_names, layer_status, make_filter, uncalled_layers, untied_views, wrap_layers
from thrifty.core.revert import holdout_split, keep_if_better
from thrifty.nn import Chain, gemm_layers, gemm_op, is_gemm
from thrifty.quant.adaquant import adaquant
from thrifty.quant.bitalloc import allocate_bits, min_cost
from thrifty.quant.blocks import Blocks, check_chain, find_blocks
from thrifty.quant.calib import Batch, Output, as_batches, execution_order, output_loss, relu_fed, run
from thrifty.quant.config import PTQ, QuantConfig, Quantizers, input_quantizer, weight_quantizer
from thrifty.quant.fold import fold_bn
from thrifty.quant.quantizer import UniformQuantizer
from thrifty.quant.tuning import bias_tune, bn_tune, calib_loss
from thrifty.utils import removing_hooks

__all__ = ["QuantResult", "quantize", "calibrate_inputs", "layer_costs"]

_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.Identity)


@dataclass
class QuantResult:
    """What :func:`quantize` returns. Losses are divergences from the FP model on the calibration data."""

    model: nn.Module
    config: PTQ
    bits: dict[str, tuple[int, Optional[int]]]  # layer -> (weight bits, activation bits or None)
    folded: list[tuple[str, str]]
    skipped: dict[str, str]  # layer -> why it stays in floating point
    size_fraction: float  # quantized layers' bytes / their FP32 bytes
    model_size_fraction: float  # whole model (everything not quantized counted at 32 bit)
    bops_fraction: Optional[float]
    losses: dict[str, float] = field(default_factory=dict)  # after each stage
    sensitivity: dict[str, dict[int, float]] = field(default_factory=dict)
    predicted_loss: Optional[float] = None
    measured_loss: Optional[float] = None
    adaquant_errors: dict[str, tuple[float, float]] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    loss_kind: str = "mse"
    # stages undone because they raised the calibration loss ("adaquant <layer>": one layer's optimisation undone)
    reverted: list[str] = field(default_factory=list)

    @property
    def final_loss(self) -> float:
        return next(reversed(self.losses.values()))

    def summary(self) -> str:
        lines = [f"PTQ {self.config.pipeline}: {len(self.bits)} layers quantized, size {self.size_fraction:.3f} "
                 f"of FP32 (whole model {self.model_size_fraction:.3f})"]
        lines += [f"  {k}: {self.loss_kind} loss {v:.4g}" for k, v in self.losses.items()]
        if self.predicted_loss is not None:
            lines.append(f"  bit allocation: predicted loss {self.predicted_loss:.4g}, measured {self.measured_loss:.4g}")
        lines.append(f"  time {sum(self.timings.values()):.1f}s " + str({k: round(v, 2) for k, v in self.timings.items()}))
        return "\n".join(lines)


def _candidates(model: nn.Module, filter: Filter) -> tuple[list[str], dict[str, str]]:
    # The one wrappability rule (thrifty.core.layer_status); a layer under two names is one layer.
    pred = make_filter(filter)
    chosen: list[str] = []
    skipped: dict[str, str] = {}
    seen: set[int] = set()
    status = list(layer_status(model, explicit_names(filter)))  # an embedding only when named
    for name, m, why in status:
        if name == "" or id(m) in seen:
            continue
        seen.add(id(m))
        if why is not None:
            skipped[name] = why
        elif pred(m, name):
            chosen.append(name)
    covered = {n for n, _, _ in status}
    for name, m in model.named_modules():
        if name and name not in covered and list(m.parameters(recurse=False)) and not isinstance(m, _NORMS) \
                and not any(name.startswith(c + ".") for c in covered) \
                and not (isinstance(m, nn.MultiheadAttention) and f"{name}.out_proj" in covered):  # GEMMs listed
            skipped[name] = (f"{type(m).__name__} is a lookup: name it in filter= to quantize its table per row"
                             if isinstance(m, nn.Embedding) else f"{type(m).__name__} is not a GEMM thrifty wraps")
    return chosen, skipped


@torch.no_grad()
def calibrate_inputs(model: nn.Module, data: Any, batch_size: int = 32) -> nn.Module:
    """Fix every input quantizer's range from calibration data (FP pass-through while observing)."""
    batches = data if isinstance(data, list) and data and isinstance(data[0], Batch) else as_batches(data, batch_size)
    qs = [m.slots.input for _, m in model.named_modules() if is_gemm(m) and isinstance(m.slots.input, UniformQuantizer)]
    for q in qs:
        q.calibrate()
    for b in batches:
        run(model, b)
    for q in qs:
        if q._n_obs:
            q.freeze()
        else:
            q._calibrating = False  # not executed: stays dynamic
    return model


@torch.no_grad()
def layer_costs(model: nn.Module, names: list[str], batch: Batch) -> tuple[dict[str, int], dict[str, int], dict[str, float]]:
    """Per layer: weight elements, bias elements, multiply-accumulates per sample (measured on ``batch``)."""
    macs: dict[str, float] = {}
    with removing_hooks() as hooks:
        for n in names:
            def hook(mod, _a, out, n=n):
                # products per output: the GEMM reduction (GPT-2 Conv1D stores [in, out]); a lookup has none
                fan_in = 0 if isinstance(mod, nn.Embedding) else gemm_op(mod).gemm_weight(mod.weight)[0].numel()
                macs[n] = out.numel() / max(batch.size, 1) * fan_in
            hooks.append(model.get_submodule(n).register_forward_hook(hook))
        run(model, batch)
    w = {n: model.get_submodule(n).weight.numel() for n in names}
    biases = {n: getattr(model.get_submodule(n), "bias", None) for n in names}  # an embedding has none
    b = {n: bias.numel() if bias is not None else 0 for n, bias in biases.items()}
    return w, b, macs


def _bake_weight_transforms(q: nn.Module, drop_masks: bool = False) -> list[tuple[nn.Parameter, torch.Tensor]]:
    """Fold transforms already in weight slots (e.g. N:M masks) into the copy's weights.

    Returns (weight, keep-mask) pairs for transforms that carry a ``mask`` buffer, so the pruned
    positions can be forced back to zero after stages that move latent weights (AdaQuant). Zero is on
    every quantization grid (integer zero point), so the quantized model keeps the sparsity pattern.
    ``drop_masks``: remove the masking transforms instead of folding them (the dense reference).
    """
    kept = []
    for _, layer in gemm_layers(q):
        t = layer.slots.weight
        if t is None:
            continue
        members = list(t) if isinstance(t, Chain) else [t]
        masks = [m.mask for m in members if isinstance(getattr(m, "mask", None), torch.Tensor)]
        if drop_masks and masks:
            rest = [m for m in members if not isinstance(getattr(m, "mask", None), torch.Tensor)]
            layer.slots.weight = None if not rest else rest[0] if len(rest) == 1 else Chain(*rest)
            masks = []
        with torch.no_grad():
            layer.weight.copy_(layer.effective_weight())
        layer.slots.weight = None
        if masks:
            keep = torch.stack([mk.to(torch.bool) for mk in masks]).all(0)
            kept.append((layer.weight, keep))
    return kept


def _reapply_masks(kept: list[tuple[nn.Parameter, torch.Tensor]]) -> None:
    with torch.no_grad():
        for w, keep in kept:
            w.mul_(keep.reshape(w.shape).to(w.dtype))


def _set_wbits(layer: nn.Module, bits: int, cfg: Quantizers, learnable: bool) -> None:
    layer.slots.weight = weight_quantizer(bits, cfg, learnable, layer).init_from(layer.weight)


def _check_layer_configs(layer_configs: Mapping[str, Quantizers], config: PTQ, filter: Filter) -> dict[str, Quantizers]:
    if not isinstance(layer_configs, Mapping) or not layer_configs:
        raise ValueError(f"quantize: layer_configs must be a non-empty dict layer name -> QuantConfig, got "
                         f"{layer_configs!r}")
    bad = {n: type(c).__name__ for n, c in layer_configs.items() if not isinstance(c, Quantizers)}
    if bad:
        raise TypeError(f"quantize: layer_configs values must be QuantConfigs; got {bad}")
    if filter is not None:
        raise ValueError("quantize: give either filter= or layer_configs= (its keys are the layers quantized)")
    if config.uses_bitalloc:
        raise ValueError("quantize: layer_configs fixes every layer's bits; it does not combine with a budget")
    return {str(n): c for n, c in layer_configs.items()}


def quantize(model: nn.Module, config: PTQ, calib_data: Any, *, filter: Filter = None,
             progress: Optional[bool] = None, output: Output = None, blocks: Blocks = None,
             layer_configs: Optional[Mapping[str, Quantizers]] = None,
             reference: Optional[nn.Module] = None) -> QuantResult:
    """Post-training quantization of a copy of ``model`` on ``calib_data``; see the module docstring.

    ``layer_configs``: per-layer quantizers (layer name -> ``QuantConfig``: bits and grid of its weight and
    input) instead of ``config``'s; exactly these layers are quantized, each with its own config (no first/last
    policy), in one run of ``config``'s pipeline (AdaQuant, BN and bias tuning over all of them together).
    Replaces ``filter``; no budget.

    ``reference``: the model whose outputs the pipeline fits (AdaQuant, BN and bias tuning) and its losses are
    measured against; default ``model`` itself, the transforms in its weight slots (an N:M mask) applied. Give
    the dense model when ``model`` is a pruned copy of it (the same layer names): AdaQuant then also compensates
    the pruning (the kept weights fitted to the dense layers' outputs) and the losses count it. The masks are
    kept either way; N:M masks in ``reference`` are removed (its latent dense weights are used).

    ``calib_data``: tensors, ``(x, y)`` tuples or dicts such as a tokenizer's output (see
    :mod:`thrifty.quant.calib`); ``output``: the compared field of a dict / ``ModelOutput`` result (a name or a
    callable; default ``sentence_embedding``, ``logits`` or ``last_hidden_state``, whichever the model returns).
    ``blocks``: AdaQuant block by block (``"auto"``, a container name or block names; see
    :mod:`thrifty.quant.blocks`): one block's activations in memory and one pass per block instead of a
    prefix pass per layer. None (default): layer by layer on the whole model.

    Raises ValueError/TypeError (and leaves ``model`` untouched) for bad configs, empty or mismatched
    calibration data, models with no quantizable layer, or a budget below the smallest feasible allocation.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"quantize expects an nn.Module, got {type(model).__name__}")
    if isinstance(config, QuantConfig):
        config = PTQ(w_bits=config.w_bits, a_bits=config.a_bits, pipeline="rtn", first_last_bits=config.w_bits,
                     per_channel=config.per_channel, group_size=config.group_size, w_symmetric=config.w_symmetric,
                     a_symmetric=config.a_symmetric,
                     w_estimator=config.w_estimator, a_estimator=config.a_estimator)
    if not isinstance(config, PTQ):
        raise TypeError(f"quantize expects a PTQ config, got {type(config).__name__}")
    if reference is not None and not isinstance(reference, nn.Module):
        raise TypeError(f"quantize: reference must be an nn.Module (the model to match), got {type(reference).__name__}")
    cfg = config
    per_layer = None if layer_configs is None else _check_layer_configs(layer_configs, cfg, filter)
    if per_layer is not None:
        filter = list(per_layer)
    from thrifty.train.loop import check_finite  # late: thrifty.train imports the quantizers

    try:
        check_finite(model)  # NaN weights would otherwise surface as a misleading BN-folding error
    except ValueError as e:
        raise ValueError(f"quantize: the model's {e}") from None
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    batches = as_batches(calib_data, cfg.batch_size, output)
    q = copy.deepcopy(model).eval()
    kept = _bake_weight_transforms(q)
    try:
        run(q, batches[0])
    except Exception as e:
        raise ValueError(f"calibration data does not fit the model: {type(e).__name__}: {e}") from e
    torch.manual_seed(cfg.seed)

    block_names = None if blocks is None else find_blocks(q, blocks)
    if block_names is not None:
        check_chain(q, block_names, batches[0])
    folded = fold_bn(q, batches[0])
    q.__dict__["_thrifty_folded"] = [*q.__dict__.get("_thrifty_folded", []), *folded]  # for thrifty.save
    if reference is not None:
        fp = copy.deepcopy(reference).eval()
        _bake_weight_transforms(fp, drop_masks=True)
        there = dict(fp.named_modules())
        gone = [n for n, _ in gemm_layers(q) if n not in there]
        if gone:
            raise ValueError(f"quantize: the reference model lacks the layers {gone[:5]}; it must be the model "
                             "that `model` was derived from (the same layer names)")
        try:
            run(fp, batches[0])
            fold_bn(fp, batches[0], pairs=list(folded))  # the same layers as the copy's, so names line up
        except Exception as e:
            raise ValueError(f"quantize: the reference model does not run like `model` on the calibration data: "
                             f"{type(e).__name__}: {e}") from e
    else:
        fp = copy.deepcopy(q)
    names, skipped = _candidates(q, filter)
    if not names:
        raise ValueError(f"quantize: the model has no quantizable nn.Linear/nn.Conv2d layer (filter={filter!r})")
    wrap_layers(q, list(names))  # exact names: a named embedding is wrapped too
    layers = {n: q.get_submodule(n) for n in names}
    order = execution_order(q, layers, batches[0])
    bypassed = [n for n in uncalled_layers(q, lambda: run(q, batches[0])) if n in order]
    if bypassed:  # the hooks of execution_order saw them run, a plain forward does not: a fused path reads the weights
        raise ValueError(f"quantize: the model's forward bypasses the wrapped layers {bypassed} (it uses their "
                         "weights without calling them), so quantizing them would have no effect; leave them out with "
                         "filter=")
    for n in names:
        if n not in order:
            skipped[n] = "not executed on the calibration data"
    if not order:
        raise ValueError("quantize: none of the quantizable layers runs on the calibration data")
    fl = {order[0], order[-1]}
    bits: dict[str, tuple[int, Optional[int]]] = {}
    for n in order:
        if per_layer is not None:  # each layer's own config, first and last alike
            bits[n] = (per_layer[n].w_bits, per_layer[n].a_bits)
        elif n in fl:
            if cfg.first_last_bits is None:
                skipped[n] = "first/last layer kept in floating point (first_last_bits=None)"
                continue
            bits[n] = (cfg.first_last_bits, cfg.first_last_bits if cfg.a_bits is not None else None)
        else:
            bits[n] = (cfg.w_bits, cfg.a_bits)
    if not bits:
        raise ValueError("quantize: no layer left to quantize after the first/last layer policy")
    qnames = [n for n in order if n in bits]
    if skipped:
        warnings.warn("thrifty.quantize: these layers stay in floating point: "
                      + "; ".join(f"{n} ({why})" for n, why in skipped.items()), stacklevel=2)
    wel, bel, macs = layer_costs(q, qnames, batches[0])
    alloc_names = [n for n in qnames if n not in fl]
    budget_bytes = None
    if cfg.uses_bitalloc:
        if not alloc_names:
            raise ValueError("quantize: a budget was given but every quantized layer is a first/last layer")
        cost, fixed, total = _alloc_costs(cfg, qnames, alloc_names, bits, wel, bel, macs)
        lo = (min_cost(cost) + fixed) / total
        if cfg.budget < lo - 1e-12:  # type: ignore[operator]
            raise ValueError(f"quantize: budget {cfg.budget} ({cfg.budget_kind}) is infeasible; the smallest feasible "
                             f"budget is {lo:.4f} (all allocatable layers at {min(cfg.candidate_bits)} bits, "
                             f"first/last at {cfg.first_last_bits})")
        budget_bytes = cfg.budget * total - fixed  # type: ignore[operator]

    learn = cfg.uses_adaquant
    for n in qnames:
        wb, ab = bits[n]
        grid = cfg if per_layer is None else per_layer[n]
        _set_wbits(layers[n], wb, grid, learn)
        lookup = "input" in type(layers[n]).NO_SLOTS  # an embedding: its one-hot operand is exact at any width
        layers[n].slots.input = None if ab is None or lookup else input_quantizer(ab, grid, learn)
    ties = untied_views(q)
    if ties:
        warnings.warn(f"thrifty.quantize: {ties}", stacklevel=2)
    calibrate_inputs(q, batches)
    loss_kind = cfg.loss if cfg.loss != "auto" else ("kl" if all(b.labels is not None for b in batches) else "mse")
    loss_fn = output_loss(loss_kind)
    with torch.no_grad():
        targets = [run(fp, b) for b in batches]
    timings["prepare"] = time.perf_counter() - t0
    res = QuantResult(q, cfg, bits, folded, skipped, 0.0, 0.0, None, loss_kind=loss_kind)
    res.losses["rtn"] = calib_loss(q, batches, targets, loss_fn)

    if budget_bytes is not None:
        t = time.perf_counter()
        res.sensitivity, base = _sensitivities(q, layers, alloc_names, bits, cfg, batches, targets, loss_fn,
                                               learn, progress)
        cost, _, _ = _alloc_costs(cfg, qnames, alloc_names, bits, wel, bel, macs)
        alloc = allocate_bits(res.sensitivity, cost, budget_bytes, "bytes" if cfg.budget_kind == "size" else "BOPs")
        for n, b in alloc.bits.items():
            bits[n] = (b, bits[n][1])
            _set_wbits(layers[n], b, cfg, learn)
        res.predicted_loss = base + alloc.predicted_increase
        res.measured_loss = calib_loss(q, batches, targets, loss_fn)
        res.losses["bit allocation"] = res.measured_loss
        timings["bit allocation"] = time.perf_counter() - t
    if cfg.uses_adaquant:
        t = time.perf_counter()
        # Exact zeros in a weight are pruned positions (a stripped N:M mask, say; a trained dense weight has none):
        # AdaQuant's latent weights may drift over a rounding boundary, so they are put back to 0 afterwards.
        kept += [(layers[n].weight, layers[n].weight.ne(0)) for n in qnames if bool((layers[n].weight == 0).any())]
        with _keep_if_better(q, res, "adaquant", lambda: calib_loss(q, batches, targets, loss_fn)):
            relu = relu_fed(fp, qnames, batches[0]) if cfg.adaquant_relu else frozenset()
            res.adaquant_errors = adaquant(q, fp, qnames, batches, mode=cfg.adaquant_mode, iters=cfg.adaquant_iters,
                                           batch=cfg.adaquant_batch, lr_weight=cfg.lr_weight, lr_bias=cfg.lr_bias,
                                           lr_w_scale=cfg.lr_w_scale, lr_a_scale=cfg.lr_a_scale, seed=cfg.seed,
                                           relu=relu, max_shift=cfg.adaquant_max_shift, progress=progress,
                                           blocks=block_names)
            _reapply_masks(kept)
        # adaquant_layer restores a layer it could not improve and then reports after == before
        res.reverted += [f"adaquant {n}" for n, (b, a) in res.adaquant_errors.items() if cfg.adaquant_iters and a == b]
        timings["adaquant"] = time.perf_counter() - t
    bn_names = [n for n in qnames if n in {a for a, _ in folded}]
    if cfg.uses_bn_tune and bn_names:
        t = time.perf_counter()
        with _keep_if_better(q, res, "bn tuning", lambda: calib_loss(q, batches, targets, loss_fn)):
            bn_tune(q, fp, bn_names, batches, progress=progress)
        timings["bn tuning"] = time.perf_counter() - t
    if cfg.uses_bias_tune:
        t = time.perf_counter()
        n_bias = sum(layers[n].bias.numel() for n in qnames if getattr(layers[n], "bias", None) is not None)
        values, samples = sum(t.numel() for t in targets), sum(b.size for b in batches)
        if values < n_bias:  # under-determined: the tuned biases would fit these samples and nothing else
            warnings.warn(f"thrifty.quantize: bias tuning skipped: {samples} calibration samples give {values} output "
                          f"values for {n_bias} biases; give at least {-(-n_bias * samples // max(values, 1))} samples",
                          stacklevel=2)
        else:
            # few outputs for the biases (fewer than 2 per bias): tuned without every 4th sample and judged on
            # those (holdout_rows), so a tuning that only fits the calibration samples is undone
            fit_b, fit_t, chk_b, chk_t = _bias_holdout(batches, targets, values, n_bias)
            whole = None if chk_b is batches else (lambda: calib_loss(q, batches, targets, loss_fn))
            with _keep_if_better(q, res, "bias tuning", lambda: calib_loss(q, chk_b, chk_t, loss_fn), all_loss=whole):
                bias_tune(q, qnames, fit_b, fit_t, loss_fn, iters=cfg.bias_iters, lr=cfg.bias_lr, seed=cfg.seed,
                          restore=False, progress=progress)
            timings["bias tuning"] = time.perf_counter() - t
    for p in q.parameters():
        p.requires_grad_(False)
    _reapply_masks(kept)  # no-op unless a later stage moved a pruned weight
    res.size_fraction, res.model_size_fraction, res.bops_fraction = _fractions(q, qnames, bits, wel, bel, macs)
    res.timings = timings
    return res


def _bias_holdout(batches: list[Batch], targets: list[torch.Tensor], values: int, n_bias: int):
    """``(fit batches, fit targets, check batches, check targets)`` for bias tuning: the same lists twice unless
    ``values`` calibration outputs are too few for ``n_bias`` biases (:func:`thrifty.core.revert.holdout_rows`)."""
    split = holdout_split(list(zip(batches, targets)), [b.size for b in batches], values, n_bias,
                          lambda v, i: v.select(i) if isinstance(v, Batch) else v[i.to(v.device)])
    return (batches, targets, batches, targets) if split is None else split


@contextlib.contextmanager
def _keep_if_better(model: nn.Module, res: QuantResult, stage: str, loss: Callable[[], float],
                    all_loss: Optional[Callable[[], float]] = None) -> Iterator[None]:
    """Run a stage; keep its result only if the calibration loss did not increase (else restore the model).

    Layer-wise objectives (AdaQuant, BN statistics) do not guarantee a lower end-to-end loss; the guard makes
    every stage monotone on the calibration data. ``res.losses[stage]`` records the kept loss and
    ``res.reverted`` the stages that were undone. ``all_loss``: ``loss`` is measured on held-out samples only
    (the stage fitted the others); the guard compares those and ``res.losses`` records ``all_loss``.
    """
    before = next(reversed(res.losses.values())) if all_loss is None else None
    with keep_if_better(model, loss, before, stage=stage, reverted=res.reverted) as out:
        yield
    res.losses[stage] = out.after if all_loss is None else all_loss()


def _alloc_costs(cfg: PTQ, qnames: list[str], alloc: list[str], bits: dict, wel: dict, bel: dict,
                 macs: dict) -> tuple[dict[str, dict[int, float]], float, float]:
    """(per-layer cost of each candidate, fixed cost of the other quantized layers, FP32 total)."""
    if cfg.budget_kind == "size":
        per = lambda n, wb: (wel[n] * wb + bel[n] * 32) / 8  # noqa: E731
        total = sum(per(n, 32) for n in qnames)
    else:
        per = lambda n, wb: macs[n] * wb * (bits[n][1] or 32)  # noqa: E731
        total = sum(macs[n] * 32 * 32 for n in qnames)
    cost = {n: {b: float(per(n, b)) for b in cfg.candidate_bits} for n in alloc}
    fixed = float(sum(per(n, bits[n][0]) for n in qnames if n not in alloc))
    return cost, fixed, float(total)


def _sensitivities(q, layers, alloc, bits, cfg, batches, targets, loss_fn, learn, progress):
    top = max(cfg.candidate_bits)
    for n in alloc:
        _set_wbits(layers[n], top, cfg, learn)
    base = calib_loss(q, batches, targets, loss_fn)
    sens: dict[str, dict[int, float]] = {}
    for n in tqdm(alloc, desc="sensitivity", unit="layer", disable=None if progress is None else not progress):
        sens[n] = {top: 0.0}
        for b in cfg.candidate_bits:
            if b == top:
                continue
            _set_wbits(layers[n], b, cfg, learn)
            sens[n][b] = calib_loss(q, batches, targets, loss_fn) - base
        _set_wbits(layers[n], top, cfg, learn)
    return sens, base


def _fractions(model: nn.Module, qnames: list[str], bits: dict, wel: dict, bel: dict, macs: dict):
    qbytes = sum((wel[n] * bits[n][0] + bel[n] * 32) / 8 for n in qnames)
    fp_bytes = sum((wel[n] + bel[n]) * 4 for n in qnames)
    quant_params = {id(model.get_submodule(n).weight) for n in qnames}
    quant_params |= {id(model.get_submodule(n).bias) for n in qnames if model.get_submodule(n).bias is not None}
    other = sum(p.numel() * 4 for p in model.parameters() if id(p) not in quant_params and not _is_qparam(model, p))
    bops = None
    if all(bits[n][1] is not None for n in qnames):
        bops = sum(macs[n] * bits[n][0] * bits[n][1] for n in qnames) / max(sum(macs[n] * 1024 for n in qnames), 1e-30)
    return qbytes / fp_bytes, (qbytes + other) / (fp_bytes + other), bops


def _is_qparam(model: nn.Module, p: torch.Tensor) -> bool:
    for m in model.modules():
        if isinstance(m, UniformQuantizer) and any(p is x for x in m.parameters()):
            return True
    return False
