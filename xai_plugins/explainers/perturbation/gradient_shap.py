"""GradientSHAP / expected gradients (Lundberg & Lee 2017; Erion et al. 2021)."""

from __future__ import annotations

import torch
from torch import nn

from xai_plugins import Explainer, InputError
from xai_plugins.toolkit import batch_slices, resolve_baseline, select_targets

from .common import generator


def reference_set(baseline: object, inputs: torch.Tensor) -> torch.Tensor | None:
    """R x C x H x W references shared by all images, or None for "random" (drawn per sample)."""
    if isinstance(baseline, str) and baseline == "random":
        return None
    if isinstance(baseline, torch.Tensor) and baseline.dim() == 4:
        if tuple(baseline.shape[1:]) != tuple(inputs.shape[1:]):
            raise InputError(
                f"references of shape {tuple(baseline.shape)} do not match inputs {tuple(inputs.shape)}"
            )
        return baseline.to(device=inputs.device, dtype=inputs.dtype)
    return resolve_baseline(baseline, inputs)[:1]


class GradientShap(Explainer):
    """GradientSHAP, i.e. expected gradients (Erion et al. 2021, Eq. 4; Lundberg & Lee 2017):
    phi(x) = E_{r ~ D, alpha ~ U(0,1), eps ~ N(0, s^2)} [(x + eps - r) * grad f_c(r + alpha (x + eps - r))],
    estimated with ``samples`` draws per image, all evaluated in batches of ``batch_size``.

    Same estimator as Captum's ``GradientShap`` (``n_samples=samples``, ``stdevs`` = ``noise`` times each
    image's input range): references are drawn uniformly from ``baseline``: an R x C x H x W tensor (a
    reference set, e.g. training images), a single reference ("zeros", the default as for every method
    with a baseline; a number, "mean", C x H x W), or "random": uniform noise over each image's own
    value range, a fresh reference per draw.
    In expectation the attributions sum to E_r[f(x) - f(r)] (completeness of integrated gradients).
    """

    name = "gradient_shap"
    space = "input"
    params = {"baseline": "zeros", "samples": 32, "noise": 0.0, "seed": 0, "batch_size": 64}

    def explain(self, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        samples = int(cfg["samples"])
        if samples < 1:
            raise InputError("gradient_shap needs samples >= 1")
        refs = reference_set(cfg["baseline"], inputs)
        gen = generator(cfg["seed"], inputs.device)
        lo = inputs.flatten(1).amin(1).view(-1, 1, 1, 1)
        span = inputs.flatten(1).amax(1).view(-1, 1, 1, 1) - lo
        total = torch.zeros_like(inputs)
        count = inputs.shape[0] * samples
        for sl in batch_slices(count, cfg["batch_size"] or count):
            b = torch.arange(sl.start, sl.stop, device=inputs.device) // samples
            x = inputs[b]
            if cfg["noise"]:
                x = x + torch.randn(x.shape, generator=gen, device=x.device) * cfg["noise"] * span[b]
            if refs is None:
                r = lo[b] + torch.rand(x.shape, generator=gen, device=x.device) * span[b]
            else:
                r = refs[torch.randint(0, refs.shape[0], (x.shape[0],), generator=gen, device=x.device)]
            alpha = torch.rand(x.shape[0], 1, 1, 1, generator=gen, device=x.device)
            point = (r + alpha * (x - r)).requires_grad_(True)
            with torch.enable_grad():
                (grad,) = torch.autograd.grad(select_targets(model(point), targets[b]).sum(), point)
            total.index_add_(0, b, grad * (x - r))
        return total / samples
