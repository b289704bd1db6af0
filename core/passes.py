"""One forward and one backward that serve every gradient/CAM method asking for them.

Saliency needs the input gradient, Grad-CAM / Grad-CAM++ / FEM need a layer's activations and
gradients: one ``GradientPass`` computes all of them with a single ``torch.autograd.grad`` call.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from core.hooks import capture_layers
from core.layers import resolve_layer
from core.tensors import select_targets


@dataclass
class GradientPass:
    """Results of one forward/backward on a batch for the target-class logits."""

    model: nn.Module
    inputs: torch.Tensor
    targets: torch.Tensor
    logits: torch.Tensor
    input_grad: torch.Tensor | None = None
    activations: dict[str, torch.Tensor] = field(default_factory=dict)
    gradients: dict[str, torch.Tensor] = field(default_factory=dict)


def run_gradient_pass(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor,
                      layers: list[str] | tuple[str, ...] = (), input_grad: bool = False,
                      score_fn=None) -> GradientPass:
    """Forward ``inputs``, backpropagate the sum of target logits once.

    ``score_fn(logits, targets) -> scalar`` overrides the objective (default: the sum over the
    batch of each sample's target logit, as Captum and pytorch-grad-cam use).
    """
    modules = dict(resolve_layer(model, name) for name in layers)
    x = inputs.detach().clone().requires_grad_(input_grad)
    with torch.enable_grad(), capture_layers(modules) as caps:
        logits = model(x)
        score = score_fn(logits, targets) if score_fn else select_targets(logits, targets).sum()
        wrt: list[torch.Tensor] = []
        if input_grad:
            wrt.append(x)
        layer_names = list(caps)
        for name in layer_names:
            if caps[name].output is None:
                raise RuntimeError(f"layer {name!r} was not called in the forward pass")
            wrt.append(caps[name].output)
        grads = torch.autograd.grad(score, wrt, allow_unused=True) if wrt else ()
    result = GradientPass(model, inputs, targets, logits.detach())
    offset = 0
    if input_grad:
        result.input_grad = grads[0] if grads[0] is not None else torch.zeros_like(x)
        offset = 1
    for i, name in enumerate(layer_names):
        act = caps[name].output.detach()
        g = grads[offset + i]
        result.activations[name] = act
        result.gradients[name] = g if g is not None else torch.zeros_like(act)
    return result
