"""``thrifty train`` options from the sparsity package (a `thrifty.train.options` plugin).

Activation and neural-gradient N:M (:mod:`thrifty.sparse.actgrad`):

    thrifty train --model resnet20 --dataset digits32 --grad-nm 2:4 --grad-method mvue --act-nm 2:4

``--grad-nm N:M`` prunes dY of every Linear/Conv2d in backward (``--grad-method mvue``, unbiased, or
``mse``, the biased baseline; ``--grad-gemms`` picks the backward GEMMs, default both);
``--act-nm N:M`` keeps the top-N of every M inputs of every Linear/Conv2d in forward. The slots hold no
parameters, so the saved weights load into the plain registry model; the configs are recorded under
``options.actgrad-nm`` in the saved YAML (re-apply them with ``thrifty.apply`` to evaluate with
activation N:M, which the reported test accuracy includes).

Example:
    >>> import argparse
    >>> p = argparse.ArgumentParser(); _add(p)
    >>> grad_config(p.parse_args(["--grad-nm", "1:2"]))
    GradNM(n=1, m=2, method='mvue', gemms=('input', 'weight'), input_dim=None, weight_dim=None, tail='pad', seed=0)
"""
from __future__ import annotations

import argparse
from typing import Optional

from torch import nn

from thrifty.train.options import TrainingOption, register_training_option

__all__ = ["grad_config", "act_config"]


def _add(p: argparse.ArgumentParser) -> None:
    from thrifty.cli._fields import add_config_flags
    from thrifty.sparse.actgrad import ActNM, GradNM

    g = p.add_argument_group("activation / gradient N:M sparsity (thrifty.sparse.actgrad)")
    g.add_argument("--grad-nm", default=None, metavar="N:M",
                   help="prune the neural gradients dY N:M (e.g. 2:4); the --grad-* flags are GradNM's fields")
    g.add_argument("--act-nm", default=None, metavar="N:M",
                   help="prune layer inputs N:M, MSE-optimal (e.g. 2:4); the --act-* flags are ActNM's fields")
    # n and m come from --grad-nm / --act-nm, which also switch the technique on
    add_config_flags(p, "grad", GradNM, prefix="grad-", skip=("n", "m"), title="GradNM fields (with --grad-nm)",
                     on_load=lambda c: {"grad_nm": f"{c.n}:{c.m}"})
    add_config_flags(p, "act", ActNM, prefix="act-", skip=("n", "m"), title="ActNM fields (with --act-nm)",
                     on_load=lambda c: {"act_nm": f"{c.n}:{c.m}"})


def _config(args: argparse.Namespace, role: str, cls: type, **base: object):
    from thrifty.cli._fields import changed_flags, config_from_args
    from thrifty.sparse.actgrad import parse_nm

    spec = getattr(args, f"{role}_nm", None)
    if spec in (None, "", "none"):
        if changed_flags(args, role):
            raise ValueError(f"{changed_flags(args, role)[0]} applies with --{role}-nm N:M only; it would be ignored")
        return None
    return config_from_args(args, role, base=cls(*parse_nm(spec, f"--{role}-nm"), **base))


def grad_config(args: argparse.Namespace):
    """The GradNM config the flags ask for, or None; its seed defaults to the run's ``--seed``."""
    from thrifty.cli._fields import UNSET
    from thrifty.sparse.actgrad import GradNM

    seed = getattr(args, "seed", UNSET)
    return _config(args, "grad", GradNM, **({} if seed is UNSET else {"seed": seed}))


def act_config(args: argparse.Namespace):
    """The ActNM config the flags ask for, or None."""
    from thrifty.sparse.actgrad import ActNM

    return _config(args, "act", ActNM)


def _prepare(model: nn.Module, args: argparse.Namespace, configs: dict) -> Optional[dict]:
    from thrifty.core import apply, to_dict

    grad, act = configs.get("grad"), configs.get("act")
    meta = {}
    if act is not None:
        apply(model, act)
        meta["act"] = to_dict(act)
    if grad is not None:
        apply(model, grad)
        meta["grad"] = to_dict(grad)
    return meta or None


register_training_option(TrainingOption("actgrad-nm", _add, prepare=_prepare,
                                        configs=lambda args: {"grad": grad_config(args), "act": act_config(args)}))
