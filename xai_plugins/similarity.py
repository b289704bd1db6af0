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


__all__ = [
    "ssim",
    "spearman",
    "SpearmanReference",
    "pearson",
    "hog_similarity",
    "sim",
    "cc",
    "nss",
    "dice_at_quantile",
    "dice_at_threshold",
    "kl_divergence",
    "auc_vs_mask",
    "auc_judd",
    "auc_borji",
    "auc_shuffled",
    "uniform_nonfixations",
    "SIMILARITIES",
]


def _batch(m: torch.Tensor) -> torch.Tensor:
    m = torch.as_tensor(m).detach().float().cpu()
    return m.unsqueeze(0) if m.dim() == 2 else m


def _check_pair(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.shape != b.shape or a.dim() != 3:
        raise ValueError(
            f"maps must both be B x H x W with the same shape, got {tuple(a.shape)} and {tuple(b.shape)}"
        )


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
    return hog(
        image, orientations=9, pixels_per_cell=(cell, cell), cells_per_block=(2, 2), feature_vector=True
    )


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
    (Judd et al.; the review's Table 1 "SIM"; pysaliency ``SIM``). Symmetric: ``sim(maps, density)``."""
    x, y = _pair(a, b)
    return torch.from_numpy(np.minimum(_distribution(x), _distribution(y)).sum(axis=1)).float()


def cc(maps: torch.Tensor, density: torch.Tensor) -> torch.Tensor:
    """CC (PCC), Pearson's linear correlation of a map with a fixation density, per image
    (Bylinskii et al. 2019, section 3.4; pysaliency ``CC``). A constant map scores 0 (pysaliency
    too); two equal constants score 1 where pysaliency gives NaN."""
    return pearson(maps, density)


def kl_divergence(maps: torch.Tensor, density: torch.Tensor, eps: float = 2.2204e-16) -> torch.Tensor:
    """KL(density || map) of the L1-normalized maps, as the MIT saliency benchmark
    (pysaliency ``MIT_KLDiv(map, density)``): sum_i Q_i log(eps + Q_i / (P_i + eps)) with Q the
    density (e.g. a gaze map or a mask), P the map. 0 for identical distributions, larger is worse."""
    p, q = _pair(maps, density)
    q, p = _distribution(q), _distribution(p)
    return torch.from_numpy((q * np.log(eps + q / (p + eps))).sum(axis=1)).float()


def _dice(bx: np.ndarray, by: np.ndarray) -> torch.Tensor:
    """Dice 2|A n B| / (|A| + |B|) of two N x P boolean arrays, per row; two empty sets score 1."""
    inter = (bx & by).sum(axis=1)
    size = bx.sum(axis=1) + by.sum(axis=1)
    return torch.from_numpy(np.where(size > 0, 2.0 * inter / np.maximum(size, 1), 1.0)).float()


def dice_at_quantile(a: torch.Tensor, b: torch.Tensor, q: float = 0.9) -> torch.Tensor:
    """Dice coefficient 2|A n B| / (|A| + |B|) of the maps binarized at their own ``q`` quantile
    (A = a >= quantile(a, q): the top 10 % for q = 0.9, whatever the values), per image."""
    x, y = _pair(a, b)
    fx, fy = x.reshape(x.shape[0], -1), y.reshape(y.shape[0], -1)
    return _dice(
        fx >= np.quantile(fx, q, axis=1, keepdims=True), fy >= np.quantile(fy, q, axis=1, keepdims=True)
    )


def dice_at_threshold(a: torch.Tensor, b: torch.Tensor, threshold: float = 0.9) -> torch.Tensor:
    """Dice coefficient of the [0, 1] maps binarized at a fixed value (A = a >= ``threshold``), per
    image: Galli et al. 2021 as the review describes it ("thresholding of importance map with 0.9 as
    the threshold value"). Two empty sets score 1."""
    x, y = _pair(a, b)
    return _dice(x.reshape(x.shape[0], -1) >= threshold, y.reshape(y.shape[0], -1) >= threshold)


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


def _fixations(maps: torch.Tensor, fixations: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    x, f = _pair(maps, fixations)
    n = x.shape[0]
    return x.reshape(n, -1), f.reshape(n, -1) > 0


def nss(maps: torch.Tensor, fixations: torch.Tensor) -> torch.Tensor:
    """NSS, the mean of the standardized map (zero mean, unit standard deviation, ddof 0 as
    pysaliency; the MIT code uses ddof 1) at the fixated pixels, per image (Peters et al. 2005;
    Bylinskii et al. 2019, section 3.3). A constant map scores 0."""
    x, fix = _fixations(maps, fixations)
    std = x.std(axis=1, keepdims=True)
    z = (x - x.mean(axis=1, keepdims=True)) / np.where(std > 0, std, 1.0)
    count = fix.sum(axis=1)
    return torch.from_numpy(np.where(count > 0, (z * fix).sum(axis=1) / np.maximum(count, 1), 0.0)).float()


def _auc_exact(positives: np.ndarray, negatives: np.ndarray) -> float:
    """Area under the ROC curve over every threshold: P(pos > neg) + P(pos = neg) / 2."""
    if positives.size == 0 or negatives.size == 0:
        return 0.5
    neg = np.sort(negatives)
    below = np.searchsorted(neg, positives, side="left")
    equal = np.searchsorted(neg, positives, side="right") - below
    return float((below + 0.5 * equal).sum() / (positives.size * neg.size))


def _auc_judd_one(positives: np.ndarray, negatives: np.ndarray) -> float:
    if positives.size == 0 or negatives.size == 0:
        return 0.5
    pos, neg = np.sort(positives), np.sort(negatives)
    top = max(pos[-1], neg[-1]) + 1
    bottom = min(pos[0], neg[0])
    thresholds = np.sort(np.concatenate([[top], positives, [bottom]]))[::-1]
    tpr = (pos.size - np.searchsorted(pos, thresholds, side="left")) / pos.size
    fpr = (neg.size - np.searchsorted(neg, thresholds, side="left")) / neg.size
    tpr, fpr = np.concatenate([[0.0], tpr]), np.concatenate([[0.0], fpr])
    return float(np.trapezoid(tpr, fpr))


def auc_judd(maps: torch.Tensor, fixations: torch.Tensor) -> torch.Tensor:
    """AUC-Judd: ROC of the map as a detector of fixated pixels against every unfixated pixel,
    thresholds at the map's values at the fixations (Judd et al. 2009; Bylinskii et al. 2019,
    section 3.1; pysaliency ``AUC_Judd(jitter=False)``: no random jitter, ties are kept)."""
    x, fix = _fixations(maps, fixations)
    return torch.tensor([_auc_judd_one(xi[fi], xi[~fi]) for xi, fi in zip(x, fix)], dtype=torch.float32)


def uniform_nonfixations(fixations: torch.Tensor, splits: int = 100, seed: int = 0) -> list[np.ndarray]:
    """The nonfixations of AUC-Borji: per image, ``splits`` x (number of fixations) flat pixel
    indices drawn uniformly with replacement (as the MIT code's randi), from a seeded generator."""
    f = _batch(fixations)
    rng = np.random.default_rng(seed)
    size = f.shape[-1] * f.shape[-2]
    return [rng.integers(0, size, size=(splits, int((fi > 0).sum()))) for fi in f]


def auc_borji(maps: torch.Tensor, fixations: torch.Tensor, splits: int = 100, seed: int = 0) -> torch.Tensor:
    """AUC-Borji: ROC of the map's values at the fixations against its values at as many pixels
    drawn uniformly (``uniform_nonfixations``), averaged over ``splits`` draws (Borji et al. 2013;
    Bylinskii et al. 2019, section 3.1). Every threshold, not the MIT code's steps of 0.1."""
    x, fix = _fixations(maps, fixations)
    draws = uniform_nonfixations(fixations, splits, seed)
    out = [
        np.mean([_auc_exact(xi[fi], xi[d]) for d in di]) if fi.any() else 0.5
        for xi, fi, di in zip(x, fix, draws)
    ]
    return torch.tensor(out, dtype=torch.float32)


def auc_shuffled(
    maps: torch.Tensor, fixations: torch.Tensor, other: torch.Tensor | None = None
) -> torch.Tensor:
    """Shuffled AUC: ROC of the map's values at the image's fixations against its values at the
    fixations of the other images of the batch (each counted as often as it occurs), which
    discounts centre bias (Zhang et al. 2008; Bylinskii et al. 2019, section 3.1; pysaliency
    ``AUC(nonfixations="shuffled")``, every threshold). ``other``: B x H x W fixation counts to
    use instead of the rest of the batch."""
    x, fix = _fixations(maps, fixations)
    counts = fix.astype(np.int64)
    pool = (
        counts.sum(axis=0, keepdims=True) - counts
        if other is None
        else _batch(other).numpy().reshape(x.shape[0], -1).astype(np.int64)
    )
    return torch.tensor(
        [
            _auc_exact(xi[fi], np.repeat(xi, np.maximum(ci, 0))) if fi.any() else 0.5
            for xi, fi, ci in zip(x, fix, pool)
        ],
        dtype=torch.float32,
    )


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
