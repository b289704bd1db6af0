"""Localization against ground-truth masks (the review's section 7.2 and Table 1) and the share of
relevance on a known shortcut.

- ``localization``: pointing game and relevance mass accuracy, with the random baselines that
  make them readable, and the saliency-benchmark measures of the review's Table 1 computed against
  the object mask (read as a fixation density map): SIM (histogram intersection), PCC (Pearson),
  AUC (ROC of the map as a detector of mask pixels) and KL(mask || map).
- ``shortcut``: the share of the relevance that falls on a known spurious region, e.g. the
  Clever Hans watermark of `shapes` (``context.spurious_masks``); ``shortcut.area`` is what a
  uniform map would score and ``shortcut.ratio`` = share / area. The region is dilated by
  ``tolerance`` pixels (default: 1/16 of the image side), as the pointing game allows a tolerance
  (Zhang et al. 2018: 15 px at 224 px): maps of CAM methods have the resolution of their layer and
  cannot put all their relevance inside a small box. ``share_exact`` uses the region as given.
"""

from __future__ import annotations

import torch

from xai_plugins import Metric, MetricContext, hookimpl
from xai_plugins.similarity import auc_vs_mask, kl_divergence, pearson, sim


def pointing_game(maps: torch.Tensor, masks: torch.Tensor, tolerance: int = 0) -> torch.Tensor:
    """1 where the map's maximum falls inside the mask (dilated by ``tolerance`` px), per image.
    Ties: the first maximum in raster order."""
    b, h, w = maps.shape
    idx = maps.reshape(b, -1).argmax(dim=1)
    m = dilate(masks, tolerance)
    return m.reshape(b, -1).gather(1, idx.view(-1, 1)).squeeze(1).float()


def relevance_mass(maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Share of the (non-negative) relevance that falls inside the mask, per image
    (Arras et al.'s relevance mass accuracy)."""
    m = maps.clamp(min=0).reshape(maps.shape[0], -1)
    inside = (m * masks.reshape(masks.shape[0], -1).float()).sum(1)
    return inside / m.sum(1).clamp_min(1e-12)


def dilate(masks: torch.Tensor, tolerance: int) -> torch.Tensor:
    """Boolean B x H x W masks grown by ``tolerance`` pixels (square neighbourhood)."""
    if tolerance <= 0:
        return masks.bool()
    k = 2 * tolerance + 1
    return torch.nn.functional.max_pool2d(masks.float().unsqueeze(1), k, stride=1, padding=tolerance).squeeze(1) > 0


def fit_masks(masks: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
    """Boolean masks at the maps' resolution (nearest neighbour), on the CPU."""
    masks = masks.bool().cpu()
    if masks.shape[-2:] != maps.shape[-2:]:
        masks = torch.nn.functional.interpolate(masks.float().unsqueeze(1), size=maps.shape[-2:],
                                                mode="nearest").squeeze(1) > 0.5
    return masks


class Localization(Metric):
    """Pointing game and relevance mass against ground-truth object masks, and the review's
    Table 1 measures (SIM, PCC, AUC, KL) against the same masks.

    ``random_pointing`` and ``mask_fraction`` are what a map with no information scores: the
    expected pointing game of a uniformly random point and the relevance mass of a uniform map.
    """

    name = "localization"
    requires = ("masks",)
    higher_is_better = True
    params = {"tolerance": 0}

    def compute(self, context: MetricContext) -> dict[str, float]:
        maps = context.explanation.maps.float().cpu()
        masks = fit_masks(context.masks, maps)
        frac = masks.reshape(masks.shape[0], -1).float().mean(1)
        target = masks.float()
        return {
            "pointing_game": float(pointing_game(maps, masks, int(self.config["tolerance"])).mean()),
            "relevance_mass": float(relevance_mass(maps, masks).mean()),
            "random_pointing": float(frac.mean()),
            "mask_fraction": float(frac.mean()),
            "sim": float(sim(maps, target).mean()),
            "pcc": float(pearson(maps, target).mean()),
            "auc": float(auc_vs_mask(maps, masks).mean()),
            "kl": float(kl_divergence(target, maps).mean()),
        }


class Shortcut(Metric):
    """Share of the relevance on the known spurious region (the Clever Hans watermark): a model
    that looks at the shortcut gets a high ``shortcut.share`` (lower is better)."""

    name = "shortcut"
    requires = ("spurious_masks",)
    higher_is_better = False
    params = {"tolerance": None}

    def compute(self, context: MetricContext) -> dict[str, float]:
        maps = context.explanation.maps.float().cpu()
        exact = fit_masks(context.spurious_masks, maps)
        tol = self.config["tolerance"]
        tol = max(1, round(min(maps.shape[-2:]) / 16)) if tol is None else int(tol)
        regions = dilate(exact, tol)
        share = relevance_mass(maps, regions)
        area = regions.reshape(regions.shape[0], -1).float().mean(1)
        return {"share": float(share.mean()), "share_max": float(share.max()),
                "share_exact": float(relevance_mass(maps, exact).mean()), "area": float(area.mean()),
                "ratio": float((share / area.clamp_min(1e-12)).mean()),
                "pointing": float(pointing_game(maps, regions).mean()), "tolerance": tol}


@hookimpl
def xai_metrics():
    return [Localization, Shortcut]
