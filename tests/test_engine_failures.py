"""How ``Engine.run`` records (isolated) or raises (``isolate=False``) a method's failure at each
stage: building the explainer, refusing a TorchScript model, the default layer, fitting, and
explaining; and the logits of a run whose only shared-pass method failed before the batches."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from core.engine import Engine
from core.errors import PluginError, UnknownNameError, XAIError
from tests.test_plugin_host import NaNs, Raising, _host_with, _module
from xai_plugins import Explainer

torch.manual_seed(0)
CNN = nn.Sequential(
    nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5)
)
MLP = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 5))  # no layer for grad_cam to default to
X = torch.randn(2, 3, 8, 8)


class RaisesUserError(Explainer):
    name = "raises_user_error"

    def explain(self, model, inputs, targets):
        raise XAIError("a message for the user")


class FitFails(Explainer):
    name = "fit_fails"
    trainable = True

    def fit(self, model, data):
        raise XAIError("no data to fit on")

    def explain(self, model, inputs, targets):
        return torch.zeros_like(inputs)


HOST = _host_with(_module("failing_plugins", Raising, NaNs, RaisesUserError, FitFails))


def _run(model, methods, isolate=True, targets=None, **engine):
    return Engine(progress=False, **engine).run(model.eval(), X, methods, targets=targets, isolate=isolate)


def _only_failure(out):
    assert len(out.failures) == 1
    f = out.failures[0]
    return f.plugin, f.name, f.kind, f.message


def test_config_failure_names_the_method():
    methods = [{"method": "saliency", "params": {"isolate": "nowhere"}, "label": "s"}]
    plugin, label, kind, message = _only_failure(_run(CNN, methods))
    assert (plugin, label, kind) == ("saliency", "s", "config")
    assert message.startswith("s: isolate must be one of")
    with pytest.raises(XAIError, match="isolate must be one of"):
        _run(CNN, methods, isolate=False)
    with pytest.raises(UnknownNameError):  # raised as it is
        _run(CNN, ["no_such_method"], isolate=False)


def test_torchscript_refusal():
    scripted = torch.jit.script(CNN.eval())
    plugin, label, kind, message = _only_failure(_run(scripted, ["grad_cam"], targets=[1, 2]))
    assert (plugin, label, kind) == ("xai_plugins.explainers.cam", "grad_cam", "config")
    assert message.startswith("grad_cam needs the model's Python modules")
    with pytest.raises(XAIError, match="needs the model's Python modules") as info:
        _run(scripted, ["grad_cam"], isolate=False, targets=[1, 2])
    assert type(info.value) is XAIError and info.value.__cause__ is None


def test_default_layer_failure():
    out = _run(MLP, ["grad_cam", "saliency"])
    plugin, label, kind, message = _only_failure(out)
    assert (plugin, label, kind) == ("xai_plugins.explainers.cam", "grad_cam", "config")
    assert message.startswith("could not find a convolutional or token layer")  # an XAIError's own
    assert set(out.explanations) == {"saliency"}
    with pytest.raises(XAIError, match="could not find a convolutional or token layer"):
        _run(MLP, ["grad_cam"], isolate=False)


def test_fit_failure_names_the_type(tmp_path):
    plugin, label, kind, message = _only_failure(_run(CNN, ["fit_fails"], host=HOST, fit_root=tmp_path))
    assert (plugin, label, kind) == ("failing_plugins", "fit_fails", "fit")
    assert message == "XAIError: no data to fit on"
    with pytest.raises(XAIError, match="^no data to fit on$") as info:
        _run(CNN, ["fit_fails"], isolate=False, host=HOST, fit_root=tmp_path)
    assert type(info.value) is XAIError


def test_explain_failures():
    out = _run(CNN, ["raising", "nans", "raises_user_error", "saliency"], host=HOST)
    got = {f.name: (f.plugin, f.kind, f.message) for f in out.failures}
    assert got["raising"] == ("failing_plugins", "exception", "RuntimeError: boom")
    assert got["raises_user_error"] == ("failing_plugins", "exception", "a message for the user")
    assert got["nans"] == (
        "failing_plugins",
        "nan",
        "plugin 'nans' failed (nan): attributions contain NaN or infinite values",
    )
    assert set(out.explanations) == {"saliency"}
    with pytest.raises(PluginError) as info:
        _run(CNN, ["raising"], isolate=False, host=HOST)
    assert (info.value.plugin, info.value.kind, info.value.message) == (
        "raising",
        "exception",
        "RuntimeError: boom",
    )
    assert isinstance(info.value.__cause__, RuntimeError)
    with pytest.raises(XAIError, match="^a message for the user$") as user:
        _run(CNN, ["raises_user_error"], isolate=False, host=HOST)
    assert type(user.value) is XAIError  # re-raised as it is, not wrapped
    with pytest.raises(PluginError) as nan:
        _run(CNN, ["nans"], isolate=False, host=HOST)
    assert (nan.value.plugin, nan.value.kind, nan.value.__cause__) == ("nans", "nan", None)


@pytest.mark.parametrize("targets", [None, [1, 2]])
def test_logits_when_the_only_shared_method_failed_before_the_batches(targets):
    """grad_cam (a shared-pass method) fails at its default layer: the run, planned as fused, gets
    the logits from each slice's forward (before, with targets given: KeyError 'logits')."""
    for methods in (["grad_cam"], ["grad_cam", "occlusion"]):
        out = _run(MLP, methods, targets=targets)
        with torch.no_grad():
            expected = MLP(X)
        assert out.logits is not None and torch.allclose(out.logits, expected)
        want = expected.argmax(1) if targets is None else torch.tensor(targets)
        assert torch.equal(out.targets, want)
        assert set(out.explanations) == set(methods) - {"grad_cam"}
