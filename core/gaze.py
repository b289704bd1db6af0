"""Synthetic gaze for `shapes`: where a simulated observer looks in each image, as fixation points,
a boolean fixation map and a fixation density map (the review's Table 1 compares explanations with
human gaze maps by SIM and PCC; `shapes` has no human observers, so this stands in for them).

The observer model, one image at a time, from its own seeded generator (``make_shapes`` and the
data it generates are untouched):

- a share ``on_object`` of the fixations lands on the object, drawn inside its mask with a weight
  that falls off from the object's centroid (people fixate the centre of an object first);
- the rest lands on salient clutter: pixels outside the object drawn in proportion to the squared
  local contrast of the image (gradient magnitude of the grey image), so stripes, texture edges and
  a watermark draw the eye, flat background does not;
- the density is the fixation count map blurred by a Gaussian of ``sigma`` pixels (about one degree
  of visual angle in the saliency benchmarks; default 1/20 of the side) and normalized to sum 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from core.datasets import ShapesData


@dataclass
class Gaze:
    points: torch.Tensor  # N x K x 2 long, (y, x) pixel of each fixation
    fixations: torch.Tensor  # N x H x W bool: fixated at least once
    density: torch.Tensor  # N x H x W float, sums to 1 per image


def _contrast(image: np.ndarray) -> np.ndarray:
    grey = image.mean(axis=0)
    gy, gx = np.gradient(grey)
    return gy**2 + gx**2


def _blur(counts: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = max(1, int(round(3 * sigma)))
    t = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-(t**2) / (2 * sigma**2))
    k = (k / k.sum()).float()
    x = counts.unsqueeze(1)
    x = torch.nn.functional.conv2d(
        torch.nn.functional.pad(x, (radius, radius, 0, 0), mode="reflect"), k.view(1, 1, 1, -1)
    )
    x = torch.nn.functional.conv2d(
        torch.nn.functional.pad(x, (0, 0, radius, radius), mode="reflect"), k.view(1, 1, -1, 1)
    )
    return x.squeeze(1)


def _draw(rng: np.random.Generator, weights: np.ndarray, n: int) -> np.ndarray:
    flat = weights.ravel()
    total = flat.sum()
    p = flat / total if total > 0 else np.full(flat.size, 1.0 / flat.size)
    return rng.choice(flat.size, size=n, replace=True, p=p)


def shapes_gaze(
    data: ShapesData, fixations: int = 30, on_object: float = 0.75, sigma: float | None = None, seed: int = 0
) -> Gaze:
    """Simulated gaze for every image of ``data`` (module docstring), fully determined by ``seed``."""
    if not 0.0 <= on_object <= 1.0 or fixations < 1:
        raise ValueError("shapes_gaze needs fixations >= 1 and 0 <= on_object <= 1")
    rng = np.random.default_rng(seed)
    n, _, h, w = data.images.shape
    sigma = float(sigma if sigma is not None else max(1.0, min(h, w) / 20))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    points = np.zeros((n, fixations, 2), dtype=np.int64)
    images, masks = data.images.numpy(), data.masks.numpy()
    for i in range(n):
        mask = masks[i]
        k_obj = int(rng.binomial(fixations, on_object)) if mask.any() else 0
        cy, cx = (yy[mask].mean(), xx[mask].mean()) if mask.any() else (h / 2, w / 2)
        spread = max(1.0, np.sqrt(mask.sum() / np.pi))
        on = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * spread**2)) * mask
        off = _contrast(images[i]) * ~mask
        idx = np.concatenate([_draw(rng, on, k_obj), _draw(rng, off, fixations - k_obj)])
        points[i, :, 0], points[i, :, 1] = idx // w, idx % w
    counts = torch.zeros(n, h * w)
    pts = torch.from_numpy(points)
    counts.scatter_add_(1, pts[..., 0] * w + pts[..., 1], torch.ones(n, fixations))
    counts = counts.view(n, h, w)
    density = _blur(counts, sigma).clamp(min=0)
    density = density / density.flatten(1).sum(1).view(-1, 1, 1)
    return Gaze(pts, counts > 0, density)
