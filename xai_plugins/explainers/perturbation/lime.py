"""LIME on superpixels (Ribeiro et al. 2016)."""

from __future__ import annotations

import torch

from .surrogate_base import SuperpixelSurrogate, weighted_ridge


class Lime(SuperpixelSurrogate):
    """LIME (Ribeiro et al. 2016, Eq. 1-2): xi(x) = argmin_g L(f, g, pi_x) + Omega(g) with a linear g over
    superpixel indicators z, fitted to f(h_x(z)) with locality weights pi_x(z).

    As ``lime_image``: SLIC superpixels (``segments``, ``compactness``; or ``feature_mask``), the first
    sample keeps every superpixel, the others keep each with probability 1/2; pi_x(z) =
    sqrt(exp(-d(z, 1)^2 / kernel_width^2)) with d the cosine distance; scores are the target's softmax
    probability. The sparse surrogate (Omega: at most ``num_features`` non-zero coefficients, K-LASSO's
    role) uses lime's "highest_weights" selection (ridge alpha 0.01, keep the K largest |coef|) and a
    final weighted ridge (``ridge`` = alpha, 1.0 as lime) with intercept; ``num_features=None`` keeps
    all superpixels (lime_image's default). Removed superpixels take the ``baseline`` value (lime's
    default is each superpixel's mean color). The map is the coefficients painted on the superpixels.
    """

    name = "lime"
    params = {
        **SuperpixelSurrogate.params,
        "output": "probability",
        "num_features": None,
        "kernel_width": 0.25,
        "ridge": 1.0,
    }

    def coalitions(self, count: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        n = max(2, int(self.config["samples"]))
        z = (torch.rand(n, count, generator=gen) < 0.5).float()
        z[0] = 1.0
        on = z.sum(1)
        cosine = 1.0 - torch.where(on > 0, (on / count).sqrt(), torch.zeros_like(on))
        weights = torch.exp(-cosine.pow(2) / self.config["kernel_width"] ** 2).sqrt()
        return z, weights

    def solve(self, z, weights, y, full, empty) -> torch.Tensor:
        k = self.config["num_features"]
        if k is None or k >= z.shape[1]:
            return weighted_ridge(z, y, weights, self.config["ridge"])
        chosen = weighted_ridge(z, y, weights, 0.01).abs().topk(int(k)).indices
        coef = torch.zeros(z.shape[1], dtype=z.dtype)
        coef[chosen] = weighted_ridge(z[:, chosen], y, weights, self.config["ridge"])
        return coef
