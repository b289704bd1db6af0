"""Tiny, offline builds (random weights, 32 px, few channels and blocks) of the architectures users
register: torchvision and timm ViT, DeiT, Swin, ConvNeXt, EfficientNet, MobileNetV3, DenseNet,
RegNet, ResNet, VGG-BN and a CNN calling ``F.relu`` in its forward.

BatchNorm statistics are set from data (a few batches in train mode with ``momentum=None``, the
cumulative average), so that activations neither vanish nor explode as with the default 0/1
statistics; residual branches are not zero-initialized (timm's ``zero_init_last``) and ConvNeXt's
layer scale starts at 1, so every block takes part; transformer heads get a visible scale.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from conftest import FunctionalReLUCNN
from torch import nn
from torchvision.models.vgg import VGG, make_layers

SIZE = 32
CLASSES = 5


def calibrated(model: nn.Module, batches: int = 3) -> nn.Module:
    """Trained-like BatchNorm running statistics: the cumulative mean/variance over ``batches``
    batches of standard normal inputs, then eval mode."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None
    model.train()
    with torch.no_grad():
        for seed in range(batches):
            model(torch.randn(8, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed)))
    return model.eval()


def _scaled_head(model: nn.Module, head: nn.Linear, std: float = 0.5) -> nn.Module:
    nn.init.normal_(head.weight, std=std)  # torchvision starts ViT heads at zero, timm at std 0.02
    return model.eval()


# -- torchvision --------------------------------------------------------------------------------
def tv_vit() -> nn.Module:
    from torchvision.models.vision_transformer import VisionTransformer

    m = VisionTransformer(
        image_size=SIZE,
        patch_size=8,
        num_layers=2,
        num_heads=2,
        hidden_dim=32,
        mlp_dim=64,
        num_classes=CLASSES,
    )
    return _scaled_head(m, m.heads.head)


def tv_swin() -> nn.Module:
    from torchvision.models.swin_transformer import SwinTransformer

    return SwinTransformer(
        patch_size=[2, 2],
        embed_dim=16,
        depths=[1, 1],
        num_heads=[2, 2],
        window_size=[4, 4],
        num_classes=CLASSES,
    ).eval()


def tv_convnext() -> nn.Module:
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt

    return ConvNeXt(
        [CNBlockConfig(16, 32, 1), CNBlockConfig(32, None, 1)], layer_scale=1.0, num_classes=CLASSES
    ).eval()


def tv_efficientnet() -> nn.Module:
    from torchvision.models.efficientnet import EfficientNet, _efficientnet_conf

    settings, last = _efficientnet_conf("efficientnet_b0", width_mult=0.25, depth_mult=0.25)
    return calibrated(EfficientNet(settings, 0.2, last_channel=last, num_classes=CLASSES))


def tv_mobilenet_v3() -> nn.Module:
    import torchvision

    return calibrated(torchvision.models.mobilenet_v3_small(num_classes=CLASSES, width_mult=0.5))


def tv_densenet() -> nn.Module:
    from torchvision.models import DenseNet

    return calibrated(
        DenseNet(growth_rate=8, block_config=(2, 2), num_init_features=16, bn_size=2, num_classes=CLASSES)
    )


def tv_regnet() -> nn.Module:
    from torchvision.models.regnet import BlockParams, RegNet

    params = BlockParams.from_init_params(depth=4, w_0=8, w_a=8.0, w_m=2.0, group_width=8, se_ratio=0.25)
    return calibrated(RegNet(params, num_classes=CLASSES, stem_width=8))


def tv_resnet() -> nn.Module:
    from torchvision.models.resnet import BasicBlock, ResNet

    return calibrated(ResNet(BasicBlock, [1, 1, 1, 1], num_classes=CLASSES))


def tv_vgg_bn() -> nn.Module:
    """VGG with batch norms, few channels; the classifier keeps VGG's shape (7 x 7 adaptive pool, two
    hidden layers with dropout), narrower."""
    return calibrated(TinyVGG())


class TinyVGG(VGG):
    """torchvision's ``VGG`` (its own forward) on ``make_layers(..., batch_norm=True)``, narrow: VGG's
    constructor would first build its 120M-parameter classifier, so the fields are set here."""

    def __init__(self):
        nn.Module.__init__(self)
        self.features = make_layers([8, "M", 16, "M", 32, 32, "M"], batch_norm=True)
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Sequential(
            nn.Linear(32 * 7 * 7, 32),
            nn.ReLU(True),
            nn.Dropout(),
            nn.Linear(32, 32),
            nn.ReLU(True),
            nn.Dropout(),
            nn.Linear(32, CLASSES),
        )


def functional_relu_cnn() -> nn.Module:
    return FunctionalReLUCNN(CLASSES).eval()


# -- timm ---------------------------------------------------------------------------------------
def _timm(name: str, **kwargs) -> nn.Module:
    import timm

    return timm.create_model(name, pretrained=False, num_classes=CLASSES, **kwargs)


def timm_vit() -> nn.Module:
    m = _timm("vit_tiny_patch16_224", img_size=SIZE, patch_size=8, depth=2, embed_dim=32, num_heads=2)
    return _scaled_head(m, m.head)


def timm_deit() -> nn.Module:
    """DeiT with a distillation token (two prefix tokens; eval averages the two heads)."""
    m = _timm(
        "deit_tiny_distilled_patch16_224", img_size=SIZE, patch_size=8, depth=2, embed_dim=32, num_heads=2
    )
    _scaled_head(m, m.head)
    return _scaled_head(m, m.head_dist)


def timm_swin() -> nn.Module:
    return _timm(
        "swin_tiny_patch4_window7_224",
        img_size=SIZE,
        patch_size=2,
        embed_dim=16,
        depths=(1, 1),
        num_heads=(1, 2),
        window_size=4,
    ).eval()


def timm_convnext() -> nn.Module:
    """Stem patch 1 (timm needs four stages): the last stage is 4 x 4 at 32 px, not 1 x 1."""
    return _timm(
        "convnext_atto", depths=(1, 1, 1, 1), dims=(8, 16, 24, 32), ls_init_value=1.0, patch_size=1
    ).eval()


def timm_efficientnet() -> nn.Module:
    from timm.models.efficientnet import _gen_efficientnet

    return calibrated(
        _gen_efficientnet(
            "efficientnet_b0", channel_multiplier=0.25, depth_multiplier=0.25, num_classes=CLASSES
        )
    )


def timm_mobilenet_v3() -> nn.Module:
    from timm.models.mobilenetv3 import _gen_mobilenet_v3

    return calibrated(_gen_mobilenet_v3("mobilenetv3_small_100", 0.25, num_classes=CLASSES))


def timm_densenet() -> nn.Module:
    return calibrated(_timm("densenet121", growth_rate=8, block_config=(2, 2), bn_size=2))


def timm_regnet() -> nn.Module:
    from timm.models.regnet import RegNet, RegNetCfg

    cfg = RegNetCfg(depth=4, w0=8, wa=16.0, wm=1.5, group_size=8, se_ratio=0.25, stem_width=8)  # 4 stages
    return calibrated(RegNet(cfg, num_classes=CLASSES, zero_init_last=False))


def timm_resnet() -> nn.Module:
    from timm.models.resnet import BasicBlock, ResNet

    return calibrated(
        ResNet(
            BasicBlock,
            (1, 1, 1, 1),
            num_classes=CLASSES,
            channels=(8, 16, 32, 64),
            stem_width=8,
            zero_init_last=False,
        )
    )


ARCHITECTURES: dict[str, Callable[[], nn.Module]] = {
    "tv_vit": tv_vit,
    "timm_vit": timm_vit,
    "timm_deit": timm_deit,
    "tv_swin": tv_swin,
    "timm_swin": timm_swin,
    "tv_convnext": tv_convnext,
    "timm_convnext": timm_convnext,
    "tv_efficientnet": tv_efficientnet,
    "timm_efficientnet": timm_efficientnet,
    "tv_mobilenet_v3": tv_mobilenet_v3,
    "timm_mobilenet_v3": timm_mobilenet_v3,
    "tv_densenet": tv_densenet,
    "timm_densenet": timm_densenet,
    "tv_regnet": tv_regnet,
    "timm_regnet": timm_regnet,
    "tv_resnet": tv_resnet,
    "timm_resnet": timm_resnet,
    "tv_vgg_bn": tv_vgg_bn,
    "functional_relu_cnn": functional_relu_cnn,
}
TRANSFORMERS = ("tv_vit", "timm_vit", "timm_deit")  # global self-attention over tokens


def build(name: str, seed: int = 0) -> nn.Module:
    """The architecture ``name`` with weights seeded by ``seed``, in eval mode."""
    torch.manual_seed(seed)
    return ARCHITECTURES[name]()
