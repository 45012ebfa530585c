"""A small Llama-style causal LM (transformers' ``LlamaForCausalLM``) over byte-level tokens.

Built from a config with random weights (nothing is downloaded); :func:`thrifty.train.lm.pretrained_lm` trains
it once on the stdlib docstring stream (:mod:`thrifty.data.lm`) and caches it. Every GEMM is an ``nn.Linear``
(q/k/v/o, gate/up/down, ``lm_head``), so thrifty wraps them all.

Example:
    >>> m = tinyllama(hidden=32, layers=1, heads=2, intermediate=64)
    >>> m(input_ids=torch.zeros(2, 5, dtype=torch.long)).logits.shape
    torch.Size([2, 5, 256])
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .registry import register_model

__all__ = ["tinyllama"]


@register_model("tinyllama")
def tinyllama(vocab_size: int = 256, hidden: int = 192, layers: int = 4, heads: int = 4, intermediate: int = 512,
              max_len: int = 256) -> nn.Module:
    """``LlamaForCausalLM`` with untied embeddings, 1.87 M parameters at the defaults (byte vocabulary)."""
    for name, v in (("vocab_size", vocab_size), ("hidden", hidden), ("layers", layers), ("heads", heads),
                    ("intermediate", intermediate), ("max_len", max_len)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"tinyllama: {name} must be a positive int, got {v!r}")
    if hidden % heads or (hidden // heads) % 2:
        raise ValueError(f"tinyllama: hidden ({hidden}) must split into {heads} heads of even size (rotary)")
    from transformers import LlamaConfig, LlamaForCausalLM  # late: importing transformers takes seconds

    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                      max_position_embeddings=max_len, tie_word_embeddings=False, use_cache=False)
    return LlamaForCausalLM(cfg)
