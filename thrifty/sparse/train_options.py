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
    g = p.add_argument_group("activation / gradient N:M sparsity (thrifty.sparse.actgrad)")
    g.add_argument("--grad-nm", default=None, metavar="N:M", help="prune the neural gradients dY N:M (e.g. 2:4)")
    g.add_argument("--grad-method", default="mvue", choices=["mvue", "mse"],
                   help="mvue: unbiased minimum-variance mask (default); mse: top-N, biased baseline")
    g.add_argument("--grad-gemms", default="input,weight",
                   help="backward GEMMs that use the pruned dY: input (dX = dY W), weight (dW = dY^T X) or both")
    g.add_argument("--act-nm", default=None, metavar="N:M", help="prune layer inputs N:M, MSE-optimal (e.g. 2:4)")


def grad_config(args: argparse.Namespace):
    """The GradNM config the flags ask for, or None."""
    from thrifty.sparse.actgrad import GradNM, parse_nm

    spec = getattr(args, "grad_nm", None)
    if spec in (None, "", "none"):
        return None
    n, m = parse_nm(spec, "--grad-nm")
    gemms = tuple(s.strip() for s in str(getattr(args, "grad_gemms", "input,weight")).split(",") if s.strip())
    try:
        return GradNM(n, m, method=getattr(args, "grad_method", "mvue"), gemms=gemms, seed=getattr(args, "seed", 0))
    except ValueError as e:
        raise ValueError(f"--grad-gemms / --grad-method: {e}") from None


def act_config(args: argparse.Namespace):
    """The ActNM config the flags ask for, or None."""
    from thrifty.sparse.actgrad import ActNM, parse_nm

    spec = getattr(args, "act_nm", None)
    if spec in (None, "", "none"):
        return None
    return ActNM(*parse_nm(spec, "--act-nm"))


def _prepare(model: nn.Module, args: argparse.Namespace) -> Optional[dict]:
    from thrifty.core import apply, to_dict

    grad, act = grad_config(args), act_config(args)
    meta = {}
    if act is not None:
        apply(model, act)
        meta["act"] = to_dict(act)
    if grad is not None:
        apply(model, grad)
        meta["grad"] = to_dict(grad)
    return meta or None


register_training_option(TrainingOption("actgrad-nm", _add, prepare=_prepare))
