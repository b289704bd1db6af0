"""Meaningful perturbation (Fong & Vedaldi 2017): the smallest blurred region that removes the class."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from xai_plugins import Explainer, InputError

from .common import class_scores, generator


def gaussian_blur(inputs: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of B x C x H x W inputs, replicate padding."""
    radius = max(1, math.ceil(3 * sigma))
    t = torch.arange(-radius, radius + 1, device=inputs.device, dtype=inputs.dtype)
    kernel = torch.exp(-t.pow(2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    c = inputs.shape[1]
    x = F.pad(inputs, (radius, radius, radius, radius), mode="replicate")
    x = F.conv2d(x, kernel.view(1, 1, 1, -1).expand(c, 1, 1, -1).contiguous(), groups=c)
    return F.conv2d(x, kernel.view(1, 1, -1, 1).expand(c, 1, -1, 1).contiguous(), groups=c)


def total_variation(mask: torch.Tensor, power: float) -> torch.Tensor:
    """Per-image mean of |d m / dy|^beta + mean of |d m / dx|^beta over the mask (B x 1 x h x w)."""
    dy = (mask[..., 1:, :] - mask[..., :-1, :]).abs().pow(power).flatten(1).mean(1)
    dx = (mask[..., :, 1:] - mask[..., :, :-1]).abs().pow(power).flatten(1).mean(1)
    return dy + dx


class MeaningfulPerturbation(Explainer):
    """Meaningful perturbation, deletion game (Fong & Vedaldi 2017, Eq. 3-4):
    min_m  l1 ||1 - m||_1 + tv sum_u ||grad m(u)||^beta + E_tau[f_c(Phi(x(. - tau); m))],
    Phi(x; m) = m . x + (1 - m) . blur(x, sigma), m in [0, 1] (1 keeps the pixel).

    The mask lives at 1/``mask_scale`` of the input resolution and is upsampled bilinearly (the
    paper: 28 x 28 for 224 px, i.e. 8; we default to 2 for small images); each step shifts the image by a random jitter tau of up to ``jitter``
    pixels (the expectation over tau: stochastic application); Adam with ``lr`` for ``steps`` steps,
    the mask clipped to [0, 1] after each, starting from m = 1. The norms are means rather than sums
    (the coefficients do not depend on the image size); f_c is the target's softmax probability
    (``output``). ``sigma`` defaults to a fifth of the shorter side (strong enough to erase an object;
    the paper used 10 at 224 px). All images of the batch are optimized together.

    ``attributions`` are 1 - m (what had to be deleted). The map is 1 - m smoothed by a Gaussian of
    sigma ``mask_scale`` / 2 input pixels, so that inside a saturated deleted region (1 - m = 1) its
    centre ranks first rather than an arbitrary pixel of the plateau.
    """

    name = "meaningful_perturbation"
    space = "map"
    params = {
        "steps": 150,
        "lr": 0.1,
        "l1": 0.5,
        "tv": 0.2,
        "tv_power": 3.0,
        "mask_scale": 2,
        "sigma": None,
        "jitter": 2,
        "output": "probability",
        "seed": 0,
    }

    def explain(
        self, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor
    ) -> tuple[torch.Tensor, dict]:
        cfg = self.config
        if cfg["steps"] < 1 or cfg["mask_scale"] < 1:
            raise InputError("meaningful_perturbation needs steps >= 1 and mask_scale >= 1")
        height, width = inputs.shape[-2:]
        sigma = cfg["sigma"] or max(1.0, min(height, width) / 5)
        blurred = gaussian_blur(inputs, sigma)
        low = (max(1, -(-height // cfg["mask_scale"])), max(1, -(-width // cfg["mask_scale"])))
        mask = torch.ones(inputs.shape[0], 1, *low, device=inputs.device, requires_grad=True)
        opt = torch.optim.Adam([mask], lr=cfg["lr"])
        gen = generator(cfg["seed"], torch.device("cpu"))
        jitter = int(cfg["jitter"])
        with torch.enable_grad():
            for _ in range(int(cfg["steps"])):
                dy, dx = torch.randint(0, jitter + 1, (2,), generator=gen).tolist() if jitter else (0, 0)
                x, blur = (torch.roll(t, shifts=(dy, dx), dims=(2, 3)) for t in (inputs, blurred))
                up = F.interpolate(mask, size=(height, width), mode="bilinear", align_corners=False)
                score = class_scores(model(blur + up * (x - blur)), targets, cfg["output"])
                loss = (
                    cfg["l1"] * (1 - mask).abs().flatten(1).mean(1)
                    + cfg["tv"] * total_variation(mask, cfg["tv_power"])
                    + score
                )
                (mask.grad,) = torch.autograd.grad(loss.sum(), mask)
                opt.step()
                with torch.no_grad():
                    mask.clamp_(0, 1)
        mask = mask.detach()
        up = F.interpolate(mask, size=(height, width), mode="bilinear", align_corners=False)
        with torch.no_grad():
            deleted = class_scores(model(blurred + up * (inputs - blurred)), targets, cfg["output"])
        return 1 - up, {"mask": mask.cpu(), "deleted_score": deleted.cpu()}

    def to_map(self, attributions: torch.Tensor) -> torch.Tensor:
        sigma = max(0.5, self.config["mask_scale"] / 2)
        return gaussian_blur(attributions.reshape(-1, 1, *attributions.shape[-2:]).float(), sigma)[:, 0]
