"""Reading attention probabilities from torchvision's and timm's attention modules, fused or not.

- timm ``Attention`` (ViT, DeiT): its ``fused_attn`` flag is switched off for the forward, so the
  probabilities softmax(q k^T * scale) pass through ``attn_drop``, whose output is captured.
- ``nn.MultiheadAttention`` (torchvision ViT calls it with ``need_weights=False``, the fused
  ``scaled_dot_product_attention`` path): a forward hook recomputes its output explicitly from the
  packed q, k, v projection, softmax(q k^T / sqrt(d)) v then ``out_proj``, and the explicit
  probabilities are captured; identical outputs, and gradients reach the probabilities.
The captured maps (B x heads x N x N) are part of the graph: ``torch.autograd.grad`` on them works.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from xai_plugins import InputError
from xai_plugins.toolkit import LayerCapture


def _timm_attention(module: nn.Module) -> bool:
    return (
        hasattr(module, "fused_attn")
        and hasattr(module, "qkv")
        and isinstance(getattr(module, "attn_drop", None), nn.Module)
        and "Attention" in type(module).__name__
        and "Window" not in type(module).__name__
    )


def _supported_mha(module: nn.Module) -> bool:
    return (
        isinstance(module, nn.MultiheadAttention)
        and module._qkv_same_embed_dim
        and module.batch_first
        and module.bias_k is None
        and not module.add_zero_attn
    )


def attention_modules(model: nn.Module, method: str) -> list[tuple[str, nn.Module]]:
    """The global self-attention modules of ``model`` in call order; a one-line refusal without any."""
    found = [(n, m) for n, m in model.named_modules() if _timm_attention(m) or _supported_mha(m)]
    if not found:
        raise InputError(
            f"{method} needs global self-attention (timm Attention or batch-first "
            f"nn.MultiheadAttention); {type(model).__name__} has none"
        )
    return found


def _explicit_mha(maps: list[torch.Tensor]):
    def hook(module: nn.MultiheadAttention, args, kwargs, output):
        query = args[0] if args else kwargs["query"]
        if kwargs.get("attn_mask") is not None or kwargs.get("key_padding_mask") is not None:
            raise InputError("attention maps with attention masks are not supported")
        b, n, d = query.shape
        heads = module.num_heads
        q, k, v = F.linear(query, module.in_proj_weight, module.in_proj_bias).chunk(3, dim=-1)
        q, k, v = (t.reshape(b, n, heads, d // heads).transpose(1, 2) for t in (q, k, v))
        attn = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(d // heads), dim=-1)
        maps.append(attn)
        out = (attn @ v).transpose(1, 2).reshape(b, n, d)
        return module.out_proj(out), None

    return hook


@contextlib.contextmanager
def attention_maps(model: nn.Module, method: str) -> Iterator[list[torch.Tensor]]:
    """Within the block, every forward of ``model`` appends each attention module's probabilities
    (B x heads x N x N, in call order) to the yielded list. Flags and hooks are restored on exit."""
    modules = attention_modules(model, method)
    maps: list[torch.Tensor] = []
    with contextlib.ExitStack() as stack:
        captures: list[LayerCapture] = []
        for _, module in modules:
            if isinstance(module, nn.MultiheadAttention):
                handle = module.register_forward_hook(_explicit_mha(maps), with_kwargs=True)
                stack.callback(handle.remove)
            else:
                flag = module.fused_attn
                module.fused_attn = False
                stack.callback(setattr, module, "fused_attn", flag)
                cap = stack.enter_context(LayerCapture(module.attn_drop))
                captures.append(cap)
                hook = module.register_forward_hook(lambda mod, a, o, cap=cap: maps.append(cap.output))
                stack.callback(hook.remove)
        yield maps
