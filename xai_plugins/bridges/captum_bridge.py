"""Captum bridge: any Captum attribution class as an explainer named ``captum_<snake_case>``.

``captum_layer_conductance``, ``captum_lime``, ``captum_occlusion``, ... take the class's
``attribute()`` keyword arguments as parameters (``n_steps``, ``sliding_window_shapes``, ...) plus
``layer`` for layer methods; the result is mapped onto the Explanation contract: input-shaped
attributions stay in input space, layer attributions are summed over channels into a map that the
engine upsamples. Active only when captum is installed (``pip install 'xai-mlops[captum]'``); the
names of the common classes are still listed without it and explain why they cannot run.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from xai_plugins import Explainer, XAIError, hookimpl, provides
from xai_plugins.bridges import snake
from xai_plugins.toolkit import resolve_layer

SKIP = {
    "Attribution",
    "GradientAttribution",
    "LayerAttribution",
    "NeuronAttribution",
    "PerturbationAttribution",
    "LimeBase",
    "DataLoaderAttribution",
    "NoiseTunnel",
    "LLMAttribution",
    "LLMGradientAttribution",
    "RemoteLLMAttribution",
}
HIDDEN_ARGS = {
    "self",
    "inputs",
    "target",
    "additional_forward_args",
    "return_convergence_delta",
    "grad_kwargs",
    "show_progress",
    "kwargs",
    "args",
}
COMMON = (
    "IntegratedGradients",
    "Saliency",
    "Occlusion",
    "Lime",
    "KernelShap",
    "LayerConductance",
    "LayerGradCam",
    "DeepLift",
    "GradientShap",
    "InputXGradient",
    "FeatureAblation",
)


class CaptumExplainer(Explainer):
    """Base of the generated bridge classes; ``captum_class`` is set per subclass."""

    space = "input"
    captum_class: Any = None

    def explain(self, model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> Any:
        cls = self.captum_class
        init_params = inspect.signature(cls.__init__).parameters
        args: list[Any] = [model]
        if "layer" in init_params:
            if self.config.get("layer") is None:
                raise XAIError(f"{self.name} needs layer=")
            args.append(resolve_layer(model, self.config["layer"])[1])
        method = cls(*args)
        kwargs = {k: _tupled(v) for k, v in self.config.items() if k != "layer" and v is not None}
        x = inputs.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            out = method.attribute(x, target=targets, **kwargs)
        attr = out[0] if isinstance(out, tuple) else out
        attr = attr.detach().float()
        if tuple(attr.shape) == tuple(inputs.shape):
            self.space = "input"
            return attr
        if attr.dim() == 4:
            self.space = "map"
            return attr.sum(dim=1, keepdim=True)
        raise XAIError(
            f"{self.name}: Captum returned attributions of shape {tuple(attr.shape)}, which are "
            "neither input-shaped nor spatial; choose a convolutional layer"
        )


def _tupled(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def _make(cls: type) -> type:
    params: dict[str, Any] = {}
    if "layer" in inspect.signature(cls.__init__).parameters:
        params["layer"] = None
    for name, p in inspect.signature(cls.attribute).parameters.items():
        if name in HIDDEN_ARGS or p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
            continue
        default = p.default if p.default is not inspect.Parameter.empty else None
        params[name] = default if isinstance(default, (int, float, str, bool, type(None), tuple)) else None
    doc = f"Captum's {cls.__name__} through the bridge (parameters: attribute() keyword arguments)."
    return type(
        f"Captum{cls.__name__}",
        (CaptumExplainer,),
        {"name": f"captum_{snake(cls.__name__)}", "params": params, "captum_class": cls, "__doc__": doc},
    )


def _missing(class_name: str) -> type:
    def explain(self, model, inputs, targets):
        raise XAIError(f"{self.name} needs captum: pip install 'xai-mlops[captum]'")

    def init(self, **params):
        raise XAIError(
            f"captum_{snake(class_name)} needs captum, which is not installed: "
            "pip install 'xai-mlops[captum]'"
        )

    return type(
        f"Missing{class_name}",
        (Explainer,),
        {
            "name": f"captum_{snake(class_name)}",
            "__init__": init,
            "explain": explain,
            "__doc__": "(needs captum)",
        },
    )


def captum_classes() -> list[type]:
    try:
        import captum.attr as attr_mod
        from captum.attr._utils.attribution import Attribution
    except Exception:
        return [_missing(n) for n in COMMON]
    out = []
    for name, cls in sorted(vars(attr_mod).items()):
        if (
            not inspect.isclass(cls)
            or not issubclass(cls, Attribution)
            or name in SKIP
            or name.startswith("Neuron")
        ):
            continue
        if inspect.isabstract(cls):
            continue
        out.append(_make(cls))
    return out


@hookimpl
@provides("captum_*")  # the library is imported only when one of its methods is asked for
def xai_explainers():
    return captum_classes()
