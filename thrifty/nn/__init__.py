"""Wrapped GEMM layers (Linear, Conv1d/2d, ConvTranspose1d/2d, GPT-2 Conv1D, Embedding, attention) with operand slots."""
from thrifty.nn.gemm import (
    SLOT_NAMES,
    Accumulator,
    Chain,
    GemmConv1d,
    GemmConv2d,
    GemmConvTranspose1d,
    GemmConvTranspose2d,
    GemmEmbedding,
    GemmLayer,
    GemmLinear,
    GemmLinearT,
    GemmOp,
    GradTransform,
    SlotRefused,
    Slots,
    gemm_layers,
    gemm_like,
    gemm_op,
    is_gemm,
    why_not_wrappable,
    wrap,
)
from thrifty.nn.attention import GemmInProj, GemmMultiheadAttention
from thrifty.nn.hf_attention import attach_matmuls, detach_matmuls
from thrifty.nn.matmul import GemmMatmul
from thrifty.nn.rangebn import RangeBatchNorm1d, RangeBatchNorm2d, convert_to_range_bn

__all__ = [
    "SLOT_NAMES", "Accumulator", "Chain", "GemmConv1d", "GemmConv2d", "GemmConvTranspose1d", "GemmConvTranspose2d",
    "GemmEmbedding", "GemmLayer", "GemmLinear", "GemmLinearT", "GemmOp", "GradTransform", "SlotRefused", "Slots",
    "gemm_layers", "gemm_like", "gemm_op", "is_gemm", "why_not_wrappable", "wrap",
    "GemmInProj", "GemmMatmul", "GemmMultiheadAttention", "attach_matmuls", "detach_matmuls",
    "RangeBatchNorm1d", "RangeBatchNorm2d", "convert_to_range_bn",
]
