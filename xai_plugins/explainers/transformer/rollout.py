"""Attention rollout (Abnar & Zuidema 2020, "Quantifying Attention Flow in Transformers", section 3).

Per block l the heads' attention probabilities are fused (``head_fusion``: mean, as the paper, or
max / min, as jacobgil's vit-explain), the ``discard_ratio`` smallest entries of each image's fused
map are set to zero (vit-explain's noise filter; 0 keeps the paper's definition), the residual
connection is added and rows renormalized: A_l = norm(0.5 W_l + 0.5 I) (paper, section 3), and
the rollout is the product R = A_L ... A_1 (Eq. for attention rollout, R(l) = A_l R(l-1)).
The map is the class token's row over the patch tokens (the mean row when there is no prefix
token), laid on the patch grid. Class-agnostic: the target is not used.
"""

from __future__ import annotations

import torch

from xai_plugins import Explainer, InputError
from xai_plugins.explainers.transformer.attention import attention_maps
from xai_plugins.toolkit import token_grid

FUSIONS = ("mean", "max", "min")


def fuse_heads(attn: torch.Tensor, fusion: str) -> torch.Tensor:
    """B x heads x N x N -> B x N x N."""
    if fusion == "mean":
        return attn.mean(dim=1)
    if fusion == "max":
        return attn.amax(dim=1)
    if fusion == "min":
        return attn.amin(dim=1)
    raise InputError(f"unknown head_fusion {fusion!r}; known: {', '.join(FUSIONS)}")


def token_map(relevance: torch.Tensor, size: tuple[int, int], method: str) -> torch.Tensor:
    """B x N x N token relevance -> B x 1 x h x w: the class token's row (or the mean row) over the
    patch tokens, on the patch grid of an input of ``size``."""
    b, n, _ = relevance.shape
    grid = token_grid(n, size)
    if grid is None:
        raise InputError(f"{method}: {n} tokens do not lie on a patch grid of the {size[0]}x{size[1]} input")
    prefix, h, w = grid
    row = relevance[:, 0] if prefix else relevance.mean(dim=1)
    return row[:, prefix:].reshape(b, 1, h, w)


class AttentionRollout(Explainer):
    """Attention rollout (Abnar & Zuidema 2020): product of the residual-augmented, head-fused
    attention maps of all blocks; the class token's row as the map."""

    name = "attention_rollout"
    space = "map"
    rowwise = True
    python_modules = True
    params = {"head_fusion": "mean", "discard_ratio": 0.0}

    def explain(self, model, inputs, targets):
        fusion, ratio = self.config["head_fusion"], float(self.config["discard_ratio"])
        if not 0.0 <= ratio < 1.0:
            raise InputError("discard_ratio must be in [0, 1)")
        with torch.no_grad(), attention_maps(model, self.name) as maps:
            model(inputs)
        rollout = None
        for attn in maps:
            fused = fuse_heads(attn.float(), fusion)
            b, n, _ = fused.shape
            drop = int(n * n * ratio)
            if drop:
                flat = fused.reshape(b, -1).clone()
                flat.scatter_(1, flat.topk(drop, dim=1, largest=False).indices, 0.0)
                fused = flat.view(b, n, n)
            a = 0.5 * fused + 0.5 * torch.eye(n, device=fused.device)
            a = a / a.sum(dim=-1, keepdim=True)
            rollout = a if rollout is None else a @ rollout
        return token_map(rollout, tuple(inputs.shape[-2:]), self.name)
