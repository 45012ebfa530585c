"""Training: the one loop (`fit`, `evaluate`), checkpoints, DDP, regimes, cached pretrained models.

Example:
    >>> from thrifty.train import TrainConfig
    >>> TrainConfig(epochs=2, optim={"lr": 0.05}).optim.lr
    0.05
"""
from thrifty.train.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from thrifty.train.loop import History, StepState, TrainConfig, check_finite, evaluate, fit
from thrifty.train.regime import Compose, Regime

__all__ = [
    "CheckpointError", "load_checkpoint", "save_checkpoint", "History", "StepState", "TrainConfig",
    "check_finite", "evaluate", "fit", "Compose", "Regime",
]
from thrifty.train.io import load_model, model_kwargs_for, save_model  # noqa: E402
from thrifty.train.recipes import (  # noqa: E402
    RECIPES, cache_dir, flat_train_config, pretrained, pretrained_cached, recipe, with_train_overrides,
)
from thrifty.train.augment import AugmentConfig, SignalAugmentConfig, augment, augment_signal, resize  # noqa: E402
from thrifty.train.bn import recalibrate_bn  # noqa: E402
from thrifty.train.regimes import BatchAugment, MixedSize, SizeSchedule, default_schedule  # noqa: E402

__all__ += ["load_model", "model_kwargs_for", "save_model", "RECIPES", "cache_dir", "pretrained", "pretrained_cached", "recipe",
            "flat_train_config", "with_train_overrides",
            "AugmentConfig", "SignalAugmentConfig", "augment", "augment_signal", "resize", "recalibrate_bn", "BatchAugment", "MixedSize", "SizeSchedule",
            "default_schedule"]
