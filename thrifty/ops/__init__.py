"""Pure tensor math (no nn.Modules): quantizers, N:M masks, MVUE, accumulators."""
from torch import Tensor

__all__ = ["ste"]


def ste(x: Tensor, fx: Tensor) -> Tensor:
    """Straight-through estimator: the value of ``fx`` with the gradient of ``x``.

    Example:
        >>> import torch
        >>> x = torch.tensor([0.4, 1.6], requires_grad=True)
        >>> y = ste(x, torch.round(x)); y.sum().backward(); x.grad.tolist()
        [1.0, 1.0]
    """
    return x + (fx - x).detach()
