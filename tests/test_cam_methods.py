"""CAM explainers against Captum and pytorch-grad-cam, on ResNet-18, VGG-11 and a CNN calling F.relu.

Captum: identical definition, compared after the same bilinear resize (allclose).
pytorch-grad-cam scales each map to [0, 1] and resizes it with OpenCV: compared exactly on a layer
at the input's resolution (no resizing at all), and by correlation (> 0.99) on ResNet/VGG layers.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from core.api import explain
from core.engine import Engine

captum_attr = pytest.importorskip("captum.attr")
pgc = pytest.importorskip("pytorch_grad_cam")
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget  # noqa: E402

from tests.test_gradient_methods import CountingModel, ModuleReLUTwin  # noqa: E402

TARGETS = torch.tensor([1, 3])


def minmax(maps: torch.Tensor) -> torch.Tensor:
    """pytorch-grad-cam's scale_cam_image: (m - min) / (1e-7 + max(m - min)), per image."""
    flat = maps.reshape(maps.shape[0], -1)
    flat = flat - flat.min(1, keepdim=True).values
    return flat / (1e-7 + flat.max(1, keepdim=True).values)


def corr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1])


def pgc_run(cls, model, layer, x, targets, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with cls(model, [dict(model.named_modules())[layer]], **kwargs) as cam:
            cam.batch_size = 64
            return torch.from_numpy(cam(x, [ClassifierOutputTarget(int(t)) for t in targets]))


# model fixture, layer, input fixture; layer "conv1" of the CNN keeps the input's resolution
CASES = [
    ("functional_relu_cnn", "conv1", "images32"),
    ("functional_relu_cnn", "conv2", "images32"),
    ("resnet18", "layer4", "images64"),
    ("vgg11", "features", "images64"),
]


@pytest.fixture(params=CASES, ids=[f"{m}-{layer}" for m, layer, _ in CASES])
def case(request):
    model_name, layer, images = request.param
    return model_name, request.getfixturevalue(model_name), layer, request.getfixturevalue(images)


def test_grad_cam_equals_captum(case):
    _, model, layer, x = case
    ours = explain(model, x, TARGETS, method="grad_cam", layer=layer, progress=False).attributions
    module = dict(model.named_modules())[layer]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = captum_attr.LayerGradCam(model, module).attribute(x, target=TARGETS, relu_attributions=True)
    theirs = theirs.detach()
    theirs = captum_attr.LayerAttribution.interpolate(
        theirs, tuple(x.shape[-2:]), interpolate_mode="bilinear"
    )
    assert ours.shape == (2, 1, *x.shape[-2:])
    assert torch.allclose(ours, theirs, rtol=1e-4, atol=1e-6 * float(theirs.abs().max()))


def test_guided_grad_cam_equals_captum(case):
    name, model, layer, x = case
    ours = explain(
        model, x, TARGETS, method="guided_grad_cam", layer=layer, interpolation="nearest", progress=False
    ).attributions
    ref = model
    if name == "functional_relu_cnn":  # Captum's guided backprop needs nn.ReLU modules
        ref = ModuleReLUTwin(model).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = captum_attr.GuidedGradCam(ref, dict(ref.named_modules())[layer]).attribute(x, target=TARGETS)
    theirs = theirs.detach()
    assert torch.allclose(ours, theirs, rtol=1e-4, atol=1e-5 * float(theirs.abs().max()))


PGC = {
    "grad_cam": ("GradCAM", {}, {}),
    "grad_cam_pp": ("GradCAMPlusPlus", {}, {}),
    "fem": ("FEM", {"k": 2}, {"weighting": "mask_fraction", "k": 2}),
}


@pytest.mark.parametrize("method", list(PGC))
def test_cams_agree_with_pytorch_grad_cam(case, method):
    name, model, layer, x = case
    cls, their_kwargs, our_kwargs = PGC[method]
    if method == "fem" and name != "functional_relu_cnn":
        # 2 x 2 maps never pass a 2-sigma threshold: compare one stage earlier (4 x 4)
        layer = {"resnet18": "layer3", "vgg11": "features.15"}[name]
    ours = explain(model, x, TARGETS, method=method, layer=layer, progress=False, **our_kwargs).attributions[
        :, 0
    ]
    theirs = pgc_run(getattr(pgc, cls), model, layer, x, TARGETS, **their_kwargs)
    assert theirs.flatten(1).max(1).values.min() > 0.5  # not a degenerate all-zero map
    if layer == "conv1":  # same resolution as the input: nothing resized, identical maps
        assert torch.allclose(minmax(ours), minmax(theirs), atol=2e-3)
    else:
        assert corr(minmax(ours), minmax(theirs)) > 0.99


def test_score_cam_equals_pytorch_grad_cam_exactly(functional_relu_cnn, images32):
    ours = explain(
        functional_relu_cnn, images32, TARGETS, method="score_cam", layer="conv1", progress=False
    ).attributions[:, 0]
    theirs = pgc_run(pgc.ScoreCAM, functional_relu_cnn, "conv1", images32, TARGETS)
    assert torch.allclose(minmax(ours), minmax(theirs), atol=1e-4)


def test_score_cam_agrees_with_pytorch_grad_cam_on_resnet(resnet18, images32):
    """layer3 at 32 px: 256 masks of 2 x 2 maps (layer4 would be 1 x 1: every mask all zero)."""
    x = images32[:1]
    ours = explain(resnet18, x, TARGETS[:1], method="score_cam", layer="layer3", progress=False).attributions[
        :, 0
    ]
    theirs = pgc_run(pgc.ScoreCAM, resnet18, "layer3", x, TARGETS[:1])
    assert theirs.max() > 0.5
    assert corr(minmax(ours), minmax(theirs)) > 0.99


class RowCounter(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner, self.rows, self.calls = inner, 0, 0

    def forward(self, x):
        self.rows += x.shape[0]
        self.calls += 1
        return self.inner(x)


class Mark(nn.Identity):
    """The layer Score-CAM reads."""


class DuplicatingNet(nn.Module):
    """Layer ``dup`` outputs 5 channels: channel 1 constant (an all-zero mask), channel 4 a copy of
    channel 0 (the same mask)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        with torch.no_grad():
            self.conv.weight[1] = 0
        self.mark = Mark()
        self.fc = nn.Linear(5, 4)

    def dup(self, x):
        return torch.cat([x, x[:, :1]], dim=1)

    def forward(self, x):
        a = self.mark(self.dup(self.conv(x)))
        return self.fc(torch.relu(a).mean(dim=(2, 3)))


def test_score_cam_runs_each_distinct_mask_once_and_no_zero_mask(images32, monkeypatch):
    """All-zero masks share one forward of the zero image; identical masks run once; the weights are
    still those of pytorch-grad-cam, which runs every mask. (Rows are counted in Python: the
    TorchScript inference path, which would not replay the counting, is off here.)"""
    monkeypatch.setattr("core.fastpath.FREEZE_FOR_INFERENCE", False)
    model = DuplicatingNet()
    counter = RowCounter(model).eval()
    ours = explain(counter, images32, TARGETS, method="score_cam", layer="inner.mark", progress=False)
    # the shared pass (2 images) + 1 zero image + per image 3 distinct live masks (of 5 channels),
    # packed into one forward; pytorch-grad-cam runs 2 + 2 * 5 rows
    assert counter.rows == 2 + 1 + 2 * 3 and counter.calls == 2
    theirs = pgc_run(pgc.ScoreCAM, model, "mark", images32, TARGETS)
    assert torch.allclose(minmax(ours.attributions[:, 0]), minmax(theirs), atol=1e-4)


def test_cam_is_grad_cam_times_positions_on_gap_linear_models(resnet18, trained_cnn, images64):
    for model, layer in ((resnet18, "layer4"), (trained_cnn.model, "features")):
        cam = explain(model, images64, TARGETS, method="cam", layer=layer, progress=False)
        grad = (
            Engine(progress=False)
            .run(
                model, images64, {"grad_cam": {"layer": layer, "relu": False}}, targets=TARGETS, isolate=False
            )
            .explanations["grad_cam"]
        )
        with torch.no_grad():
            h, w = _layer_hw(model, layer, images64)
        assert torch.allclose(
            cam.attributions,
            grad.attributions * h * w,
            rtol=1e-3,
            atol=1e-5 * float(cam.attributions.abs().max()),
        )
        assert cam.attributions.min() < 0  # Zhou et al.: the signed map


def _layer_hw(model, layer, x):
    out = []
    handle = dict(model.named_modules())[layer].register_forward_hook(
        lambda m, a, o: out.append(o.shape[-2:])
    )
    try:
        model(x)
    finally:
        handle.remove()
    return out[-1]


def test_cam_refuses_models_without_gap_linear(vgg11, images64):
    with pytest.raises(Exception, match="global average pooling"):
        explain(vgg11, images64, TARGETS, method="cam", progress=False)


def test_fem_follows_eq_26(functional_relu_cnn, images32):
    """R = sum_k mu_k [A_k >= mu_k + K sigma_k], computed by hand from the captured activations."""
    acts = []
    handle = functional_relu_cnn.conv2.register_forward_hook(lambda m, a, o: acts.append(o.detach()))
    with torch.no_grad():
        functional_relu_cnn(images32)
    handle.remove()
    a = acts[0]
    mu = a.mean(dim=(2, 3), keepdim=True)
    sigma = a.std(dim=(2, 3), keepdim=True, unbiased=False)
    expected = (mu * (a >= mu + 1.0 * sigma)).sum(1, keepdim=True).clamp(min=0)
    out = (
        Engine(progress=False)
        .run(functional_relu_cnn, images32, {"fem": {"layer": "conv2"}}, targets=TARGETS, isolate=False)
        .explanations["fem"]
    )
    expected = torch.nn.functional.interpolate(expected, size=(32, 32), mode="bilinear", align_corners=False)
    assert torch.allclose(out.attributions, expected, atol=1e-6)
    other_target = explain(
        functional_relu_cnn, images32, torch.tensor([0, 0]), method="fem", layer="conv2", progress=False
    )
    assert torch.equal(other_target.attributions, out.attributions)  # FEM ignores the class


def test_shared_pass_serves_cams_and_saliency_from_one_forward(vgg11, images64):
    model = CountingModel(vgg11)
    layer = "inner.features"
    methods = {
        "saliency": {},
        "grad_cam": {"layer": layer},
        "grad_cam_pp": {"layer": layer},
        "fem": {"layer": layer, "weighting": "mask_fraction", "k": 2},
    }
    out = Engine(progress=False).run(model, images64, methods, targets=TARGETS, isolate=False)
    assert model.calls == 1 and set(out.explanations) == set(methods)
    single = explain(vgg11, images64, TARGETS, method="grad_cam_pp", layer="features", progress=False)
    assert torch.allclose(out.explanations["grad_cam_pp"].attributions, single.attributions)


def test_bad_layer_leaves_model_untouched(resnet18, images64):
    hooks = {n: dict(m._forward_hooks) for n, m in resnet18.named_modules()}
    with pytest.raises(Exception, match="no layer"):
        explain(resnet18, images64, TARGETS, method="score_cam", layer="nope", progress=False)
    assert {n: dict(m._forward_hooks) for n, m in resnet18.named_modules()} == hooks
    assert all(p.requires_grad for p in resnet18.parameters())


class ViewCNN(nn.Module):
    """Calls ``view`` on a 4-D activation: fails on channels-last tensors (the fast layout of the
    pass before the captured layer), so the pass must fall back to the default layout."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv1, self.conv2, self.fc = (
            nn.Conv2d(3, 6, 3, padding=1),
            nn.Conv2d(6, 8, 3, padding=1),
            nn.Linear(8, 4),
        )

    def forward(self, x):
        y = torch.relu(self.conv1(x))
        y = y.view(y.shape[0], -1).view(y.shape)
        return self.fc(torch.relu(self.conv2(y)).mean(dim=(2, 3)))


@pytest.mark.parametrize("method", ["grad_cam", "fem"])
def test_pass_falls_back_when_channels_last_fails(images32, method):
    model = ViewCNN().eval()
    with pytest.raises(RuntimeError):
        model(images32.contiguous(memory_format=torch.channels_last))
    cls, their_kwargs, our_kwargs = PGC[method]
    ours = explain(model, images32, TARGETS, method=method, layer="conv2", progress=False, **our_kwargs)
    theirs = pgc_run(getattr(pgc, cls), model, "conv2", images32, TARGETS, **their_kwargs)
    assert theirs.flatten(1).max(1).values.min() > 0.5
    assert torch.allclose(minmax(ours.attributions[:, 0]), minmax(theirs), atol=2e-3)
