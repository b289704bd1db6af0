"""The skeleton shared by LIME and Kernel SHAP: superpixels -> coalitions z in {0,1}^M (1 keeps the
superpixel, 0 replaces it by the baseline) -> batched scores f(h_x(z)) -> a weighted linear fit whose
coefficients are the superpixels' attributions. Subclasses choose the coalitions and the fit."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from xai_plugins import Explainer
from xai_plugins.toolkit import resolve_baseline

from .common import generator, masked_scores
from .segments import given_segments, paint, slic_segments


class SuperpixelSurrogate(Explainer):
    """Base class: ``coalitions`` and ``solve`` define the method; ``explain`` does the rest."""

    space = "map"
    params: dict[str, Any] = {
        "segments": 50,
        "compactness": 10.0,
        "feature_mask": None,
        "samples": 1000,
        "baseline": "zeros",
        "output": "logit",
        "seed": 0,
        "batch_size": 64,
    }

    def coalitions(self, count: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """n x M float 0/1 coalitions and their n regression weights."""
        raise NotImplementedError

    def solve(
        self, z: torch.Tensor, weights: torch.Tensor, y: torch.Tensor, full: torch.Tensor, empty: torch.Tensor
    ) -> torch.Tensor:
        """The M coefficients from coalitions z, weights, scores y, f(x) and f(baseline)."""
        raise NotImplementedError

    def spread(self, values: torch.Tensor, segments: torch.Tensor) -> torch.Tensor:
        """Per-superpixel values -> B x 1 x H x W attributions (default: painted on their pixels)."""
        return paint(values, segments)

    def segment(self, inputs: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        if self.config["feature_mask"] is not None:
            return given_segments(self.config["feature_mask"], inputs)
        return slic_segments(inputs, self.config["segments"], self.config["compactness"])

    def explain(
        self, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor
    ) -> tuple[torch.Tensor, dict]:
        cfg = self.config
        segments, counts = self.segment(inputs)
        gen = generator(cfg["seed"], torch.device("cpu"))
        designs = [self.coalitions(m, gen) for m in counts]
        n_max, m_max = max(z.shape[0] for z, _ in designs), max(counts)
        # rows n_max and n_max + 1: the full image (z = 1) and the baseline (z = 0), in the same passes
        z_all = torch.ones(len(counts), n_max + 2, m_max)
        z_all[:, -1] = 0.0
        for b, (z, _) in enumerate(designs):
            z_all[b, : z.shape[0], : z.shape[1]] = z
        z_all = z_all.to(inputs.device)

        def keep(b: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
            return z_all[b, k].gather(1, segments[b].flatten(1)).view(-1, 1, *inputs.shape[-2:])

        baseline = resolve_baseline(cfg["baseline"], inputs)
        scores = masked_scores(
            model, inputs, baseline, targets, n_max + 2, keep, cfg["batch_size"], cfg["output"]
        )
        full, empty = scores[:, -2], scores[:, -1]
        values = torch.zeros(len(counts), m_max, device=inputs.device)
        per_image = []
        for b, (z, w) in enumerate(designs):
            coef = self.solve(
                z.double(),
                w.double(),
                scores[b, : z.shape[0]].double().cpu(),
                full[b].double().cpu(),
                empty[b].double().cpu(),
            ).float()
            values[b, : coef.numel()] = coef.to(inputs.device)
            per_image.append(coef)
        extras = {
            "segments": segments.cpu(),
            "values": per_image,
            "score": full.cpu(),
            "baseline_score": empty.cpu(),
        }
        return self.spread(values, segments), extras

    def to_map(self, attributions: torch.Tensor) -> torch.Tensor:
        """The map shows the evidence for the class: the positive part of the attributions."""
        return attributions.reshape(attributions.shape[0], *attributions.shape[-2:]).clamp(min=0)


def weighted_ridge(
    x: torch.Tensor, y: torch.Tensor, weights: torch.Tensor, alpha: float, intercept: bool = True
) -> torch.Tensor:
    """Coefficients of ridge regression with sample weights (as scikit-learn's ``Ridge``: the
    intercept is the weighted mean, not penalized)."""
    w = weights / weights.sum().clamp_min(1e-300)
    if intercept:
        x = x - (w.unsqueeze(1) * x).sum(0)
        y = y - (w * y).sum()
    gram = x.T @ (weights.unsqueeze(1) * x) + alpha * torch.eye(x.shape[1], dtype=x.dtype)
    return torch.linalg.solve(gram, x.T @ (weights * y))
