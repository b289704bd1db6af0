"""Class activation map explainers sharing one skeleton (as pytorch-grad-cam's BaseCAM).

grad_cam: Selvaraju et al., the review's Eq. 9-10: weights alpha_k = mean over positions of
dS_c/dA_k, map = ReLU(sum_k alpha_k A_k) at the chosen layer (default: the last conv stage).
"""

from __future__ import annotations

import torch

from xai_plugins import Explainer, hookimpl
from xai_plugins.toolkit import GradientPass


class CAMExplainer(Explainer):
    """Skeleton: activations and gradients of ``layer`` from the shared pass -> channel weights ->
    ReLU of the weighted sum. Subclasses define ``weights(activations, gradients)``."""

    space = "map"
    family = "cam"
    shared_pass = True
    needs_layer = True
    params = {"layer": None, "relu": True}

    def weights(self, activations: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def from_pass(self, gradient_pass: GradientPass) -> torch.Tensor:
        layer = self.config["layer"]
        a, g = gradient_pass.activations[layer], gradient_pass.gradients[layer]
        cam = (self.weights(a, g) * a).sum(dim=1, keepdim=True)
        return cam.clamp(min=0) if self.config["relu"] else cam


class GradCAM(CAMExplainer):
    """Grad-CAM (Selvaraju et al. 2017; review Eq. 9-10). Same definition as Captum's
    ``LayerGradCam`` (relu_attributions=True) and pytorch-grad-cam's ``GradCAM``; the map is
    upsampled bilinearly to the input (Captum's default is nearest)."""

    name = "grad_cam"

    def weights(self, activations: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
        return gradients.mean(dim=(2, 3), keepdim=True)


@hookimpl
def xai_explainers():
    return [GradCAM]
