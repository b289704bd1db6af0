"""Layers of any layout (core.layers.spatial_view) and CAM methods on token transformers."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from core.api import explain
from core.errors import XAIError
from core.layers import spatial_view, token_grid

timm = pytest.importorskip("timm")


def tiny_torchvision_vit() -> nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=5
    )
    nn.init.normal_(model.heads.head.weight, std=0.5)  # torchvision starts the head at zero
    return model.eval()


def tiny_timm(name: str, **kwargs) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, num_classes=5, **kwargs).eval()


def tiny_timm_vit() -> nn.Module:
    return tiny_timm("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2)


def test_spatial_view_reads_every_layout():
    x = torch.arange(2 * 6 * 4 * 4, dtype=torch.float32).view(2, 6, 4, 4)
    assert spatial_view(x, (32, 32)) is x
    assert torch.equal(spatial_view(x.permute(0, 2, 3, 1), (32, 32)), x)
    tokens = x.flatten(2).transpose(1, 2)  # B x 16 x 6
    with_prefix = torch.cat([torch.full((2, 2, 6), -1.0), tokens], dim=1)  # class + distillation token
    assert token_grid(18, (32, 32)) == (2, 4, 4)
    assert torch.equal(spatial_view(with_prefix, (32, 32)), x)
    with pytest.raises(XAIError, match=r"layer 'head' outputs shape \(2, 5\)"):
        spatial_view(torch.zeros(2, 5), (32, 32), "head")


def _gradcam_reference(model, layer, x, targets, prefix):
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    def reshape_transform(t):  # pytorch-grad-cam's documented ViT transform
        t = t[:, prefix:]
        side = int(t.shape[1] ** 0.5)
        return t.reshape(t.shape[0], side, side, t.shape[2]).permute(0, 3, 1, 2)

    with GradCAM(model, [layer], reshape_transform=reshape_transform) as cam:
        return torch.tensor(cam(x, targets=[ClassifierOutputTarget(int(t)) for t in targets]))


@pytest.mark.parametrize(
    "build,layer_of,name",
    [
        (tiny_torchvision_vit, lambda m: m.encoder.layers[-1].ln_1, "encoder.layers.encoder_layer_1.ln_1"),
        (tiny_timm_vit, lambda m: m.blocks[-1].norm1, "blocks.1.norm1"),
    ],
)
def test_grad_cam_on_vit_matches_pytorch_grad_cam(build, layer_of, name):
    model = build()
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    exp = explain(model, x, method="grad_cam")
    assert exp.extras["layer"] == name  # the default: the last block's first norm
    ref = _gradcam_reference(model, layer_of(model), x, exp.targets, prefix=1)
    for i in range(x.shape[0]):
        assert exp.maps[i].std() > 0
        corr = torch.corrcoef(torch.stack([exp.maps[i].flatten(), ref[i].flatten()]))[0, 1]
        assert corr > 0.99, (i, float(corr))


def test_grad_cam_given_a_block_layer_by_name():
    model = tiny_torchvision_vit()
    x = torch.randn(2, 3, 32, 32)
    exp = explain(model, x, method="grad_cam", layer="encoder.layers.encoder_layer_0.ln_1")
    assert exp.extras["layer"] == "encoder.layers.encoder_layer_0.ln_1"
    assert torch.isfinite(exp.maps).all()


def test_cam_refuses_a_vit_and_accepts_a_gap_linear_model():
    with pytest.raises(XAIError, match="global average pooling"):
        explain(tiny_torchvision_vit(), torch.randn(2, 3, 32, 32), method="cam")
    from core.models import build_model

    exp = explain(build_model("deconvolve_cnn", 4).eval(), torch.randn(2, 3, 32, 32), method="cam")
    assert exp.extras["layer"] == "features" and exp.attributions.std() > 0


def test_swin_default_layer_is_its_last_stage():
    model = tiny_timm(
        "swin_tiny_patch4_window7_224",
        img_size=56,
        embed_dim=16,
        depths=(1, 1),
        num_heads=(1, 2),
        window_size=7,
    )
    x = torch.randn(2, 3, 56, 56)
    exp = explain(model, x, method="grad_cam")
    assert exp.extras["layer"] == "layers"  # the stages' container returns the last stage's output
    assert torch.isfinite(exp.maps).all() and exp.maps.std() > 0


def test_timm_checkpoint_loads_with_timms_preprocessing_and_explains_from_the_cli(tmp_path):
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from core.models import load_model, save_checkpoint, timm_preprocess

    kwargs = {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 32, "num_heads": 2}
    model = tiny_timm("vit_tiny_patch16_224", **kwargs)
    pre = timm_preprocess(model)
    assert pre.hw == (32, 32) and pre.mean == pytest.approx(list(model.pretrained_cfg["mean"]))
    path = save_checkpoint(
        tmp_path / "vit.pt", model, "timm:vit_tiny_patch16_224", pre, list("abcde"), arch_kwargs=kwargs
    )
    loaded = load_model(path)
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(loaded.model(x), model(x), atol=1e-5)
    assert loaded.preprocess == pre and loaded.arch == "timm:vit_tiny_patch16_224"

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "XAI_NO_PROGRESS": "1"}

    def xai(*args):
        return subprocess.run(
            [sys.executable, "-m", "core.cli", *map(str, args)],
            capture_output=True,
            text=True,
            env=env,
            cwd=root,
        )

    assert xai("data", "shapes", "--out", tmp_path / "data", "--n", "3", "--seed", "5").returncode == 0
    r = xai(
        "explain",
        "--model",
        path,
        "--images",
        tmp_path / "data" / "images",
        "--methods",
        "grad_cam,cam",
        "--out",
        tmp_path / "out",
    )
    assert "Traceback" not in r.stderr
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert "grad_cam" in json.dumps(results) and "global average pooling" in json.dumps(results)
