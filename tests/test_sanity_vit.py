"""MPRT (Adebayo et al. 2018, cascading model parameter randomization; the ``sanity`` metric's
curve) on a tiny timm ViT for Grad-CAM and attention rollout.

Expected shapes of the curves: Grad-CAM is class-specific, so randomizing the head already moves
it, and it ends near zero similarity; rollout is class-agnostic and reads only the attention
probabilities, so it stays identical (spearman 1) while the head, final norm and the last block's
MLP and output projection are randomized, drops once that block's q/k/v projection is, and is far
from the original at full randomization.
"""

from __future__ import annotations

import pytest
import torch
from tiny_architectures import build

from core.api import explain
from xai_plugins.metrics.sanity import parameter_randomization

timm = pytest.importorskip("timm")


def _curve(method: str):
    model = build("timm_vit")
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(5))

    def fn(m, xx, t):
        return explain(m, xx, t, method=method, progress=False)

    original = fn(model, x, None)
    curve = parameter_randomization(
        fn, model, x, original.targets, original, "cascading", similarities=("spearman",)
    )
    return dict(zip(curve.layers, curve.mean("spearman")))


def test_grad_cam_curve_falls_from_the_head_down():
    curve = _curve("grad_cam")
    layers = list(curve)
    assert layers[0] == "head" and layers[-1] == "patch_embed.proj"  # top down
    assert curve["head"] < 0.9  # class-specific
    assert abs(curve["patch_embed.proj"]) < 0.5  # fully randomized: unrelated to the original
    assert sum(abs(v) for v in list(curve.values())[-6:]) / 6 < 0.5


def test_rollout_curve_is_flat_until_the_attention_is_randomized():
    curve = _curve("attention_rollout")
    untouched = [
        "head",
        "norm",
        "blocks.1.mlp.fc2",
        "blocks.1.mlp.fc1",
        "blocks.1.norm2",
        "blocks.1.attn.proj",
    ]
    assert list(curve)[: len(untouched)] == untouched
    for name in untouched:
        assert curve[name] == pytest.approx(1.0, abs=1e-6), name
    assert curve["blocks.1.attn.qkv"] < 0.7
    assert abs(curve["patch_embed.proj"]) < 0.5
