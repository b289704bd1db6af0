"""Attention written out as explicit operations, so that each one gets its LRP rule.

``F.scaled_dot_product_attention`` (timm's fused path, torchvision's Swin does it by hand) and
``F.multi_head_attention_forward`` (``nn.MultiheadAttention``: torchvision's ViT) are single calls
to the ``TorchFunctionMode`` of ``lrp.py``; these functions compute the same values from
``matmul``, ``softmax``, ``linear`` and constant scaling/masking, each issued through ``call`` (the
mode's own dispatch), so that the products take AttnLRP's uniform rule, the softmax its rule and the
projections their layer rules. The model is not touched: the replacement exists only inside the
explained forward. Options outside the common inference path (``bias_k``/``bias_v``,
``add_zero_attn``, separate or static key/value projections, dropout in training) are refused in one
line (``Unsupported``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from .gradient_domain import ScaleGradFn

Call = Callable[..., Any]


class Unsupported(Exception):
    """An attention call with an option these decompositions do not cover (the message says which)."""


def _bind(names: tuple[str, ...], args: tuple, kwargs: dict) -> dict[str, Any]:
    bound = dict(zip(names, args))
    bound.update(kwargs)
    return bound


_SDPA = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


def sdpa(call: Call, args: tuple, kwargs: dict) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` as softmax(q k^T * scale + mask) v."""
    a = _bind(_SDPA, args, kwargs)
    q, k, v = a["query"], a["key"], a["value"]
    if a.get("dropout_p", 0.0):
        raise Unsupported("scaled_dot_product_attention with dropout_p > 0")
    if a.get("enable_gqa", False) and q.shape[-3] != k.shape[-3]:
        rep = q.shape[-3] // k.shape[-3]
        k, v = k.repeat_interleave(rep, -3), v.repeat_interleave(rep, -3)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()  # timm's permuted views: 2x slower products
    scale = a.get("scale")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = call(torch.matmul, q, call(torch.Tensor.transpose, k, -2, -1))
    scores = call(torch.mul, scores, scale)
    mask = a.get("attn_mask")
    if a.get("is_causal", False):
        n, m = q.shape[-2], k.shape[-2]
        mask = torch.ones(n, m, dtype=torch.bool, device=q.device).tril()
    if mask is not None:
        if mask.dtype == torch.bool:
            scores = call(torch.Tensor.masked_fill, scores, ~mask, float("-inf"))
        else:
            scores = call(torch.add, scores, mask)
    attn = call(F.softmax, scores, -1)
    return call(torch.matmul, attn, v)


def fused_sdpa(args: tuple, kwargs: dict, absorb: Callable[[torch.Tensor], None]) -> torch.Tensor | None:
    """The fused kernel in the gradient domain (``gradient_domain.py``): AttnLRP's uniform rule on
    q k^T and on attention x values is 1/4 of the gradient to q and k and 1/2 to v (as LXT runs it),
    the softmax rule is the softmax's gradient, and its bias term, sum(R_attention) - sum(R_scores),
    is 1/2 R_out - R_q - R_k (both products conserve). None where that does not hold or the kernel
    cannot run it: an additive (float) mask, which takes a share like a bias, or dropout."""
    a = _bind(_SDPA, args, kwargs)
    mask = a.get("attn_mask")
    if a.get("dropout_p", 0.0) or (mask is not None and mask.dtype != torch.bool):
        return None

    def taken(sign: float) -> Callable[[torch.Tensor], None]:
        return lambda r: absorb(r * sign)

    q = ScaleGradFn.apply(a["query"], 0.25, taken(-1.0))
    k = ScaleGradFn.apply(a["key"], 0.25, taken(-1.0))
    v = ScaleGradFn.apply(a["value"], 0.5, None)
    rest = {name: a[name] for name in ("attn_mask", "is_causal", "scale", "enable_gqa") if name in a}
    out = F.scaled_dot_product_attention(q, k, v, **rest)
    return ScaleGradFn.apply(out, 1.0, taken(0.5))


_MHA = (
    "query",
    "key",
    "value",
    "embed_dim_to_check",
    "num_heads",
    "in_proj_weight",
    "in_proj_bias",
    "bias_k",
    "bias_v",
    "add_zero_attn",
    "dropout_p",
    "out_proj_weight",
    "out_proj_bias",
    "training",
    "key_padding_mask",
    "need_weights",
    "attn_mask",
    "use_separate_proj_weight",
    "q_proj_weight",
    "k_proj_weight",
    "v_proj_weight",
    "static_k",
    "static_v",
    "average_attn_weights",
    "is_causal",
)


def multi_head_attention(call: Call, args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``F.multi_head_attention_forward`` (inputs L x N x E or L x E) with explicit operations."""
    a = _bind(_MHA, args, kwargs)
    for name in ("bias_k", "bias_v", "static_k", "static_v", "key_padding_mask"):
        if a.get(name) is not None:
            raise Unsupported(f"multi-head attention with {name}")
    if a.get("add_zero_attn") or a.get("use_separate_proj_weight"):
        raise Unsupported("multi-head attention with add_zero_attn or separate projection weights")
    if a.get("training", True) and a.get("dropout_p", 0.0):
        raise Unsupported("multi-head attention with dropout in training mode")
    query, key, value = a["query"], a["key"], a["value"]
    batched = query.dim() == 3
    if not batched:
        query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
    n_heads, w, b = int(a["num_heads"]), a["in_proj_weight"], a.get("in_proj_bias")
    length, batch, embed = query.shape
    # the projections batch first and contiguous: a linear layer on the L x N x E view
    # (nn.MultiheadAttention's batch_first transposes) runs as L small matrix products (ViT-B/16: most
    # of AttnLRP's cost over the limit, with q k^T on permuted views, which sdpa makes contiguous)
    if query is key and key is value:
        query = query.transpose(0, 1).contiguous()
        q, k, v = call(F.linear, query, w, b).chunk(3, dim=-1)
    else:
        ws = w.chunk(3)
        bs = b.chunk(3) if b is not None else (None, None, None)
        inputs = (t.transpose(0, 1).contiguous() for t in (query, key, value))
        q, k, v = (call(F.linear, t, wi, bi) for t, wi, bi in zip(inputs, ws, bs))

    def heads(t: torch.Tensor) -> torch.Tensor:  # N x L x E -> N x heads x L x E/heads (sdpa copies)
        return t.reshape(batch, t.shape[1], n_heads, embed // n_heads).transpose(1, 2)

    mask = a.get("attn_mask")
    if mask is not None and mask.dim() == 3:
        mask = mask.view(batch, n_heads, *mask.shape[1:])
    if mask is not None and mask.dtype == torch.bool:
        mask = ~mask  # True = not allowed in nn.MultiheadAttention, = allowed in sdpa
    sdpa_kwargs = {"attn_mask": mask, "is_causal": bool(a.get("is_causal")) and mask is None}
    need_weights = bool(a.get("need_weights", True))
    weights = None
    if need_weights:  # the probabilities themselves (detached: what the caller reads, not explained)
        with torch.no_grad():
            scores = heads(q) @ heads(k).transpose(-2, -1) / math.sqrt(embed // n_heads)
            if mask is not None:
                scores = (
                    scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
                )
            weights = scores.softmax(-1)
            weights = weights.mean(1) if a.get("average_attn_weights", True) else weights
            if not batched:
                weights = weights.squeeze(0)
    # through the mode: the explicit decomposition (``sdpa``), or the fused kernel in the gradient domain
    out = call(F.scaled_dot_product_attention, heads(q), heads(k), heads(v), **sdpa_kwargs)
    out = out.transpose(1, 2).reshape(batch, length, embed)
    out = call(F.linear, out, a["out_proj_weight"], a.get("out_proj_bias")).transpose(0, 1)
    return (out if batched else out.squeeze(1)), weights
