"""Localization against ground-truth masks (the review's section 7; Table 1 of the review uses
SIM and PCC against gaze maps): pointing game and relevance mass accuracy, with the random
baselines that make them readable."""

from __future__ import annotations

import torch

from xai_plugins import Metric, MetricContext, hookimpl


def pointing_game(maps: torch.Tensor, masks: torch.Tensor, tolerance: int = 0) -> torch.Tensor:
    """1 where the map's maximum falls inside the mask (dilated by ``tolerance`` px), per image.
    Ties: the first maximum in raster order."""
    b, h, w = maps.shape
    idx = maps.reshape(b, -1).argmax(dim=1)
    m = masks.bool()
    if tolerance > 0:
        k = 2 * tolerance + 1
        m = torch.nn.functional.max_pool2d(m.float().unsqueeze(1), k, stride=1, padding=tolerance).squeeze(1) > 0
    return m.reshape(b, -1).gather(1, idx.view(-1, 1)).squeeze(1).float()


def relevance_mass(maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Share of the (non-negative) relevance that falls inside the mask, per image
    (Arras et al.'s relevance mass accuracy)."""
    m = maps.clamp(min=0).reshape(maps.shape[0], -1)
    inside = (m * masks.reshape(masks.shape[0], -1).float()).sum(1)
    return inside / m.sum(1).clamp_min(1e-12)


class Localization(Metric):
    """Pointing game and relevance mass against ground-truth object masks.

    ``random_pointing`` and ``mask_fraction`` are what a map with no information scores: the
    expected pointing game of a uniformly random point and the relevance mass of a uniform map.
    """

    name = "localization"
    requires = ("masks",)
    higher_is_better = True
    params = {"tolerance": 0}

    def compute(self, context: MetricContext) -> dict[str, float]:
        maps = context.explanation.maps.float().cpu()
        masks = context.masks.bool().cpu()
        if masks.shape[-2:] != maps.shape[-2:]:
            masks = torch.nn.functional.interpolate(masks.float().unsqueeze(1), size=maps.shape[-2:],
                                                    mode="nearest").squeeze(1) > 0.5
        frac = masks.reshape(masks.shape[0], -1).float().mean(1)
        return {
            "pointing_game": float(pointing_game(maps, masks, int(self.config["tolerance"])).mean()),
            "relevance_mass": float(relevance_mass(maps, masks).mean()),
            "random_pointing": float(frac.mean()),
            "mask_fraction": float(frac.mean()),
        }


@hookimpl
def xai_metrics():
    return [Localization]
