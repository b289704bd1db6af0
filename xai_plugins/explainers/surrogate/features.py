"""What the soft tree's nodes look at: the raw input (Frosst & Hinton) or the model's own features at
a layer, global-average-pooled. Both also give, per node, a spatial map of its logit's parts."""

from __future__ import annotations

import torch
from torch import nn

from xai_plugins.toolkit import LayerCapture, batch_slices, resolve_layer, spatial_view


class TreeFeatures:
    """``vectors``: B x D feature vectors; ``contributions``: per node, the spatial terms that sum to
    the node's logit w . v (B x nodes x h x w)."""

    def __init__(self, kind: str, layer: str | None):
        if kind not in ("input", "layer"):
            raise ValueError(f"features must be 'input' or 'layer', not {kind!r}")
        self.kind, self.layer = kind, layer

    def spatial(self, model: nn.Module, inputs: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """B x K x h x w: the input itself, or the layer's activations."""
        if self.kind == "input":
            return inputs
        _, module = resolve_layer(model, self.layer)
        out = []
        with torch.no_grad(), LayerCapture(module, clone=True, track_grad=False) as cap:
            for sl in batch_slices(inputs.shape[0], batch_size):
                model(inputs[sl])
                out.append(spatial_view(cap.output.detach(), tuple(inputs.shape[-2:]), self.layer).float())
        return torch.cat(out)

    def vectors(self, spatial: torch.Tensor) -> torch.Tensor:
        return spatial.flatten(1) if self.kind == "input" else spatial.mean(dim=(2, 3))

    def contributions(self, spatial: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Node logit parts per position, for weights (nodes x D) applied to ``vectors(spatial)``."""
        if self.kind == "input":
            w = weights.view(weights.shape[0], *spatial.shape[1:])
            return torch.einsum("bkhw,nkhw->bnhw", spatial, w)
        hw = spatial.shape[2] * spatial.shape[3]
        return torch.einsum("bkhw,nk->bnhw", spatial, weights) / hw
