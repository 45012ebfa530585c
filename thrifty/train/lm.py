"""Causal language modelling: a short training loop, held-out perplexity, and a cached pretrained ``tinyllama``.

``pretrained_lm()`` trains ``create("tinyllama")`` once on the stdlib docstring stream (:mod:`thrifty.data.lm`,
byte-level) and caches it under ``$THRIFTY_CACHE/pretrained`` like :func:`thrifty.train.pretrained`: the entry
is keyed by the model kwargs, the recipe, the seed and a digest of the training text, and a file lock lets
parallel callers wait for one training run. Its metric is the perplexity per byte on the held-out documents.

Example (a tiny model, a few steps; ``pretrained_lm()`` is the usual call):
    >>> from thrifty.models import create
    >>> from thrifty.data.lm import lm_tokens, lm_windows
    >>> _ = torch.manual_seed(0)
    >>> m = create("tinyllama", hidden=32, layers=1, heads=2, intermediate=64)
    >>> cfg = TrainConfig(optim={"steps": 15, "batch_size": 4, "lr": 3e-3}, optimizer="adamw", warmup=3)
    >>> losses = train_lm(m, cfg, lm_tokens("train"), seq_len=32, progress=False)
    >>> losses[-1] < losses[0], perplexity(m, lm_windows("test", 32, n=4)) < 256
    (True, True)
"""
from __future__ import annotations

import hashlib
import math
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import trange

from thrifty.core import OptimConfig, to_dict
from thrifty.quant.calib import model_output
from thrifty.train.io import save_model
from thrifty.train.loop import TrainConfig, _optimizer
from thrifty.train.recipes import flat_train_config, cached_model, with_train_overrides
from thrifty.utils import seed_everything, show_progress

__all__ = ["LM_RECIPE", "LM_SEQ_LEN", "train_lm", "nll", "perplexity", "pretrained_lm"]

# 400 steps x 16 windows x 128 bytes = 0.8 M tokens (about 1.3 passes over the training text).
LM_RECIPE = TrainConfig(optim=OptimConfig(steps=400, lr=3e-3, batch_size=16, weight_decay=0.01), optimizer="adamw",
                        warmup=20, grad_clip=1.0)
LM_SEQ_LEN = 128


def _logits(model: nn.Module, ids: Tensor) -> Tensor:
    return model_output(model(input_ids=ids))


def _batch_nll(model: nn.Module, ids: Tensor) -> Tensor:
    """Summed next-token negative log-likelihood of a (B, T) batch (T - 1 predictions per window)."""
    logits = _logits(model, ids)
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1),
                           reduction="sum")


def _check_windows(windows: Any) -> Tensor:
    if not isinstance(windows, Tensor) or windows.dim() != 2 or windows.dtype != torch.int64:
        raise TypeError("expected (windows, seq_len) int64 token ids, got "
                        + (f"{windows.dtype} of shape {tuple(windows.shape)}" if isinstance(windows, Tensor)
                           else type(windows).__name__))
    if windows.shape[0] == 0 or windows.shape[1] < 2:
        raise ValueError(f"need at least one window of >= 2 tokens, got shape {tuple(windows.shape)}")
    return windows


def train_lm(model: nn.Module, cfg: TrainConfig, tokens: Tensor, *, seq_len: int = LM_SEQ_LEN,
             progress: Optional[bool] = None) -> list[float]:
    """Train ``model`` (``model(input_ids=...)`` -> logits) on random ``seq_len`` windows of a token stream.

    ``cfg.optim.steps`` steps of ``cfg.optim.batch_size`` windows with ``cfg``'s optimizer, learning-rate schedule,
    warmup and gradient clipping; windows are drawn with a generator seeded by ``cfg.seed``. Returns the per-step mean
    next-token loss (nats). The model is left in eval mode.
    """
    if cfg.optim.steps <= 0:
        raise ValueError(f"train_lm: the recipe needs optim.steps > 0, got {cfg.optim.steps}")
    if not isinstance(tokens, Tensor) or tokens.dim() != 1 or tokens.numel() <= seq_len:
        raise ValueError(f"train_lm: tokens must be a 1-D stream longer than seq_len={seq_len}")
    g = torch.Generator().manual_seed(cfg.seed)
    opt = _optimizer(model, cfg)
    dev = next(model.parameters()).device
    offsets = torch.arange(seq_len)
    losses: list[float] = []
    model.train()
    for step in trange(cfg.optim.steps, desc="train LM", disable=not show_progress(progress)):
        for group in opt.param_groups:
            group["lr"] = cfg.lr_at(step, cfg.optim.steps)
        starts = torch.randint(0, tokens.numel() - seq_len + 1, (cfg.optim.batch_size,), generator=g)
        ids = tokens[starts[:, None] + offsets].to(dev)
        loss = _batch_nll(model, ids) / (ids.shape[0] * (seq_len - 1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        value = loss.item()
        if not math.isfinite(value):
            raise FloatingPointError(f"train_lm: the loss became {value} at step {step}; lower the lr")
        losses.append(value)
    model.eval()
    return losses


@torch.no_grad()
def nll(model: nn.Module, windows: Tensor, batch_size: int = 32) -> float:
    """Mean next-token negative log-likelihood (nats) over all ``T - 1`` predictions of every window."""
    windows = _check_windows(windows)
    was = model.training
    model.eval()
    dev = next(model.parameters()).device
    total = 0.0
    try:
        for i in range(0, windows.shape[0], batch_size):
            total += float(_batch_nll(model, windows[i:i + batch_size].to(dev)))
    finally:
        model.train(was)
    return total / (windows.shape[0] * (windows.shape[1] - 1))


def perplexity(model: nn.Module, windows: Tensor, batch_size: int = 32) -> float:
    """``exp`` of :func:`nll`: the model's perplexity per token on held-out windows (a uniform model: vocab size).

    Example:
        >>> class Uniform(nn.Module):
        ...     def __init__(self): super().__init__(); self.w = nn.Parameter(torch.zeros(()))
        ...     def forward(self, input_ids): return torch.zeros(*input_ids.shape, 256) + self.w
        >>> round(perplexity(Uniform(), torch.zeros(2, 9, dtype=torch.long)), 3)
        256.0
    """
    return math.exp(nll(model, windows, batch_size))


def pretrained_lm(model_name: str = "tinyllama", seed: int = 0, *, return_meta: bool = False,
                  progress: Optional[bool] = None, seq_len: int = LM_SEQ_LEN, **overrides: Any) -> Any:
    """The trained causal LM (eval mode), trained once on the stdlib docstring stream and then cached.

    ``overrides``: TrainConfig fields (steps=..., lr=...) or model kwargs (hidden=...). With
    ``return_meta=True`` returns ``(model, meta)``; meta holds the held-out perplexity, train seconds, config
    and cache path.
    """
    from thrifty.data.lm import VOCAB_SIZE, lm_text, lm_tokens, lm_windows
    from thrifty.models import create

    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int, got {seed!r}")
    cfg, rest = with_train_overrides(LM_RECIPE.replace(seed=seed), overrides)
    kwargs = {"vocab_size": VOCAB_SIZE, **rest}
    text_digest = hashlib.sha256(lm_text("train").encode()).hexdigest()[:12]
    key = {"model": model_name, "model_kwargs": kwargs, "dataset": "stdlib-docs-bytes", "text": text_digest,
           "seed": seed, "seq_len": seq_len, "train": flat_train_config(cfg), "format": 1}

    def train(stem: Path) -> None:
        seed_everything(seed)
        model = create(model_name, **kwargs)
        if show_progress(progress):
            print(f"[thrifty] training {model_name} on the stdlib docstring text (seed {seed}) once; "
                  f"cached at {stem}", file=sys.stderr)
        t0, c0 = time.perf_counter(), time.process_time()
        losses = train_lm(model, cfg, lm_tokens("train"), seq_len=seq_len, progress=progress)
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        meta = {"model": model_name, "model_kwargs": kwargs, "dataset": "stdlib-docs-bytes", "seed": seed,
                "seq_len": seq_len, "train_config": to_dict(cfg),
                "final_train_loss": round(sum(losses[-20:]) / len(losses[-20:]), 4),
                "test_ppl": perplexity(model, lm_windows("test", seq_len)),
                "train_seconds": round(seconds, 2), "train_cpu_seconds": round(cpu, 2), "torch": torch.__version__}
        save_model(model, stem, meta)

    model, meta = cached_model(f"{model_name}-stdlibdocs-seed{seed}", key, train)
    return (model, meta) if return_meta else model
