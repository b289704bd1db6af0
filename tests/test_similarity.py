"""Similarity functions: agreement with scipy / scikit-image / scikit-learn and their conventions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import pearsonr, spearmanr

from xai_plugins.similarity import (
    SIMILARITIES,
    auc_vs_mask,
    dice_at_quantile,
    hog_similarity,
    kl_divergence,
    pearson,
    sim,
    spearman,
    ssim,
)


@pytest.fixture
def maps():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(3, 24, 24, generator=g)
    b = 0.5 * a + 0.5 * torch.rand(3, 24, 24, generator=g)
    b[1] = torch.rand(24, 24, generator=g)
    a[2, :12] = 0.0  # ties, as ReLU'd maps have
    return a, b


def test_correlations_match_scipy(maps):
    a, b = maps
    for i in range(3):
        x, y = a[i].flatten().numpy(), b[i].flatten().numpy()
        assert spearman(a, b)[i] == pytest.approx(spearmanr(x, y)[0], abs=1e-5)
        assert pearson(a, b)[i] == pytest.approx(pearsonr(x, y)[0], abs=1e-5)
    signed = a - 0.5
    assert torch.allclose(spearman(signed, b, absolute=True), spearman(signed.abs(), b.abs()))
    assert not torch.allclose(spearman(signed, b, absolute=True), spearman(signed, b))


def test_identical_maps_score_perfectly_and_constants_follow_the_convention(maps):
    a, _ = maps
    for name, fn in SIMILARITIES.items():
        assert torch.allclose(fn(a, a), torch.ones(3), atol=1e-5), name
    zero = torch.zeros(2, 16, 16)
    other = torch.rand(2, 16, 16)
    assert spearman(zero, zero).tolist() == [1.0, 1.0]
    assert spearman(zero, other).tolist() == [0.0, 0.0]
    assert pearson(other, zero).tolist() == [0.0, 0.0]


def test_ssim_and_hog_match_skimage(maps):
    from skimage.feature import hog
    from skimage.metrics import structural_similarity

    a, b = maps
    ref = structural_similarity(a[0].double().numpy(), b[0].double().numpy(), win_size=7, data_range=1.0)
    assert ssim(a, b)[0] == pytest.approx(ref, abs=1e-5)
    ha = hog(a[1].double().numpy(), orientations=9, pixels_per_cell=(3, 3), cells_per_block=(2, 2))
    hb = hog(b[1].double().numpy(), orientations=9, pixels_per_cell=(3, 3), cells_per_block=(2, 2))
    assert hog_similarity(a, b)[1] == pytest.approx(pearsonr(ha, hb)[0], abs=1e-5)
    assert ssim(a, b)[0] > ssim(a, b)[1]  # b[0] is half a[0], b[1] unrelated


def test_sim_kl_dice_and_auc_on_known_cases():
    mask = torch.zeros(1, 10, 10)
    mask[0, :5] = 1.0
    inside = mask.clone()
    outside = 1 - mask
    assert sim(inside, mask).item() == pytest.approx(1.0)
    assert sim(outside, mask).item() == pytest.approx(0.0)
    assert sim(torch.ones(1, 10, 10), mask).item() == pytest.approx(0.5)
    assert kl_divergence(inside, mask).item() == pytest.approx(0.0, abs=1e-6)
    assert kl_divergence(torch.ones(1, 10, 10), mask).item() == pytest.approx(np.log(2), abs=1e-4)
    assert kl_divergence(outside, mask).item() > 10
    assert auc_vs_mask(inside + 0.01 * torch.rand(1, 10, 10), mask).item() == pytest.approx(1.0)
    assert auc_vs_mask(outside, mask).item() == pytest.approx(0.0)
    assert auc_vs_mask(torch.ones(1, 10, 10), mask).item() == pytest.approx(0.5)
    ramp = torch.arange(100.0).view(1, 10, 10)  # top 10 %: the last row
    assert dice_at_quantile(ramp, ramp.flip(-1)).item() == pytest.approx(1.0)  # same row, mirrored
    assert dice_at_quantile(ramp, ramp.flip(-2)).item() == pytest.approx(0.0)  # the first row
    half = ramp.clone()
    half[0, 9, 5:] = 0.0
    half[0, 8, :5] = 200.0  # half of the top set moved to another row
    assert dice_at_quantile(ramp, half).item() == pytest.approx(0.5)


def test_auc_matches_sklearn():
    from sklearn.metrics import roc_auc_score

    g = torch.Generator().manual_seed(1)
    scores = torch.rand(2, 12, 12, generator=g).round(decimals=1)  # with ties
    masks = torch.rand(2, 12, 12, generator=g) > 0.7
    for i in range(2):
        ref = roc_auc_score(masks[i].flatten().numpy(), scores[i].flatten().numpy())
        assert auc_vs_mask(scores, masks)[i].item() == pytest.approx(ref, abs=1e-6)
