"""Superimposing a filter's heat map on the image, two ways (DeConvolve, section 3.4.1, Fig. 5).

- proportionate: every pixel's intensity multiplied by the heat map value, so a pixel's opacity is
  proportional to its importance;
- encircled threshold: the heat map is smoothed (Gaussian, ``sigma`` px), the region above
  ``threshold`` of its maximum is kept at full intensity while the rest is dimmed (the image
  multiplied by the focus), and the region's boundary is drawn onto the image in a solid colour.
  The paper thresholds the product of the smoothed map and the image; we threshold the smoothed
  map alone, so dark objects are encircled as readily as bright ones.
All functions take B x 3 x H x W images and B x H x W heat maps in [0, 1] and are batched.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def proportionate(images: torch.Tensor, heat: torch.Tensor) -> torch.Tensor:
    return (images * heat.unsqueeze(1)).clamp(0, 1)


def smooth(heat: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of B x H x W maps (reflect padding)."""
    if sigma <= 0:
        return heat
    radius = max(1, int(math.ceil(2.5 * sigma)))
    radius = min(radius, heat.shape[-1] - 1, heat.shape[-2] - 1)
    if radius < 1:
        return heat
    t = torch.arange(-radius, radius + 1, dtype=heat.dtype, device=heat.device)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    x = heat.unsqueeze(1)
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="reflect"), k.view(1, 1, 1, -1))
    x = F.conv2d(F.pad(x, (0, 0, radius, radius), mode="reflect"), k.view(1, 1, -1, 1))
    return x.squeeze(1)


def focus_region(heat: torch.Tensor, threshold: float = 0.5, sigma: float = 1.0) -> torch.Tensor:
    """B x H x W bool: the smoothed map at or above ``threshold`` of its maximum (empty if flat zero)."""
    s = smooth(heat, sigma)
    top = s.flatten(1).amax(dim=1).view(-1, 1, 1)
    return (s >= threshold * top) & (top > 0)


def boundary(region: torch.Tensor, width: int = 1) -> torch.Tensor:
    """The inner boundary of a B x H x W bool region (pixels of the region next to its outside)."""
    r = region.float().unsqueeze(1)
    k = 2 * width + 1
    eroded = -F.max_pool2d(-F.pad(r, (width,) * 4, value=0.0), k, stride=1)
    return region & (eroded.squeeze(1) < 0.5)


def encircled(
    images: torch.Tensor,
    heat: torch.Tensor,
    threshold: float = 0.5,
    sigma: float = 1.0,
    colour: tuple[float, float, float] = (1.0, 0.1, 0.1),
    dim: float = 0.55,
) -> torch.Tensor:
    """The encircled threshold heat map: focus region at full intensity, the rest dimmed, the
    region's boundary drawn in ``colour`` (1 px per 64 px of image side)."""
    region = focus_region(heat, threshold, sigma)
    width = max(1, min(images.shape[-2:]) // 64)
    edge = boundary(region, width).unsqueeze(1)
    out = images * torch.where(
        region.unsqueeze(1), torch.ones_like(images[:, :1]), torch.full_like(images[:, :1], dim)
    )
    paint = torch.tensor(colour, dtype=images.dtype, device=images.device).view(1, 3, 1, 1).expand_as(out)
    return torch.where(edge, paint, out).clamp(0, 1)
