"""The public API on the first two methods: agreement with Captum, the contract of `explain`,
and the model left exactly as found."""

from __future__ import annotations

import copy

import pytest
import torch
from captum.attr import LayerGradCam, Saliency

from core.api import explain
from core.errors import InputError, ModelError, UnknownNameError
from core.tensors import upsample


def _snapshot(model):
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "training": [m.training for m in model.modules()],
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "hooks": [
            len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
            for m in model.modules()
        ],
    }


def _assert_unchanged(model, snap):
    now = _snapshot(model)
    assert now["training"] == snap["training"]
    assert now["requires_grad"] == snap["requires_grad"]
    assert now["hooks"] == snap["hooks"]
    for k, v in snap["state"].items():
        assert torch.equal(now["state"][k], v), k


@pytest.mark.parametrize(
    "model_name,layer",
    [
        ("functional_relu_cnn", "conv2"),
        ("residual_net", "bn2"),
        ("resnet18", "layer4"),
        ("vgg11", "features"),
    ],
)
def test_saliency_and_grad_cam_match_captum(request, model_name, layer):
    model = request.getfixturevalue(model_name)
    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, 64)
    model.train()  # explain must use eval mode and give the flag back
    snap = _snapshot(model)
    sal = explain(model, x, method="saliency")
    cam = explain(model, x, method="grad_cam", layer=layer)
    _assert_unchanged(model, snap)
    model.eval()
    ref_sal = Saliency(model).attribute(x.clone().requires_grad_(), target=sal.targets, abs=False)
    torch.testing.assert_close(sal.attributions, ref_sal, rtol=1e-4, atol=1e-6)
    module = dict(model.named_modules())[layer]
    ref_cam = LayerGradCam(model, module).attribute(x, target=cam.targets, relu_attributions=True)
    torch.testing.assert_close(cam.attributions, upsample(ref_cam, (64, 64)), rtol=1e-4, atol=1e-6)
    assert sal.maps.shape == (2, 64, 64) and cam.attributions.shape == (2, 1, 64, 64)
    assert 0 <= float(cam.maps.min()) and float(cam.maps.max()) <= 1
    # the saliency map is Eq. 6: max over channels of |gradient|, normalized
    expected = ref_sal.abs().amax(1)
    expected = expected / expected.amax(dim=(1, 2), keepdim=True)
    torch.testing.assert_close(sal.maps, expected, rtol=1e-4, atol=1e-6)


def test_default_layer_is_last_conv_stage(resnet18, vgg11, functional_relu_cnn):
    x = torch.randn(1, 3, 64, 64)
    assert explain(resnet18, x, method="grad_cam").params["layer"] == "layer4"
    assert explain(vgg11, x, method="grad_cam").params["layer"] == "features"
    assert explain(functional_relu_cnn, x, method="grad_cam").params["layer"] == "conv2"


def test_targets_default_to_prediction_and_are_checked(functional_relu_cnn, images32):
    with torch.no_grad():
        pred = functional_relu_cnn(images32).argmax(1)
    assert torch.equal(explain(functional_relu_cnn, images32, method="saliency").targets, pred)
    other = explain(functional_relu_cnn, images32, targets=[3, 1], method="saliency")
    assert other.targets.tolist() == [3, 1]
    with pytest.raises(InputError, match="out of range"):
        explain(functional_relu_cnn, images32, targets=9, method="saliency")


def test_batches_give_the_same_result(functional_relu_cnn):
    x = torch.randn(5, 3, 32, 32)
    whole = explain(functional_relu_cnn, x, method="grad_cam", batch_size=5)
    parts = explain(functional_relu_cnn, x, method="grad_cam", batch_size=2)
    torch.testing.assert_close(whole.attributions, parts.attributions)


def test_unknown_method_and_parameter_list_known_ones(functional_relu_cnn, images32):
    with pytest.raises(UnknownNameError, match="grad_cam"):
        explain(functional_relu_cnn, images32, method="gradcam")
    with pytest.raises(UnknownNameError, match="layer"):
        explain(functional_relu_cnn, images32, method="grad_cam", lyer="conv2")


def test_model_with_wrong_output_is_refused(images32):
    class Segmenter(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 2, 3, padding=1)

        def forward(self, x):
            return self.conv(x)

    model = Segmenter()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ModelError, match="batch x classes"):
        explain(model, images32, method="saliency")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_model_restored_when_method_raises(functional_relu_cnn, images32):
    snap = _snapshot(functional_relu_cnn)
    with pytest.raises(Exception, match="no layer"):
        explain(functional_relu_cnn, images32, method="grad_cam", layer="nope")
    _assert_unchanged(functional_relu_cnn, snap)


def test_torchscript_models_get_gradients_and_a_clear_refusal_for_hooking_methods(
    functional_relu_cnn, images32, tmp_path
):
    """A TorchScript file (what `xai explain --model` loads safely) runs its own graph: gradient and
    perturbation methods work on it as on the module; methods that hook layers or change the ReLU
    backward are refused in one line instead of returning plain gradients, and the other methods of
    the same run still finish."""
    from core.engine import Engine
    from core.errors import XAIError

    path = tmp_path / "net.pt"
    torch.jit.trace(functional_relu_cnn, images32[:1]).save(str(path))
    scripted = torch.jit.load(str(path))
    ours = explain(scripted, images32, method="saliency").attributions
    assert torch.allclose(
        ours, explain(functional_relu_cnn, images32, method="saliency").attributions, atol=1e-6
    )
    for method in ("guided_backprop", "deconvnet", "lrp", "deeplift", "grad_cam", "perception_visualization"):
        with pytest.raises(XAIError, match=f"^{method} needs the model's Python modules"):
            explain(scripted, images32, method=method)
    out = Engine(progress=False).run(scripted, images32, ["saliency", "grad_cam", "occlusion"], isolate=True)
    assert set(out.explanations) == {"saliency", "occlusion"}
    (failure,) = out.failures
    assert failure.name == "grad_cam" and "\n" not in failure.message


@pytest.mark.parametrize(
    "method,params",
    [
        ("lrp", {}),
        ("occlusion", {}),
        ("score_cam", {}),
        ("integrated_gradients", {"steps": 8}),
        ("deeplift", {}),
    ],
)
def test_weights_written_through_data_are_seen(residual_net, images32, method, params):
    """Writes through ``.data`` do not bump a tensor's version counter: the caches of folded
    BatchNorm, frozen inference copies and LRP rules must still see them (a content checksum)."""
    model = residual_net
    explain(model, images32, method=method, **params)  # fills the caches
    with torch.no_grad():
        for p in model.parameters():
            p.data.mul_(-0.7)
        model.bn1.running_mean.data.add_(0.3)
    again = explain(model, images32, method=method, **params).attributions
    fresh = explain(copy.deepcopy(model), images32, method=method, **params).attributions
    assert torch.allclose(again, fresh, atol=1e-5)


@pytest.mark.parametrize(
    "entry, bad",
    [({"method": "grad_cam", "layer": "conv2"}, "layer"), ({"params": {}}, "no method")],
)
def test_a_method_entry_with_a_stray_key_is_refused_not_ignored(entry, bad):
    """``{"method": "grad_cam", "layer": ...}`` used to run Grad-CAM at its default layer, silently."""
    from core.engine import parse_requests
    from core.errors import XAIError

    with pytest.raises(XAIError) as info:
        parse_requests([entry])
    message = str(info.value)
    assert bad in message and "params" in message and "\n" not in message
    (request,) = parse_requests([{"method": "grad_cam", "params": {"layer": "conv2"}}])
    assert request.method == "grad_cam" and request.params == {"layer": "conv2"}
