"""Similarity of explanation maps, image by image (the review's section 7 and its reference 46).

Every function takes two B x H x W maps (or H x W, treated as a batch of one) and returns a float
tensor of B values. Conventions shared by all of them:

- Correlations (Spearman, Pearson, HOG) of a constant map are undefined: two constant maps that
  are equal score 1 (nothing distinguishes them), otherwise a constant map scores 0 (it shares no
  ordering with the other). Quantus returns NaN there.
- Distribution measures (SIM, KL) first clamp maps at 0 and L1-normalize them; an all-zero map is
  read as the uniform distribution.

Used by the sanity checks (Adebayo et al. 2018: Spearman with and without absolute value, SSIM,
Pearson correlation of HOG features), robustness (Dice at the 0.9 quantile, Galli et al. 2021),
localization against masks (SIM, PCC, AUC, KL; review Table 1) and explanation drift.
"""

from __future__ import annotations

import numpy as np
import torch


def rankdata(values: np.ndarray, axis: int) -> np.ndarray:
    """``scipy.stats.rankdata``, imported on first use (1-2 s that most pipeline stages never need)."""
    from scipy.stats import rankdata as scipy_rankdata

    return scipy_rankdata(values, axis=axis)


__all__ = ["ssim", "spearman", "SpearmanReference", "pearson", "hog_similarity", "sim", "dice_at_quantile", "kl_divergence",
           "auc_vs_mask", "SIMILARITIES"]


def _batch(m: torch.Tensor) -> torch.Tensor:
    m = torch.as_tensor(m).detach().float().cpu()
    return m.unsqueeze(0) if m.dim() == 2 else m


def _check_pair(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.shape != b.shape or a.dim() != 3:
        raise ValueError(f"maps must both be B x H x W with the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")


def _pair(a: torch.Tensor, b: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    a, b = _batch(a), _batch(b)
    _check_pair(a, b)
    return a.numpy().astype(np.float64), b.numpy().astype(np.float64)


def _row_pearson(x: np.ndarray, y: np.ndarray) -> torch.Tensor:
    """Pearson correlation of each row of two B x N arrays, with the constant-map convention."""
    xc = x - x.mean(axis=1, keepdims=True)
    yc = y - y.mean(axis=1, keepdims=True)
    sx = np.sqrt((xc * xc).sum(axis=1))
    sy = np.sqrt((yc * yc).sum(axis=1))
    scale = np.maximum(np.abs(x).max(axis=1), np.abs(y).max(axis=1))
    tol = 1e-12 * np.maximum(scale, 1e-30) * np.sqrt(x.shape[1])
    const_x, const_y = sx <= tol, sy <= tol
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (xc * yc).sum(axis=1) / (sx * sy)
    both = const_x & const_y
    r = np.where(const_x | const_y, 0.0, r)
    r = np.where(both & np.all(np.isclose(x, y), axis=1), 1.0, r)
    return torch.from_numpy(np.clip(r, -1.0, 1.0)).float()


def spearman(a: torch.Tensor, b: torch.Tensor, absolute: bool = False) -> torch.Tensor:
    """Spearman rank correlation per image (ties get their average rank, as scipy.stats.spearmanr).

    ``absolute``: rank |a| and |b| (Adebayo et al.'s "with absolute value" variant)."""
    return SpearmanReference(a, absolute)(b)


class SpearmanReference:
    """Maps ranked once, then compared by Spearman correlation with any number of others (a sanity
    check compares one original explanation with dozens of randomized ones)."""

    def __init__(self, maps: torch.Tensor, absolute: bool = False):
        self.maps, self.absolute = _batch(maps), absolute
        self.ranks = self._ranks(self.maps.numpy().astype(np.float64))

    def _ranks(self, x: np.ndarray) -> np.ndarray:
        return average_ranks((np.abs(x) if self.absolute else x).reshape(x.shape[0], -1))

    def __call__(self, other: torch.Tensor) -> torch.Tensor:
        b = _batch(other)
        _check_pair(self.maps, b)
        return _row_pearson(self.ranks, self._ranks(b.numpy().astype(np.float64)))


def average_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 1..N within each row, ties sharing their average rank: ``scipy.stats.rankdata(values,
    axis=1)``. Ties are averaged, so the sort need not be stable: NumPy's vectorized quicksort is
    about 10x faster on maps than the merge sort ``rankdata`` uses (rows with NaN go to scipy)."""
    if values.size == 0 or np.isnan(values).any():
        return rankdata(values, axis=1)
    n = values.shape[1]
    order = np.argsort(values, axis=1)
    ordered = np.take_along_axis(values, order, axis=1)
    starts = np.ones(ordered.shape, dtype=bool)
    starts[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    ends = np.ones_like(starts)
    ends[:, :-1] = starts[:, 1:]
    pos = np.arange(n)
    first = np.maximum.accumulate(np.where(starts, pos, 0), axis=1)  # first sorted position of each tie group
    last = (n - 1) - np.maximum.accumulate(np.where(ends, n - 1 - pos, 0)[:, ::-1], axis=1)[:, ::-1]
    ranks = np.empty(values.shape, dtype=np.float64)
    np.put_along_axis(ranks, order, (first + last) / 2.0 + 1.0, axis=1)
    return ranks


def pearson(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pearson correlation coefficient (PCC) of the pixel values, per image."""
    x, y = _pair(a, b)
    n = x.shape[0]
    return _row_pearson(x.reshape(n, -1), y.reshape(n, -1))


def _data_range(x: np.ndarray, y: np.ndarray) -> float:
    lo, hi = min(x.min(), y.min()), max(x.max(), y.max())
    if lo >= 0 and hi <= 1:
        return 1.0  # maps in [0, 1], as Explanation.maps
    return float(max(hi - lo, 1e-12))


def ssim(a: torch.Tensor, b: torch.Tensor, win_size: int = 7) -> torch.Tensor:
    """Structural similarity (Wang et al. 2004) per image, skimage's implementation (Gaussian-free
    7 x 7 window, as Adebayo et al. used). ``data_range`` is 1 for maps in [0, 1], else the joint
    range of the pair. Images smaller than the window use the largest odd window that fits."""
    from skimage.metrics import structural_similarity

    x, y = _pair(a, b)
    win = min(win_size, min(x.shape[1:]) - (1 - min(x.shape[1:]) % 2))
    if win < 3:
        raise ValueError("SSIM needs maps of at least 3 x 3 pixels")
    out = []
    for xi, yi in zip(x, y):
        if np.array_equal(xi, yi):
            out.append(1.0)
            continue
        out.append(float(structural_similarity(xi, yi, win_size=win, data_range=_data_range(xi, yi))))
    return torch.tensor(out, dtype=torch.float32)


def _hog(image: np.ndarray) -> np.ndarray:
    from skimage.feature import hog

    side = min(image.shape)
    cell = int(min(8, max(2, side // 8)))
    return hog(image, orientations=9, pixels_per_cell=(cell, cell), cells_per_block=(2, 2), feature_vector=True)


def hog_similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pearson correlation of the HOG features (Dalal & Triggs; skimage.feature.hog, 9 orientations,
    cells of min(8, side // 8) px, 2 x 2 blocks) of the two maps, per image (Adebayo et al.)."""
    x, y = _pair(a, b)
    hx = np.stack([_hog(m) for m in x])
    hy = np.stack([_hog(m) for m in y])
    return _row_pearson(hx, hy)


def _distribution(x: np.ndarray) -> np.ndarray:
    flat = np.clip(x.reshape(x.shape[0], -1), 0, None)
    total = flat.sum(axis=1, keepdims=True)
    uniform = np.full_like(flat, 1.0 / flat.shape[1])
    return np.where(total > 0, flat / np.where(total > 0, total, 1.0), uniform)


def sim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """SIM, histogram intersection of the L1-normalized maps: sum_i min(P_i, Q_i), in [0, 1]
    (Judd et al.; the review's Table 1 "SIM")."""
    x, y = _pair(a, b)
    return torch.from_numpy(np.minimum(_distribution(x), _distribution(y)).sum(axis=1)).float()


def kl_divergence(target: torch.Tensor, prediction: torch.Tensor, eps: float = 2.2204e-16) -> torch.Tensor:
    """KL(target || prediction) of the L1-normalized maps, as the MIT saliency benchmark:
    sum_i Q_i log(eps + Q_i / (P_i + eps)) with Q the target (e.g. a mask), P the prediction.
    0 for identical distributions, larger is worse."""
    q, p = _pair(target, prediction)
    q, p = _distribution(q), _distribution(p)
    return torch.from_numpy((q * np.log(eps + q / (p + eps))).sum(axis=1)).float()


def dice_at_quantile(a: torch.Tensor, b: torch.Tensor, q: float = 0.9) -> torch.Tensor:
    """Dice coefficient 2|A n B| / (|A| + |B|) of the maps binarized at their own ``q`` quantile
    (A = a >= quantile(a, q)), per image (Galli et al. 2021 use q = 0.9). Two empty sets score 1."""
    x, y = _pair(a, b)
    n = x.shape[0]
    fx, fy = x.reshape(n, -1), y.reshape(n, -1)
    bx = fx >= np.quantile(fx, q, axis=1, keepdims=True)
    by = fy >= np.quantile(fy, q, axis=1, keepdims=True)
    inter = (bx & by).sum(axis=1)
    size = bx.sum(axis=1) + by.sum(axis=1)
    return torch.from_numpy(np.where(size > 0, 2.0 * inter / np.maximum(size, 1), 1.0)).float()


def auc_vs_mask(maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Area under the ROC curve of the map's values as scores for "pixel is in the mask", per image
    (Mann-Whitney U with average ranks for ties; 0.5 is chance). An image whose mask is empty or
    full has no ROC curve and scores 0.5."""
    x, m = _pair(maps, masks)
    n = x.shape[0]
    scores, pos = x.reshape(n, -1), m.reshape(n, -1) > 0.5
    ranks = rankdata(scores, axis=1)
    n_pos = pos.sum(axis=1).astype(np.float64)
    n_neg = pos.shape[1] - n_pos
    u = (ranks * pos).sum(axis=1) - n_pos * (n_pos + 1) / 2
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = u / (n_pos * n_neg)
    return torch.from_numpy(np.where((n_pos > 0) & (n_neg > 0), auc, 0.5)).float()


def _spearman_abs(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return spearman(a, b, absolute=True)


SIMILARITIES = {
    "spearman": spearman,
    "spearman_abs": _spearman_abs,
    "pearson": pearson,
    "ssim": ssim,
    "hog": hog_similarity,
    "sim": sim,
    "dice90": dice_at_quantile,
}
"""Name -> symmetric similarity of two maps (higher: more similar), used by name in metric params."""
