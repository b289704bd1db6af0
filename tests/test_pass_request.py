"""Issue 18: an explainer declares one ``PassRequest``; the engine merges the requests of a run
into one pass; the flags of earlier versions still work on third-party subclasses."""

from __future__ import annotations

import types

import torch
from torch import nn

from core.engine import Engine
from core.plugins import PluginHost, PluginInfo
from xai_plugins import Explainer, PassRequest, hookimpl
from xai_plugins.explainers.cam import GradCAM
from xai_plugins.explainers.gradient import Saliency
from xai_plugins.toolkit import guided_relu_rule

LEGACY_FLAGS = ("shared_pass", "needs_layer", "needs_input_grad", "relu_rule", "needs_layer_grad", "family")


def test_explainer_declares_how_it_runs_in_three_names():
    """What the engine and the sanity check read: ``pass_request``, ``rowwise``, ``python_modules``
    (at most four pass-related declarations, as the issue asks); none of the old flags is left."""
    assert not [f for f in LEGACY_FLAGS if hasattr(Explainer, f)]
    declared = {
        k
        for k, v in vars(Explainer).items()
        if not k.startswith("_") and not callable(v) and k != "kind_label"
    }
    assert declared == {"space", "trainable", "signed", "pass_request", "rowwise", "python_modules"}


def test_merging_requests_unions_layers_rules_and_gradients():
    from core.passes import merge_requests

    rule = ("guided", guided_relu_rule)
    plan = merge_requests(
        [
            (PassRequest(input_grad=True), None),
            (PassRequest(layer=True, layer_grad=False), "layer2"),
            (PassRequest(layer=True), "layer1"),
            (PassRequest(layer=True, layer_grad=False, relu_rule=rule), "layer2"),
        ]
    )
    assert plan.layers == ("layer1", "layer2") and plan.input_grad
    assert plan.relu_rules == dict([rule]) and plan.layer_grads
    forward_only = merge_requests([(PassRequest(layer=True, layer_grad=False), "layer4")])
    assert not forward_only.layer_grads and not forward_only.input_grad and not forward_only.relu_rules


class LegacySaliency(Explainer):
    """A third-party plugin written against the old flags."""

    name = "legacy_saliency"
    shared_pass = True
    needs_input_grad = True

    def from_pass(self, gradient_pass):
        return gradient_pass.input_grad


class LegacyActivations(Explainer):
    """Old flags: the layer's activations only, no gradient (FEM-like)."""

    name = "legacy_activations"
    space = "map"
    shared_pass = True
    needs_layer = True
    needs_layer_grad = False
    params = {"layer": None}

    def from_pass(self, gradient_pass):
        return gradient_pass.activations[self.config["layer"]].mean(1, keepdim=True)


class OwnPassSaliency(Saliency):
    """A subclass of a built-in that turns the shared pass off with the old flag."""

    name = "own_pass_saliency"
    shared_pass = False


def test_old_flags_become_the_request():
    assert LegacySaliency.pass_request == PassRequest(input_grad=True)
    assert LegacyActivations.pass_request == PassRequest(layer=True, layer_grad=False)
    assert OwnPassSaliency.pass_request is None
    assert GradCAM.pass_request == PassRequest(layer=True)


def _host_with(*classes: type) -> PluginHost:
    mod = types.ModuleType("legacy_plugins")
    mod.xai_explainers = hookimpl(lambda: list(classes))
    host = PluginHost(load_entry_points=False)
    host.pm.register(mod, name=mod.__name__)
    host.infos[mod.__name__] = PluginInfo(mod.__name__, "test", "0")
    host._classes = None
    return host


class _Counting(nn.Module):
    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner, self.calls = inner, 0

    def forward(self, x):
        self.calls += 1
        return self.inner(x)


def test_legacy_and_builtin_methods_share_one_forward_and_agree(functional_relu_cnn, images32):
    host = _host_with(LegacySaliency, LegacyActivations, OwnPassSaliency)
    model = _Counting(functional_relu_cnn)
    t = torch.tensor([1, 0])[: images32.shape[0]]
    layer = next(n for n, m in model.named_modules() if isinstance(m, nn.Conv2d))
    methods = {
        "saliency": {},
        "legacy_saliency": {},
        "legacy_activations": {"layer": layer},
        "grad_cam": {"layer": layer},
    }
    out = Engine(host=host, progress=False).run(model, images32, methods, targets=t, isolate=False)
    assert model.calls == 1 and set(out.explanations) == set(methods)  # one merged pass
    e = out.explanations
    assert torch.allclose(e["legacy_saliency"].attributions, e["saliency"].attributions)
    assert float(e["legacy_activations"].maps.std()) > 0
    model.calls = 0
    alone = Engine(host=host, progress=False).run(
        model, images32, {"own_pass_saliency": {}}, targets=t, isolate=False
    )
    assert model.calls >= 1
    assert torch.allclose(alone.explanations["own_pass_saliency"].attributions, e["saliency"].attributions)


def test_the_plugin_check_runs_each_request_as_declared():
    """`xai plugins --check` serves a shared method from a pass built from its own request: a ReLU
    rule included (guided backpropagation failed there with KeyError 'guided' before)."""
    from core.plugin_check import check_explainer

    for method in ("guided_backprop", "guided_grad_cam", "deconvnet", "fem", "saliency"):
        report = check_explainer(method)
        assert report["passed"], (method, [c for c in report["checks"] if not c["passed"]])
