"""The Captum and pytorch-grad-cam bridges run methods we do not implement natively and give
exactly the libraries' own outputs."""

from __future__ import annotations

import torch
from captum.attr import LayerConductance, Occlusion
from pytorch_grad_cam import EigenCAM, LayerCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from core.api import explain
from core.tensors import upsample
from xai_plugins.bridges import snake


def test_snake_names():
    assert snake("LayerConductance") == "layer_conductance"
    assert snake("GradCAMPlusPlus") == "grad_cam_plus_plus"
    assert snake("KPCA_CAM") == "kpca_cam" and snake("XGradCAM") == "x_grad_cam"


def test_layer_conductance_equals_captum(functional_relu_cnn):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    exp = explain(
        functional_relu_cnn, x, targets=[1, 2], method="captum_layer_conductance", layer="conv2", n_steps=16
    )
    ref = LayerConductance(functional_relu_cnn, functional_relu_cnn.conv2).attribute(
        x, target=torch.tensor([1, 2]), n_steps=16
    )
    torch.testing.assert_close(
        exp.attributions, upsample(ref.sum(1, keepdim=True), (32, 32)), rtol=1e-4, atol=1e-6
    )


def test_occlusion_through_bridge_is_input_space(functional_relu_cnn):
    x = torch.randn(1, 3, 16, 16)
    exp = explain(
        functional_relu_cnn,
        x,
        targets=0,
        method="captum_occlusion",
        sliding_window_shapes=[3, 4, 4],
        strides=[3, 2, 2],
    )
    ref = Occlusion(functional_relu_cnn).attribute(
        x, target=0, sliding_window_shapes=(3, 4, 4), strides=(3, 2, 2)
    )
    torch.testing.assert_close(exp.attributions, ref)


def test_gradcam_library_cams_equal_theirs(resnet18):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, 64)
    for name, cls in (("gradcam_eigen_cam", EigenCAM), ("gradcam_layer_cam", LayerCAM)):
        exp = explain(resnet18, x, targets=[0, 3], method=name, layer="layer3")
        with cls(model=resnet18, target_layers=[resnet18.layer3]) as cam:
            ref = cam(
                input_tensor=x.clone().requires_grad_(True),
                targets=[ClassifierOutputTarget(0), ClassifierOutputTarget(3)],
            )
        torch.testing.assert_close(exp.attributions[:, 0], torch.as_tensor(ref), rtol=1e-4, atol=1e-5)
    assert all(not m._forward_hooks for m in resnet18.modules())
