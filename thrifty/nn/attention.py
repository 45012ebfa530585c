"""nn.MultiheadAttention with its GEMMs as modules: the in-projection and ``out_proj`` take operand slots.

torch's ``F.multi_head_attention_forward`` reads the projection weights directly, so a wrapped
``out_proj`` would never run. :class:`GemmMultiheadAttention` computes the same function op for op
(the slow path of ``nn.MultiheadAttention.forward``) but calls its projections as modules:

* ``in_proj``: the packed ``[3E, E]`` in-projection (one GEMM for self-attention; for cross-attention
  the q rows and the k/v rows are two GEMMs of the same layer, as torch splits them), or ``q_proj``,
  ``k_proj``, ``v_proj`` when ``kdim``/``vdim`` differ from ``embed_dim``;
* ``out_proj``: the output projection (a :class:`~thrifty.nn.GemmLinear`);
* ``qk`` and ``pv``: the two activation-activation GEMMs (:class:`~thrifty.nn.GemmMatmul`), see there.

With empty slots every output and gradient is bit-identical to ``nn.MultiheadAttention``'s (its fused
inference kernel, taken in eval mode without gradients, is not used: that kernel reads the bare weights).
:func:`thrifty.apply` converts an nn.MultiheadAttention when a filter selects one of these names and
:func:`thrifty.strip` gives back an nn.MultiheadAttention with the transformed weights.

Example:
    >>> import torch, torch.nn as nn
    >>> mha = nn.MultiheadAttention(8, 2, batch_first=True)
    >>> g = GemmMultiheadAttention.from_mha(mha)
    >>> x = torch.randn(2, 5, 8)
    >>> torch.equal(g(x, x, x)[0], mha(x, x, x)[0])
    True
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.nn.utils import parametrize

from thrifty.nn.gemm import GemmLinear, _gemm_forward, gemm_call, wrap
from thrifty.nn.gemm_op import Slots
from thrifty.nn.matmul import GemmMatmul

__all__ = ["GemmInProj", "GemmMultiheadAttention", "why_not_convertible", "convert_in_place"]


class GemmInProj(GemmLinear):
    """An attention in-projection: a GemmLinear whose forward can compute a row range of its output.

    ``forward(x, rows=(lo, hi))`` is ``F.linear(x, w[lo:hi], b[lo:hi])`` with the slots applied (the weight
    slot to the whole weight first, so a per-channel quantizer or an N:M mask is the same for every row
    range). ``bias_rows`` (set for ``q_proj``/``k_proj``/``v_proj``) says which rows of the shared packed
    ``in_proj_bias`` are this projection's.
    """

    bias_rows: Optional[tuple[int, int]] = None

    def forward(self, x: Tensor, rows: Optional[tuple[int, int]] = None) -> Tensor:  # type: ignore[override]
        if rows is None and self.bias_rows is None:
            return _gemm_forward(self, x, self.op)
        lo, hi = rows if rows is not None else (0, self.weight.shape[0])
        w = self.slots.weight(self.weight) if self.slots.weight is not None else self.weight
        b = self.bias
        if b is not None:
            off = self.bias_rows[0] if self.bias_rows is not None else 0
            b = b[off + lo:off + hi]
        return gemm_call(self, x, w[lo:hi] if rows is not None else w, b, self.op)


def why_not_convertible(m: nn.Module) -> Optional[str]:
    """Why an nn.MultiheadAttention cannot become a :class:`GemmMultiheadAttention`, or None."""
    if isinstance(m, GemmMultiheadAttention):
        return None
    if type(m).forward is not nn.MultiheadAttention.forward:
        return f"{type(m).__name__} overrides forward() of nn.MultiheadAttention, so which GEMMs it computes is unknown"
    if parametrize.is_parametrized(m) or parametrize.is_parametrized(m.out_proj):
        return "nn.MultiheadAttention has parametrizations; remove them before wrapping"
    if type(m.out_proj).forward is not nn.Linear.forward:
        return "its out_proj overrides nn.Linear.forward"
    return None


def _linear_from(weight: nn.Parameter, bias: Optional[nn.Parameter], cls: type = GemmInProj) -> nn.Module:
    lin = cls.__new__(cls)
    nn.Module.__init__(lin)
    lin.in_features, lin.out_features = weight.shape[1], weight.shape[0]
    lin.weight = weight
    lin.register_parameter("bias", bias)
    lin.slots = Slots()
    return lin


_PROJ = ("q_proj_weight", "k_proj_weight", "v_proj_weight")
_OWN = ("in_proj", "q_proj", "k_proj", "v_proj", "out_proj", "qk", "pv")


class GemmMultiheadAttention(nn.MultiheadAttention):
    """nn.MultiheadAttention whose five GEMMs are modules with operand slots (see the module docstring).

    Build one with :meth:`from_mha` (shares the Parameters) or like an nn.MultiheadAttention. The packed
    weights stay readable as ``in_proj_weight`` / ``in_proj_bias`` / ``q_proj_weight`` ... (the weights
    as stored, before any weight transform), for code that inspects them.
    """

    def __init__(self, *args, **kwargs) -> None:
        nn.Module.__init__(self)
        _convert(nn.MultiheadAttention(*args, **kwargs), self)

    @classmethod
    def from_mha(cls, mha: nn.MultiheadAttention) -> "GemmMultiheadAttention":
        """A wrapped form sharing ``mha``'s Parameters (``mha`` itself is not changed)."""
        if isinstance(mha, GemmMultiheadAttention):
            return mha
        why = why_not_convertible(mha)
        if why:
            raise TypeError(f"cannot wrap {type(mha).__name__}: {why}")
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        return _convert(mha, new)

    # The packed Parameters as nn.MultiheadAttention stores them (TransformerEncoderLayer reads them).
    @property
    def in_proj_weight(self) -> Optional[Tensor]:  # type: ignore[override]
        return self.in_proj.weight if self._qkv_same_embed_dim else None

    @property
    def in_proj_bias(self) -> Optional[Tensor]:  # type: ignore[override]
        return (self.in_proj if self._qkv_same_embed_dim else self.q_proj).bias

    @property
    def q_proj_weight(self) -> Optional[Tensor]:  # type: ignore[override]
        return None if self._qkv_same_embed_dim else self.q_proj.weight

    @property
    def k_proj_weight(self) -> Optional[Tensor]:  # type: ignore[override]
        return None if self._qkv_same_embed_dim else self.k_proj.weight

    @property
    def v_proj_weight(self) -> Optional[Tensor]:  # type: ignore[override]
        return None if self._qkv_same_embed_dim else self.v_proj.weight

    def to_mha(self) -> nn.MultiheadAttention:
        """The plain nn.MultiheadAttention on the same Parameters (projections stripped first: :func:`thrifty.strip`)."""
        mha = nn.MultiheadAttention.__new__(nn.MultiheadAttention)
        mha.__dict__.update(self.__dict__)  # attributes and hooks
        mha.__dict__.update(_parameters={}, _modules={}, _buffers=dict(self._buffers))
        for k in ("in_proj_weight", *_PROJ, "in_proj_bias"):
            mha.register_parameter(k, getattr(self, k))
        mha._parameters.update(self._parameters)  # bias_k, bias_v
        out = self.out_proj
        if type(out) is nn.Linear:  # torch's own class again (strip gives a plain Linear)
            out.__class__ = nn.modules.linear.NonDynamicallyQuantizableLinear
        mha.out_proj = out
        mha._modules.update({k: v for k, v in self._modules.items() if k not in _OWN})
        return mha

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Optional[Tensor] = None,
                need_weights: bool = True, attn_mask: Optional[Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[Tensor, Optional[Tensor]]:
        # nn.MultiheadAttention.forward's slow path, then F.multi_head_attention_forward, op for op.
        is_batched = query.dim() == 3
        key_padding_mask = F._canonical_mask(mask=key_padding_mask, mask_name="key_padding_mask",
                                             other_type=F._none_or_dtype(attn_mask), other_name="attn_mask",
                                             target_type=query.dtype)
        attn_mask = F._canonical_mask(mask=attn_mask, mask_name="attn_mask", other_type=None, other_name="",
                                      target_type=query.dtype, check_other=False)
        if self.batch_first and is_batched:
            if key is value:
                if query is key:
                    query = key = value = query.transpose(1, 0)
                else:
                    query, key = (x.transpose(1, 0) for x in (query, key))
                    value = key
            else:
                query, key, value = (x.transpose(1, 0) for x in (query, key, value))
        out, weights = self._mha(query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights,
                                 is_causal)
        if self.batch_first and is_batched:
            return out.transpose(1, 0), weights
        return out, weights

    def _in_projection(self, query: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        if not self._qkv_same_embed_dim:
            return self.q_proj(query), self.k_proj(key), self.v_proj(value)
        E = query.size(-1)
        if key is value and query is key:  # one GEMM: torch's _in_projection_packed
            proj = self.in_proj(query)
            proj = proj.unflatten(-1, (3, E)).unsqueeze(0).transpose(0, -2).squeeze(-2).contiguous()
            return proj[0], proj[1], proj[2]
        if key is value:
            kv = self.in_proj(key, rows=(E, 3 * E))
            kv = kv.unflatten(-1, (2, E)).unsqueeze(0).transpose(0, -2).squeeze(-2).contiguous()
            return self.in_proj(query, rows=(0, E)), kv[0], kv[1]
        return (self.in_proj(query, rows=(0, E)), self.in_proj(key, rows=(E, 2 * E)),
                self.in_proj(value, rows=(2 * E, 3 * E)))

    def _mha(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Optional[Tensor],
             need_weights: bool, attn_mask: Optional[Tensor], average_attn_weights: bool,
             is_causal: bool) -> tuple[Tensor, Optional[Tensor]]:
        num_heads = self.num_heads
        is_batched = F._mha_shape_check(query, key, value, key_padding_mask, attn_mask, num_heads)
        if not is_batched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        tgt_len, bsz, embed_dim = query.shape
        src_len = key.shape[0]
        key_padding_mask = F._canonical_mask(mask=key_padding_mask, mask_name="key_padding_mask",
                                             other_type=F._none_or_dtype(attn_mask), other_name="attn_mask",
                                             target_type=query.dtype)
        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint. You may use the Transformer module "
                               "method `generate_square_subsequent_mask` to create this mask.")
        if is_causal and key_padding_mask is None and not need_weights:
            attn_mask = None
        else:
            attn_mask = F._canonical_mask(mask=attn_mask, mask_name="attn_mask", other_type=None, other_name="",
                                          target_type=query.dtype, check_other=False)
            if key_padding_mask is not None:
                is_causal = False
        if embed_dim != self.embed_dim:
            raise ValueError(f"was expecting embedding dimension of {self.embed_dim}, but got {embed_dim}")
        head_dim = embed_dim // num_heads
        if (key.shape[:2] if not self._qkv_same_embed_dim else key.shape) != (
                value.shape[:2] if not self._qkv_same_embed_dim else value.shape):
            raise ValueError(f"key shape {tuple(key.shape)} does not match value shape {tuple(value.shape)}")
        q, k, v = self._in_projection(query, key, value)
        if attn_mask is not None:
            if attn_mask.dim() == 2:
                if attn_mask.shape != (tgt_len, src_len):
                    raise RuntimeError(f"The shape of the 2D attn_mask is {attn_mask.shape}, but should be "
                                       f"{(tgt_len, src_len)}.")
                attn_mask = attn_mask.unsqueeze(0)
            elif attn_mask.dim() == 3:
                if attn_mask.shape != (bsz * num_heads, tgt_len, src_len):
                    raise RuntimeError(f"The shape of the 3D attn_mask is {attn_mask.shape}, but should be "
                                       f"{(bsz * num_heads, tgt_len, src_len)}.")
            else:
                raise RuntimeError(f"attn_mask's dimension {attn_mask.dim()} is not supported")
        if self.bias_k is not None and self.bias_v is not None:
            k = torch.cat([k, self.bias_k.repeat(1, bsz, 1)])
            v = torch.cat([v, self.bias_v.repeat(1, bsz, 1)])
            if attn_mask is not None:
                attn_mask = F.pad(attn_mask, (0, 1))
            if key_padding_mask is not None:
                key_padding_mask = F.pad(key_padding_mask, (0, 1))
        q = q.view(tgt_len, bsz * num_heads, head_dim).transpose(0, 1)
        k = k.view(k.shape[0], bsz * num_heads, head_dim).transpose(0, 1)
        v = v.view(v.shape[0], bsz * num_heads, head_dim).transpose(0, 1)
        if self.add_zero_attn:
            zero_attn_shape = (bsz * num_heads, 1, head_dim)
            k = torch.cat([k, torch.zeros(zero_attn_shape, dtype=k.dtype, device=k.device)], dim=1)
            v = torch.cat([v, torch.zeros(zero_attn_shape, dtype=v.dtype, device=v.device)], dim=1)
            if attn_mask is not None:
                attn_mask = F.pad(attn_mask, (0, 1))
            if key_padding_mask is not None:
                key_padding_mask = F.pad(key_padding_mask, (0, 1))
        src_len = k.size(1)
        if key_padding_mask is not None:
            if key_padding_mask.shape != (bsz, src_len):
                raise ValueError(f"expected key_padding_mask of shape {(bsz, src_len)}, got "
                                 f"{tuple(key_padding_mask.shape)}")
            key_padding_mask = (key_padding_mask.view(bsz, 1, 1, src_len).expand(-1, num_heads, -1, -1)
                                .reshape(bsz * num_heads, 1, src_len))
            attn_mask = key_padding_mask if attn_mask is None else attn_mask + key_padding_mask
        dropout_p = self.dropout if self.training else 0.0
        if need_weights or not (self.qk.slots.empty() and self.pv.slots.empty()):
            # the explicit path (torch's need_weights branch): Q K^T and P V are GEMMs a slot can act on
            q_scaled = q * math.sqrt(1.0 / float(q.shape[-1]))
            if is_causal and attn_mask is None:  # only without need_weights: build the mask SDPA would use
                attn_mask = torch.ones(tgt_len, src_len, dtype=torch.bool, device=q.device).tril().logical_not()
                attn_mask = torch.zeros_like(attn_mask, dtype=q.dtype).masked_fill_(attn_mask, float("-inf"))
            weights = self.qk(q_scaled, k, attn_mask, op="bmm")
            weights = F.softmax(weights, dim=-1)
            if dropout_p > 0.0:
                weights = F.dropout(weights, p=dropout_p)
            out = self.pv(weights, v.transpose(-2, -1), op="bmm")
            out = out.transpose(0, 1).reshape(tgt_len * bsz, embed_dim)
            out = self.out_proj(out)
            out = out.view(tgt_len, bsz, out.size(1))
            if not need_weights:
                return (out if is_batched else out.squeeze(1)), None
            weights = weights.view(bsz, num_heads, tgt_len, src_len)
            if average_attn_weights:
                weights = weights.mean(dim=1)
            if not is_batched:
                out, weights = out.squeeze(1), weights.squeeze(0)
            return out, weights
        if attn_mask is not None:
            if attn_mask.size(0) == 1 and attn_mask.dim() == 3:
                attn_mask = attn_mask.unsqueeze(0)
            else:
                attn_mask = attn_mask.view(bsz, num_heads, -1, src_len)
        q = q.view(bsz, num_heads, tgt_len, head_dim)
        k = k.view(bsz, num_heads, src_len, head_dim)
        v = v.view(bsz, num_heads, src_len, head_dim)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal)
        out = out.permute(2, 0, 1, 3).reshape(bsz * tgt_len, embed_dim)
        out = self.out_proj(out)
        out = out.view(tgt_len, bsz, out.size(1))
        return (out if is_batched else out.squeeze(1)), None


def _convert(mha: nn.MultiheadAttention, new: GemmMultiheadAttention) -> GemmMultiheadAttention:
    # ``new`` has fresh Module dicts; it shares mha's Parameters, buffers, hooks and attributes.
    for k, v in mha.__dict__.items():
        if k not in ("_parameters", "_modules", "_buffers"):
            new.__dict__[k] = v
    new._buffers.update(mha._buffers)
    p = dict(mha._parameters)
    same = mha._qkv_same_embed_dim
    for k in ("in_proj_weight", "in_proj_bias", *_PROJ):
        p.pop(k, None)
    new._parameters.update(p)  # bias_k, bias_v
    if same:
        new.in_proj = _linear_from(mha.in_proj_weight, mha.in_proj_bias)
    else:
        E = mha.embed_dim
        for i, (name, attr) in enumerate(zip(("q_proj", "k_proj", "v_proj"), _PROJ)):
            lin = _linear_from(getattr(mha, attr), mha.in_proj_bias)
            if mha.in_proj_bias is not None:
                lin.bias_rows = (i * E, (i + 1) * E)
            setattr(new, name, lin)
    new.out_proj = wrap(mha.out_proj)
    new.qk, new.pv = GemmMatmul(), GemmMatmul()
    return new


def convert_in_place(mha: nn.MultiheadAttention) -> None:
    """Make ``mha`` itself a :class:`GemmMultiheadAttention` (for a bare module the caller holds).

    Its Module dicts are replaced, not edited, so a copy of the old ``__dict__`` restores it.
    """
    if isinstance(mha, GemmMultiheadAttention):
        return
    why = why_not_convertible(mha)
    if why:
        raise TypeError(f"cannot wrap {type(mha).__name__}: {why}")
    old = nn.MultiheadAttention.__new__(nn.MultiheadAttention)
    old.__dict__.update(mha.__dict__)
    mha.__dict__.update(_parameters={}, _modules={}, _buffers={})
    mha.__class__ = GemmMultiheadAttention
    _convert(old, mha)  # type: ignore[arg-type]
