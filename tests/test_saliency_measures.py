"""The saliency-benchmark measures of xai_plugins.similarity equal pysaliency's (Bylinskii et al. 2019)
on random continuous maps and fixations; localization reads densities and points, masks as before."""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest
import torch

from xai_plugins.similarity import (
    auc_borji,
    auc_judd,
    auc_shuffled,
    auc_vs_mask,
    cc,
    kl_divergence,
    nss,
    pearson,
    sim,
    uniform_nonfixations,
)


@pytest.fixture(scope="module")
def pysal():
    """pysaliency 0.2.22 (a test extra). It imports pkg_resources for its external data sets and
    calls np.trapz, both gone from today's setuptools/NumPy: two compatibility names, nothing else."""
    if "pkg_resources" not in sys.modules:
        try:
            import pkg_resources  # noqa: F401
        except ImportError:
            shim = types.ModuleType("pkg_resources")
            shim.resource_string = shim.resource_listdir = None
            sys.modules["pkg_resources"] = shim
    if not hasattr(np, "trapz"):
        np.trapz = np.trapezoid
    import pysaliency

    return pysaliency


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    b, h, w = 4, 20, 24
    maps = torch.rand(b, h, w, generator=g, dtype=torch.float64) ** 2
    density = torch.rand(b, h, w, generator=g, dtype=torch.float64) * maps + 0.1 * torch.rand(
        b, h, w, generator=g
    )
    fix = torch.zeros(b, h, w, dtype=torch.bool)
    for i in range(b):  # distinct pixels, more where the map is high
        idx = torch.multinomial(maps[i].flatten(), 15 + 5 * i, replacement=False, generator=g)
        fix[i].view(-1)[idx] = True
    return maps.float(), density.float(), fix


class _Maps:
    def __init__(self, pysaliency, maps):
        class Model(pysaliency.SaliencyMapModel):
            def _saliency_map(self, stimulus):
                return maps[int(stimulus[0, 0, 0])]

        self.model = Model(caching=False)
        self.stimuli = pysaliency.Stimuli(
            [np.full((*maps.shape[1:], 3), i, dtype=np.uint8) for i in range(len(maps))]
        )


def _pysal_fixations(pysaliency, fix):
    n, y, x = np.nonzero(fix.numpy())
    return pysaliency.Fixations.create_without_history(x.astype(float), y.astype(float), n)


def test_density_and_fixation_measures_equal_pysaliency(pysal, data):
    maps, density, fix = data
    m, d = maps.double().numpy(), density.double().numpy()
    for i in range(len(m)):
        ys, xs = np.nonzero(fix[i].numpy())
        assert sim(maps, density)[i].item() == pytest.approx(pysal.metrics.SIM(m[i], d[i]), abs=1e-6)
        assert cc(maps, density)[i].item() == pytest.approx(pysal.metrics.CC(m[i], d[i]), abs=1e-6)
        assert kl_divergence(maps, density)[i].item() == pytest.approx(
            pysal.metrics.MIT_KLDiv(m[i], d[i]), abs=1e-6
        )
        assert nss(maps, fix)[i].item() == pytest.approx(pysal.metrics.NSS(m[i], xs, ys).mean(), abs=1e-6)


def test_aucs_equal_pysaliency(pysal, data):
    maps, _, fix = data
    m = maps.double().numpy()
    wrapped, fixations = _Maps(pysal, m), _pysal_fixations(pysal, fix)
    judd = wrapped.model.AUC_per_image(
        wrapped.stimuli, fixations, nonfixations="unfixated", thresholds="fixations"
    )
    shuffled = wrapped.model.AUC_per_image(wrapped.stimuli, fixations, nonfixations="shuffled")
    assert np.allclose(auc_judd(maps, fix).double().numpy(), judd, atol=1e-6, rtol=0)
    assert np.allclose(auc_shuffled(maps, fix).double().numpy(), shuffled, atol=1e-6, rtol=0)
    # AUC-Borji samples its nonfixations: the same seeded draws, scored by pysaliency's ROC
    from pysaliency.roc import general_roc

    draws = uniform_nonfixations(fix, splits=7, seed=3)
    ours = auc_borji(maps, fix, splits=7, seed=3)
    for i in range(len(m)):
        flat, pos = m[i].ravel(), m[i][fix[i].numpy()]
        ref = np.mean([general_roc(pos, flat[d].astype(float), 0)[0] for d in draws[i]])
        assert ours[i].item() == pytest.approx(ref, abs=1e-6)
    assert not torch.equal(ours, auc_borji(maps, fix, splits=7, seed=4))  # the seed matters
    assert (auc_judd(maps, fix) > 0.6).all()  # fixations were drawn where the map is high


def test_measures_read_binary_masks_as_before():
    mask = torch.zeros(2, 10, 10)
    mask[:, :5] = 1.0
    g = torch.Generator().manual_seed(2)
    maps = torch.rand(2, 10, 10, generator=g)
    assert torch.allclose(cc(maps, mask), pearson(maps, mask))
    assert torch.allclose(auc_judd(mask + 0.0, mask.bool()), torch.ones(2))
    assert torch.allclose(
        auc_shuffled(maps, mask.bool(), other=torch.zeros(2, 10, 10)), torch.full((2,), 0.5)
    )
    assert nss(torch.ones(2, 10, 10), mask.bool()).tolist() == [0.0, 0.0]
    assert torch.allclose(auc_vs_mask(maps, mask), auc_borji(maps, mask.bool(), splits=300), atol=0.05)


def test_localization_takes_densities_points_and_masks():
    from core.plugin_api import MetricContext
    from xai_plugins.metrics.localization import Localization

    class Exp:
        maps = torch.zeros(2, 16, 16)

    Exp.maps[:, 4:8, 4:8] = 1.0
    mask = torch.zeros(2, 16, 16, dtype=torch.bool)
    mask[:, 4:8, 4:8] = True
    density = mask.float() * 0.8 + 0.01
    points = torch.tensor([[[5, 5], [6, 7], [-1, -1]], [[4, 4], [12, 12], [7, 7]]])
    metric = Localization()

    def run(target):
        return metric.compute(
            MetricContext(None, torch.zeros(2, 3, 16, 16), torch.zeros(2), Exp, masks=target)
        )

    as_mask, as_float = run(mask), run(mask.float())
    assert as_mask == as_float and as_mask["pcc"] == pytest.approx(1.0) and as_mask["pointing_game"] == 1.0
    d = run(density)
    assert (
        set(d) == {"sim", "pcc", "kl"}
        and d["pcc"] == pytest.approx(1.0, abs=1e-5)
        and d["sim"] == pytest.approx(16 * 0.81 / (16 * 0.81 + 240 * 0.01), abs=1e-5)
    )
    p = run(points)
    assert set(p) == {"nss", "auc_judd", "auc_borji", "auc_shuffled"}
    assert p["nss"] > 1.5 and p["auc_judd"] > 0.8
