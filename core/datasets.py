"""The `shapes` data set: seeded synthetic images with ground-truth masks, and its Clever Hans
variant whose class is given away by a planted watermark; plus loading a user's image folder.

Images are float tensors in [0, 1] (N x 3 x H x W); masks are boolean N x H x W. Ground truth makes
localization (pointing game, relevance mass) and shortcut detection measurable.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

CLASS_NAMES = ["circle", "square", "triangle", "cross"]
WATERMARK_FRACTION = 0.22  # side of the watermark box relative to the image side


@dataclass
class ShapesData:
    images: torch.Tensor  # N x 3 x H x W in [0, 1]
    labels: torch.Tensor  # N
    masks: torch.Tensor  # N x H x W bool: the object
    spurious: torch.Tensor  # N x H x W bool: the watermark box of the label's class
    class_names: list[str]
    watermark: str

    def __len__(self) -> int:
        return self.labels.numel()

    def subset(self, index: slice | torch.Tensor) -> ShapesData:
        return ShapesData(
            self.images[index],
            self.labels[index],
            self.masks[index],
            self.spurious[index],
            self.class_names,
            self.watermark,
        )


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A low-contrast textured background: smooth noise plus oriented stripes."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    base = rng.uniform(0.25, 0.6, size=3).astype(np.float32)
    angle = rng.uniform(0, math.pi)
    freq = rng.uniform(3, 8)
    stripes = 0.06 * np.sin(2 * math.pi * freq * (xx * math.cos(angle) + yy * math.sin(angle)))
    coarse = torch.from_numpy(rng.normal(0, 1, size=(1, 3, 4, 4)).astype(np.float32))
    up = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)[
        0
    ].numpy()
    noise = rng.normal(0, 0.03, size=(3, size, size)).astype(np.float32)
    return np.clip(base[:, None, None] + stripes[None] + 0.05 * up + noise, 0, 1)


def _shape_mask(kind: int, size: int, cx: float, cy: float, r: float, rot: float) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    dx, dy = xx - cx, yy - cy
    c, s = math.cos(rot), math.sin(rot)
    u, v = c * dx + s * dy, -s * dx + c * dy
    if kind == 0:  # circle
        return dx**2 + dy**2 <= r**2
    if kind == 1:  # square
        return (np.abs(u) <= r * 0.8) & (np.abs(v) <= r * 0.8)
    if kind == 2:  # triangle (pointing up in its own frame)
        h = r * 1.5
        top = -r
        within = (v >= top) & (v <= top + h)
        half_width = (v - top) / h * r
        return within & (np.abs(u) <= half_width)
    # cross
    arm = r * 0.33
    return ((np.abs(u) <= arm) & (np.abs(v) <= r)) | ((np.abs(v) <= arm) & (np.abs(u) <= r))


def watermark_box(label: int, size: int) -> tuple[int, int, int, int]:
    """(y0, y1, x0, x1) of the watermark of a class: one corner per class."""
    w = max(3, int(round(size * WATERMARK_FRACTION)))
    corner = label % 4
    y0 = 0 if corner in (0, 1) else size - w
    x0 = 0 if corner in (0, 2) else size - w
    return y0, y0 + w, x0, x0 + w


def _draw_watermark(img: np.ndarray, label: int, size: int) -> None:
    y0, y1, x0, x1 = watermark_box(label, size)
    img[:, y0:y1, x0:x1] = 1.0
    img[:, y0 + 1 : y1 - 1, x0 + 1 : x1 - 1] = 0.0
    cy, cx = (y0 + y1) // 2, (x0 + x1) // 2
    img[:, cy - 1 : cy + 1, cx - 1 : cx + 1] = 1.0


def make_shapes(
    n: int,
    size: int = 32,
    seed: int = 0,
    watermark: str = "none",
    agreement: float = 0.55,
    placement: str = "clear",
) -> ShapesData:
    """Generate ``n`` images of ``size`` px, classes balanced, fully determined by ``seed``.

    watermark:
      "none"     clean data; ``spurious`` still marks where the label's watermark would be.
      "agree"    every image carries its class's watermark and a matching shape (probe sets).
      "shortcut" Clever Hans training data: the watermark always gives the label away, while the
                 shape matches the label only with probability ``agreement`` (else a random shape),
                 so a model fits the labels only by looking at the watermark.

    placement:
      "clear"    the object stays clear of the four watermark corners (every training and probe
                 set): its centre falls in the middle third of the image, so a centre-bias map
                 is almost the object prior.
      "anywhere" the object may reach a border of a tenth of the side (clean images only): the
                 gaze comparison of the review's Table 1 (``bench.table1``) uses it, so that
                 a map must find the object rather than the centre to beat centre bias.
    The random stream does not depend on ``placement``: the same seed gives the same shapes,
    colours and backgrounds, only the object positions differ.
    """
    if watermark not in ("none", "agree", "shortcut"):
        raise ValueError(f"watermark must be none, agree or shortcut, not {watermark!r}")
    if placement not in ("clear", "anywhere"):
        raise ValueError(f"placement must be clear or anywhere, not {placement!r}")
    if placement == "anywhere" and watermark != "none":
        raise ValueError("placement='anywhere' needs watermark='none' (objects would cover the watermarks)")
    if size < 16:
        raise ValueError("shapes images need at least 16 px")
    rng = np.random.default_rng(seed)
    k = len(CLASS_NAMES)
    labels = np.arange(n) % k
    rng.shuffle(labels)
    images = np.empty((n, 3, size, size), dtype=np.float32)
    masks = np.zeros((n, size, size), dtype=bool)
    spurious = np.zeros((n, size, size), dtype=bool)
    margin_box = max(3, int(round(size * (WATERMARK_FRACTION if placement == "clear" else 0.1))))
    for i, label in enumerate(labels):
        img = _background(rng, size)
        kind = int(label)
        if watermark == "shortcut" and rng.uniform() > agreement:
            kind = int(rng.integers(k))
        r = rng.uniform(0.2, 0.3) * size
        lo, hi = margin_box + r * 0.6, size - margin_box - r * 0.6
        if hi <= lo:
            lo, hi = r, size - r
        cx, cy = rng.uniform(lo, hi), rng.uniform(lo, hi)
        mask = _shape_mask(kind, size, cx, cy, r, rng.uniform(-0.3, 0.3))
        color = rng.uniform(0, 1, size=3).astype(np.float32)
        bg_mean = img.mean(axis=(1, 2))
        if np.abs(color - bg_mean).max() < 0.35:  # keep the object visible
            color = np.where(bg_mean > 0.5, bg_mean - 0.45, bg_mean + 0.45).clip(0, 1)
        img[:, mask] = color[:, None] * 0.9 + img[:, mask] * 0.1
        y0, y1, x0, x1 = watermark_box(int(label), size)
        spurious[i, y0:y1, x0:x1] = True
        if watermark != "none":
            _draw_watermark(img, int(label), size)
        images[i], masks[i] = img, mask
    return ShapesData(
        torch.from_numpy(images),
        torch.from_numpy(labels).long(),
        torch.from_numpy(masks),
        torch.from_numpy(spurious),
        list(CLASS_NAMES),
        watermark,
    )


def iterate_batches(
    data: ShapesData | tuple[torch.Tensor, torch.Tensor],
    batch_size: int = 64,
    shuffle: bool = False,
    seed: int = 0,
):
    """Yield (images, labels) batches from a ShapesData or an (images, labels) pair."""
    images, labels = (data.images, data.labels) if isinstance(data, ShapesData) else data
    n = labels.shape[0]
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)) if shuffle else torch.arange(n)
    for start in range(0, n, batch_size):
        idx = order[start : start + batch_size]
        yield images[idx], labels[idx]
