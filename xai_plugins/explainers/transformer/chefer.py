"""Transformer attribution (Chefer, Gur & Wolf): relevance propagated through the attention maps,
weighted by their gradients.

Implemented in the gradient x attention form of Chefer et al.'s follow-up (ICCV 2021, "Generic
Attention-model Explainability", Eq. 5-6), which the CVPR 2021 paper's Eq. 13-14 reduce to when
the LRP relevance of each attention map is replaced by the map itself:
  Abar_b = E_h[(grad A_b * A_b)^+]   (grad A_b = dy_t / dA_b for the target logit y_t; Eq. 5)
  R = I;  R <- R + Abar_b R          for the blocks b in order (Eq. 6)
The map is the class token's row of R over the patch tokens (the mean row without a prefix
token), on the patch grid. One forward and one backward to all the attention maps.
"""

from __future__ import annotations

import torch

from xai_plugins import Explainer
from xai_plugins.explainers.transformer.attention import attention_maps
from xai_plugins.explainers.transformer.rollout import token_map
from xai_plugins.toolkit import select_targets


class TransformerAttribution(Explainer):
    """Chefer et al. (2021): gradient-weighted attention relevance rolled out over the blocks."""

    name = "transformer_attribution"
    space = "map"
    rowwise = True
    python_modules = True
    params: dict = {}

    def explain(self, model, inputs, targets):
        x = inputs.detach().clone().requires_grad_()
        with torch.enable_grad(), attention_maps(model, self.name) as maps:
            score = select_targets(model(x), targets).sum()
            grads = torch.autograd.grad(score, maps, allow_unused=True)
        n = maps[0].shape[-1]
        relevance = torch.eye(n, device=x.device).expand(x.shape[0], n, n)
        for attn, grad in zip(maps, grads):
            grad = torch.zeros_like(attn) if grad is None else grad
            cam = (grad * attn).clamp(min=0).mean(dim=1).float()
            relevance = relevance + cam @ relevance
        return token_map(relevance.detach(), tuple(inputs.shape[-2:]), self.name)
