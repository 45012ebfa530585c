"""Low-bit floating-point accumulators in the GEMM ``accumulator`` slot, and their fine-tuning recipe.

:class:`LowBitAccumulator` computes the forward GEMM of a Linear or Conv2d (convolution through ``unfold``)
with :func:`thrifty.ops.accum.accumulate` (on CPU a compiled kernel, ~5x a float32 GEMM at 12 bits; see
results/bench_accumulators.md). Its backward is one of

* ``"ste"``: the exact float32 backward (a straight-through estimator through the rounding);
* ``"fine"``: a fine-grained straight-through estimator. The forward records, for every product
  ``x_k w_k`` of every output, whether it reached the result: it is *lost* if its product underflowed to 0,
  if adding it left the partial sum unchanged (swamping), if its whole chunk sum was swamped in the outer
  accumulation, or if the output saturated / overflowed. Lost terms get zero gradient, the others the exact
  one: ``dx[n,k] = sum_o keep[n,o,k] dy[n,o] w[o,k]`` and ``dw[o,k] = sum_n keep[n,o,k] dy[n,o] x[n,k]``.
  Rationale: the forward output does not depend (locally) on a term that was rounded away, so the STE's
  gradient for it is pure noise; below ~12 bits many small products are swamped and this noise grows.
  The masked gradients are :func:`thrifty.ops.accum.trace_grads` (compiled on CPU).

Recipe (:func:`finetune_accumulators`): fine-tune first with ``underflow=False`` (exponent unbounded below,
only the mantissa and overflow act), then with the full format. ``AccumConfig`` is registered so
``thrifty.apply(model, AccumConfig(...))`` fills the slots of every selected layer.

Example:
    >>> import torch, torch.nn as nn
    >>> import thrifty.core as core
    >>> model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> _ = core.apply(model, AccumConfig(exp_bits=5, man_bits=6, chunk=4))
    >>> model(torch.randn(3, 16)).shape
    torch.Size([3, 2])
"""
from __future__ import annotations

import dataclasses
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Literal, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from thrifty.core import Config, Filter, apply, register_config, register_handler
from thrifty.nn.gemm import Accumulator, GemmOp, _pad, gemm_layers
from thrifty.ops.accum import AccumTrace, FloatFormat, accumulate, bias_for_chunk, trace_grads

__all__ = ["AccumConfig", "LowBitAccumulator", "accumulator_from_config", "set_underflow", "finetune_accumulators"]

Backward = Literal["ste", "fine"]


@register_config
@dataclass(frozen=True)
class AccumConfig(Config):
    """A low-bit floating-point accumulator for every selected GEMM.

    ``exp_bits``/``man_bits``: accumulator format (1 + e + m bits). Products use ``prod_exp_bits``/
    ``prod_man_bits`` (None: same as the accumulator) unless ``fp32_products``. ``bias`` None is IEEE-style
    ``2^(e-1)-1``, or with ``chunk_bias`` :func:`thrifty.ops.accum.bias_for_chunk`. ``outer``: the format
    that sums the chunk results (``"same"`` or ``"fp32"``). ``backward``: ``"ste"`` or ``"fine"``.

    Args:
        exp_bits: exponent bits of the accumulator format (1 + exp_bits + man_bits bits in all).
        man_bits: mantissa bits of the accumulator format.
        chunk: products summed per chunk before the chunk sums are accumulated by ``outer`` (None: one chunk).
        bias: exponent bias (None: IEEE-style 2^(e-1)-1, or the chunk-aware one with ``chunk_bias``).
        chunk_bias: with ``bias`` None, shift the bias so a chunk of maximal products cannot overflow.
        prod_exp_bits: exponent bits of the products (None: the accumulator's).
        prod_man_bits: mantissa bits of the products (None: the accumulator's).
        fp32_products: keep the products in float32 (the product format is then unused).
        subnormals: keep subnormal numbers (False: flush them to zero).
        overflow: "saturate" clamps results beyond the largest value to +-max; "inf" makes them +-inf.
        underflow: bound the exponent below (False: unbounded, only the mantissa and overflow act).
        outer: the format that sums the chunk results: "same" as the accumulator or "fp32".
        backward: "ste" (exact float32 backward) or "fine" (zero gradient for products lost in the sum).
    """

    exp_bits: int = 4
    man_bits: int = 7
    chunk: Optional[int] = 16
    bias: Optional[int] = None
    chunk_bias: bool = False
    prod_exp_bits: Optional[int] = None
    prod_man_bits: Optional[int] = None
    fp32_products: bool = False
    subnormals: bool = True
    overflow: Literal["saturate", "inf"] = "saturate"
    underflow: bool = True
    outer: Literal["same", "fp32"] = "same"
    backward: Backward = "ste"

    def __post_init__(self) -> None:
        if self.backward not in ("ste", "fine"):
            raise ValueError(f"AccumConfig.backward must be 'ste' or 'fine', got {self.backward!r}")
        if self.outer not in ("same", "fp32"):
            raise ValueError(f"AccumConfig.outer must be 'same' or 'fp32', got {self.outer!r}")
        self.formats()  # validates the formats (ValueError/TypeError naming the problem)

    @property
    def bits(self) -> int:
        return 1 + self.exp_bits + self.man_bits

    def formats(self) -> tuple[FloatFormat, Optional[FloatFormat]]:
        """(accumulator format, product format or None for float32 products)."""
        bias = self.bias
        if bias is None and self.chunk_bias:
            bias = bias_for_chunk(self.exp_bits, self.chunk or 1)
        acc = FloatFormat(self.exp_bits, self.man_bits, bias, self.subnormals, self.overflow, self.underflow)
        if self.fp32_products:
            return acc, None
        pe = self.exp_bits if self.prod_exp_bits is None else self.prod_exp_bits
        pm = self.man_bits if self.prod_man_bits is None else self.prod_man_bits
        return acc, FloatFormat(pe, pm, None, self.subnormals, self.overflow, self.underflow)


class LowBitAccumulator(Accumulator):
    """The ``accumulator`` slot: forward GEMM with simulated low-bit accumulation (see module docstring).

    Example:
        >>> from thrifty.nn import wrap
        >>> layer = wrap(nn.Linear(32, 4)).add("accumulator", LowBitAccumulator(FloatFormat(4, 3), chunk=8))
        >>> layer(torch.randn(2, 32)).shape
        torch.Size([2, 4])
    """

    def __init__(self, acc: FloatFormat, prod: Optional[FloatFormat] = None, chunk: Optional[int] = 16,
                 outer: Literal["same", "fp32"] = "same", backward: Backward = "ste", max_cached: int = 4) -> None:
        super().__init__()
        if not isinstance(acc, FloatFormat) or not (prod is None or isinstance(prod, FloatFormat)):
            raise TypeError("LowBitAccumulator: acc (and prod, if given) must be thrifty.ops.accum.FloatFormat")
        if backward not in ("ste", "fine"):
            raise ValueError(f"LowBitAccumulator: backward must be 'ste' or 'fine', got {backward!r}")
        if outer not in ("same", "fp32"):
            raise ValueError(f"LowBitAccumulator: outer must be 'same' or 'fp32', got {outer!r}")
        self.acc, self.prod, self.chunk, self.outer, self.grad = acc, prod, chunk, outer, backward
        self.max_cached = max_cached
        # traces of forward passes awaiting their backward, keyed by the operands' storage (alive until then)
        self._traces: "OrderedDict[tuple, list[AccumTrace]]" = OrderedDict()

    def extra_repr(self) -> str:
        return f"acc={self.acc}, prod={self.prod or 'fp32'}, chunk={self.chunk}, outer={self.outer}, " \
               f"backward={self.grad}, underflow={self.acc.underflow}"

    def spec(self) -> dict[str, Any]:
        """Constructor arguments (plain data) that rebuild this accumulator; see :meth:`from_spec`."""
        return dict(acc=dataclasses.asdict(self.acc), prod=None if self.prod is None else dataclasses.asdict(self.prod),
                    chunk=self.chunk, outer=self.outer, backward=self.grad, max_cached=self.max_cached)

    @classmethod
    def from_spec(cls, spec: dict[str, Any], layer: Optional[nn.Module] = None) -> "LowBitAccumulator":
        prod = None if spec.get("prod") is None else FloatFormat(**spec["prod"])
        return cls(FloatFormat(**spec["acc"]), prod, **{k: v for k, v in spec.items() if k not in ("acc", "prod")})

    def set_underflow(self, flag: bool) -> "LowBitAccumulator":
        """Switch underflow (the lower exponent limit) on or off in both formats; returns self."""
        self.acc = self.acc.replace(underflow=flag)
        if self.prod is not None:
            self.prod = self.prod.replace(underflow=flag)
        return self

    # ----------------------------------------------------------------------------------------------- GEMMs
    def _mm(self, x2: Tensor, w2: Tensor, trace: bool):
        outer = "same" if self.outer == "same" else None
        return accumulate(x2, w2, self.acc, self.prod, self.chunk, outer, trace=trace)

    def _gemm(self, op: GemmOp, x: Tensor, w: Tensor, trace: bool) -> tuple[Tensor, list[AccumTrace]]:
        """Bias-free GEMM output in float32 and, with ``trace``, one trace per group."""
        traces: list[AccumTrace] = []
        if op.kind == "linear":
            r = self._mm(x.reshape(-1, x.shape[-1]), w, trace)
            y = r[0] if trace else r
            if trace:
                traces.append(r[1])
            return y.reshape(*x.shape[:-1], w.shape[0]), traces
        cols, (B, L, Ho, Wo) = _unfold(op, x, w)
        g = op.groups
        kg, og = cols.shape[1] // g, w.shape[0] // g
        ys = []
        for gi in range(g):
            r = self._mm(cols[:, gi * kg:(gi + 1) * kg], w[gi * og:(gi + 1) * og].reshape(og, kg), trace)
            ys.append(r[0] if trace else r)
            if trace:
                traces.append(r[1])
        y = torch.cat(ys, 1) if g > 1 else ys[0]
        return y.reshape(B, L, -1).permute(0, 2, 1).reshape(B, -1, Ho, Wo), traces

    def forward(self, op: GemmOp, x: Tensor, w: Tensor, bias: Optional[Tensor]) -> Tensor:  # type: ignore[override]
        trace = self.grad == "fine" and self.training
        with torch.no_grad():
            y, traces = self._gemm(op, x, w, trace)
            if trace:
                self._traces[_key(x, w)] = traces
                while len(self._traces) > self.max_cached:
                    self._traces.popitem(last=False)
            if bias is not None:
                y = y + (bias if op.kind == "linear" else bias.view(1, -1, 1, 1))
        return y.to(x.dtype)

    def backward(self, op: GemmOp, x: Tensor, w: Tensor, dy_x: Tensor, dy_w: Tensor,
                 needs: tuple[bool, bool]) -> Optional[tuple[Optional[Tensor], Optional[Tensor]]]:
        if self.grad == "ste":
            return None
        with torch.no_grad():
            traces = self._traces.pop(_key(x, w), None)
            if traces is None:  # evicted (or forward ran in eval mode): recompute the trace
                traces = self._gemm(op, x, w, True)[1]
            if op.kind == "linear":
                dx, dw = trace_grads(traces[0], x.reshape(-1, x.shape[-1]).float(), w.float(),
                                       dy_x.reshape(-1, w.shape[0]).float(), dy_w.reshape(-1, w.shape[0]).float(),
                                       needs)
                return (dx.reshape(x.shape).to(x.dtype) if dx is not None else None,
                        dw.to(w.dtype) if dw is not None else None)
            return _conv_grads(op, x, w, dy_x, dy_w, traces, needs)


def _key(x: Tensor, w: Tensor) -> tuple:
    return (x.data_ptr(), tuple(x.shape), w.data_ptr(), tuple(w.shape), w._version)


def _unfold(op: GemmOp, x: Tensor, w: Tensor) -> tuple[Tensor, tuple[int, int, int, int]]:
    kh, kw = w.shape[-2:]
    pad = _pad(op, w)
    cols = F.unfold(x.float(), (kh, kw), dilation=op.dilation, padding=pad, stride=op.stride)  # (B, K, L)
    B, K, L = cols.shape
    Ho = (x.shape[2] + 2 * pad[0] - op.dilation[0] * (kh - 1) - 1) // op.stride[0] + 1
    Wo = (x.shape[3] + 2 * pad[1] - op.dilation[1] * (kw - 1) - 1) // op.stride[1] + 1
    return cols.transpose(1, 2).reshape(B * L, K), (B, L, Ho, Wo)


def _conv_grads(op: GemmOp, x: Tensor, w: Tensor, dy_x: Tensor, dy_w: Tensor, traces: list[AccumTrace],
                needs: tuple[bool, bool]) -> tuple[Optional[Tensor], Optional[Tensor]]:
    cols, (B, L, Ho, Wo) = _unfold(op, x, w)
    O, g = w.shape[0], op.groups
    kg, og = cols.shape[1] // g, O // g
    gx = dy_x.float().reshape(B, O, L).permute(0, 2, 1).reshape(B * L, O)
    gw = dy_w.float().reshape(B, O, L).permute(0, 2, 1).reshape(B * L, O)
    dcols, dws = [], []
    for gi in range(g):
        sl = slice(gi * og, (gi + 1) * og)
        dxg, dwg = trace_grads(traces[gi], cols[:, gi * kg:(gi + 1) * kg], w[sl].reshape(og, kg).float(),
                                 gx[:, sl], gw[:, sl], needs)
        dcols.append(dxg)
        dws.append(dwg)
    dx = dw = None
    if needs[0]:
        dc = torch.cat(dcols, 1) if g > 1 else dcols[0]  # (B*L, K)
        dc = dc.reshape(B, L, -1).permute(0, 2, 1)
        dx = F.fold(dc, x.shape[-2:], w.shape[-2:], dilation=op.dilation, padding=_pad(op, w),
                    stride=op.stride).to(x.dtype)
    if needs[1]:
        dw = (torch.cat(dws, 0) if g > 1 else dws[0]).reshape(w.shape).to(w.dtype)
    return dx, dw


def accumulator_from_config(cfg: AccumConfig) -> LowBitAccumulator:
    """Build the slot module for one layer from an :class:`AccumConfig`."""
    acc, prod = cfg.formats()
    return LowBitAccumulator(acc, prod, cfg.chunk, cfg.outer, cfg.backward)


@register_handler(AccumConfig)
def _handle(layer: nn.Module, name: str, cfg: AccumConfig) -> None:
    layer.add("accumulator", accumulator_from_config(cfg))


def set_underflow(model: nn.Module, flag: bool) -> int:
    """Turn underflow on/off in every :class:`LowBitAccumulator` of ``model``; returns how many were changed."""
    n = 0
    for _, layer in gemm_layers(model):
        acc = layer.slots.accumulator
        if isinstance(acc, LowBitAccumulator):
            acc.set_underflow(flag)
            n += 1
    return n


def finetune_accumulators(model: nn.Module, cfg: AccumConfig, train_ds: Any, test_ds: Any = None,
                          train_cfg: Any = None, *, filter: Filter = None, stage1_fraction: float = 0.5,
                          progress: bool = False) -> dict[str, Any]:
    """The two-stage recipe: put ``cfg``'s accumulator in ``model``; fine-tune without underflow, then with it.

    ``train_cfg`` is a :class:`thrifty.train.TrainConfig` for the whole fine-tuning (its steps/epochs are split
    ``stage1_fraction`` : rest). Returns per-stage histories and the final test accuracy (if ``test_ds``).
    Example:
        >>> import torch, torch.nn as nn
        >>> from torch.utils.data import TensorDataset
        >>> from thrifty.train import TrainConfig
        >>> model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> ds = TensorDataset(torch.randn(64, 16), torch.randint(0, 2, (64,)))
        >>> r = finetune_accumulators(model, AccumConfig(4, 7), ds, ds, TrainConfig(optim={"steps": 4, "batch_size": 16}))
        >>> r["steps"], 0 <= r["test_acc"] <= 1
        ([2, 2], True)
    """
    from thrifty.train import TrainConfig, evaluate, fit

    if not 0.0 <= stage1_fraction <= 1.0:
        raise ValueError(f"stage1_fraction must be in [0, 1], got {stage1_fraction}")
    train_cfg = train_cfg or TrainConfig(epochs=1, optim={"lr": 1e-3, "batch_size": 64, "weight_decay": 0.0},
                                         optimizer="adamw")
    if not isinstance(cfg, AccumConfig):
        raise TypeError(f"cfg must be an AccumConfig, got {type(cfg).__name__}")
    n = len(train_ds)
    total = train_cfg.optim.steps or max(1, round(train_cfg.epochs * -(-n // train_cfg.optim.batch_size)))
    s1 = int(round(total * stage1_fraction))
    apply(model, dataclasses.replace(cfg, underflow=cfg.underflow and s1 == 0), filter)
    out: dict[str, Any] = {"steps": [s1, total - s1]}
    if s1:
        set_underflow(model, False)
        out["stage1"] = fit(model, train_cfg.replace(optim={"steps": s1}), train_ds, progress=progress).final
    set_underflow(model, cfg.underflow)
    if total - s1:
        cfg2 = train_cfg.replace(optim={"steps": total - s1}, seed=train_cfg.seed + 1)
        out["stage2"] = fit(model, cfg2, train_ds, progress=progress).final
    if test_ds is not None:
        out["test_acc"] = evaluate(model, test_ds)["acc"]
    return out
