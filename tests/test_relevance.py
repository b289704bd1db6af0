"""Relevance explainers (issue 4): LRP against Zennit, LRP conservation, DeepLIFT against Captum,
summation to delta, reveal-cancel vs rescale, and the model left as found.

Zennit runs with its own canonizers (``VGGCanonizer`` / ``ResNetCanonizer``: ``SequentialMergeBatchNorm``
plus the residual ``Sum``) and the explained logit as output relevance. VGG-11 agrees in float32.
On ResNet-18 Zennit's merged batch norm still divides by sqrt(1 + eps) in its forward, and the
epsilon rule amplifies float32 rounding in a deep random network, so there the strict check runs
in float64 with batch-norm eps = 0 (where the definitions coincide), plus a float32 check of the
composites on the fixture itself at a tolerance that covers the sqrt(1 + eps) factor.
On VGG-11 the uniform rules act on the convolutions, with epsilon on the dense layers (a rule on
VGG's 100M-parameter classifier costs Zennit seconds per call); on ResNet-18 they act everywhere.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from core.api import explain
from core.errors import InputError, ModelError
from xai_plugins.explainers.relevance import deeplift_attributions, lrp_relevance, make_rule
from xai_plugins.explainers.relevance.composites import LayerMapComposite, make_composite
from xai_plugins.explainers.relevance.rules import epsilon

zennit = pytest.importorskip("zennit")
captum_attr = pytest.importorskip("captum.attr")

from zennit import composites as zc  # noqa: E402
from zennit import rules as zr  # noqa: E402
from zennit.attribution import Gradient  # noqa: E402
from zennit.composites import (  # noqa: E402
    LayerMapComposite as ZLayerMap,
)
from zennit.composites import (  # noqa: E402
    NameMapComposite,
    SpecialFirstLayerMapComposite,
    layer_map_base,
)
from zennit.torchvision import ResNetCanonizer, VGGCanonizer  # noqa: E402
from zennit.types import Convolution  # noqa: E402
from zennit.types import Linear as ZAnyLinear  # noqa: E402

EPS = 0.01  # LRP-epsilon's epsilon in the rule tests (ours and Zennit's)
INPUT_RULES = ("z_box", "flat", "w_square")


# -- helpers -----------------------------------------------------------------------------------------
def _x(dtype=torch.float32) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(2, 3, 32, 32, dtype=dtype)


def _box(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Our z^B default bounds (each image's per-channel min/max) as Zennit's full-size tensors."""
    return x.amin((2, 3), keepdim=True).expand_as(x), x.amax((2, 3), keepdim=True).expand_as(x)


def _zennit_rule(name: str, x: torch.Tensor):
    low, high = _box(x)
    return {
        "zero": lambda: zr.Epsilon(epsilon=0.0),
        "epsilon": lambda: zr.Epsilon(epsilon=EPS),
        "gamma": lambda: zr.Gamma(gamma=0.25),
        "alpha_beta": lambda: zr.AlphaBeta(alpha=2.0, beta=1.0),
        "z_plus": lambda: zr.ZPlus(),
        "z_box": lambda: zr.ZBox(low, high),
        "flat": lambda: zr.Flat(),
        "w_square": lambda: zr.WSquare(),
    }[name]()


def _zennit(model: nn.Module, composite, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    with Gradient(model, composite) as attributor:
        _, relevance = attributor(x, lambda out: F.one_hot(targets, out.shape[1]).to(out) * out)
    return relevance


def _rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return float((ours - ref).abs().max() / ref.abs().max())


def _zennit_composite(name: str, x: torch.Tensor, canonizers: list):
    low, high = _box(x)
    base = layer_map_base()
    return {
        "epsilon_gamma_box": lambda: zc.EpsilonGammaBox(low, high, canonizers=canonizers),
        "epsilon_plus": lambda: zc.EpsilonPlus(canonizers=canonizers),
        "epsilon_alpha2_beta1": lambda: zc.EpsilonAlpha2Beta1(canonizers=canonizers),
        "epsilon_plus_flat": lambda: zc.EpsilonPlusFlat(canonizers=canonizers),
        "epsilon_alpha2_beta1_flat": lambda: zc.EpsilonAlpha2Beta1Flat(canonizers=canonizers),
        "deep_taylor": lambda: SpecialFirstLayerMapComposite(
            base + [(ZAnyLinear, zr.ZPlus())], [(ZAnyLinear, zr.ZBox(low, high))], canonizers=canonizers
        ),
    }[name]()


ZENNIT_BUILTIN = (
    "epsilon_gamma_box",
    "epsilon_plus",
    "epsilon_alpha2_beta1",
    "epsilon_plus_flat",
    "epsilon_alpha2_beta1_flat",
)
ZENNIT_COMPOSITES = ZENNIT_BUILTIN + ("deep_taylor",)
RESNET_COMPOSITES = ("epsilon_gamma_box", "epsilon_plus_flat", "deep_taylor")
RULES = ("zero", "epsilon", "gamma", "alpha_beta", "z_plus", "z_box", "flat", "w_square")
VGG_RULES = ("zero", "w_square")


@pytest.fixture(scope="module")
def resnet18_f64(resnet18):
    """ResNet-18 in float64 with batch-norm eps = 0: Zennit's merged forward equals the model's."""
    model = copy.deepcopy(resnet18).double()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eps = 0.0
    return model.eval()


# -- LRP vs Zennit -----------------------------------------------------------------------------------
@pytest.mark.parametrize("rule", VGG_RULES)
def test_lrp_rule_matches_zennit_vgg11(vgg11, rule):
    """The rules no built-in composite puts on VGG-11; the others (gamma and z^B: epsilon_gamma_box,
    z+: epsilon_plus, alpha2-beta1: epsilon_alpha2_beta1, flat: *_flat, epsilon on the dense
    layers: all) are checked there."""
    x = _x()
    targets = vgg11(x).argmax(1)
    ours_rule = make_rule(rule, {"epsilon": EPS})
    if rule in INPUT_RULES:  # the input layer's rule, epsilon above (as rule=... does)
        ours = LayerMapComposite(conv=epsilon(EPS), linear=epsilon(EPS), first=ours_rule)
        zmap = layer_map_base() + [(Convolution, zr.Epsilon(EPS)), (nn.Linear, zr.Epsilon(EPS))]
        zcomp = SpecialFirstLayerMapComposite(
            zmap, [(Convolution, _zennit_rule(rule, x))], canonizers=[VGGCanonizer()]
        )
    else:
        ours = LayerMapComposite(conv=ours_rule, linear=epsilon(EPS))
        zmap = layer_map_base() + [(Convolution, _zennit_rule(rule, x)), (nn.Linear, zr.Epsilon(EPS))]
        zcomp = ZLayerMap(zmap, canonizers=[VGGCanonizer()])
    got = explain(vgg11, x, targets, method="lrp", composite=ours, progress=False).attributions
    ref = _zennit(vgg11, zcomp, x, targets)
    assert _rel_err(got, ref) < 1e-4
    assert torch.allclose(got, ref, rtol=1e-3, atol=1e-5 * float(ref.abs().max()))


@pytest.mark.parametrize("rule", RULES)
def test_lrp_rule_matches_zennit_resnet18(resnet18_f64, rule):
    """``rule=`` everywhere (input-layer rules on conv1, epsilon above) with Zennit's ResNetCanonizer."""
    x = _x(torch.float64)
    targets = resnet18_f64(x).argmax(1)
    got, extras = lrp_relevance(resnet18_f64, x, targets, make_composite(rule, None, {"epsilon": EPS}))
    first = _zennit_rule(rule, x)
    rest = _zennit_rule("epsilon", x) if rule in INPUT_RULES else _zennit_rule(rule, x)
    zmap = layer_map_base() + [(ZAnyLinear, rest)]
    zcomp = SpecialFirstLayerMapComposite(zmap, [(ZAnyLinear, first)], canonizers=[ResNetCanonizer()])
    ref = _zennit(resnet18_f64, zcomp, x, targets)
    assert _rel_err(got, ref) < 1e-7
    assert got.abs().sum() > 0 and "layer4.1.conv2" in extras["layer_relevance"]


@pytest.mark.parametrize("name", ZENNIT_COMPOSITES)
def test_lrp_composite_matches_zennit(vgg11, resnet18_f64, name):
    """Zennit's built-in composites on VGG-11 (through ``explain``); on ResNet-18 those whose rule
    assignment differs in kind (first convolution, first layer of any kind, both kinds alike; the
    others only recombine rules checked one by one there), and deep_taylor (no Zennit counterpart)
    against the same assignment built from Zennit rules (z+ on VGG's 100M-parameter classifier
    would cost seconds). epsilon_plus_box differs from deep_taylor only in its rule table."""
    models = []
    if name in ZENNIT_BUILTIN:
        models.append((vgg11, VGGCanonizer, torch.float32))
    if name in RESNET_COMPOSITES:
        models.append((resnet18_f64, ResNetCanonizer, torch.float64))
    for model, canon, dtype in models:
        x = _x(dtype)
        targets = model(x).argmax(1)
        if dtype == torch.float32:  # the public API (it explains float32 inputs)
            got = explain(model, x, targets, method="lrp", composite=name, progress=False).attributions
        else:
            got = lrp_relevance(model, x, targets, make_composite(None, name, {}))[0]
        ref = _zennit(model, _zennit_composite(name, x, [canon()]), x, targets)
        assert _rel_err(got, ref) < (1e-4 if dtype == torch.float32 else 1e-7), (name, type(model).__name__)


def test_lrp_float32_resnet_through_public_api(resnet18):
    """On the float32 fixture (batch-norm eps 1e-5), predicted classes: the documented sqrt(1 + eps)
    difference to Zennit stays far below the map's scale."""
    x = _x()
    exp = explain(resnet18, x, None, method="lrp", composite="epsilon_gamma_box", progress=False)
    targets = resnet18(x).argmax(1)
    assert torch.equal(exp.targets, targets) and exp.attributions.shape == x.shape
    assert exp.maps.shape == (2, 32, 32) and float(exp.maps.min()) >= 0 and float(exp.maps.max()) <= 1
    ref = _zennit(resnet18, _zennit_composite("epsilon_gamma_box", x, [ResNetCanonizer()]), x, targets)
    assert _rel_err(exp.attributions, ref) < 1e-3


def test_gamma_epsilon_zero_by_depth_matches_zennit_name_map(resnet18_f64):
    """The depth composite: gamma in the lower third of the 21 linear layers, epsilon in the middle,
    LRP-0 in the upper third, z^B on conv1 -- Zennit given the same assignment by module name."""
    x = _x(torch.float64)
    targets = resnet18_f64(x).argmax(1)
    names = [n for n, m in resnet18_f64.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert len(names) == 21  # registration order is execution order in torchvision's ResNet-18
    low, high = _box(x)
    band = [zr.Gamma(0.25), zr.Epsilon(1e-6), zr.Epsilon(0.0)]
    name_map = [((names[0],), zr.ZBox(low, high))]
    name_map += [((n,), band[min(2, int(3 * i / 21))]) for i, n in enumerate(names) if i > 0]
    zcomp = zc.MixedComposite(
        [NameMapComposite(name_map), ZLayerMap(layer_map_base())], canonizers=[ResNetCanonizer()]
    )
    got = lrp_relevance(resnet18_f64, x, targets, make_composite(None, "gamma_epsilon_zero", {}))[0]
    assert _rel_err(got, _zennit(resnet18_f64, zcomp, x, targets)) < 1e-7


# -- conservation ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def vgg11_f64_biased(vgg11):
    """VGG-11 in float64 with random biases (torchvision initializes them to zero). LRP-0 divides
    by pre-activations that come arbitrarily close to 0 in a random network; in float32 the rounding
    of the large, cancelling relevances near the input then exceeds 1e-3, float64 isolates the rule."""
    model = copy.deepcopy(vgg11).double()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.bias.copy_(torch.randn(m.bias.shape, generator=g, dtype=torch.float64) * 0.05)
    return model.eval()


@pytest.mark.parametrize("rule,params", [("zero", {}), ("epsilon", {"epsilon": 1e-15})])
def test_lrp_conservation_vgg11(vgg11_f64_biased, rule, params):
    """Eq. 11 layer by layer; ``stabilizer`` (the average pooling's Norm) small as well."""
    model = vgg11_f64_biased
    x = _x(torch.float64)
    logits = model(x).detach()
    targets = logits.argmax(1)
    logit = logits.gather(1, targets.view(-1, 1)).squeeze(1)
    relevance, extras = lrp_relevance(
        model, x, targets, make_composite(rule, None, dict(params, zero_bias=True)), stabilizer=1e-12
    )
    layers = extras["layer_relevance"]
    assert torch.allclose(layers["output"], logit)
    assert list(layers)[1:4] == ["features.0", "features.3", "features.6"]  # forward order
    assert len(layers) == 1 + 8 + 3  # the output, 8 convolutions, 3 dense layers
    for name, sums in layers.items():
        assert torch.allclose(sums, logit, rtol=1e-3, atol=0), name
    assert torch.allclose(relevance.flatten(1).sum(1), logit, rtol=1e-3, atol=0)
    # with the biases in the rule they absorb relevance: the sums drift away from the logit
    leaky = lrp_relevance(model, x, targets, make_composite(rule, None, params), stabilizer=1e-12)[0]
    drift = (leaky.flatten(1).sum(1) - logit).abs() / logit.abs()
    assert float(drift.max()) > 1e-2


def test_lrp_conservation_parameters_through_public_api(vgg11):
    """``zero_bias`` and per-layer sums reach ``explain``'s extras (float32: a loose check)."""
    x = _x()
    exp = explain(vgg11, x, None, method="lrp", rule="epsilon", epsilon=1e-9, zero_bias=True, progress=False)
    layers = exp.extras["layer_relevance"]
    assert len(layers) == 12 and torch.allclose(layers["classifier.6"], layers["output"], rtol=1e-4)


# -- DeepLIFT ----------------------------------------------------------------------------------------
class ModuleReLUTwin(nn.Module):
    """conftest's FunctionalReLUCNN with nn.ReLU / nn.MaxPool2d modules (what Captum can see)."""

    def __init__(self, functional: nn.Module):
        super().__init__()
        self.conv1, self.conv2, self.fc = functional.conv1, functional.conv2, functional.fc
        self.relu1, self.relu2, self.pool = nn.ReLU(), nn.ReLU(), nn.MaxPool2d(2)

    def forward(self, x):
        x = self.pool(self.relu1(self.conv1(x)))
        x = self.relu2(self.conv2(x))
        return self.fc(x.mean(dim=(2, 3)))


def _captum_deeplift(
    model: nn.Module, x: torch.Tensor, targets: torch.Tensor, baselines=None, shap: bool = False
) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if shap:
            return captum_attr.DeepLiftShap(model).attribute(x, baselines=baselines, target=targets).detach()
        return (
            captum_attr.DeepLift(model)
            .attribute(x, baselines=torch.zeros_like(x) if baselines is None else baselines, target=targets)
            .detach()
        )


def _gradient(model: nn.Module, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    x = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(model(x).gather(1, targets.view(-1, 1)).sum(), x)
    return g.detach()


class PoolFreeCNN(nn.Module):
    """nn.ReLU modules, biases, global average pooling: a model Captum's DeepLift handles exactly."""

    def __init__(self):
        super().__init__()
        self.conv1, self.relu1 = nn.Conv2d(3, 8, 3, padding=1), nn.ReLU()
        self.conv2, self.relu2 = nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU()
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        return self.fc(self.relu2(self.conv2(self.relu1(self.conv1(x)))).mean(dim=(2, 3)))


def test_deeplift_rescale_matches_captum_vgg11(vgg11):
    """The black reference (the default): max-pool and in-place ReLU modules, each used once."""
    x = _x()
    targets = vgg11(x).argmax(1)
    exp = explain(vgg11, x, targets, method="deeplift", progress=False)
    ref = _captum_deeplift(vgg11, x, targets)
    assert torch.allclose(exp.attributions, ref, rtol=1e-4, atol=1e-6 * float(ref.abs().max()))
    assert torch.allclose(exp.attributions.flatten(1).sum(1), exp.extras["delta"], rtol=1e-3, atol=0)


def test_deeplift_matches_captum_with_references():
    """Random references, one (``DeepLift``) and several averaged (``DeepLiftShap``, ``baseline`` a
    list); the multipliers are not the gradient there."""
    torch.manual_seed(0)
    model = PoolFreeCNN().eval()
    x = _x()
    torch.manual_seed(7)
    refs = torch.randn(3, 3, 32, 32) * 0.5
    targets = model(x).argmax(1)
    one = explain(model, x, targets, method="deeplift", baseline=refs[0], progress=False).attributions
    ref = _captum_deeplift(model, x, targets, refs[:1].expand_as(x))
    assert torch.allclose(one, ref, rtol=1e-4, atol=1e-6 * float(ref.abs().max()))
    assert _rel_err(_gradient(model, x, targets) * (x - refs[0]), ref) > 0.05
    shap = explain(model, x, targets, method="deeplift", baseline=list(refs), progress=False)
    ref_shap = _captum_deeplift(model, x, targets, baselines=refs, shap=True)
    assert torch.allclose(shap.attributions, ref_shap, rtol=1e-4, atol=1e-6 * float(ref_shap.abs().max()))
    assert torch.allclose(shap.attributions.flatten(1).sum(1), shap.extras["delta"], rtol=1e-3, atol=0)


def test_deeplift_functional_relu_equals_module_twin(functional_relu_cnn):
    """F.relu / torch.relu / F.max_pool2d in forward give what nn.ReLU / nn.MaxPool2d modules give."""
    twin = ModuleReLUTwin(functional_relu_cnn).eval()
    x = _x()
    targets = twin(x).argmax(1)
    torch.manual_seed(7)
    reference = torch.randn_like(x) * 0.5
    for rule in ("rescale", "reveal_cancel"):
        ours = deeplift_attributions(functional_relu_cnn, x, targets, rule, reference)[0]
        assert torch.allclose(ours, deeplift_attributions(twin, x, targets, rule, reference)[0])


def test_deeplift_max_pool_rule_by_hand():
    """relu then a 2x2 max-pool, x = (1, 2, .5, -1), reference (3, -2, 0, .2): y = 2, y0 = 3. The
    input's maximum gets max(y, y0) - y0 = 0, the reference's maximum y - max(y, y0) = -1 (Captum's
    rule; Captum 0.9 itself breaks summation here, convergence delta 3, when a ReLU module
    precedes the pool)."""

    class Pool(nn.Module):
        def forward(self, x):
            return F.max_pool2d(torch.relu(x), 2).flatten(1)

    x, r = torch.tensor([[[[1.0, 2.0], [0.5, -1.0]]]]), torch.tensor([[[[3.0, -2.0], [0.0, 0.2]]]])
    got, extras = deeplift_attributions(Pool(), x, torch.tensor([0]), "rescale", r)
    assert torch.allclose(got.flatten(), torch.tensor([-1.0, 0.0, 0.0, 0.0]))
    assert torch.allclose(extras["delta"], torch.tensor([-1.0]))


@pytest.mark.parametrize("rule", ["rescale", "reveal_cancel"])
@pytest.mark.parametrize("model_name", ["resnet18", "functional_relu_cnn", "residual_net"])
def test_deeplift_summation_to_delta(request, model_name, rule):
    """Eq. 19 on a reused in-place ReLU (ResNet-18, the residual net), F.relu, BatchNorm + residual."""
    model = request.getfixturevalue(model_name)
    x = _x()
    logits = model(x).detach()
    targets = logits.argmax(1)
    exp = explain(model, x, targets, method="deeplift", rule=rule, progress=False)
    ref_logits = model(torch.zeros_like(x)).detach()
    delta = logits.gather(1, targets.view(-1, 1)) - ref_logits.gather(1, targets.view(-1, 1))
    assert torch.allclose(exp.extras["delta"], delta.squeeze(1), rtol=1e-5, atol=1e-7)
    assert torch.allclose(exp.attributions.flatten(1).sum(1), delta.squeeze(1), rtol=1e-3, atol=0)


class MinNet(nn.Module):
    """The DeepLIFT paper's example (Shrikumar et al. 2017, Sec. 3.5.3): min(i1, i2) = i1 - relu(i1 - i2)."""

    def __init__(self):
        super().__init__()
        self.diff = nn.Linear(2, 1, bias=False)
        self.relu = nn.ReLU()
        with torch.no_grad():
            self.diff.weight.copy_(torch.tensor([[1.0, -1.0]]))

    def forward(self, x):
        return x[:, :1] - self.relu(self.diff(x))


def test_reveal_cancel_differs_from_rescale_on_min():
    """With i1 = 3 > i2 = 1 and reference 0: rescale gives min = 1 all to i2 (i1's positive and
    negative paths cancel); reveal-cancel splits it evenly, as the paper describes."""
    model = MinNet().eval()
    x = torch.tensor([[3.0, 1.0], [1.0, 4.0]])
    targets = torch.zeros(2, dtype=torch.long)
    rescale, ex = deeplift_attributions(model, x, targets, "rescale")
    reveal, _ = deeplift_attributions(model, x, targets, "reveal_cancel")
    assert torch.allclose(ex["delta"], torch.tensor([1.0, 1.0]))
    assert torch.allclose(rescale, torch.tensor([[0.0, 1.0], [1.0, 0.0]]))
    # reveal-cancel (Eq. 23-25), first sample: dy+ = 3, dy- = -1, dz+ = (3 + 2) / 2, dz- = (0 - 1) / 2,
    # so relu(i1 - i2) takes 2.5 from i1 and -0.5 from i2, and min = i1 - relu(..) gives 0.5 to each;
    # second (ReLU off in both): dy+ = 1, dy- = -4, dz+ = 0.5, dz- = -0.5: again 0.5 each
    assert torch.allclose(reveal, torch.tensor([[0.5, 0.5], [0.5, 0.5]]))
    assert torch.allclose(rescale, _captum_deeplift(model, x, targets, torch.zeros(1, 2)))


# -- the model is left as found --------------------------------------------------------------------
def _hooks(model: nn.Module) -> int:
    attrs = (
        "_forward_hooks",
        "_forward_pre_hooks",
        "_backward_hooks",
        "_backward_pre_hooks",
        "_state_dict_hooks",
        "_load_state_dict_pre_hooks",
    )
    return sum(len(getattr(m, a, {})) for m in model.modules() for a in attrs)


class Boom(nn.Module):
    """A residual CNN whose forward raises after a few layers (when armed)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(4, 3)
        self.armed = False

    def forward(self, x):
        y = self.relu(self.bn(self.conv(x)))
        y = self.relu(y + y * 0.5)
        if self.armed:
            raise RuntimeError("boom")
        return self.fc(y.mean(dim=(2, 3)))


@pytest.mark.parametrize(
    "method,params",
    [
        ("lrp", {"composite": "epsilon_gamma_box"}),
        ("lrp", {"rule": "gamma"}),
        ("deeplift", {"rule": "reveal_cancel"}),
        ("deeplift", {}),
    ],
)
@pytest.mark.parametrize("armed", [False, True])
def test_model_unchanged(method, params, armed):
    torch.manual_seed(0)
    model = Boom().train()
    model.bn.weight.requires_grad_(False)
    model.armed = armed
    state = copy.deepcopy(model.state_dict())
    x = _x()[:, :, :8, :8]
    targets = torch.tensor([0, 2])
    fn = lrp_relevance if method == "lrp" else deeplift_attributions
    if armed:
        with pytest.raises(ModelError, match="boom"):  # the engine's own forward fails first
            explain(model, x, targets, method=method, progress=False, **params)
        with pytest.raises(RuntimeError, match="boom"):
            if method == "lrp":
                fn(model, x, targets, make_composite(params.get("rule"), params.get("composite"), {}))
            else:
                fn(model, x, targets, params.get("rule", "rescale"))
    else:
        exp = explain(model, x, targets, method=method, progress=False, **params)
        assert torch.isfinite(exp.attributions).all() and exp.attributions.abs().sum() > 0
    assert model.training and all(m.training for m in model.modules())
    assert [p.requires_grad for p in model.parameters()] == [True, True, False, True, True, True]
    assert all(p.grad is None for p in model.parameters())
    assert _hooks(model) == 0
    assert torch._C._len_torch_function_stack() == 0 and torch.is_grad_enabled()
    after = model.state_dict()
    assert all(torch.equal(state[k], after[k]) for k in state)  # batch-norm statistics included


# -- parameters --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "params,match",
    [
        ({"rule": "bogus"}, "unknown LRP rule"),
        ({"composite": "bogus"}, "unknown LRP composite"),
        ({"rule": "gamma", "composite": "epsilon_plus"}, "not both"),
        ({"rule": "alpha_beta", "alpha": 2.0, "beta": 0.5}, "alpha = beta"),
    ],
)
def test_lrp_bad_parameters_are_one_line_errors(params, match):
    model = Boom().eval()
    with pytest.raises(InputError, match=match):
        explain(model, _x()[:, :, :8, :8], [0, 1], method="lrp", progress=False, **params)


def test_deeplift_bad_parameters_are_one_line_errors():
    model = Boom().eval()
    x = _x()[:, :, :8, :8]
    with pytest.raises(InputError, match="unknown DeepLIFT rule"):
        explain(model, x, [0, 1], method="deeplift", rule="bogus", progress=False)
    with pytest.raises(InputError, match="does not match inputs"):
        explain(model, x, [0, 1], method="deeplift", baseline=torch.zeros(3, 4, 4), progress=False)


class InPlaceShift(nn.Module):
    """A ReLU output shifted below zero in place (or out of place) before the next convolution."""

    def __init__(self, in_place: bool):
        super().__init__()
        self.conv1, self.conv2, self.fc = nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3), nn.Linear(4, 3)
        self.in_place = in_place

    def forward(self, x):
        x = F.relu(self.conv1(x))
        if self.in_place:
            x -= 0.5
        else:
            x = x - 0.5
        return self.fc(F.relu(self.conv2(x)).mean(dim=(2, 3)))


@pytest.mark.parametrize("rule", ["gamma", "alpha_beta"])
def test_lrp_in_place_change_after_relu(rule):
    """Rules skip the a^- terms after a ReLU; an in-place change of that output must undo this."""
    torch.manual_seed(0)
    a, b = InPlaceShift(True).eval(), InPlaceShift(False).eval()
    b.load_state_dict(a.state_dict())
    x = _x()[:, :, :8, :8]
    targets = torch.tensor([0, 1])
    got = lrp_relevance(a, x, targets, make_composite(rule, None, {}))[0]
    assert torch.allclose(got, lrp_relevance(b, x, targets, make_composite(rule, None, {}))[0], atol=1e-7)


def test_bench_suite_runs_on_a_tiny_model():
    """``bench/suite_relevance.py``: every case and peer runs; Zennit's context stays on its copy."""
    from bench import harness

    suites = harness.discover(["relevance"])
    model = harness.make_model("tiny")
    rows = harness.run_model(
        "tiny",
        harness.Settings(models=["tiny"], batch=2, size=32, repeats=1),
        suites,
        model=model,
        log=lambda s: None,
    )
    by = {r.method: r for r in rows}
    assert set(by) == {
        "lrp(epsilon_gamma_box)",
        "lrp(epsilon_plus)",
        "deeplift(rescale)",
        "deeplift(reveal_cancel)",
    }
    for row in rows:
        assert row.error is None and row.peer_error is None, row
        assert row.ours_over_limit > 0 and (row.peer is None or row.speedup > 0)
    assert _hooks(model) == 0


def test_signed_relevance_is_drawn_red_for_blue_against_and_leaves_zero_untinted(
    functional_relu_cnn, images32, tmp_path, monkeypatch
):
    """LRP / DeepLIFT maps keep their sign: the report draws relevance for the class in red, against
    it in blue, and a pixel of zero relevance exactly as the image is (no background tint)."""
    import numpy as np

    from core.plugins import explainer_flag
    from core.render import signed_overlay
    from core.workflow import run

    image = torch.full((3, 8, 8), 0.5)
    relevance = torch.zeros(8, 8)
    relevance[0, 0], relevance[3, 3] = 2.0, -1.0
    out = signed_overlay(image, relevance)
    assert out.shape == (8, 8, 3) and np.allclose(out[5:, 5:], 0.5)  # zero relevance: the image itself
    assert out[0, 0, 0] > 0.6 > out[0, 0, 2]  # for the class: red
    assert out[3, 3, 2] > 0.55 > out[3, 3, 0]  # against: blue
    assert explainer_flag("lrp", "signed") and explainer_flag("deeplift", "signed")
    assert not explainer_flag("saliency", "signed") and not explainer_flag("no_such_method", "signed")
    images = (images32 - images32.min()) / (images32.max() - images32.min())
    results = run(
        functional_relu_cnn,
        images32,
        ["lrp", "saliency"],
        images=images,
        reporters=["html", "json"],
        out_dir=tmp_path,
        progress=False,
    )
    page = (tmp_path / "report.html").read_text()
    assert page.count("red: for the class, blue: against") == 1  # the lrp column only
    # the json reporter keeps the signed relevance beside maps.npz, for the registry worker's PNGs
    with np.load(tmp_path / "signed.npz") as stored:
        assert stored.files == ["lrp"]
        assert np.allclose(stored["lrp"], results.explanations["lrp"].attributions.sum(1).numpy())
    # the MLflow reporter's map PNGs draw it the same way
    import io

    from PIL import Image

    from xai_plugins.reporters.mlflow_reporter import map_pngs

    pngs = map_pngs(
        {"lrp": torch.rand(1, 8, 8)}, ["a.png"], image.unsqueeze(0), signed={"lrp": relevance[None]}
    )
    ((name, png),) = pngs.items()
    assert name == "maps/lrp/000_a.png"
    pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=float) / 255
    scale = pixels.shape[0] // 8
    assert np.allclose(pixels[-1, -1], 0.5, atol=0.01) and pixels[0, 0, 0] > 0.6 > pixels[0, 0, 2]
    assert pixels.shape[0] == 8 * scale
    # the registry worker reads both files back and draws lrp the same way (its probe images given)
    import registry.runlog as runlog

    monkeypatch.setattr(runlog, "_probe_images", lambda workspace, out_dir: images)
    logged = runlog._maps(tmp_path, tmp_path, ["a", "b"], tmp_path)
    assert set(logged) == {
        "maps/lrp/000_a.png",
        "maps/lrp/001_b.png",
        "maps/saliency/000_a.png",
        "maps/saliency/001_b.png",
    }
    expected = map_pngs(
        {"lrp": results.explanations["lrp"].maps[:1]},
        ["a"],
        images[:1],
        signed={"lrp": results.explanations["lrp"].attributions[:1].sum(1)},
    )
    assert logged["maps/lrp/000_a.png"] == expected["maps/lrp/000_a.png"]
