"""pytorch-grad-cam bridge: its CAM classes as explainers named ``gradcam_<snake_case>``
(``gradcam_eigen_cam``, ``gradcam_layer_cam``, ``gradcam_x_grad_cam``, ...).

Parameters: ``layer`` (default: the last convolutional stage), ``aug_smooth``, ``eigen_smooth``
and ``batch_size`` (for the perturbation CAMs). pytorch-grad-cam returns maps that are already
upsampled and min-max normalized per image; they become B x 1 x H x W map attributions. Active only
when grad-cam is installed (``pip install 'xai-mlops[gradcam]'``).
"""

from __future__ import annotations

from typing import Any

import torch

from xai_plugins import Explainer, XAIError, hookimpl, provides
from xai_plugins.bridges import snake
from xai_plugins.toolkit import resolve_layer

SKIP = {
    "BaseCAM",
    "GradCAM",
    "GradCAMPlusPlus",
    "ScoreCAM",
    "RandomCAM",
    "SegEigenCAM",
}  # native or not useful
COMMON = ("EigenCAM", "LayerCAM", "XGradCAM", "HiResCAM", "AblationCAM", "EigenGradCAM")


class GradCamLibExplainer(Explainer):
    """Base of the generated bridge classes; ``cam_class`` is set per subclass."""

    space = "map"
    cam_class: Any = None
    params = {"layer": None, "aug_smooth": False, "eigen_smooth": False, "batch_size": 32}

    def explain(self, model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        layer = resolve_layer(model, self.config["layer"])[1]
        cam = self.cam_class(model=model, target_layers=[layer])
        if hasattr(cam, "batch_size"):
            cam.batch_size = int(self.config["batch_size"])
        try:
            x = inputs.detach().clone().requires_grad_(True)  # gradients even with frozen parameters
            with torch.enable_grad():
                maps = cam(
                    input_tensor=x,
                    targets=[ClassifierOutputTarget(int(t)) for t in targets],
                    aug_smooth=bool(self.config["aug_smooth"]),
                    eigen_smooth=bool(self.config["eigen_smooth"]),
                )
        finally:
            cam.activations_and_grads.release()
        return torch.as_tensor(maps, dtype=torch.float32).unsqueeze(1)


def _missing(class_name: str) -> type:
    def init(self, **params):
        raise XAIError(
            f"gradcam_{snake(class_name)} needs grad-cam, which is not installed: "
            "pip install 'xai-mlops[gradcam]'"
        )

    return type(
        f"Missing{class_name}",
        (Explainer,),
        {"name": f"gradcam_{snake(class_name)}", "__init__": init, "__doc__": "(needs grad-cam)"},
    )


def gradcam_classes() -> list[type]:
    try:
        import pytorch_grad_cam as lib
        from pytorch_grad_cam.base_cam import BaseCAM
    except Exception:
        return [_missing(n) for n in COMMON]
    out = []
    for name in sorted(dir(lib)):
        cls = getattr(lib, name)
        if isinstance(cls, type) and issubclass(cls, BaseCAM) and name not in SKIP:
            doc = f"pytorch-grad-cam's {name} through the bridge."
            out.append(
                type(
                    f"Lib{name}",
                    (GradCamLibExplainer,),
                    {"name": f"gradcam_{snake(name)}", "cam_class": cls, "__doc__": doc},
                )
            )
    return out


@hookimpl
@provides("gradcam_*")  # the library is imported only when one of its methods is asked for
def xai_explainers():
    return gradcam_classes()
