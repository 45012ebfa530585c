"""The one training loop: `fit`, `evaluate`, `TrainConfig`, `History`.

Every regime (batch augmentation, mixed sizes, ...) plugs in through the small protocol in
`thrifty.train.regime`; per-step callbacks get a `StepState`. Data order is DistributedSampler's
permutation of each epoch, consumed as one endless stream, so a step may draw any number of samples
(regimes that change the batch size) and resume / DDP stay exact.

Example:
    >>> import torch
    >>> from torch.utils.data import TensorDataset
    >>> x = torch.randn(64, 4); y = (x[:, 0] > 0).long()
    >>> model = torch.nn.Linear(4, 2)
    >>> hist = fit(model, TrainConfig(epochs=3, optim={"batch_size": 16}), TensorDataset(x, y), progress=False)
    >>> evaluate(model, TensorDataset(x, y))["acc"] > 0.5
    True
"""
from __future__ import annotations

import dataclasses
import json
import math
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator, Literal, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, TensorDataset
from tqdm.auto import tqdm

from thrifty.core import (
    Config, OptimConfig, config_first, from_dict, old_order_warning, register_config, register_pipeline, to_dict,
)
from thrifty.train import dist as _dist
from thrifty.train.augment import resize
from thrifty.train.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from thrifty.train.sampling import collate, index_batches, loader
from thrifty.utils import remove_stale_temp_files, show_progress

__all__ = ["TrainConfig", "History", "StepState", "fit", "evaluate", "check_finite", "check_finite_data", "CKPT_NAME"]

CKPT_NAME = "last.safetensors"
_RESUME_FREE = {"eval_every", "eval_steps", "ckpt_every", "num_workers"}  # may change between runs on resume
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@register_config
@dataclass(frozen=True)
class TrainConfig(Config):
    """Recipe for `fit`. ``optim.steps > 0`` overrides ``epochs``; one epoch = ceil(N / (optim.batch_size * world))
    steps.

    ``optim.batch_size`` is per process; ``warmup`` is in steps; ``eval_every`` in epochs (``eval_steps > 0``
    evaluates every that many steps instead); ``ckpt_every`` in steps (0: at every evaluation).

    Args:
        epochs: passes over the training set (used when ``optim.steps`` is 0).
        optim: ``steps`` in all (0: from ``epochs``), peak ``lr``, ``batch_size`` samples per step and process,
            ``weight_decay`` of the optimizer.
        optimizer: "sgd" or "adamw".
        momentum: SGD momentum.
        nesterov: Nesterov momentum for SGD.
        schedule: "cosine", "step" (times ``gamma`` at ``milestones``) or "constant".
        warmup: linear warmup steps.
        milestones: fractions of training where the step schedule decays.
        gamma: decay factor of the step schedule.
        label_smoothing: label smoothing of the cross-entropy.
        loss: training loss; "ce" (cross-entropy).
        grad_clip: clip the gradient norm to this (0: no clipping).
        seed: seeds the batch order and each step's randomness (augmentation, dropout).
        eval_every: evaluate every this many epochs (0: only at the end).
        eval_steps: evaluate every this many steps instead (0: use ``eval_every``).
        ckpt_every: checkpoint every this many steps (0: at every evaluation).
        num_workers: DataLoader worker processes.
    """

    epochs: float = 10
    optim: OptimConfig = OptimConfig(steps=0, lr=0.1, batch_size=128, weight_decay=5e-4)
    optimizer: Literal["sgd", "adamw"] = "sgd"
    momentum: float = 0.9
    nesterov: bool = True
    schedule: Literal["cosine", "step", "constant"] = "cosine"
    warmup: int = 0
    milestones: tuple[float, ...] = (0.5, 0.75)
    gamma: float = 0.1
    label_smoothing: float = 0.0
    loss: Literal["ce"] = "ce"
    grad_clip: float = 0.0
    seed: int = 0
    eval_every: int = 1
    eval_steps: int = 0
    ckpt_every: int = 0
    num_workers: int = 0

    # version 2 moved steps, batch_size, lr and weight_decay into ``optim``
    version: ClassVar[int] = 2
    moved_fields: ClassVar[dict[str, str]] = {k: "optim." + k for k in ("steps", "batch_size", "lr", "weight_decay")}

    def __post_init__(self) -> None:
        checks = {
            "optim": isinstance(self.optim, OptimConfig),
            "epochs": self.epochs > 0 or getattr(self.optim, "steps", 0) > 0,
            "optimizer": self.optimizer in ("sgd", "adamw"), "momentum": 0 <= self.momentum < 1,
            "schedule": self.schedule in ("cosine", "step", "constant"),
            "warmup": self.warmup >= 0, "label_smoothing": 0 <= self.label_smoothing < 1, "loss": self.loss == "ce",
            "eval_every": self.eval_every >= 0, "eval_steps": self.eval_steps >= 0,
            "ckpt_every": self.ckpt_every >= 0, "num_workers": self.num_workers >= 0, "grad_clip": self.grad_clip >= 0,
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"TrainConfig.{name}: invalid value {getattr(self, name)!r}")

    def lr_at(self, step: int, total: int) -> float:
        """Learning rate used at ``step`` (0-based) of ``total``: warmup, then the schedule."""
        if self.schedule == "cosine":
            f = 0.5 * (1 + math.cos(math.pi * step / max(total, 1)))
        elif self.schedule == "step":
            f = self.gamma ** sum(step >= m * total for m in self.milestones)
        else:
            f = 1.0
        if self.warmup:
            f *= min(1.0, (step + 1) / self.warmup)
        return self.optim.lr * f


register_pipeline(TrainConfig, "needs a training set", "thrifty.train.fit(model, cfg, train_ds)")


@dataclass
class History:
    """What `fit` returns: one record per evaluation plus the per-step training loss."""

    records: list[dict[str, Any]] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def final(self) -> dict[str, Any]:
        return self.records[-1] if self.records else {}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "History":
        return cls(records=list(d.get("records", [])), losses=list(d.get("losses", [])), seconds=d.get("seconds", 0.0))


@dataclass
class StepState:
    """Handed to per-step callbacks and ``regime.on_step_end`` after each optimizer step.

    Set ``stop = True`` to end training after this step."""

    step: int  # steps done so far (1-based after the first step)
    total_steps: int
    epoch: float
    loss: float
    lr: float
    batch_size: int
    model: nn.Module
    optimizer: torch.optim.Optimizer
    history: History
    stop: bool = False


def check_finite(model: nn.Module) -> None:
    """Raise ValueError naming the first parameter or buffer holding NaN/Inf."""
    for kind, items in (("parameter", model.named_parameters()), ("buffer", model.named_buffers())):
        for name, t in items:
            if t.is_floating_point() and not torch.isfinite(t).all():
                raise ValueError(f"{kind} {name!r} contains NaN or Inf values")


def check_finite_data(ds: Any, what: str) -> None:
    """Raise ValueError naming ``what`` and the first sample whose inputs hold NaN/Inf (TensorDatasets;
    for other datasets a non-finite loss says whether its batch held NaN/Inf inputs).

    Example:
        >>> x = torch.tensor([[0.0], [float("nan")]])
        >>> check_finite_data(TensorDataset(x, torch.zeros(2)), "my data")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: my data: inputs hold NaN or Inf (1 of 2 samples, the first at index 1); ...
    """
    if isinstance(ds, TensorDataset) and ds.tensors and ds.tensors[0].is_floating_point():
        x = ds.tensors[0]
        bad = ~torch.isfinite(x.reshape(len(x), -1)).all(1) if len(x) else torch.zeros(0, dtype=torch.bool)
        if bad.any():
            i = int(bad.nonzero()[0])
            raise ValueError(f"{what}: inputs hold NaN or Inf ({int(bad.sum())} of {len(x)} samples, the first "
                             f"at index {i}); clean or drop them before training or evaluating")


def _check_labels(out: torch.Tensor, y: torch.Tensor, what: str) -> None:
    # cross_entropy's own error is "IndexError: Target 10 is out of bounds", naming neither side
    if out.dim() == 2 and y.dim() == 1 and not y.is_floating_point() and len(y):
        lo, hi = int(y.min()), int(y.max())
        if lo < 0 or hi >= out.shape[1]:
            raise ValueError(f"{what} has label {hi if hi >= out.shape[1] else lo}, but the model has "
                             f"{out.shape[1]} outputs (labels must be in 0..{out.shape[1] - 1})")


def _forward(model: nn.Module, x: torch.Tensor, what: str) -> torch.Tensor:
    """The first batch's forward: a shape error there means the data does not fit the model; say so."""
    try:
        return model(x)
    except torch.cuda.OutOfMemoryError:
        raise
    except RuntimeError as e:
        raise ValueError(f"the model cannot take the {what} inputs of shape {tuple(x.shape[1:])} "
                         f"(one sample): {str(e).splitlines()[0]}") from e


def _check_dataset(ds: Any, what: str) -> None:
    try:
        n = len(ds)
    except TypeError:
        raise TypeError(f"{what} must be a sized Dataset (e.g. TensorDataset), got {type(ds).__name__}") from None
    if n == 0:
        raise ValueError(f"{what} is empty: nothing to train or evaluate on")
    check_finite_data(ds, what)


def _dotted(d: dict[str, Any], path: str = "") -> dict[str, Any]:
    """A config dict with its nested configs' fields as dotted keys ("optim.lr"), to name what differs."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and "kind" in v:
            out.update(_dotted(v, f"{path}{k}."))
        else:
            out[path + k] = v
    return out


def _optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no trainable parameters")
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.optim.lr, momentum=cfg.momentum, weight_decay=cfg.optim.weight_decay,
                               nesterov=cfg.nesterov and cfg.momentum > 0)
    return torch.optim.AdamW(params, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)


def _step_seed(seed: int, step: int, rank: int) -> int:
    return (seed * 1_000_003 + step * 7_919 + rank * 104_729) % (2**63 - 1)


@torch.no_grad()
def evaluate(model: nn.Module, ds: Dataset, batch_size: int = 512, *, size: int | None = None,
             loss_fn: LossFn | None = None) -> dict[str, float]:
    """Accuracy and mean loss of ``model`` on ``ds`` (eval mode; the model's train/eval mode is restored).

    ``size`` resizes image batches (N, C, H, W) to size x size first (bilinear), for test-size sweeps.
    ``batch_size`` only chunks the work; results do not depend on it.

    Example:
        >>> import torch; from torch.utils.data import TensorDataset
        >>> r = evaluate(torch.nn.Linear(3, 2), TensorDataset(torch.randn(8, 3), torch.zeros(8).long()))
        >>> sorted(r)
        ['acc', 'loss', 'n']
    """
    _check_dataset(ds, "evaluation dataset")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"evaluate: batch_size must be a positive integer, got {batch_size!r}")
    loss_fn = loss_fn or F.cross_entropy
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        correct, loss_sum, n = 0, 0.0, len(ds)
        for s in range(0, n, batch_size):
            x, y = collate(ds, list(range(s, min(s + batch_size, n))))
            x, y = x.to(device), y.to(device)
            if size is not None:
                if x.dim() != 4:
                    raise ValueError(f"evaluate(size={size}) needs image inputs (N, C, H, W), got {tuple(x.shape)}")
                x = resize(x, size)
            out = _forward(model, x, "evaluation dataset") if s == 0 else model(x)
            _check_labels(out, y, "evaluation dataset")
            loss_sum += float(loss_fn(out, y)) * len(y)
            correct += int((out.argmax(1) == y).sum())
        return {"acc": correct / n, "loss": loss_sum / n, "n": n}
    finally:
        model.train(was_training)


class _GracefulInterrupt:
    """While active, the first Ctrl-C (SIGINT) only sets ``hit``: the loop finishes the step, saves a
    checkpoint of the progress made and raises KeyboardInterrupt, so ``resume`` continues exactly. A second
    Ctrl-C interrupts at once. Only in the main thread, only over Python's default handler, and not under
    DDP (ranks could stop at different steps and hang in a collective)."""

    def __init__(self, active: bool):
        self.active, self.hit, self._old = active, False, None

    def __enter__(self) -> "_GracefulInterrupt":
        if (self.active and threading.current_thread() is threading.main_thread()
                and signal.getsignal(signal.SIGINT) is signal.default_int_handler):
            self._old = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.hit:
            raise KeyboardInterrupt
        self.hit = True

    def __exit__(self, *exc: Any) -> None:
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)


def fit(model: nn.Module, config: TrainConfig | None = None, train_ds: Dataset | None = None,
        test_ds: Dataset | None = None, *, cfg: TrainConfig | None = None, regime: Any = None,
        callbacks: Sequence[Callable[[StepState], Any]] = (), ckpt_dir: str | Path | None = None,
        resume: bool = False, progress: bool | None = None, loss_fn: LossFn | None = None) -> History:
    """Train ``model`` in place on ``train_ds``; returns the `History`.

    ``regime`` plugs in batch transforms and hooks (see `thrifty.train.regime`); ``callbacks`` are called
    with a `StepState` after every step; ``ckpt_dir`` gets ``last.safetensors`` (rank 0 only);
    ``resume=True`` continues from it exactly; ``loss_fn(logits, y)`` replaces the cross-entropy loss.
    Under torchrun (WORLD_SIZE > 1) it runs DistributedDataParallel with ``batch_size`` per process.
    ``config`` defaults to ``TrainConfig()``; the older order ``fit(model, train_ds, test_ds, cfg)`` (or
    ``cfg=``) still works for one release, with a DeprecationWarning.
    """
    call = "fit(model, cfg, train_ds, test_ds)"
    if config is not None and not isinstance(config, (TrainConfig, Config)):  # old order: (train_ds, test_ds, cfg)
        old_order_warning("fit", call)
        config, train_ds, test_ds, cfg = (cfg if cfg is not None else test_ds), config, train_ds, None
    cfg, _ = config_first("fit", config, None, cfg, default=TrainConfig(), accepts=(TrainConfig,), call=call)
    if train_ds is None:
        raise TypeError("fit needs train_ds: fit(model, cfg, train_ds)")
    _check_dataset(train_ds, "train_ds")
    if test_ds is not None:
        _check_dataset(test_ds, "test_ds")
    check_finite(model)
    rank, world = _dist.setup()
    ckpt = Path(ckpt_dir) / CKPT_NAME if ckpt_dir is not None else None
    if resume and ckpt is None:
        raise ValueError("resume=True needs ckpt_dir")
    if ckpt is not None and rank == 0:
        remove_stale_temp_files(ckpt)  # left by a write that was killed (SIGKILL, power loss)
    if regime is not None and hasattr(regime, "setup"):
        regime.setup(model, train_ds, cfg)
    loss_fn = loss_fn or (lambda out, y: F.cross_entropy(out, y, label_smoothing=cfg.label_smoothing))
    n = len(train_ds)
    base = min(cfg.optim.batch_size, math.ceil(n / world))
    spe = math.ceil(n / (base * world))  # steps per epoch
    total = cfg.optim.steps or max(1, round(cfg.epochs * spe))
    opt = _optimizer(model, cfg)
    hist, start = History(), 0
    cfg_dict = to_dict(cfg)
    if resume:
        info = load_checkpoint(ckpt, model, opt)
        saved = json.loads(info["extra"].get("cfg", "{}"))
        if saved.get("kind") == "TrainConfig":  # a checkpoint of an older version: compare in today's layout
            saved = to_dict(from_dict(saved))
        saved, now = _dotted(saved), _dotted(cfg_dict)
        diff = sorted(k for k in set(saved) | set(now) if k not in _RESUME_FREE and saved.get(k) != now.get(k))
        if diff:
            raise CheckpointError(f"checkpoint {ckpt} was written with a different TrainConfig (fields {diff})")
        start, hist = info["step"], History.from_dict(info["extra"].get("history", {}))
    net = model
    if world > 1:
        net = nn.parallel.DistributedDataParallel(model)
    sizes = (lambda t: regime.batch_size(t, base)) if hasattr(regime, "batch_size") else (lambda t: base)
    batches = loader(train_ds, index_batches(n, sizes, start, total, cfg.seed, rank, world), cfg.num_workers)
    device = next(model.parameters()).device
    eval_period = cfg.eval_steps or (cfg.eval_every * spe if cfg.eval_every else 0)
    ckpt_period = cfg.ckpt_every or eval_period or total
    bar = tqdm(total=total, initial=start, disable=not show_progress(progress) or rank != 0, desc="train", unit="step", leave=False)
    t0, run_loss, run_correct, run_n = time.perf_counter() - hist.seconds, 0.0, 0, 0
    model.train()
    with _GracefulInterrupt(ckpt is not None and rank == 0 and world == 1) as interrupt:
        for step in range(start, total):
            torch.manual_seed(_step_seed(cfg.seed, step, rank))
            x, y = next(batches)
            x, y = x.to(device), y.to(device)
            if regime is not None and hasattr(regime, "batch"):
                x, y = regime.batch(x, y, step)
            lr = cfg.lr_at(step, total)
            for g in opt.param_groups:
                g["lr"] = lr
            out = _forward(net, x, "train_ds") if step == start else net(x)
            _check_labels(out, y, "train_ds")
            loss = loss_fn(out, y)
            if not torch.isfinite(loss):
                if x.is_floating_point() and not torch.isfinite(x).all():  # a regime or dataset made them
                    raise ValueError(f"training inputs hold NaN or Inf at step {step}: the loss is not a sign of "
                                     "divergence; clean the data")
                raise FloatingPointError(f"training diverged: loss is {loss.item()} at step {step} "
                                         f"(epoch {step / spe:.2f}, lr {lr:g}); lower the learning rate?")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if regime is not None and hasattr(regime, "before_optimizer_step"):
                regime.before_optimizer_step(model, step)
            if cfg.grad_clip:
                nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            lv = loss.item()
            hist.losses.append(lv)
            run_loss, run_n = run_loss + lv * len(y), run_n + len(y)
            run_correct += int((out.detach().argmax(1) == y).sum()) if out.dim() == 2 and y.dim() == 1 else 0
            state = StepState(step + 1, total, (step + 1) / spe, lv, lr, len(y), model, opt, hist)
            if regime is not None and hasattr(regime, "on_step_end"):
                regime.on_step_end(state)
            for cb in callbacks:
                cb(state)
            bar.update(1)
            done = step + 1
            if (eval_period and done % eval_period == 0) or done == total or state.stop:
                rec = {"step": done, "epoch": round(done / spe, 4), "lr": lr, "train_loss": run_loss / max(run_n, 1),
                       "train_acc": run_correct / max(run_n, 1), "seconds": round(time.perf_counter() - t0, 3)}
                if test_ds is not None:
                    ev = evaluate(model, test_ds)
                    rec.update(test_acc=ev["acc"], test_loss=ev["loss"])
                hist.records.append(rec)
                run_loss, run_correct, run_n = 0.0, 0, 0
                bar.set_postfix({k: round(v, 4) for k, v in rec.items() if k in ("train_loss", "test_acc")})
            hist.seconds = time.perf_counter() - t0
            if ckpt is not None and rank == 0 and (done % ckpt_period == 0 or done == total or state.stop
                                                   or interrupt.hit):
                save_checkpoint(ckpt, model, opt, done, {"cfg": json.dumps(cfg_dict), "history": hist.to_dict()})
            if interrupt.hit:
                bar.close()
                raise KeyboardInterrupt(f"interrupted after step {done} of {total}; checkpoint saved to {ckpt} "
                                        "(continue with resume=True, or --resume)")
            if state.stop:
                break
    bar.close()
    return hist
