"""The attention matmuls of Hugging Face transformers models (BERT, GPT-2, Llama, ViT, ...) as GemmMatmul modules.

transformers' attention modules call ``ALL_ATTENTION_FUNCTIONS.get_interface(config._attn_implementation,
eager_attention_forward)``. :func:`attach_matmuls` gives an attention module two
:class:`~thrifty.nn.GemmMatmul` children, ``qk`` (scores ``Q K^T``) and ``pv`` (``P V``), and points its
config at the ``"thrifty"`` implementation registered here: transformers' eager attention written with those
two modules (Q K^T times the scaling, plus the additive mask, softmax in float32, dropout, P V; key/value
heads repeated for grouped-query attention). With empty slots it is bit-identical to ``attn_implementation=
"eager"``; a model that ran SDPA before runs the eager math afterwards (the same function, another
summation order). Attention variants the eager formula does not cover (logit soft-capping, sliding
windows, attention sinks) raise ValueError naming the module.

:func:`thrifty.apply` attaches the matmuls when a filter names them (``"*.qk"``, ``"*.pv"``);
:func:`thrifty.strip` removes them and restores the config's previous implementation.

Example:
    >>> import torch, transformers
    >>> cfg = transformers.BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
    ...                               intermediate_size=32, vocab_size=50, attn_implementation="eager")
    >>> bert = transformers.BertModel(cfg).eval()
    >>> ids = torch.randint(0, 50, (2, 5))
    >>> ref = bert(ids).last_hidden_state
    >>> attach_matmuls(bert.encoder.layer[0].attention.self)
    >>> torch.equal(bert(ids).last_hidden_state, ref)
    True
"""
from __future__ import annotations

import inspect
import sys
from typing import Any, Optional

import torch
import torch.nn as nn
from torch import Tensor

from thrifty.nn.matmul import GemmMatmul

__all__ = ["IMPLEMENTATION", "is_hf_attention", "attach_matmuls", "detach_matmuls", "thrifty_attention_forward"]

IMPLEMENTATION = "thrifty"
# On each attention module (not on the config, whose attributes go into config.json): the implementation its
# config had when the matmuls were attached ("thrifty" for the second module of a shared config).
PREVIOUS = "_thrifty_previous_attn"
_UNSUPPORTED = ("softcap", "sliding_window", "s_aux", "sinks")


def is_hf_attention(m: nn.Module) -> bool:
    """Whether ``m`` is a transformers attention module that dispatches through ``ALL_ATTENTION_FUNCTIONS``."""
    if not type(m).__module__.startswith("transformers.") or not hasattr(m, "config"):
        return False
    home = sys.modules.get(type(m).__module__)
    code = getattr(inspect.unwrap(type(m).forward), "__code__", None)  # past transformers' decorators
    return (home is not None and hasattr(home, "ALL_ATTENTION_FUNCTIONS") and code is not None
            and "attention_interface" in code.co_varnames and hasattr(m.config, "_attn_implementation"))


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, eager_mask

    if IMPLEMENTATION not in AttentionInterface._global_mapping:
        AttentionInterface.register(IMPLEMENTATION, thrifty_attention_forward)
    if IMPLEMENTATION not in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping:
        AttentionMaskInterface.register(IMPLEMENTATION, eager_mask)  # the additive float mask eager attention adds


def attach_matmuls(m: nn.Module) -> None:
    """Give the transformers attention module ``m`` its ``qk``/``pv`` GemmMatmul children (idempotent)."""
    if not is_hf_attention(m):
        raise TypeError(f"{type(m).__name__} is not a transformers attention module using ALL_ATTENTION_FUNCTIONS")
    _register()
    for name in ("qk", "pv"):
        if not isinstance(getattr(m, name, None), GemmMatmul):
            if name in m.__dict__ or name in m._parameters or name in m._modules:
                raise TypeError(f"{type(m).__name__} already has an attribute {name!r}")
            m.add_module(name, GemmMatmul())
    if PREVIOUS not in m.__dict__:
        m.__dict__[PREVIOUS] = m.config._attn_implementation
    if m.config._attn_implementation != IMPLEMENTATION:
        m.config._attn_implementation = IMPLEMENTATION


def detach_matmuls(model: nn.Module) -> None:
    """Remove every attached ``qk``/``pv`` and restore each config's previous attention implementation."""
    restore: dict[int, tuple[Any, str]] = {}
    for m in model.modules():
        if is_hf_attention(m) and isinstance(getattr(m, "qk", None), GemmMatmul):
            del m._modules["qk"], m._modules["pv"]
            prev = m.__dict__.pop(PREVIOUS, None)
            if prev != IMPLEMENTATION or id(m.config) not in restore:
                # "eager" when nothing better is known: the function the empty matmuls computed
                restore[id(m.config)] = (m.config, prev if prev not in (None, IMPLEMENTATION) else "eager")
    for cfg, impl in restore.values():
        if cfg._attn_implementation == IMPLEMENTATION:
            cfg._attn_implementation = impl


def _repeat_kv(x: Tensor, n_rep: int) -> Tensor:
    # transformers' repeat_kv: (batch, kv_heads, seq, dim) -> (batch, kv_heads * n_rep, seq, dim)
    if n_rep == 1:
        return x
    b, h, s, d = x.shape
    return x[:, :, None, :, :].expand(b, h, n_rep, s, d).reshape(b, h * n_rep, s, d)


def thrifty_attention_forward(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                              attention_mask: Optional[Tensor], scaling: Optional[float] = None,
                              dropout: float = 0.0, **kwargs: Any) -> tuple[Tensor, Tensor]:
    """transformers' eager attention with ``module.qk`` and ``module.pv`` as the two GEMMs (registered as "thrifty")."""
    bad = [k for k in _UNSUPPORTED if kwargs.get(k) is not None]
    if bad:
        raise ValueError(f"thrifty attention: {type(module).__name__} passes {bad}, which the wrapped attention "
                         "matmuls do not implement; leave its '*.qk' / '*.pv' out of the filter")
    qk, pv = getattr(module, "qk", None), getattr(module, "pv", None)
    if scaling is None:
        scaling = query.size(-1) ** -0.5
    groups = getattr(module, "num_key_value_groups", 1)
    key, value = _repeat_kv(key, groups), _repeat_kv(value, groups)
    scores = qk(query, key) if qk is not None else torch.matmul(query, key.transpose(2, 3))
    weights = scores * scaling
    if attention_mask is not None:
        weights = weights + attention_mask
    weights = nn.functional.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = nn.functional.dropout(weights, p=dropout, training=module.training)
    out = pv(weights, value.transpose(2, 3)) if pv is not None else torch.matmul(weights, value)
    return out.transpose(1, 2).contiguous(), weights
