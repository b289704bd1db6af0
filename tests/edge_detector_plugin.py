"""A deliberately insensitive "explainer" plugin: the Sobel edge magnitude of the input, whatever
the model (the kind of method Adebayo et al.'s randomization test exposes). Used in-process by
tests/test_sanity.py and through a real entry point by tests/test_registry_sanity_gate.py."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from xai_plugins import Explainer, hookimpl


class EdgeDetector(Explainer):
    """Sobel edge magnitude of the channel-mean image (B x 1 x H x W); ignores the model."""

    name = "edge_detector"
    space = "map"
    params = {}

    def explain(self, model, inputs, targets):
        gray = inputs.mean(dim=1, keepdim=True)
        kx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], device=inputs.device).view(
            1, 1, 3, 3
        )
        gx = F.conv2d(F.pad(gray, (1, 1, 1, 1), mode="replicate"), kx)
        gy = F.conv2d(F.pad(gray, (1, 1, 1, 1), mode="replicate"), kx.transpose(2, 3))
        return (gx**2 + gy**2).sqrt()


@hookimpl
def xai_explainers():
    return [EdgeDetector]
