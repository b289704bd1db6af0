"""Gradient (linearization) explainers: the review's section 4.

saliency: Simonyan et al., the review's Eq. 5-6: the map is max_c |d S_c / d x| over channels.
"""

from __future__ import annotations

import torch

from xai_plugins import Explainer, hookimpl
from xai_plugins.toolkit import GradientPass


class Saliency(Explainer):
    """Vanilla gradient saliency (Simonyan et al. 2014; review Eq. 5-6).

    Attributions are the raw gradient d S_c / d x of the target logit (Captum ``Saliency`` with
    ``abs=False``); the map is its absolute value maximized over channels (Eq. 6).
    """

    name = "saliency"
    family = "gradient"
    space = "input"
    shared_pass = True
    needs_input_grad = True
    params = {"abs": False}

    def from_pass(self, gradient_pass: GradientPass) -> torch.Tensor:
        g = gradient_pass.input_grad
        return g.abs() if self.config["abs"] else g


@hookimpl
def xai_explainers():
    return [Saliency]
