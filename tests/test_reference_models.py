"""The shipped data and reference models: `shapes` is seeded, the CNN learns it, and Grad-CAM
points at the objects clearly more often than chance."""

from __future__ import annotations

import torch

from core.api import explain
from core.datasets import make_shapes
from core.models import build_model
from core.train import evaluate
from xai_plugins.metrics.localization import pointing_game


def test_shapes_is_seeded_and_masks_fit():
    a = make_shapes(8, size=32, seed=5)
    b = make_shapes(8, size=32, seed=5)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.images, make_shapes(8, size=32, seed=6).images)
    assert a.images.shape == (8, 3, 32, 32) and 0 <= float(a.images.min()) and float(a.images.max()) <= 1
    frac = a.masks.float().mean(dim=(1, 2))
    assert bool(((frac > 0.03) & (frac < 0.4)).all())
    hans = make_shapes(8, size=32, seed=5, watermark="agree")
    # the watermark is drawn inside the spurious box and nowhere else
    diff = (hans.images - make_shapes(8, size=32, seed=5).images).abs().sum(1) > 0
    assert bool((diff & ~hans.spurious).sum() == 0) and bool(diff.any())


def test_trained_cnn_is_accurate(trained_cnn, shapes_probe):
    acc = evaluate(trained_cnn.model, shapes_probe.images, shapes_probe.labels, trained_cnn.preprocess)
    assert acc > 0.9, f"held-out accuracy {acc:.2%}"
    assert trained_cnn.meta["accuracy"] > 0.9


def test_grad_cam_points_at_objects(trained_cnn, shapes_probe):
    x = trained_cnn.preprocess.normalize(shapes_probe.images)
    exp = explain(trained_cnn.model, x, method="grad_cam")
    hits = float(pointing_game(exp.maps, shapes_probe.masks).mean())
    chance = float(shapes_probe.masks.float().mean())
    assert hits > chance + 0.3, (hits, chance)


def test_resnet18_small_runs_with_batchnorm_and_reused_relu():
    model = build_model("resnet18", 4).eval()
    x = torch.randn(2, 3, 32, 32)
    exp = explain(model, x, method="grad_cam")
    assert exp.params["layer"] == "layer4" and exp.maps.shape == (2, 32, 32)
