"""What FS-Merge needs to know about a zoo architecture: merge points, folding rule, taps, explicit SuperNet.

An ``Arch`` is built from K frozen copies of the input models. It lists the merge points (where M / U
maps sit), composes the merged weights from the maps (``compose``: the fold, W_new = sum_i M_i W_i U_i
with LayerNorm affines and biases pushed through), builds a plain zoo model of the merged width
(``template``), names the feature taps used by the reconstruction loss, and runs the *explicit* SuperNet
(``explicit``: every model's own layers on unmerged features, merged after each layer) which is what
the fold must reproduce exactly.

What is exact and what is approximated (ViT):
  - exact: the fold of the SuperNet below. LayerNorm's *normalisation* runs once, in the merged residual
    space (no affine); each model's LN affine acts after its read-unmerge U and is folded into the
    following Linear (qkv / fc1 / head), so the folded model's LayerNorms are weight 1, bias 0.
  - approximated (and learned): the SuperNet itself vs. the original models. normalise(U z) != U
    normalise(z) for a non-orthogonal U, and the residual stream is shared, so each model's branch sees
    U_i z instead of its own residual; training the maps on the feature loss absorbs that.
  - The residual stream uses one shared merge M_r (every write: embeddings, proj, fc2) so skip
    connections stay identities in the merged model; reads (norm1, norm2, final norm) have their own U.
"""
from __future__ import annotations

import copy
from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from thrifty.merge.maps import MergePoint
from thrifty.models.mlp import MLP
from thrifty.models.vit import ViT

__all__ = ["Arch", "MLPArch", "ViTArch", "arch_for", "check_models", "head_sizes", "task_slices", "zoo_kwargs"]

Points = nn.ModuleDict


def _param_names(model: nn.Module) -> dict[str, torch.Size]:
    return {k: v.shape for k, v in model.state_dict().items() if not k.startswith("head.")}


def check_models(models: Sequence[nn.Module], min_models: int = 2) -> None:
    """Raise a clear error unless the models can be merged (same zoo class and shapes, eval mode, plain)."""
    from thrifty.nn.gemm import is_gemm

    if not isinstance(models, (list, tuple)):
        raise TypeError(f"models must be a list of nn.Module, got {type(models).__name__}")
    if len(models) < min_models:
        raise ValueError(f"need at least {min_models} models to merge, got {len(models)}")
    for i, m in enumerate(models):
        if not isinstance(m, nn.Module):
            raise TypeError(f"models[{i}] is a {type(m).__name__}, not an nn.Module")
        if not isinstance(m, (MLP, ViT)):
            raise TypeError(f"models[{i}]: merging supports thrifty.models MLP and ViT, got {type(m).__name__}")
        if m.training:
            raise ValueError(f"models[{i}] is in training mode; call .eval() first (merging reads features "
                             "with dropout / batch statistics off)")
        for name, mod in m.named_modules():
            if is_gemm(mod):
                raise ValueError(f"models[{i}].{name} is a wrapped Gemm layer (quantized / sparsified); "
                                 "call thrifty.strip(model) before merging")
        for name, p in m.state_dict().items():
            if not p.is_floating_point() and not name.endswith("num_batches_tracked"):
                raise TypeError(f"models[{i}].{name} has dtype {p.dtype}; merging needs float parameters")
    ref = models[0]
    ref_shapes = _param_names(ref)
    for i, m in enumerate(models[1:], start=1):
        if type(m) is not type(ref):
            raise ValueError(f"models[{i}] is a {type(m).__name__} but models[0] is a {type(ref).__name__}")
        shapes = _param_names(m)
        for name in list(ref_shapes) + [n for n in shapes if n not in ref_shapes]:
            if name not in shapes or name not in ref_shapes:
                raise ValueError(f"models[{i}] and models[0] differ: parameter {name!r} exists in only one")
            if shapes[name] != ref_shapes[name]:
                raise ValueError(f"models[{i}] and models[0] differ at parameter {name!r}: "
                                 f"{tuple(shapes[name])} vs {tuple(ref_shapes[name])}")
        if isinstance(m, ViT) and (m.patch_size, m.grid) != (ref.patch_size, ref.grid):
            raise ValueError(f"models[{i}] has patch size/grid {(m.patch_size, m.grid)}, models[0] "
                             f"{(ref.patch_size, ref.grid)}")
        if isinstance(m, ViT) and m.blocks[0].attn.heads != ref.blocks[0].attn.heads:
            raise ValueError(f"models[{i}] has {m.blocks[0].attn.heads} heads, models[0] {ref.blocks[0].attn.heads}")


def head_sizes(models: Sequence[nn.Module]) -> list[int]:
    return [int(m.head.out_features) for m in models]


def task_slices(models: Sequence[nn.Module]) -> list[tuple[int, int]]:
    """Where each task's logits sit in the merged model's concatenated head."""
    out, s = [], 0
    for c in head_sizes(models):
        out.append((s, s + c))
        s += c
    return out


def _frozen_copy(m: nn.Module) -> nn.Module:
    c = copy.deepcopy(m).eval()
    for p in c.parameters():
        p.requires_grad_(False)
    return c


class Arch:
    """Base: holds frozen copies ``self.models`` and their (BN-folded) parameter dicts ``self.params``."""

    kind = ""

    def __init__(self, models: Sequence[nn.Module]) -> None:
        self.models = [_frozen_copy(m) for m in models]
        self.k = len(models)
        self.heads = head_sizes(models)
        self.params = [self._params(m) for m in self.models]

    def _params(self, m: nn.Module) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in m.state_dict().items()}

    # -- interface --------------------------------------------------------------------------
    def points(self, width_mult: float, make: Callable[..., MergePoint]) -> Points:
        """``make(d, m, has_m=, has_u=, pattern=, key=)`` builds one point; ``key`` names its permutation group
        (as in ``thrifty.merge.match_permutations``) for init="permute"."""
        raise NotImplementedError

    def compose(self, pts: Points) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def template(self, pts: Points) -> nn.Module:
        raise NotImplementedError

    def taps(self) -> list[tuple[str, str]]:
        """(module name, merge point whose U unmerges it) for each feature tap."""
        raise NotImplementedError

    def tap_fn(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def explicit(self, pts: Points, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def stages(self) -> list[tuple[list[str], int]]:
        """Local training: (merge points trained, index of the tap it is scored on; -1: the logits) in order."""
        raise NotImplementedError


class MLPArch(Arch):
    """fc_l -> (BN folded) -> ReLU; one merge point per hidden layer ("h1".."hL")."""

    kind = "mlp"

    def _params(self, m: MLP) -> dict[str, torch.Tensor]:
        out = {}
        for l in range(1, m.depth + 1):
            fc = getattr(m, f"fc{l}")
            w = fc.weight.detach().clone()
            b = fc.bias.detach().clone() if fc.bias is not None else torch.zeros(w.shape[0])
            if m.batchnorm:  # eval BN is affine: fold it into the Linear
                bn = getattr(m, f"bn{l}")
                s = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
                w, b = w * s[:, None], (b - bn.running_mean) * s + bn.bias.detach()
            out[f"fc{l}.weight"], out[f"fc{l}.bias"] = w, b
        out["head.weight"], out["head.bias"] = m.head.weight.detach().clone(), m.head.bias.detach().clone()
        return out

    def dims(self) -> list[int]:
        m = self.models[0]
        return [getattr(m, f"fc{l}").out_features for l in range(1, m.depth + 1)]

    def points(self, width_mult: float, make: Callable[..., MergePoint]) -> Points:
        return nn.ModuleDict({f"h{l}": make(d, max(1, round(d * width_mult)), key=f"h{l}")
                              for l, d in enumerate(self.dims(), start=1)})

    def compose(self, pts: Points) -> dict[str, torch.Tensor]:
        sd: dict[str, torch.Tensor] = {}
        depth = len(self.dims())
        for l in range(1, depth + 1):
            w = b = 0
            for i, p in enumerate(self.params):
                wi = p[f"fc{l}.weight"] if l == 1 else p[f"fc{l}.weight"] @ pts[f"h{l - 1}"].u(i)
                mi = pts[f"h{l}"].m(i)
                w, b = w + mi @ wi, b + mi @ p[f"fc{l}.bias"]
            sd[f"fc{l}.weight"], sd[f"fc{l}.bias"] = w, b
        last = pts[f"h{depth}"]
        sd["head.weight"] = torch.cat([p["head.weight"] @ last.u(i) for i, p in enumerate(self.params)])
        sd["head.bias"] = torch.cat([p["head.bias"] for p in self.params])
        return sd

    def template(self, pts: Points) -> MLP:
        widths = [pts[f"h{l}"].width for l in range(1, len(self.dims()) + 1)]
        return MLP(self.models[0].in_features, widths, sum(self.heads), batchnorm=False).eval()

    def taps(self) -> list[tuple[str, str]]:
        return [(f"fc{l}", f"h{l}") for l in range(1, len(self.dims()) + 1)]

    def tap_fn(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x)

    def stages(self) -> list[tuple[list[str], int]]:
        return [([f"h{l}"], l - 1) for l in range(1, len(self.dims()) + 1)]

    def explicit(self, pts: Points, x: torch.Tensor) -> torch.Tensor:
        """Each model's own fc (+BN) layers on its unmerged input; ReLU on the merged pre-activation."""
        z = x.flatten(1)
        depth = len(self.dims())
        for l in range(1, depth + 1):
            pre = 0
            for i, m in enumerate(self.models):
                zi = z if l == 1 else z @ pts[f"h{l - 1}"].u(i).T
                a = getattr(m, f"fc{l}")(zi)
                if m.batchnorm:
                    a = getattr(m, f"bn{l}")(a)
                pre = pre + a @ pts[f"h{l}"].m(i).T
            z = F.relu(pre)
        last = pts[f"h{depth}"]
        return torch.cat([m.head(z @ last.u(i).T) for i, m in enumerate(self.models)], dim=1)


def _head_pattern(m: int, d: int, heads: int) -> torch.Tensor:
    """m x d 0/1 map sending dim j of head h (model) to dim j of head h (merged), keeping heads aligned."""
    dm, dd = m // heads, d // heads
    p = torch.zeros(m, d)
    for h in range(heads):
        for j in range(min(dm, dd)):
            p[h * dm + j, h * dd + j] = 1.0
    return p


class ViTArch(Arch):
    """Pre-norm ViT. Points: "res" (shared residual merge / unmerge), per block "b{l}_a" (norm1 read U),
    "b{l}_q/k/v" (merges of the projections), "b{l}_o" (U before proj), "b{l}_n2" (norm2 read U),
    "b{l}_h" (MLP hidden, M and U), and "final" (final-norm read U before each task head)."""

    kind = "vit"

    def dims(self) -> tuple[int, int, int, int]:
        m = self.models[0]
        blk = m.blocks[0]
        return blk.attn.proj.out_features, blk.attn.heads, blk.mlp.fc1.out_features, len(m.blocks)

    def points(self, width_mult: float, make: Callable[..., MergePoint]) -> Points:
        d, heads, hid, depth = self.dims()
        m = max(heads, round(d * width_mult / heads) * heads)
        f = int(m * (hid / d))
        hp = _head_pattern(m, d, heads)
        pts: dict[str, MergePoint] = {"res": make(d, m, key="res")}
        for l in range(depth):
            pts[f"b{l}_a"] = make(d, m, has_m=False, key="res")
            for n in "qkv":
                pts[f"b{l}_{n}"] = make(d, m, has_u=False, pattern=hp, key=f"b{l}_{'v' if n == 'v' else 'qk'}")
            pts[f"b{l}_o"] = make(d, m, has_m=False, pattern=hp, key=f"b{l}_v")
            pts[f"b{l}_n2"] = make(d, m, has_m=False, key="res")
            pts[f"b{l}_h"] = make(hid, f, key=f"b{l}_h")
        pts["final"] = make(d, m, has_m=False, key="res")
        return nn.ModuleDict(pts)

    def compose(self, pts: Points) -> dict[str, torch.Tensor]:
        d, heads, hid, depth = self.dims()
        res = pts["res"]
        m = res.width
        sd: dict[str, torch.Tensor] = {}
        mr = [res.m(i) for i in range(self.k)]
        pe = self.params[0]["patch_embed.weight"]
        sd["patch_embed.weight"] = sum(mr[i] @ p["patch_embed.weight"].reshape(d, -1)
                                       for i, p in enumerate(self.params)).reshape(m, *pe.shape[1:])
        sd["patch_embed.bias"] = sum(mr[i] @ p["patch_embed.bias"] for i, p in enumerate(self.params))
        sd["cls_token"] = sum(p["cls_token"] @ mr[i].T for i, p in enumerate(self.params))
        sd["pos_embed"] = sum(p["pos_embed"] @ mr[i].T for i, p in enumerate(self.params))
        ones, zeros = torch.ones(m), torch.zeros(m)
        for l in range(depth):
            pre = f"blocks.{l}."
            qkv_w, qkv_b = [], []
            for j, n in enumerate("qkv"):
                w = b = 0
                for i, p in enumerate(self.params):
                    wi = p[pre + "attn.qkv.weight"][j * d:(j + 1) * d]
                    bi = p[pre + "attn.qkv.bias"][j * d:(j + 1) * d]
                    mi = pts[f"b{l}_{n}"].m(i)
                    g, beta = p[pre + "norm1.weight"], p[pre + "norm1.bias"]
                    w = w + mi @ (wi * g) @ pts[f"b{l}_a"].u(i)
                    b = b + mi @ (wi @ beta + bi)
                qkv_w.append(w)
                qkv_b.append(b)
            sd[pre + "attn.qkv.weight"], sd[pre + "attn.qkv.bias"] = torch.cat(qkv_w), torch.cat(qkv_b)
            sd[pre + "attn.proj.weight"] = sum(mr[i] @ p[pre + "attn.proj.weight"] @ pts[f"b{l}_o"].u(i)
                                               for i, p in enumerate(self.params))
            sd[pre + "attn.proj.bias"] = sum(mr[i] @ p[pre + "attn.proj.bias"] for i, p in enumerate(self.params))
            hp = pts[f"b{l}_h"]
            w = b = 0
            for i, p in enumerate(self.params):
                w1, g, beta = p[pre + "mlp.fc1.weight"], p[pre + "norm2.weight"], p[pre + "norm2.bias"]
                w = w + hp.m(i) @ (w1 * g) @ pts[f"b{l}_n2"].u(i)
                b = b + hp.m(i) @ (w1 @ beta + p[pre + "mlp.fc1.bias"])
            sd[pre + "mlp.fc1.weight"], sd[pre + "mlp.fc1.bias"] = w, b
            sd[pre + "mlp.fc2.weight"] = sum(mr[i] @ p[pre + "mlp.fc2.weight"] @ hp.u(i)
                                             for i, p in enumerate(self.params))
            sd[pre + "mlp.fc2.bias"] = sum(mr[i] @ p[pre + "mlp.fc2.bias"] for i, p in enumerate(self.params))
            for n in ("norm1", "norm2"):
                sd[pre + n + ".weight"], sd[pre + n + ".bias"] = ones, zeros
        sd["norm.weight"], sd["norm.bias"] = ones, zeros
        sd["head.weight"] = torch.cat([(p["head.weight"] * p["norm.weight"]) @ pts["final"].u(i)
                                       for i, p in enumerate(self.params)])
        sd["head.bias"] = torch.cat([p["head.weight"] @ p["norm.bias"] + p["head.bias"] for p in self.params])
        return sd

    def template(self, pts: Points) -> ViT:
        d, heads, hid, depth = self.dims()
        ref = self.models[0]
        m = pts["res"].width
        # the zoo sizes the MLP as int(dim * ratio); +0.5 keeps float rounding from losing a unit
        return ViT(ref.grid * ref.patch_size, ref.patch_size, ref.patch_embed.in_channels, sum(self.heads), m,
                   depth, heads, (pts["b0_h"].width + 0.5) / m).eval()

    def taps(self) -> list[tuple[str, str]]:
        return [(f"blocks.{l}", "res") for l in range(self.dims()[3])]

    def stages(self) -> list[tuple[list[str], int]]:
        depth = self.dims()[3]
        out = []
        for l in range(depth):
            names = [f"b{l}_{n}" for n in ("a", "q", "k", "v", "o", "n2", "h")]
            out.append(((["res"] if l == 0 else []) + names, l))
        return out + [(["final"], -1)]

    def explicit(self, pts: Points, x: torch.Tensor) -> torch.Tensor:
        """The SuperNet as defined: per-model layers on unmerged features, merged after each linear map."""
        d, heads, hid, depth = self.dims()
        res = pts["res"]
        m = res.width
        z = 0
        for i, mod in enumerate(self.models):
            e = mod.patch_embed(x)
            gh, gw = e.shape[-2:]
            e = e.flatten(2).transpose(1, 2)
            e = torch.cat([mod.cls_token.expand(e.shape[0], -1, -1), e], dim=1) + mod._pos(gh, gw)
            z = z + e @ res.m(i).T
        for l in range(depth):
            blocks = [mod.blocks[l] for mod in self.models]
            n = F.layer_norm(z, (m,), eps=blocks[0].norm1.eps)
            q = k = v = 0
            for i, blk in enumerate(blocks):
                u = (n @ pts[f"b{l}_a"].u(i).T) * blk.norm1.weight + blk.norm1.bias
                qi, ki, vi = blk.attn.qkv(u).split(d, dim=-1)
                q = q + qi @ pts[f"b{l}_q"].m(i).T
                k = k + ki @ pts[f"b{l}_k"].m(i).T
                v = v + vi @ pts[f"b{l}_v"].m(i).T
            b_, t_ = z.shape[:2]
            split = lambda y: y.reshape(b_, t_, heads, m // heads).transpose(1, 2)
            o = F.scaled_dot_product_attention(split(q), split(k), split(v)).transpose(1, 2).reshape(b_, t_, m)
            z = z + sum(blk.attn.proj(o @ pts[f"b{l}_o"].u(i).T) @ res.m(i).T for i, blk in enumerate(blocks))
            n2 = F.layer_norm(z, (m,), eps=blocks[0].norm2.eps)
            h = F.gelu(sum(blk.mlp.fc1((n2 @ pts[f"b{l}_n2"].u(i).T) * blk.norm2.weight + blk.norm2.bias)
                           @ pts[f"b{l}_h"].m(i).T for i, blk in enumerate(blocks)))
            z = z + sum(blk.mlp.fc2(h @ pts[f"b{l}_h"].u(i).T) @ res.m(i).T for i, blk in enumerate(blocks))
        n = F.layer_norm(z, (m,), eps=self.models[0].norm.eps)[:, 0]
        return torch.cat([mod.head((n @ pts["final"].u(i).T) * mod.norm.weight + mod.norm.bias)
                          for i, mod in enumerate(self.models)], dim=1)


def zoo_kwargs(model: nn.Module) -> dict:
    """Keyword arguments rebuilding ``model`` with ``thrifty.models.create("mlp" | "vit", **kw)``."""
    if isinstance(model, MLP):
        hidden = [getattr(model, f"fc{l}").out_features for l in range(1, model.depth + 1)]
        return dict(in_features=model.in_features, hidden=hidden, num_classes=model.head.out_features,
                    batchnorm=model.batchnorm)
    if isinstance(model, ViT):
        blk = model.blocks[0]
        dim = blk.attn.proj.out_features
        return dict(img_size=model.grid * model.patch_size, in_chans=model.patch_embed.in_channels,
                    num_classes=model.head.out_features, dim=dim, depth=len(model.blocks), heads=blk.attn.heads,
                    patch_size=model.patch_size, mlp_ratio=(blk.mlp.fc1.out_features + 0.5) / dim)
    raise TypeError(f"zoo_kwargs supports the zoo's MLP and ViT, got {type(model).__name__}")


def arch_for(models: Sequence[nn.Module]) -> Arch:
    """The Arch for a checked list of models."""
    return MLPArch(models) if isinstance(models[0], MLP) else ViTArch(models)
