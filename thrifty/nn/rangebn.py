"""Range Batch Normalization (Banner et al., "Scalable methods for 8-bit training of neural networks").

Standard BN divides by the standard deviation, a sum of squares that is fragile in low precision. Range BN
divides by the (scaled) range instead:

    x_hat = (x - mean(x)) / (C(n) * range(x - mean(x)))        per channel, over batch (and spatial) elements

As in the authors' code, the range is the mean of ``max - min`` over ``num_chunks`` chunks of the batch
(``n`` elements each; leftover elements, fewer than ``num_chunks``, count for the mean but not the range).
``C(n)`` is chosen by ``correction``:

* ``"gaussian"`` (default): ``C(n) = 1 / E[range of n standard normals]`` (computed once by numerical
  integration), so ``C(n) * range`` estimates the standard deviation of Gaussian activations without bias and the
  layer's output matches BN's (``experiments/train8.py`` measures the relative error by ``n``);
* ``"paper"``: the paper's closed form ``C(n) = 1 / sqrt(2 ln n)``. Since ``E[range] ~ 2 sigma sqrt(2 ln n)``
  this yields about ``2 sigma``: outputs are about half BN's, a constant the affine weight absorbs.

Eval mode uses running ``mean`` and ``scale`` (exponential averages with ``momentum``, or cumulative when
``momentum=None``). ``bits`` (optional) fake-quantizes the input and the scale with
:mod:`thrifty.ops.quant` (per-tensor min/max, straight-through), as the paper's 8-bit variant does.
:func:`convert_to_range_bn` swaps every BatchNorm1d/2d of a model (a trained BN's running statistics carry
over: its eval output is unchanged).

Speed: on CPU (float32/64, no ``bits``, chunks made of whole samples, e.g. batch 64 with 16 chunks) training mode
takes a fused path: chunk max/min by ``amax``/``amin`` over a view, the normalisation in one pass and an analytic
backward in two passes (:mod:`thrifty.ops._rangebn_kernels`). Its forward and running statistics are
bit-identical to the reference (:meth:`batch_stats` + broadcast ops differentiated by autograd, used otherwise);
its gradients agree within float rounding, except that a chunk max (min) reached by several elements shares its
gradient evenly among them instead of giving it to one.

Example:
    >>> import torch
    >>> bn = RangeBatchNorm2d(3)
    >>> bn(torch.randn(8, 3, 4, 4)).shape
    torch.Size([8, 3, 4, 4])
"""
from __future__ import annotations

import functools
import math
from typing import Literal, Optional

import numpy as np
import torch
import torch.nn as nn
from torch import Tensor

__all__ = ["RangeBatchNorm1d", "RangeBatchNorm2d", "convert_to_range_bn", "range_constant", "expected_gaussian_range"]

Correction = Literal["gaussian", "paper"]


@functools.lru_cache(maxsize=None)
def expected_gaussian_range(n: int) -> float:
    """``E[max - min]`` of ``n`` i.i.d. standard normal samples (numerical integration; n >= 2).

    ``E[range] = 2 E[max] = 2 * integral x n phi(x) Phi(x)^(n-1) dx``. Example:
        >>> round(expected_gaussian_range(2), 4)  # 2 / sqrt(pi)
        1.1284
    """
    from scipy.special import log_ndtr

    if not isinstance(n, int) or n < 2:
        raise ValueError(f"the range needs at least 2 samples, got n={n!r}")
    x = np.linspace(-12.0, 12.0, 48001)
    logpdf = -0.5 * x * x - 0.5 * math.log(2 * math.pi)
    dens = np.exp(math.log(n) + logpdf + (n - 1) * log_ndtr(x))
    return float(2.0 * np.trapezoid(x * dens, x))


def range_constant(n: int, correction: Correction = "gaussian") -> float:
    """``C(n)``: ``1 / E[range_n]`` (``"gaussian"``) or ``1 / sqrt(2 ln n)`` (``"paper"``).

    Example:
        >>> round(range_constant(1024, "paper"), 4)
        0.2686
    """
    if n < 2:
        raise ValueError(f"Range BN needs at least 2 elements per chunk, got n={n}")
    if correction == "gaussian":
        return 1.0 / expected_gaussian_range(int(n))
    if correction == "paper":
        return 1.0 / math.sqrt(2.0 * math.log(n))
    raise ValueError(f"correction must be 'gaussian' or 'paper', got {correction!r}")


class _RangeBatchNorm(nn.Module):
    _dims: tuple[int, ...] = ()

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1, affine: bool = True,
                 track_running_stats: bool = True, num_chunks: int = 16, correction: Correction = "gaussian",
                 bits: Optional[int] = None, device=None, dtype=None) -> None:
        super().__init__()
        if not isinstance(num_features, int) or num_features < 1:
            raise ValueError(f"{type(self).__name__}: num_features must be a positive int, got {num_features!r}")
        if not isinstance(num_chunks, int) or num_chunks < 1:
            raise ValueError(f"{type(self).__name__}: num_chunks must be a positive int, got {num_chunks!r}")
        if momentum is not None and not 0.0 <= momentum <= 1.0:
            raise ValueError(f"{type(self).__name__}: momentum must be None or in [0, 1], got {momentum}")
        range_constant(2, correction)  # validates the name
        if bits is not None:
            from thrifty.ops.quant import check_bits

            check_bits(bits, "bits")
        fk = {"device": device, "dtype": dtype}
        self.num_features, self.eps, self.momentum, self.affine = num_features, eps, momentum, affine
        self.track_running_stats, self.num_chunks, self.correction, self.bits = (
            track_running_stats, num_chunks, correction, bits)
        if affine:
            self.weight = nn.Parameter(torch.ones(num_features, **fk))
            self.bias = nn.Parameter(torch.zeros(num_features, **fk))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features, **fk))
            self.register_buffer("running_scale", torch.ones(num_features, **fk))
            self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))
        else:
            self.running_mean = self.running_scale = self.num_batches_tracked = None

    def extra_repr(self) -> str:
        return (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
                f"num_chunks={self.num_chunks}, correction={self.correction}, bits={self.bits}")

    def _check(self, x: Tensor) -> None:
        if x.dim() not in self._dims:
            raise ValueError(f"{type(self).__name__} expects a {' or '.join(f'{d}-D' for d in self._dims)} input, "
                             f"got shape {tuple(x.shape)}")
        if x.shape[1] != self.num_features:
            raise ValueError(f"{type(self).__name__}({self.num_features}) got {x.shape[1]} channels")

    def batch_stats(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Per-channel mean and ``C(n) * mean chunk range`` of a batch (differentiable)."""
        c = x.shape[1]
        m = x.numel() // c
        if m < 2:
            raise ValueError(f"{type(self).__name__}: expected more than 1 value per channel when training, "
                             f"got input shape {tuple(x.shape)}")
        k = min(self.num_chunks, m // 2)
        n = m // k
        # (C, batch-major elements): chunk i is the i-th run of n elements, i.e. a group of samples. max/min
        # with indices backpropagate by a scatter, ~3x cheaper than amax/amin's mask-based backward.
        blocks = x.transpose(0, 1).reshape(c, -1)[:, : k * n].reshape(c, k, n)
        rng = (blocks.max(-1)[0] - blocks.min(-1)[0]).mean(-1)
        mean = x.mean(dim=[0] + list(range(2, x.dim())))
        return mean, rng * range_constant(n, self.correction)

    def _fast_layout(self, x: Tensor) -> Optional[tuple[int, int, int]]:
        """``(P, chunks, samples per chunk)`` when the fused path applies (CPU float, chunks of whole samples)."""
        if self.bits is not None or x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64):
            return None
        p = x[0, 0].numel()
        m = x.shape[0] * p
        if m < 2:
            return None
        k = min(self.num_chunks, m // 2)
        n = m // k
        return (p, k, n // p) if n % p == 0 else None

    def _fast_stats(self, x: Tensor, p: int, k: int, q: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """:meth:`batch_stats` (same values) when chunk i is samples [i q, (i + 1) q): amax/amin over a view
        instead of a transposed copy. Also returns the (C, k) chunk maxima and minima for the backward."""
        c = x.shape[1]
        v = x.reshape(x.shape[0], c, p)[: k * q].reshape(k, q, c, p)
        mx, mn = v.amax((1, 3)).t().contiguous(), v.amin((1, 3)).t().contiguous()
        mean = x.mean(dim=[0] + list(range(2, x.dim())))
        return mean, (mx - mn).mean(-1) * range_constant(q * p, self.correction), mx, mn

    def forward(self, x: Tensor) -> Tensor:
        self._check(x)
        if self.bits is not None:
            from thrifty.ops.quant import fake_quantize_tensor

            x = fake_quantize_tensor(x, self.bits)
        use_batch = self.training or not self.track_running_stats
        layout = self._fast_layout(x) if use_batch else None
        if layout is not None:
            x = x.contiguous()
            with torch.no_grad():
                mean, scale, mx, mn = self._fast_stats(x, *layout)
            y = _RangeBNFunction.apply(x, self.weight, self.bias, mean, scale, mx, mn, self.eps,
                                       range_constant(layout[2] * layout[0], self.correction), layout)
        elif use_batch:
            mean, scale = self.batch_stats(x)
        else:
            mean, scale = self.running_mean, self.running_scale
        if use_batch and self.training and self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                mom = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                self.running_mean.mul_(1 - mom).add_(mean.detach(), alpha=mom)
                self.running_scale.mul_(1 - mom).add_(scale.detach(), alpha=mom)
        if layout is not None:
            return y
        if self.bits is not None:
            from thrifty.ops.quant import fake_quantize_tensor

            scale = fake_quantize_tensor(scale, self.bits)
        shape = (1, -1) + (1,) * (x.dim() - 2)
        # (x - mean) / (scale + eps) * weight + bias, folded to one multiply-add over x
        a = 1.0 / (scale + self.eps)
        if self.affine:
            a = a * self.weight
        shift = -mean * a
        if self.affine:
            shift = shift + self.bias
        return x * a.view(shape) + shift.view(shape)


class _RangeBNFunction(torch.autograd.Function):
    """``y = x * a + shift`` with ``a = weight / (scale + eps)``, ``shift = bias - mean * a`` from the batch stats,
    differentiated through ``mean`` and the chunk ranges analytically: two passes over (dY, X) in backward
    (:mod:`thrifty.ops._rangebn_kernels`) instead of autograd's graph of broadcasts, scatters and transposes.
    The gradient of a chunk's max (min) is shared evenly by the elements equal to it, as ``amax`` does."""

    @staticmethod
    def forward(ctx, x, weight, bias, mean, scale, mx, mn, eps, cn, layout):  # type: ignore[override]
        from thrifty.ops import _rangebn_kernels as K

        p, k, q = layout
        a = 1.0 / (scale + eps)  # the same small ops, in the same order, as the reference forward
        if weight is not None:
            a = a * weight
        shift = -mean * a
        if bias is not None:
            shift = shift + bias
        x3 = x.reshape(x.shape[0], x.shape[1], p)
        # the output is its own tensor, not a view of one made here: a following in-place op (ReLU(inplace=True),
        # as in transformers' ResNet) must be allowed to modify it
        y = torch.empty(x.shape, dtype=x.dtype)
        K.affine(x3.numpy(), a.detach().numpy(), shift.detach().numpy(), y.view(x3.shape).numpy())
        ctx.save_for_backward(x, weight, mean, scale, mx, mn, a)
        ctx.eps, ctx.cn, ctx.layout = eps, cn, layout
        return y

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        from thrifty.ops import _rangebn_kernels as K

        x, weight, mean, scale, mx, mn, a = ctx.saved_tensors
        p, k, q = ctx.layout
        n = x.shape[0]
        x3, g3 = x.reshape(n, x.shape[1], p), g.contiguous().reshape(n, x.shape[1], p)
        chunk = torch.arange(n) // q
        chunk[k * q:] = -1
        xa, ga, mxa, mna, ch = x3.numpy(), g3.numpy(), mx.numpy(), mn.numpy(), chunk.numpy()
        sg, sgx, cmx, cmn = (torch.from_numpy(t) for t in K.reduce(xa, ga, mean.detach().numpy(), ch, mxa, mna))
        inv = 1.0 / (scale.double() + ctx.eps)
        grad_inv = sgx * weight.double() if weight is not None else sgx
        d_rng = -grad_inv * inv * inv * ctx.cn / k  # d loss / d (max - min) of each chunk
        dx = None
        if ctx.needs_input_grad[0]:
            dt = x.dtype
            d_mean = -a.double() * sg / (n * p)
            dmx = (d_rng[:, None] / cmx.clamp(min=1)).to(dt)
            dmn = (-d_rng[:, None] / cmn.clamp(min=1)).to(dt)
            out = torch.empty_like(x3)
            K.grad_input(xa, ga, ch, a.detach().numpy(), d_mean.to(dt).numpy(), mxa, mna, dmx.numpy(), dmn.numpy(),
                         out.numpy())
            dx = out.reshape(x.shape)
        dw = (sgx * inv).to(x.dtype) if weight is not None and ctx.needs_input_grad[1] else None
        db = sg.to(x.dtype) if ctx.needs_input_grad[2] else None
        return dx, dw, db, None, None, None, None, None, None, None


class RangeBatchNorm1d(_RangeBatchNorm):
    """Range BN over (N, C) or (N, C, L) inputs; drop-in for nn.BatchNorm1d (see module docstring)."""

    _dims = (2, 3)


class RangeBatchNorm2d(_RangeBatchNorm):
    """Range BN over (N, C, H, W) inputs; drop-in for nn.BatchNorm2d (see module docstring)."""

    _dims = (4,)


def convert_to_range_bn(model: nn.Module, num_chunks: int = 16, correction: Correction = "gaussian",
                        bits: Optional[int] = None) -> nn.Module:
    """Replace every nn.BatchNorm1d/2d in ``model`` (in place) by the Range BN equivalent; returns the model.

    The affine Parameters are shared (an existing optimizer keeps working); running statistics carry over
    (``running_scale = sqrt(running_var + eps) - eps``), so a trained model's eval output is unchanged. A model
    that is itself a BatchNorm is returned converted. Example:
        >>> m = convert_to_range_bn(nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2)))
        >>> type(m[1]).__name__
        'RangeBatchNorm2d'
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert_to_range_bn expects an nn.Module, got {type(model).__name__}")

    def convert(bn: nn.modules.batchnorm._BatchNorm) -> _RangeBatchNorm:
        cls = RangeBatchNorm2d if isinstance(bn, nn.BatchNorm2d) else RangeBatchNorm1d
        # the buffers take the model's dtype and device (float32 ones would round a float64 model's statistics)
        like = next(iter(bn.parameters(recurse=False)), bn.running_mean)
        fk = {"device": like.device, "dtype": like.dtype} if like is not None else {}
        new = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats, num_chunks, correction,
                  bits, **fk)
        if bn.affine:
            new.weight, new.bias = bn.weight, bn.bias
        if bn.track_running_stats and bn.running_mean is not None:
            with torch.no_grad():
                new.running_mean.copy_(bn.running_mean)
                new.running_scale.copy_(torch.sqrt(bn.running_var + bn.eps) - bn.eps)
                new.num_batches_tracked.copy_(bn.num_batches_tracked)
        new.train(bn.training)
        return new

    kinds = (nn.BatchNorm1d, nn.BatchNorm2d)
    if isinstance(model, kinds):
        return convert(model)
    for parent in list(model.modules()):
        for name, child in list(parent._modules.items()):
            if isinstance(child, kinds):
                parent._modules[name] = convert(child)
    return model
