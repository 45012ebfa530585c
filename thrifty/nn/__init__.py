"""Wrapped GEMM layers (Linear, Conv2d) with weight / input / grad_output / accumulator slots."""
from thrifty.nn.gemm import (
    SLOT_NAMES,
    Accumulator,
    Chain,
    GemmConv2d,
    GemmLayer,
    GemmLinear,
    GemmOp,
    GradTransform,
    Slots,
    gemm_layers,
    gemm_like,
    is_gemm,
    why_not_wrappable,
    wrap,
)
from thrifty.nn.rangebn import RangeBatchNorm1d, RangeBatchNorm2d, convert_to_range_bn

__all__ = [
    "SLOT_NAMES", "Accumulator", "Chain", "GemmConv2d", "GemmLayer", "GemmLinear", "GemmOp",
    "GradTransform", "Slots", "gemm_layers", "gemm_like", "is_gemm", "why_not_wrappable", "wrap",
    "RangeBatchNorm1d", "RangeBatchNorm2d", "convert_to_range_bn",
]
