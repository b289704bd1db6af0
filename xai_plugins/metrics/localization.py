"""Localization against ground-truth masks (the review's section 7.2 and Table 1) and the share of
relevance on a known shortcut.

- ``localization``: pointing game and relevance mass accuracy, with the random baselines that
  make them readable, and the saliency-benchmark measures of the review's Table 1 computed against
  the object mask (read as a fixation density map): SIM (histogram intersection), PCC (Pearson),
  AUC (ROC of the map as a detector of mask pixels) and KL(mask || map). ``context.masks`` may
  also be a fixation density (float B x H x W, not only 0/1): SIM, PCC and KL against it; or
  fixation points (integer B x K x 2, (y, x) in pixels of the input, negative rows are padding):
  NSS, AUC-Judd, AUC-Borji and shuffled AUC (``xai_plugins.similarity``). Binary masks, boolean or
  0/1 floats, score as before.
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
from xai_plugins.similarity import auc_borji, auc_judd, auc_shuffled, auc_vs_mask, cc, kl_divergence, nss, sim


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
    return (
        torch.nn.functional.max_pool2d(masks.float().unsqueeze(1), k, stride=1, padding=tolerance).squeeze(1)
        > 0
    )


def fit_masks(masks: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
    """Boolean masks at the maps' resolution (nearest neighbour), on the CPU."""
    masks = masks.bool().cpu()
    if masks.shape[-2:] != maps.shape[-2:]:
        masks = (
            torch.nn.functional.interpolate(
                masks.float().unsqueeze(1), size=maps.shape[-2:], mode="nearest"
            ).squeeze(1)
            > 0.5
        )
    return masks


def target_kind(target: torch.Tensor) -> str:
    """ "points" (integer B x K x 2), "density" (float, not only 0/1) or "mask"."""
    if (
        target.dim() == 3
        and target.shape[-1] == 2
        and not target.dtype.is_floating_point
        and target.dtype != torch.bool
    ):
        return "points"
    if target.dtype.is_floating_point and not bool(((target == 0) | (target == 1)).all()):
        return "density"
    return "mask"


def fit_density(density: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
    """A non-negative density at the maps' resolution (area average when shrinking, bilinear else)."""
    density = density.float().cpu().clamp(min=0)
    if density.shape[-2:] != maps.shape[-2:]:
        shrink = density.shape[-1] >= maps.shape[-1]
        density = torch.nn.functional.interpolate(
            density.unsqueeze(1), size=maps.shape[-2:], mode="area" if shrink else "bilinear"
        ).squeeze(1)
    return density


def points_to_fixations(points: torch.Tensor, size: tuple[int, int], maps: torch.Tensor) -> torch.Tensor:
    """Boolean B x h x w fixation maps at the maps' resolution from (y, x) points given in pixels
    of an input of ``size``; rows with a negative coordinate are padding."""
    b, (h, w), (mh, mw) = points.shape[0], size, maps.shape[-2:]
    fix = torch.zeros(b, mh, mw, dtype=torch.bool)
    pts = points.long().cpu()
    valid = (pts >= 0).all(-1) & (pts[..., 0] < h) & (pts[..., 1] < w)
    idx = torch.nonzero(valid)
    ys = (pts[idx[:, 0], idx[:, 1], 0] * mh) // h
    xs = (pts[idx[:, 0], idx[:, 1], 1] * mw) // w
    fix[idx[:, 0], ys, xs] = True
    return fix


class Localization(Metric):
    """Pointing game and relevance mass against ground-truth object masks, and the review's
    Table 1 measures (SIM, PCC, AUC, KL) against the same masks; SIM, PCC, KL against a fixation
    density, NSS and the three AUCs against fixation points (module docstring).

    ``random_pointing`` and ``mask_fraction`` are what a map with no information scores: the
    expected pointing game of a uniformly random point and the relevance mass of a uniform map.
    """

    name = "localization"
    requires = ("masks",)
    higher_is_better = True
    params = {"tolerance": 0}

    def compute(self, context: MetricContext) -> dict[str, float]:
        maps = context.explanation.maps.float().cpu()
        kind = target_kind(context.masks)
        if kind == "density":
            density = fit_density(context.masks, maps)
            return {
                "sim": float(sim(maps, density).mean()),
                "pcc": float(cc(maps, density).mean()),
                "kl": float(kl_divergence(maps, density).mean()),
            }
        if kind == "points":
            fix = points_to_fixations(context.masks, tuple(context.inputs.shape[-2:]), maps)
            return {
                "nss": float(nss(maps, fix).mean()),
                "auc_judd": float(auc_judd(maps, fix).mean()),
                "auc_borji": float(auc_borji(maps, fix).mean()),
                "auc_shuffled": float(auc_shuffled(maps, fix).mean()),
            }
        masks = fit_masks(context.masks, maps)
        frac = masks.reshape(masks.shape[0], -1).float().mean(1)
        target = masks.float()
        return {
            "pointing_game": float(pointing_game(maps, masks, int(self.config["tolerance"])).mean()),
            "relevance_mass": float(relevance_mass(maps, masks).mean()),
            "random_pointing": float(frac.mean()),
            "mask_fraction": float(frac.mean()),
            "sim": float(sim(maps, target).mean()),
            "pcc": float(cc(maps, target).mean()),
            "auc": float(auc_vs_mask(maps, masks).mean()),
            "kl": float(kl_divergence(maps, target).mean()),
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
        return {
            "share": float(share.mean()),
            "share_max": float(share.max()),
            "share_exact": float(relevance_mass(maps, exact).mean()),
            "area": float(area.mean()),
            "ratio": float((share / area.clamp_min(1e-12)).mean()),
            "pointing": float(pointing_game(maps, regions).mean()),
            "tolerance": tol,
        }


@hookimpl
def xai_metrics():
    return [Localization, Shortcut]
