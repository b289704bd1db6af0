"""LRP on transformers and modern CNNs (issue 17): AttnLRP (``composite="attn_lrp"``) against LXT and
its conservation, the default composite's conservation on EfficientNet, DenseNet, ConvNeXt, Swin,
ResNet, refusals in one line. Tiny random models (32 px, BatchNorm statistics set from data).

Conservation is measured with ``zero_bias`` (biases and normalization shifts take no share), as in
``test_relevance.py``; what the rules themselves absorb is reported in ``extras["absorbed_relevance"]``:
relevance reaching constant inputs concatenated with the activations (class tokens) and the bias term
of AttnLRP's softmax rule (Eq. 13), which is not conservative by design.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bench.suite_attn_lrp import lxt_attn_lrp, lxt_relevance
from core.api import explain
from xai_plugins import InputError
from xai_plugins.explainers.relevance import lrp_relevance
from xai_plugins.explainers.relevance.composites import make_composite

timm = pytest.importorskip("timm")

from tiny_architectures import calibrated  # noqa: E402


def tv_vit() -> nn.Module:
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    m = VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=5
    )
    nn.init.normal_(m.heads.head.weight, std=0.2)  # torchvision initializes the head to zero
    return m.eval()


def timm_vit(fused: bool, class_token: bool = True) -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    m = VisionTransformer(
        img_size=32,
        patch_size=8,
        embed_dim=32,
        depth=2,
        num_heads=2,
        mlp_ratio=2,
        num_classes=5,
        class_token=class_token,
        global_pool="token" if class_token else "avg",
    )
    for block in m.blocks:
        block.attn.fused_attn = fused
    return m.eval()


def efficientnet() -> nn.Module:
    from torchvision.models.efficientnet import EfficientNet, _efficientnet_conf

    torch.manual_seed(0)
    settings, last = _efficientnet_conf("efficientnet_b0", width_mult=0.25, depth_mult=0.25)
    return calibrated(EfficientNet(settings, 0.2, last_channel=last, num_classes=5))


def densenet() -> nn.Module:
    from torchvision.models import DenseNet

    torch.manual_seed(0)
    return calibrated(
        DenseNet(growth_rate=8, block_config=(2, 2), num_init_features=16, bn_size=2, num_classes=5)
    )


def convnext() -> nn.Module:
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt

    torch.manual_seed(0)
    return ConvNeXt([CNBlockConfig(16, 32, 1), CNBlockConfig(32, None, 1)], num_classes=5).eval()


def swin() -> nn.Module:
    from torchvision.models.swin_transformer import SwinTransformer

    torch.manual_seed(0)
    return SwinTransformer(
        patch_size=[2, 2], embed_dim=16, depths=[1, 1], num_heads=[2, 2], window_size=[4, 4], num_classes=5
    ).eval()


def resnet() -> nn.Module:
    import torchvision

    torch.manual_seed(0)
    return calibrated(torchvision.models.resnet18(num_classes=5))


def mobilenet() -> nn.Module:
    import torchvision

    torch.manual_seed(0)
    return calibrated(torchvision.models.mobilenet_v3_small(num_classes=5))


def _x() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def _run(model: nn.Module, composite: str, zero_bias: bool = True, x: torch.Tensor | None = None):
    x = _x() if x is None else x
    logits = model(x).detach()
    targets = logits.argmax(1)
    logit = logits.gather(1, targets.view(-1, 1)).squeeze(1)
    config = {"zero_bias": zero_bias, "epsilon": 1e-9 if zero_bias else 1e-6}
    relevance, extras = lrp_relevance(
        model,
        x,
        targets,
        make_composite(None, composite, config),
        zero_bias=zero_bias,
        stabilizer=1e-9 if zero_bias else 1e-6,
    )
    return relevance, extras, logit, targets


def _ratio(relevance: torch.Tensor, logit: torch.Tensor) -> torch.Tensor:
    return relevance.flatten(1).sum(1) / logit


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1])


# -- AttnLRP: conservation -----------------------------------------------------------------------
@pytest.mark.parametrize("fused", [True, False])
def test_attn_lrp_conserves_on_vit(fused):
    """A timm ViT with average pooling (no class token): input relevance = the logit within 5 %, the
    fused (scaled_dot_product_attention) and the explicit attention path give the same map."""
    model = timm_vit(fused, class_token=False)
    relevance, extras, logit, _ = _run(model, "attn_lrp")
    ratio = _ratio(relevance, logit)
    assert torch.all((ratio - 1).abs() < 0.05), ratio
    other, *_ = _run(timm_vit(not fused, class_token=False), "attn_lrp")
    assert torch.allclose(relevance, other, rtol=1e-3, atol=1e-5 * float(relevance.abs().max()))


@pytest.mark.parametrize(
    "make",
    [tv_vit, lambda: timm_vit(True), lambda: timm_vit(False)],
    ids=["torchvision", "timm_fused", "timm_unfused"],
)
def test_attn_lrp_accounts_for_class_token_and_softmax(make):
    """With a class token, relevance left on it at the bottom and the softmax rule's bias term are
    reported; input + both = the logit (nothing else is lost or created, within 1 %)."""
    relevance, extras, logit, _ = _run(make(), "attn_lrp")
    absorbed = extras["absorbed_relevance"]
    assert set(absorbed) == {"constants", "softmax"}
    total = relevance.flatten(1).sum(1) + absorbed["constants"] + absorbed["softmax"]
    assert torch.allclose(total, logit, rtol=1e-2, atol=0), (total, logit)
    assert float(absorbed["softmax"].abs().max()) > 1e-3 * float(logit.abs().min())  # not trivially zero


def test_attn_lrp_conserves_on_swin():
    """torchvision's Swin (windowed attention with relative position bias and shift masks)."""
    relevance, _, logit, _ = _run(swin(), "attn_lrp")
    assert torch.all((_ratio(relevance, logit) - 1).abs() < 0.05)


# -- AttnLRP against LXT ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "make",
    [tv_vit, lambda: timm_vit(True), lambda: timm_vit(False)],
    ids=["torchvision", "timm_fused", "timm_unfused"],
)
def test_attn_lrp_matches_lxt(make):
    """Same model and input: our ``attn_lrp`` (epsilon 1e-6, biases in the rules, as LXT's gradient x
    input) and LXT's AttnLRP correlate > 0.99 per image."""
    model = make()
    x = _x()
    exp = explain(model, x, None, method="lrp", composite="attn_lrp", progress=False)
    pytest.importorskip("lxt")
    ref = lxt_relevance(lxt_attn_lrp(model), x, exp.targets)
    for i in range(x.shape[0]):
        assert _corr(exp.attributions[i], ref[i]) > 0.99


@pytest.mark.parametrize(
    "make",
    [tv_vit, lambda: timm_vit(True), lambda: timm_vit(False), swin, convnext],
    ids=["torchvision_vit", "timm_fused", "timm_unfused", "swin", "convnext"],
)
def test_attn_lrp_gradient_domain_equals_the_relevance_domain(make):
    """``attn_lrp`` with its defaults runs as modified gradients (``gradient_domain.py``, fused
    attention included); carrying relevance explicitly through every operation gives the same maps
    (the domains differ only where a layer output is within ~1e-5 of zero: epsilon's 1e-6) and the
    same softmax bias term, in float64 so that rounding does not blur the comparison."""
    from xai_plugins.explainers.relevance.lrp import gradient_domain_applies, lrp

    composite = make_composite(None, "attn_lrp", {})
    assert gradient_domain_applies(composite, True, 1e-6, False)
    assert not gradient_domain_applies(composite, True, 1e-6, True)  # zero_bias: explicit
    assert not gradient_domain_applies(make_composite(None, "attn_lrp", {"epsilon": 0.25}), True, 1e-6, False)
    assert not gradient_domain_applies(make_composite(None, "epsilon_gamma_box", {}), True, 1e-6, False)
    model, x = make().double(), _x().double()
    logits = model(x).detach()
    targets = logits.argmax(1)
    scale = logits.max(1).values.abs()  # sums compared against the explained logit
    fast, fast_extras = lrp(model, x, targets, composite)
    slow, slow_extras = lrp(model, x, targets, composite, gradient=False)
    for i in range(x.shape[0]):
        assert _corr(fast[i], slow[i]) > 0.995
    gap = (fast.flatten(1).sum(1) - slow.flatten(1).sum(1)).abs() / scale
    assert torch.all(gap < 5e-3), gap
    for kind, value in slow_extras["absorbed_relevance"].items():
        gap = (fast_extras["absorbed_relevance"][kind] - value).abs() / scale
        assert torch.all(gap < 5e-3), (kind, gap)


# -- modern CNNs: the default composite -----------------------------------------------------------
@pytest.mark.parametrize(
    "make",
    [efficientnet, densenet, convnext, resnet, swin],
    ids=["efficientnet", "densenet", "convnext", "resnet18", "swin"],
)
def test_default_composite_conserves(make):
    """epsilon_gamma_box without biases: SE gates (EfficientNet), SiLU, stochastic depth, concatenation
    and pre-activation batch norms (DenseNet), LayerNorm2d and layer scale (ConvNeXt), residual adds."""
    relevance, _, logit, _ = _run(make(), "epsilon_gamma_box")
    ratio = _ratio(relevance, logit)
    assert torch.all((ratio - 1).abs() < 0.05), ratio


def test_mobilenet_v3_in_place_hardswish_runs():
    """MobileNetV3 (in-place Hardswish / Hardsigmoid, SE) no longer fails with autograd's in-place error."""
    model = mobilenet()
    exp = explain(model, _x(), None, method="lrp", progress=False)
    assert torch.isfinite(exp.attributions).all() and exp.attributions.abs().sum() > 0


class _OffsetAfterNorm(nn.Module):
    """conv -> batch norm -> ``+ offset`` (in place or not) -> ReLU -> pool -> linear."""

    def __init__(self, in_place: bool):
        super().__init__()
        self.in_place = in_place
        self.conv, self.bn, self.fc = nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.Linear(6, 3)
        self.register_buffer("offset", torch.linspace(-0.2, 0.2, 6).view(1, 6, 1, 1))
        with torch.no_grad():
            self.bn.running_mean.uniform_(-0.5, 0.5)
            self.bn.running_var.uniform_(0.5, 2.0)

    def forward(self, x):
        h = self.bn(self.conv(x))
        if self.in_place:
            h += self.offset
        else:
            h = h + self.offset
        return self.fc(torch.relu(h).mean((2, 3)))


def test_in_place_write_to_a_batch_norm_output_without_canonizing():
    """``canonize=False``: a batch norm's output written in place (as torchvision's ResNet does with
    ``out += identity``) gives the same relevance as the out-of-place model, not autograd's in-place
    error (the rule recomputes the norm's output instead of saving it)."""
    torch.manual_seed(0)
    in_place = _OffsetAfterNorm(True).eval()
    out_of_place = _OffsetAfterNorm(False).eval()
    out_of_place.load_state_dict(in_place.state_dict())
    a = explain(in_place, _x(), None, method="lrp", canonize=False, progress=False).attributions
    b = explain(out_of_place, _x(), None, method="lrp", canonize=False, progress=False).attributions
    assert torch.isfinite(a).all() and a.abs().sum() > 0
    torch.testing.assert_close(a, b)


def test_resnet_residual_without_canonizing_is_refused_in_one_line():
    """Without the canonizer a residual addition's gradient hands the whole relevance to both branches
    (a random ResNet-18's input relevance came out 260x the logit): refused, naming the block."""
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=3).eval()
    with pytest.raises(InputError) as info:
        explain(model, _x(), None, method="lrp", canonize=False, progress=False)
    message = str(info.value)
    assert "\n" not in message and "layer1.0 (BasicBlock)" in message and "canonize=True" in message
    canonized = explain(model, _x(), None, method="lrp", progress=False).attributions
    assert torch.isfinite(canonized).all()


def test_refusal_is_one_line_naming_the_module():
    class GroupNormNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.norm, self.fc = nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4), nn.Linear(4, 3)

        def forward(self, x):
            return self.fc(self.norm(self.conv(x)).mean((2, 3)))

    with pytest.raises(InputError) as info:
        lrp_relevance(GroupNormNet().eval(), _x(), torch.tensor([0, 1]), make_composite(None, "attn_lrp", {}))
    message = str(info.value)
    assert "\n" not in message and "norm (GroupNorm)" in message and message.startswith("lrp cannot explain")


def test_model_left_as_found():
    model = timm_vit(True)
    flags = [p.requires_grad for p in model.parameters()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    _run(model, "attn_lrp")
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


# -- DeepLIFT on the same operations ----------------------------------------------------------------
def test_deeplift_complete_on_densenet():
    """Concatenation and pre-activation batch norms: summation to delta (Eq. 19) holds."""
    model = densenet()
    exp = explain(model, _x(), None, method="deeplift", progress=False)
    assert torch.allclose(exp.attributions.flatten(1).sum(1), exp.extras["delta"], rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize(
    "make,where",
    [(tv_vit, "(LayerNorm)"), (lambda: timm_vit(True), "(LayerNorm)"), (efficientnet, "(SqueezeExcitation)")],
    ids=["torchvision_vit", "timm_vit", "efficientnet_se"],
)
def test_deeplift_refuses_in_one_line(make, where):
    """LayerNorm, softmax, attention and products of activations have no DeepLIFT rule here: one line
    naming the module, never a map that breaks summation to delta."""
    with pytest.raises(InputError) as info:
        explain(make(), _x(), None, method="deeplift", progress=False)
    message = str(info.value)
    assert "\n" not in message and message.startswith("deeplift cannot explain") and where in message
