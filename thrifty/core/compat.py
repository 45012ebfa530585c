"""Deprecation paths for one release: renamed names, the old argument order, config fields that went.

Example:
    >>> config_first("merge", Config(), [1, 2])
    (Config(), [1, 2])
"""
from __future__ import annotations

import warnings
from typing import Any, Optional

from thrifty.core.config import Config

__all__ = ["config_first", "old_order_warning", "deprecated_alias", "dropped_progress", "progress_of",
           "upgrade_drop_progress"]


def deprecated_alias(module: str, aliases: dict[str, tuple[str, Any]]) -> Any:
    """A module ``__getattr__`` serving renamed public names for one release, with a DeprecationWarning.

    ``aliases``: old name -> (new name, object). Example (in a module)::

        __getattr__ = deprecated_alias(__name__, {"PermuteAverage": ("PermuteMerge", PermuteMerge)})
    """
    def __getattr__(name: str) -> Any:
        if name in aliases:
            new, obj = aliases[name]
            warnings.warn(f"{module}.{name} is now {new}; the old name goes in the next release", DeprecationWarning,
                          stacklevel=2)
            return obj
        raise AttributeError(f"module {module!r} has no attribute {name!r}")

    return __getattr__


def dropped_progress(cfg: Config, progress: Optional[bool]) -> None:
    """``__post_init__`` part of a config that had a ``progress`` field (now an InitVar): warn, keep the value.

    Progress is not part of a run's description (:func:`thrifty.utils.show_progress` decides); the value
    given still reaches the pipeline through :func:`progress_of` for one release.
    """
    if progress is not None:
        warnings.warn(f"{type(cfg).__name__}(progress=...) is deprecated: progress bars follow the terminal and "
                      "THRIFTY_PROGRESS, or the pipeline's progress= argument", DeprecationWarning, stacklevel=4)
        object.__setattr__(cfg, "_progress", bool(progress))


def progress_of(cfg: Config, progress: Optional[bool]) -> Optional[bool]:
    """The pipeline's ``progress`` argument, else what a deprecated ``progress=`` config argument said."""
    return progress if progress is not None else getattr(cfg, "_progress", None)


def upgrade_drop_progress(cls: type, d: dict[str, Any], from_version: int) -> dict[str, Any]:
    """``upgrade`` of a config whose version 1 stored ``progress`` (not a field since version 2).

    In the class body: ``version: ClassVar[int] = 2`` and ``upgrade = classmethod(upgrade_drop_progress)``.
    """
    return {k: v for k, v in d.items() if k != "progress"} if from_version < 2 else d


def old_order_warning(fn: str, call: str = "", stacklevel: int = 3) -> None:
    """DeprecationWarning for a call in the order used before the config came first after the model(s)."""
    warnings.warn(f"{fn}: the config now comes right after the model(s): {call or fn + '(model, cfg, ...)'}; "
                  "the old order (and cfg=) still works in this release", DeprecationWarning, stacklevel=stacklevel)


def config_first(fn: str, config: Any, rest: Any, cfg: Any = None, *, default: Any = None,
                 accepts: tuple[type, ...] = (Config,), call: str = "") -> tuple[Any, Any]:
    """``(config, rest)`` of a call written config-first, ``fn(model, config, rest)``.

    The older order ``fn(model, rest, config)`` or ``fn(model, rest, cfg=config)`` still works for one
    release, with a DeprecationWarning; ``default`` fills a missing config; anything else is a TypeError.

    Example:
        >>> config_first("merge", Config(), [1, 2])
        (Config(), [1, 2])
    """
    old_positional = config is not None and not isinstance(config, accepts)
    legacy = False
    if cfg is not None:
        if config is not None and not old_positional:
            raise TypeError(f"{fn}: config given twice (positionally and as cfg=)")
        config, rest, legacy = cfg, (config if old_positional else rest), True
    elif old_positional and (rest is None or isinstance(rest, accepts)):
        config, rest, legacy = rest, config, True
    if config is None:
        config = default
    if not isinstance(config, accepts):
        raise TypeError(f"{fn}: expected a {' or '.join(t.__name__ for t in accepts)} config, got "
                        f"{type(config).__name__}")
    if legacy:
        old_order_warning(fn, call, stacklevel=4)
    return config, rest
