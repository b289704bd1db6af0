"""Gradient and CAM explainers against Captum and pytorch-grad-cam (same model, inputs, targets and
settings; peers with their internal batch sizes set to ours)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from bench.harness import Case, quiet
from core.api import explain
from core.engine import Engine
from core.layers import default_layer, resolve_layer

ROWS = 64  # rows per forward/backward, ours and the peers' (internal_batch_size, batch_size)
IG_STEPS = 16
SG_SAMPLES = 8
SG_NOISE = 0.15
AM_STEPS = 10
SHARED = {"saliency": {}, "grad_cam": {}, "grad_cam_pp": {}, "fem": {"weighting": "mask_fraction", "k": 2}}


def _ends_in_gap_linear(model: nn.Module, layer: nn.Module, inputs: torch.Tensor) -> bool:
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    out: list[torch.Tensor] = []
    handle = layer.register_forward_hook(lambda m, a, o: out.append(o))
    try:
        with torch.no_grad():
            model(inputs[:1])
    finally:
        handle.remove()
    return bool(linears) and bool(out) and linears[-1].in_features == out[-1].shape[1]


def cases(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> list[Case]:
    from captum.attr import (
        Deconvolution,
        GuidedBackprop,
        GuidedGradCam,
        IntegratedGradients,
        LayerAttribution,
        LayerGradCam,
        NoiseTunnel,
        Saliency,
    )
    from pytorch_grad_cam import FEM, GradCAM, GradCAMPlusPlus, ScoreCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    b = inputs.shape[0]
    size = tuple(inputs.shape[-2:])
    layer_name = default_layer(model, inputs[:1])
    layer = resolve_layer(model, layer_name)[1]
    pgc_targets = [ClassifierOutputTarget(int(t)) for t in targets]
    span = float(inputs.amax() - inputs.amin())

    def ours(method: str, n: int = b, **params: Any) -> Callable[[], Any]:
        return lambda: explain(
            model, inputs[:n], targets[:n], method=method, progress=False, batch_size=ROWS, **params
        )

    def pgc(cls: type, n: int = b, **attrs: Any) -> Callable[[], Any]:
        def run() -> Any:
            with cls(model, [layer]) as cam:
                for k, v in attrs.items():
                    setattr(cam, k, v)
                return cam(inputs[:n], pgc_targets[:n])

        return quiet(run)

    def captum_grad_cam() -> torch.Tensor:
        attr = LayerGradCam(model, layer).attribute(inputs, target=targets, relu_attributions=True)
        return LayerAttribution.interpolate(attr, size, interpolate_mode="bilinear")

    # Score-CAM runs one forward per channel and image: on a CPU, time it on the first image only.
    sc_n = b if inputs.device.type != "cpu" else 1
    shared_peers = [
        quiet(lambda: Saliency(model).attribute(inputs, target=targets, abs=False)),
        pgc(GradCAM),
        pgc(GradCAMPlusPlus),
        pgc(FEM, k=2),
    ]
    out = [
        Case(
            "saliency",
            ours("saliency"),
            "captum.Saliency",
            quiet(lambda: Saliency(model).attribute(inputs, target=targets, abs=False)),
        ),
        Case(
            "deconvnet",
            ours("deconvnet"),
            "captum.Deconvolution",
            quiet(lambda: Deconvolution(model).attribute(inputs, target=targets)),
        ),
        Case(
            "guided_backprop",
            ours("guided_backprop"),
            "captum.GuidedBackprop",
            quiet(lambda: GuidedBackprop(model).attribute(inputs, target=targets)),
        ),
        Case(
            "integrated_gradients",
            ours("integrated_gradients", steps=IG_STEPS),
            "captum.IntegratedGradients",
            quiet(
                lambda: IntegratedGradients(model).attribute(
                    inputs, target=targets, n_steps=IG_STEPS, method="gausslegendre", internal_batch_size=ROWS
                )
            ),
            note=f"steps={IG_STEPS}, gausslegendre, {ROWS} rows/pass",
        ),
        Case(
            "smoothgrad",
            ours("smoothgrad", samples=SG_SAMPLES, noise=SG_NOISE),
            "captum.NoiseTunnel(Saliency)",
            quiet(
                lambda: NoiseTunnel(Saliency(model)).attribute(
                    inputs,
                    nt_type="smoothgrad",
                    nt_samples=SG_SAMPLES,
                    nt_samples_batch_size=max(1, ROWS // b),
                    stdevs=SG_NOISE * span,
                    target=targets,
                    abs=False,
                )
            ),
            note=f"samples={SG_SAMPLES}",
        ),
        Case(
            "grad_cam",
            ours("grad_cam"),
            "captum.LayerGradCam",
            quiet(captum_grad_cam),
            note=f"layer={layer_name}",
        ),
        Case("grad_cam", ours("grad_cam"), "pytorch_grad_cam.GradCAM", pgc(GradCAM)),
        Case(
            "guided_grad_cam",
            ours("guided_grad_cam", interpolation="nearest"),
            "captum.GuidedGradCam",
            quiet(lambda: GuidedGradCam(model, layer).attribute(inputs, target=targets)),
        ),
        Case("grad_cam_pp", ours("grad_cam_pp"), "pytorch_grad_cam.GradCAMPlusPlus", pgc(GradCAMPlusPlus)),
        Case(
            "fem",
            ours("fem", weighting="mask_fraction", k=2),
            "pytorch_grad_cam.FEM",
            pgc(FEM, k=2),
            note="pytorch-grad-cam's definition (k=2)",
        ),
        Case(
            "score_cam",
            ours("score_cam", n=sc_n),
            "pytorch_grad_cam.ScoreCAM",
            pgc(ScoreCAM, n=sc_n, batch_size=ROWS),
            note=f"first {sc_n} image(s), {ROWS} masks/pass",
            batch=sc_n,
        ),
        Case(
            "activation_maximization",
            ours("activation_maximization", steps=AM_STEPS, init="input"),
            note=f"steps={AM_STEPS}, no peer",
        ),
        Case(
            "shared(" + "+".join(SHARED) + ")",
            lambda: Engine(batch_size=ROWS, progress=False).run(
                model, inputs, SHARED, targets=targets, isolate=False
            ),
            "captum.Saliency+pgc.GradCAM+pgc.GradCAMPlusPlus+pgc.FEM",
            lambda: [peer() for peer in shared_peers],
            note="core.engine.Engine.run, one pass",
        ),
    ]
    if _ends_in_gap_linear(model, layer, inputs):
        out.insert(-2, Case("cam", ours("cam"), note="no peer"))
    return out
