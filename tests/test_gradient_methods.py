"""Gradient explainers against Captum, on ResNet-18, VGG-11 and a CNN calling F.relu in forward.

Captum hooks only ``nn.ReLU`` modules, so on the functional-ReLU CNN it is run on a twin that holds
the very same layers but calls ``nn.ReLU`` modules: our result on the functional model must equal
Captum's on the twin (and differ from Captum's on the functional model, which it gets wrong).
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from core.api import explain
from core.engine import Engine

captum_attr = pytest.importorskip("captum.attr")


class ModuleReLUTwin(nn.Module):
    """The layers of conftest's FunctionalReLUCNN, with nn.ReLU modules instead of F.relu."""

    def __init__(self, functional: nn.Module):
        super().__init__()
        self.conv1, self.conv2, self.fc = functional.conv1, functional.conv2, functional.fc
        self.relu1, self.relu2 = nn.ReLU(), nn.ReLU()

    def forward(self, x):
        x = F.max_pool2d(self.relu1(self.conv1(x)), 2)
        x = self.relu2(self.conv2(x))
        return self.fc(x.mean(dim=(2, 3)))


MODELS = ["functional_relu_cnn", "resnet18", "vgg11"]


def _pair(request, name: str):
    """(name, our model, the model Captum runs on: the same one, or the nn.ReLU twin)."""
    model = request.getfixturevalue(name)
    ref = ModuleReLUTwin(model).eval() if name == "functional_relu_cnn" else model
    return name, model, ref


@pytest.fixture(params=MODELS)
def model_pair(request):
    return _pair(request, request.param)


TARGETS = torch.tensor([1, 3])


def captum(cls, model, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cls(model).attribute(*args, **kwargs)


def close(a, b, tol=1e-5):
    return torch.allclose(a, b, rtol=1e-4, atol=tol * float(b.abs().max()))


def close_fast(a, b):
    """For methods run through fast_forward (BatchNorm folded into the convolutions): the same
    function, other float rounding."""
    return torch.allclose(a, b, rtol=1e-4, atol=1e-4 * float(b.abs().max()))


@pytest.mark.parametrize(
    "method,cls",
    [("saliency", "Saliency"), ("deconvnet", "Deconvolution"), ("guided_backprop", "GuidedBackprop")],
)
def test_relu_rule_methods_equal_captum(model_pair, images32, method, cls):
    name, model, ref = model_pair
    ours = explain(model, images32, TARGETS, method=method, progress=False).attributions
    kwargs = {"abs": False} if cls == "Saliency" else {}
    theirs = captum(getattr(captum_attr, cls), ref, images32.clone(), target=TARGETS, **kwargs)
    assert ours.shape == images32.shape
    assert close(ours, theirs)
    if name == "functional_relu_cnn" and cls != "Saliency":
        # Captum's module hooks miss F.relu: on the functional model itself it returns a different map
        wrong = captum(getattr(captum_attr, cls), model, images32.clone(), target=TARGETS)
        assert not close(ours, wrong)


def test_rules_differ_from_each_other(resnet18, images32):
    out = (
        Engine(progress=False)
        .run(resnet18, images32, ["saliency", "deconvnet", "guided_backprop"], targets=TARGETS, isolate=False)
        .explanations
    )
    sal, dec, gbp = (out[m].attributions for m in ("saliency", "deconvnet", "guided_backprop"))
    assert not close(sal, gbp) and not close(dec, gbp) and not close(sal, dec)


# every model with Gauss-Legendre; the other quadrature rules on the small CNN only (time)
@pytest.mark.parametrize(
    "model_name,quad",
    [(m, "gausslegendre") for m in MODELS]
    + [("functional_relu_cnn", "riemann_middle"), ("functional_relu_cnn", "riemann_trapezoid")],
)
def test_integrated_gradients_equals_captum(request, images32, model_name, quad):
    name, model, ref = _pair(request, model_name)
    ours = explain(
        model,
        images32,
        TARGETS,
        method="integrated_gradients",
        steps=8,
        quadrature=quad,
        batch_size=6,
        progress=False,
    ).attributions
    theirs = captum(captum_attr.IntegratedGradients, ref, images32, target=TARGETS, n_steps=8, method=quad)
    if quad == "riemann_trapezoid":  # Captum's trapezoid weights sum to (n - 1)/n (docstring)
        assert not close_fast(ours, theirs)
        ours = ours * 7 / 8
    assert close_fast(ours, theirs)


def test_integrated_gradients_baseline_is_a_parameter(functional_relu_cnn, images32):
    base = torch.full((3, 32, 32), 0.5)
    ours = explain(
        functional_relu_cnn,
        images32,
        TARGETS,
        method="integrated_gradients",
        steps=8,
        baseline=base,
        progress=False,
    ).attributions
    theirs = captum(
        captum_attr.IntegratedGradients,
        functional_relu_cnn,
        images32,
        target=TARGETS,
        baselines=base.expand_as(images32),
        n_steps=8,
    )
    assert close_fast(ours, theirs)


@pytest.mark.parametrize(
    "name,n,steps,tol",
    [
        ("functional_relu_cnn", 2, 64, 0.01),
        ("vgg11", 2, 64, 0.01),
        ("trained", 2, 64, 0.01),
        ("resnet18", 1, 256, 0.015),
    ],
)
def test_integrated_gradients_completeness(request, images32, name, n, steps, tol):
    """Eq. 7 sums to S_c(x) - S_c(x'): within 1 % at 64 steps on the CNN, VGG-11 and the trained
    reference CNN. ResNet-18 with random weights has so many ReLU kinks along the path that
    Gauss-Legendre needs ~256 steps (measured: up to 4 % off at 64 steps, about 1 % at 256)."""
    model = (
        request.getfixturevalue("trained_cnn").model if name == "trained" else request.getfixturevalue(name)
    )
    x, t = images32[:n], TARGETS[:n]
    with torch.no_grad():
        delta = (model(x) - model(torch.zeros_like(x))).gather(1, t.view(-1, 1)).squeeze(1)
    attr = explain(
        model, x, t, method="integrated_gradients", steps=steps, batch_size=128, progress=False
    ).attributions
    err = (attr.sum(dim=(1, 2, 3)) - delta).abs() / delta.abs()
    assert (err < tol).all(), err


# wrapping guided backprop: on the CNN and ResNet only (time)
@pytest.mark.parametrize(
    "model_name,inner,cls",
    [(m, "saliency", "Saliency") for m in MODELS]
    + [(m, "guided_backprop", "GuidedBackprop") for m in MODELS[:2]],
)
def test_smoothgrad_equals_noise_tunnel(request, images32, model_name, inner, cls):
    """Same noise: Captum draws it from the global generator after torch.manual_seed(seed)."""
    name, model, ref = _pair(request, model_name)
    x = images32.clamp(-2.5, 2.5)
    x[:, 0, 0, 0], x[:, 0, 0, 1] = -3.0, 3.0  # every image spans [-3, 3]: sigma = noise * 6
    ours = explain(
        model,
        x,
        TARGETS,
        method="smoothgrad",
        inner=inner,
        samples=5,
        noise=0.1,
        seed=7,
        batch_size=4,
        progress=False,
    ).attributions
    torch.manual_seed(7)
    kwargs = {"abs": False} if cls == "Saliency" else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = captum_attr.NoiseTunnel(getattr(captum_attr, cls)(ref)).attribute(
            x, nt_type="smoothgrad", nt_samples=5, stdevs=0.6, target=TARGETS, **kwargs
        )
    assert close_fast(ours, theirs)
    plain = explain(model, x, TARGETS, method=inner, progress=False).attributions
    assert not close_fast(ours, plain)


def test_smoothgrad_wraps_integrated_gradients(functional_relu_cnn, images32):
    out = explain(
        functional_relu_cnn,
        images32,
        TARGETS,
        method="smoothgrad",
        inner="integrated_gradients",
        samples=3,
        noise=0.1,
        steps=4,
        batch_size=8,
        progress=False,
    )
    assert out.attributions.shape == images32.shape and out.attributions.abs().sum() > 0
    ig = explain(
        functional_relu_cnn, images32, TARGETS, method="integrated_gradients", steps=4, progress=False
    )
    assert not close(out.attributions, ig.attributions)
    with pytest.raises(Exception, match="score_cam"):
        explain(
            functional_relu_cnn, images32, TARGETS, method="smoothgrad", inner="score_cam", progress=False
        )


def test_activation_maximization_raises_the_class_score(vgg11, functional_relu_cnn, images32):
    for model, steps in ((functional_relu_cnn, 30), (vgg11, 8)):
        exp = explain(
            model,
            images32,
            torch.tensor([1, 1]),
            method="activation_maximization",
            steps=steps,
            progress=False,
        )
        initial, final = exp.extras["scores"]["initial"], exp.extras["scores"]["final"]
        assert (final > initial + 0.1 * initial.abs() + 1e-3).all()
        # same class from the same start: the same class model, computed once
        assert torch.equal(exp.attributions[0], exp.attributions[1])
        shown = exp.extras["images"]["class_model"]
        assert shown.shape == images32.shape and shown.min() >= 0 and shown.max() <= 1


def test_activation_maximization_regularization_shrinks_the_image(functional_relu_cnn, images32):
    def norm(l2):
        return explain(
            functional_relu_cnn,
            images32,
            TARGETS,
            method="activation_maximization",
            steps=10,
            l2=l2,
            init="input",
            progress=False,
        ).attributions.norm()

    assert norm(5.0) < norm(0.0)


class Exploding(nn.Module):
    """Raises in forward after its ReLUs ran: the override and the hooks must still be removed."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        y = F.relu(self.relu(self.conv(x)))
        if y.requires_grad:
            raise RuntimeError("boom")
        return y.mean(dim=(2, 3))


@pytest.mark.parametrize("method", ["guided_backprop", "deconvnet", "integrated_gradients", "smoothgrad"])
def test_failures_leave_no_override_or_hook(images32, method):
    model = Exploding().eval()
    before = {k: dict(getattr(model.relu, k)) for k in ("_forward_hooks", "_backward_hooks")}
    with pytest.raises(Exception, match="boom"):
        explain(model, images32, TARGETS, method=method, progress=False)
    assert not torch._C._is_torch_function_mode_enabled()
    assert {k: dict(getattr(model.relu, k)) for k in ("_forward_hooks", "_backward_hooks")} == before
    assert all(p.requires_grad for p in model.parameters()) and not model.training
    x = torch.tensor([-1.0, 2.0], requires_grad=True)
    (g,) = torch.autograd.grad(F.relu(x).sum(), x)
    assert g.tolist() == [0.0, 1.0]  # a plain ReLU again


class CountingModel(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner, self.calls = inner, 0

    def forward(self, x):
        self.calls += 1
        return self.inner(x)


def test_one_forward_serves_every_shared_method(resnet18, images64):
    """saliency, guided, deconvnet and four CAMs from one forward (plus one backward per rule)."""
    layer = {"layer": "inner.layer4"}
    methods = {
        "saliency": {},
        "guided_backprop": {},
        "deconvnet": {},
        "grad_cam": layer,
        "grad_cam_pp": layer,
        "fem": layer,
        "guided_grad_cam": layer,
    }
    model = CountingModel(resnet18)
    together = Engine(progress=False).run(model, images64, methods, targets=TARGETS, isolate=False)
    assert model.calls == 1 and not together.failures
    for m, params in methods.items():
        single = Engine(progress=False).run(model, images64, {m: params}, targets=TARGETS, isolate=False)
        assert close(together.explanations[m].attributions, single.explanations[m].attributions), m
    # no targets: the shared pass explains the predicted classes, and reports the logits
    model.calls = 0
    out = Engine(progress=False).run(model, images64, ["saliency"], isolate=False)
    assert model.calls == 1
    with torch.no_grad():
        logits = resnet18(images64)
    assert torch.allclose(out.logits, logits, atol=1e-5) and torch.equal(out.targets, logits.argmax(1))


def test_fast_forward_gives_true_input_gradients(resnet18, images64):
    """BatchNorm folded, same gradients as the float64 model. Checked on four batches: a batch with
    a near-tie (a ReLU or max-pool decision within float32 rounding, as ``images64`` has on this
    ResNet) routes a gradient differently under any change of summation order (channels-last, or
    the folded weights), so one batch of four may differ; the others agree to 1e-5 of the largest."""
    import copy

    from xai_plugins.toolkit import fast_forward

    def grad(model, x):
        x = x.clone().requires_grad_()
        (g,) = torch.autograd.grad(model(x).gather(1, TARGETS.view(-1, 1)).sum(), x)
        return g

    reference = copy.deepcopy(resnet18).double()
    fast = fast_forward(resnet18)
    assert fast.path.folded is not resnet18  # BatchNorm folded into a copy
    agree = 0
    for seed in range(2, 6):
        x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(seed))
        exact = grad(reference, x.double())
        got = grad(fast, x).double()
        agree += bool(torch.allclose(got, exact, atol=1e-5 * float(exact.abs().max())))
        assert float((got - exact).norm() / exact.norm()) < 0.05
    assert agree >= 3
    with torch.no_grad():
        assert torch.allclose(fast(images64), resnet18(images64), atol=1e-4)


class _ValueBranching(torch.nn.Module):
    """A forward whose path depends on the input's values: a trace would freeze one branch."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.fc = torch.nn.Linear(4, 2)

    def forward(self, x):
        h = torch.relu(self.conv(x))
        if h.mean() > 0.05:
            h = h * 2
        return self.fc(h.mean(dim=(2, 3)))


class _PoolBySize(torch.nn.Module):
    """Global pooling written as ``avg_pool2d(h, h.shape[-1])`` (an old CIFAR-ResNet idiom): a trace
    bakes the kernel size of the image it saw into the graph. With BatchNorm, so it gets folded."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4)
        self.fc = torch.nn.Linear(4, 2)

    def forward(self, x):
        h = torch.relu(self.bn(self.conv(x)))
        return self.fc(torch.nn.functional.avg_pool2d(h, h.shape[-1]).flatten(1))


def test_fast_forward_follows_image_size_and_training_mode(images32, images64):
    """The frozen copy is traced for one image size: another size gets its own (right) answer; a
    model in training mode (batch statistics) is never replaced by its eval-mode folded copy."""
    from xai_plugins.toolkit import fast_forward

    torch.manual_seed(0)
    model = _PoolBySize().eval()
    with torch.no_grad():
        for x in (images32, images64, images32):
            assert torch.allclose(fast_forward(model)(x), model(x), atol=1e-5)
    model.train()
    x = torch.cat([images32, images32.flip(0) * 0.5])
    assert torch.allclose(fast_forward(model)(x), model(x), atol=1e-5)


def test_fast_forward_freezes_for_inference_only_what_it_can_trust(resnet18, functional_relu_cnn, images64):
    """Without gradients on CPU, the folded copy is traced, frozen and optimized for inference:
    same logits as the model. A model with value-dependent control flow is never frozen (the trace
    warns), and still gets the right logits on both branches."""
    from xai_plugins.toolkit import fast_forward

    def frozen_copies(fast) -> list:
        return list(fast.path.frozen.values())

    for model in (resnet18, functional_relu_cnn):
        with torch.no_grad():
            fast = fast_forward(model)
            assert torch.allclose(fast(images64), model(images64), atol=1e-4)
            assert [f is not None for f in frozen_copies(fast)] == [True]
    torch.manual_seed(0)
    branching = _ValueBranching().eval()
    fast = fast_forward(branching)
    with torch.no_grad():
        for scale in (0.01, 10.0):  # both sides of the branch
            x = images64 * scale
            assert torch.allclose(fast(x), branching(x), atol=1e-5)
    assert frozen_copies(fast) == [None]
