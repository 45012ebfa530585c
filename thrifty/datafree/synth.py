"""Synthetic calibration samples from the model itself (The Knowledge Within, Haroush et al.).

Three generators:

* ``gaussian``: standard-normal inputs (thrifty's datasets are standardised, so
  this is the naive "noise" baseline);
* ``inception``: inputs optimised to maximise one class logit each, under a
  total-variation smoothness prior;
* ``bns``: inputs optimised so that, at the input of every BatchNorm layer, the
  batch mean/variance match the stored running mean/variance (a Gaussian KL
  summed over channels and layers), plus a small TV/L2 prior.

The same BN statistic scores how well a data set matches a model
(:func:`bn_similarity`): real training-like data scores low, foreign data high.

Example (an untrained ResNet-20; in practice a trained one, e.g. ``thrifty.train.pretrained``):
    >>> import thrifty as th
    >>> model = th.models.create("resnet20", width=4)
    >>> calib = synthesize(model, Synth(method="bns", optim={"steps": 3}), 8, input_shape=(1, 32, 32), progress=False)
    >>> len(calib), tuple(calib.tensors[0].shape[1:])
    (8, (1, 32, 32))
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import ClassVar, Iterator, Literal, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset, TensorDataset
from tqdm.auto import tqdm

from thrifty.quant.calib import model_output
from thrifty.core import (
    Config, OptimConfig, config_first, old_order_warning, register_config, register_pipeline, with_overrides,
)
from thrifty.utils import show_progress

__all__ = ["Synth", "synthesize", "bn_similarity", "bn_layers", "bns_loss", "gaussian_kl"]

Method = Literal["bns", "gaussian", "inception"]
_BN = (nn.BatchNorm1d, nn.BatchNorm2d)


@register_config
@dataclass(frozen=True)
class Synth(Config):
    """How to synthesise calibration data.

    At most ``optim.steps`` Adam steps on the inputs, in batches of ``optim.batch_size``
    (BN statistics are matched per batch, so keep it >= 32). The learning rate
    warms up linearly over the first ``warmup`` fraction of the steps to
    ``optim.lr``, then follows a cosine to zero. ``plateau`` > 0 stops a batch early
    once the BNS loss has improved by less than that fraction over the last
    ``steps // 5`` steps (after the warmup). ``upsample`` > 1 optimises image
    inputs (C, H, W) at 1/``upsample`` of their height and width and feeds the
    model their bilinear upsampling: a smoothness prior that also shrinks the
    search space (other input shapes are optimised as they are). The defaults
    were chosen on resnet20/digits32 (benchmarks/datafree.py): 60 steps at 1/4
    resolution reach a lower BN distance than 200 full-resolution steps.

    Args:
        method: "bns" (match BatchNorm statistics), "gaussian" (noise) or "inception" (class logits).
        optim: Adam on the inputs: at most ``steps`` steps per batch of ``batch_size`` samples (BN statistics are
            matched per batch: keep it >= 32), peak ``lr``, ``weight_decay`` (Adam's, an L2 pull on the inputs).
        warmup: fraction of the steps with a linear warmup.
        plateau: stop a batch once its loss improved by less than this fraction over steps // 5 steps (0: never).
        upsample: optimise images at 1/upsample of their height and width, bilinearly upsampled (1: full size).
        tv_weight: weight of the total-variation prior.
        l2_weight: weight of the L2 prior on the inputs.
        seed: draws the starting inputs and targets.
        soft_labels: also return the model's soft outputs as labels.
    """

    method: Method = "bns"
    optim: OptimConfig = OptimConfig(steps=60, lr=0.4, batch_size=256, weight_decay=0.0)
    warmup: float = 0.0
    plateau: float = 0.0
    upsample: int = 4
    tv_weight: float = 1e-4
    l2_weight: float = 1e-5
    seed: int = 0
    soft_labels: bool = False

    # version 2 moved steps, lr and batch_size into ``optim``
    version: ClassVar[int] = 2
    moved_fields: ClassVar[dict[str, str]] = {k: "optim." + k for k in ("steps", "lr", "batch_size")}

    def __post_init__(self) -> None:
        if self.method not in ("bns", "gaussian", "inception"):
            raise ValueError(f"Synth.method must be 'bns', 'gaussian' or 'inception', got {self.method!r}")
        if not isinstance(self.optim, OptimConfig) or self.optim.steps < 1:
            raise ValueError(f"Synth.optim.steps must be >= 1, got {getattr(self.optim, 'steps', self.optim)!r}")
        if self.tv_weight < 0 or self.l2_weight < 0:
            raise ValueError("Synth: tv_weight and l2_weight must be >= 0")
        if self.upsample < 1:
            raise ValueError(f"Synth.upsample must be >= 1, got {self.upsample}")
        if not 0 <= self.warmup < 1 or not 0 <= self.plateau < 1:
            raise ValueError(f"Synth: warmup and plateau must be in [0, 1), got {self.warmup}, {self.plateau}")


register_pipeline(Synth, "makes a data set from a model, it does not change the model",
                  "thrifty.datafree.synthesize(model, cfg, n)")


def bn_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every BatchNorm1d/2d with running statistics, in module order."""
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, _BN) and m.running_mean is not None and m.running_var is not None]


def gaussian_kl(mu0: Tensor, var0: Tensor, mu1: Tensor, var1: Tensor, eps: float = 1e-5) -> Tensor:
    """KL(N(mu0, var0) || N(mu1, var1)) elementwise."""
    var0, var1 = var0 + eps, var1 + eps
    return 0.5 * (torch.log(var1 / var0) + (var0 + (mu0 - mu1) ** 2) / var1 - 1.0)


def _channel_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    dims = [0] + list(range(2, x.dim()))
    return x.mean(dims), x.var(dims, unbiased=False)


@contextlib.contextmanager
def _bn_taps(model: nn.Module) -> Iterator[list[tuple[Tensor, Tensor, nn.Module]]]:
    """Collect (batch mean, batch var, bn) at every BN input during forward passes."""
    found: list[tuple[Tensor, Tensor, nn.Module]] = []
    hooks = [m.register_forward_pre_hook(lambda mod, inp: found.append((*_channel_stats(inp[0]), mod)))
             for _, m in bn_layers(model)]
    try:
        yield found
    finally:
        for h in hooks:
            h.remove()


@contextlib.contextmanager
def _frozen_eval(model: nn.Module) -> Iterator[None]:
    """Eval mode (BN uses, and never updates, its running statistics), no parameter grads; restored after."""
    modes = {m: m.training for m in model.modules()}
    flags = {p: p.requires_grad for p in model.parameters()}
    model.eval()
    for p in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for m, t in modes.items():
            m.training = t
        for p, f in flags.items():
            p.requires_grad_(f)


def bns_loss(taps: list[tuple[Tensor, Tensor, nn.Module]]) -> Tensor:
    """Sum over BN layers of the channel-mean KL(N(running) || N(batch))."""
    total = torch.zeros(())
    for mu, var, bn in taps:
        total = total + gaussian_kl(bn.running_mean, bn.running_var, mu, var).mean()
    return total


class _NormalisedTaps:
    """BNS loss of a forward pass, accumulated by pre-hooks registered once per synthesis.

    Same value as :func:`bns_loss` on :func:`_bn_taps`, computed in each BN's
    normalised units: with ``s0 = running_var + eps``, ``d = x - running_mean``,
    ``mu_z = mean(d) / sqrt(s0)`` and ``v = (mean(d^2) - mean(d)^2) / s0 + eps / s0``,
    ``KL = (log v + (1 + mu_z^2) / v - 1) / 2``. Per BN input that is one
    subtraction, one square and two cheap reductions over the contiguous spatial
    axis; ``Tensor.var`` over (N, H, W) of an NCHW tensor is a strided reduction
    that cost more than the convolutions. Centring on the running mean keeps
    the one-pass variance free of cancellation near the optimum.
    """

    def __init__(self, model: nn.Module, eps: float = 1e-5) -> None:
        self.total: Optional[Tensor] = None
        self.hooks = []
        for _, bn in bn_layers(model):
            s0 = bn.running_var.detach().float() + eps
            self.hooks.append(bn.register_forward_pre_hook(
                self._hook(bn.running_mean.detach().float(), 1.0 / s0, eps / s0)))

    def _hook(self, rm: Tensor, inv: Tensor, ratio: Tensor):
        def hook(mod: nn.Module, inp: tuple[Tensor, ...]) -> None:
            x = inp[0]
            d = x - rm.view(-1, *([1] * (x.dim() - 2)))
            if x.dim() > 2:  # reduce the contiguous trailing axes first, then the batch
                m, q = d.flatten(2).mean(2).mean(0), d.square().flatten(2).mean(2).mean(0)
            else:
                m, q = d.mean(0), d.square().mean(0)
            v = (q - m * m) * inv + ratio
            kl = 0.5 * (torch.log(v) + (1.0 + m * m * inv) / v - 1.0).mean()
            self.total = kl if self.total is None else self.total + kl
        return hook

    def pop(self) -> Tensor:
        total, self.total = self.total, None
        if total is None:
            raise RuntimeError("no BatchNorm layer ran in the forward pass")
        return total

    def close(self) -> None:
        for h in self.hooks:
            h.remove()


def _tv(x: Tensor) -> Tensor:
    if x.dim() == 4:
        return (x[..., 1:, :] - x[..., :-1, :]).pow(2).mean() + (x[..., :, 1:] - x[..., :, :-1]).pow(2).mean()
    if x.dim() >= 2:
        return (x[..., 1:] - x[..., :-1]).pow(2).mean()
    return x.new_zeros(())


def _input_shape(model: nn.Module, input_shape: Optional[tuple[int, ...]]) -> tuple[int, ...]:
    shape = input_shape or getattr(model, "input_shape", None)
    if shape is None:
        raise ValueError(
            "synthesize: the model's input shape is unknown; pass input_shape=(C, H, W) (e.g. (1, 32, 32)) "
            "or (features,) without the batch dimension"
        )
    shape = tuple(int(s) for s in shape)
    if not shape or any(s < 1 for s in shape):
        raise ValueError(f"synthesize: input_shape must be positive sizes without the batch dim, got {shape}")
    return shape


def synthesize(
    model: nn.Module,
    config: Optional[Synth] = None,
    n: Optional[int] = None,
    *,
    input_shape: Optional[tuple[int, ...]] = None,
    cfg: Optional[Synth] = None,
    progress: Optional[bool] = None,
    **overrides,
) -> TensorDataset:
    """Return ``TensorDataset(x, y)`` of ``n`` synthetic inputs for ``model``, made as ``config`` says.

    ``y`` holds the FP model's predicted class (or its softmax with
    ``soft_labels=True``). The model's weights, buffers, mode and
    ``requires_grad`` flags are left exactly as they were. Keyword
    ``overrides`` replace fields of ``config`` (default ``Synth()``; ``steps=``,
    ``lr=``, ``batch_size=`` set its ``optim``). The
    older order ``synthesize(model, n, method, cfg=...)`` still works for one
    release, with a DeprecationWarning.

    A ``method`` given in the old order that differs from ``cfg.method`` is a ValueError, never silently
    ignored.

    Example:
        >>> import torch.nn as nn
        >>> model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
        >>> ds = synthesize(model, Synth(method="bns", optim={"steps": 20}), 32, input_shape=(6,), progress=False)
        >>> ds.tensors[0].shape, ds.tensors[1].shape
        (torch.Size([32, 6]), torch.Size([32]))
    """
    if isinstance(config, int):  # old order: (n, method, cfg=); a bool n is refused below
        old_order_warning("synthesize", "synthesize(model, cfg, n)")
        config, n, method = cfg, config, n
        cfg = None
        if method is not None:
            if isinstance(config, Synth) and method != config.method:
                # an argument that disagrees with cfg would otherwise be silently ignored
                raise ValueError(f"synthesize: method={method!r} conflicts with cfg.method={config.method!r}; "
                                 "give the method once (in cfg, or as the argument without cfg)")
            overrides.setdefault("method", method)
    given = cfg if cfg is not None else config
    if given is not None and not isinstance(given, Synth):
        raise TypeError(f"synthesize: cfg must be a Synth, got {type(given).__name__}")
    cfg, _ = config_first("synthesize", config, None, cfg, default=Synth(), accepts=(Synth,),
                          call="synthesize(model, cfg, n)")
    if overrides:
        cfg = with_overrides(cfg, **overrides)
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"synthesize: n must be a positive integer, got {n!r}")
    if hasattr(model, "tokenize"):
        raise ValueError(
            f"synthesize: {type(model).__name__} takes token ids, not continuous inputs; BNS/inception "
            "synthesis needs a differentiable input. Calibrate it on a few real sentences instead."
        )
    if cfg.method == "bns" and not bn_layers(model):
        raise ValueError(
            f"synthesize: {type(model).__name__} has no BatchNorm layer with running statistics, so BNS "
            "has nothing to match; use method='gaussian' or method='inception'"
        )
    shape = _input_shape(model, input_shape)
    gen = torch.Generator().manual_seed(cfg.seed)
    xs, ys = [], []
    batches = [min(cfg.optim.batch_size, n - i) for i in range(0, n, cfg.optim.batch_size)]
    with _frozen_eval(model):
        bar = tqdm(total=len(batches) * (0 if cfg.method == "gaussian" else cfg.optim.steps),
                   disable=not show_progress(progress),
                   desc=f"synthesize[{cfg.method}]", leave=False)
        for bi, b in enumerate(batches):
            if cfg.method == "gaussian":
                x = torch.randn((b, *shape), generator=gen)
            else:
                z = torch.randn((b, *_low_shape(shape, cfg.upsample)), generator=gen)
                targets = (torch.arange(b) + bi * cfg.optim.batch_size) % _num_classes(model, _up(z, shape))
                x = _up(_optimise(model, z, shape, targets, cfg, bar), shape)
            with torch.no_grad():
                logits = model_output(model(x))
            xs.append(x.detach())
            ys.append(F.softmax(logits, -1) if cfg.soft_labels else logits.argmax(-1))
        bar.close()
    return TensorDataset(torch.cat(xs), torch.cat(ys))


def _num_classes(model: nn.Module, x: Tensor) -> int:
    with torch.no_grad():
        return int(model_output(model(x[:1])).shape[-1])


def _lr_factor(step: int, cfg: Synth) -> float:
    """Linear warmup, then cosine to zero: large moves early, fine matching of the statistics late."""
    w = int(cfg.warmup * cfg.optim.steps)
    if step < w:
        return (step + 1) / w
    return 0.5 * (1 + math.cos(math.pi * (step - w) / max(1, cfg.optim.steps - w)))


def _low_shape(shape: tuple[int, ...], factor: int) -> tuple[int, ...]:
    if factor == 1 or len(shape) != 3:  # only images (C, H, W) are parameterised at low resolution
        return shape
    return (shape[0], max(1, -(-shape[1] // factor)), max(1, -(-shape[2] // factor)))


def _up(z: Tensor, shape: tuple[int, ...]) -> Tensor:
    if tuple(z.shape[1:]) == shape:
        return z
    return F.interpolate(z, size=shape[1:], mode="bilinear", align_corners=False)


def _optimise(model: nn.Module, z: Tensor, shape: tuple[int, ...], targets: Tensor, cfg: Synth, bar) -> Tensor:
    """Optimise the (possibly low-resolution) inputs ``z``; the model sees ``_up(z, shape)``."""
    z = z.clone().requires_grad_(True)
    opt = torch.optim.Adam([z], lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    taps = _NormalisedTaps(model) if cfg.method == "bns" else None
    window = max(2, cfg.optim.steps // 5)
    history: list[float] = []
    prior_scale = cfg.tv_weight * math.prod(shape)
    try:
        for step in range(cfg.optim.steps):
            for g in opt.param_groups:
                g["lr"] = cfg.optim.lr * _lr_factor(step, cfg)
            x = _up(z, shape)
            logits = model_output(model(x))
            # inception: push each input towards its own class
            main = taps.pop() if taps is not None else F.cross_entropy(logits, targets)
            loss = main + prior_scale * _tv(x) + cfg.l2_weight * x.pow(2).flatten(1).sum(1).mean()
            (z.grad,) = torch.autograd.grad(loss, z)
            opt.step()
            bar.update(1)
            if cfg.plateau > 0 or step % 10 == 0:
                history.append(float(main.detach()))
            if step % 10 == 0:
                bar.set_postfix(loss=f"{history[-1]:.3f}")
            if (cfg.plateau > 0 and step >= int(cfg.warmup * cfg.optim.steps) + window
                    and history[-1] > (1 - cfg.plateau) * history[-1 - window]):
                bar.update(cfg.optim.steps - step - 1)
                break
    finally:
        if taps is not None:
            taps.close()
    return z.detach()


@torch.no_grad()
def bn_similarity(model: nn.Module, data: Dataset | Tensor, batch_size: int = 256,
                  per_layer: bool = False) -> float | dict[str, float]:
    """How far ``data`` is from what the model's BN layers expect (lower is more similar).

    The statistic is the BNS objective computed over the whole data set: for
    every BN layer, the channel-mean KL between the stored running Gaussian and
    the Gaussian of the data's activations at that layer's input, summed over
    layers (``per_layer=True`` returns the per-layer values).

    Example:
        >>> import torch, torch.nn as nn
        >>> bn = nn.BatchNorm1d(4).eval()        # stored statistics: mean 0, variance 1
        >>> model = nn.Sequential(bn, nn.Linear(4, 2))
        >>> _ = torch.manual_seed(0)
        >>> bn_similarity(model, torch.randn(512, 4)) < bn_similarity(model, 3 + torch.randn(512, 4))
        True
    """
    layers = bn_layers(model)
    if not layers:
        raise ValueError(f"bn_similarity: {type(model).__name__} has no BatchNorm layer with running statistics")
    x_all = data if isinstance(data, Tensor) else data[:][0]
    if len(x_all) == 0:
        raise ValueError("bn_similarity: the data set is empty")
    sums: dict[nn.Module, tuple[Tensor, Tensor, float]] = {}

    def hook(mod, inp):
        # running sums in float64: the data set's exact per-channel mean and variance
        x = inp[0].double()
        dims = [0] + list(range(2, x.dim()))
        s1, s2, cnt = sums.get(mod, (0.0, 0.0, 0.0))
        sums[mod] = (s1 + x.sum(dims), s2 + (x * x).sum(dims), cnt + x.numel() / x.shape[1])

    with _frozen_eval(model):
        hooks = [m.register_forward_pre_hook(hook) for _, m in layers]
        try:
            for i in range(0, len(x_all), batch_size):
                model(x_all[i:i + batch_size])
        finally:
            for h in hooks:
                h.remove()
    out: dict[str, float] = {}
    for name, bn in layers:
        s1, s2, cnt = sums[bn]
        mu = s1 / cnt
        var = (s2 / cnt - mu * mu).clamp_min(0)
        kl = gaussian_kl(bn.running_mean.double(), bn.running_var.double(), mu, var)
        out[name] = float(kl.mean())
    return out if per_layer else float(sum(out.values()))
