"""Robustness: explanations of adversarial inputs (FGSM, DeepFool) and max-sensitivity."""

from __future__ import annotations

import pytest
import torch

from core.api import explain
from core.workflow import run
from xai_plugins import MetricContext
from xai_plugins.metrics.robustness import Robustness, max_sensitivity


@pytest.fixture(scope="module")
def robustness_run(trained_cnn, shapes_probe):
    probe = shapes_probe.subset(slice(0, 16))
    state = {k: v.clone() for k, v in trained_cnn.model.state_dict().items()}
    results = run(
        trained_cnn.model,
        trained_cnn.preprocess.normalize(probe.images),
        ["saliency", "grad_cam"],
        metrics=["robustness"],
        reporters=[],
        progress=False,
        metric_params={"robustness": {"max_iter": 20, "samples": 4}},
    )
    for k, v in trained_cnn.model.state_dict().items():
        assert torch.equal(v, state[k])
    return results


def test_adversarial_figures(robustness_run):
    assert not robustness_run.failures
    for method in ("saliency", "grad_cam"):
        m = robustness_run.metrics[method]
        for attack in ("fgsm", "deepfool"):
            for key in ("dice90", "spearman", "ssim"):
                assert -1.0 <= m[f"robustness.{attack}.{key}"] <= 1.0
            assert m[f"robustness.{attack}.perturbation"] > 0
        assert m["robustness.deepfool.fooling_rate"] > 0.5  # DeepFool moves past the boundary
        assert m["robustness.deepfool.dice90"] < 1.0  # the explanation moved too


def test_gradient_maps_are_less_stable_than_grad_cam(robustness_run):
    """Gradient shattering (the review's section 7.1): saliency reacts more to small noise."""
    sal, cam = robustness_run.metrics["saliency"], robustness_run.metrics["grad_cam"]
    assert sal["robustness.max_sensitivity"] > cam["robustness.max_sensitivity"]
    assert sal["robustness.max_sensitivity"] > 0


def test_no_change_means_perfect_scores(trained_cnn, shapes_probe):
    model = trained_cnn.model
    x = trained_cnn.preprocess.normalize(shapes_probe.images[:4])
    exp = explain(model, x, method="saliency", progress=False)

    def fn(m, xx, tt):
        return explain(m, xx, tt, method="saliency", progress=False)

    assert max_sensitivity(fn, model, x, exp.targets, exp.maps, noise=0.0, samples=2).abs().max() < 1e-6
    ctx = MetricContext(model, x, exp.targets, exp, explain_fn=fn)
    out = Robustness(attacks=["fgsm"], epsilon=0.0, samples=0).compute(ctx)
    assert out["fgsm.dice90"] == pytest.approx(1.0)
    assert out["fgsm.spearman"] == pytest.approx(1.0) and out["fgsm.fooling_rate"] == 0.0
    assert "max_sensitivity" not in out


def test_dice_at_threshold_and_at_quantile_are_different_cuts():
    from xai_plugins.metrics.robustness import compare_maps
    from xai_plugins.similarity import dice_at_quantile, dice_at_threshold

    g = torch.Generator().manual_seed(0)
    a = torch.rand(2, 20, 20, generator=g) * 0.5  # nothing reaches 0.9
    b = a.clone()
    a[:, :10] += 0.45  # half of a is >= 0.9 only where the noise is high; b has no value >= 0.9
    # at the value 0.9: a has pixels, b none -> no overlap; at the quantile both keep their top 10 %
    assert dice_at_threshold(a, b, 0.9).max() == 0.0
    assert (dice_at_threshold(b, b, 0.9) == 1.0).all()  # two empty sets
    assert (dice_at_quantile(a, b, 0.9) > 0).all()
    bx = a.flatten(1) >= 0.9
    by = (b + 0.45).flatten(1) >= 0.9
    expect = 2 * (bx & by).sum(1) / (bx.sum(1) + by.sum(1))
    assert torch.allclose(dice_at_threshold(a, b + 0.45, 0.9), expect.float())
    out = compare_maps(a, b)
    assert torch.equal(out["dice90"], out["dice_threshold"])
    assert torch.equal(compare_maps(a, b, dice="quantile")["dice90"], out["dice_quantile"])
    with pytest.raises(ValueError, match="dice"):
        compare_maps(a, b, dice="median")
