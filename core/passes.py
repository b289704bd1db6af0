"""One forward and one backward that serve every gradient/CAM method asking for them.

Saliency needs the input gradient, Grad-CAM / Grad-CAM++ / FEM need a layer's activations and
gradients: one ``GradientPass`` computes all of them with a single ``torch.autograd.grad`` call.
Methods that only change the ReLU backward (guided backpropagation, deconvnet) share the same
forward: each such rule costs one more backward (``relu_rules``), not another forward.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from core.fastpath import uses_channels_last
from core.hooks import ReLURule, capture_layers, switchable_relu
from core.layers import resolve_layer, spatial_view
from core.tensors import select_targets, spatial_size


@dataclass(frozen=True)
class PassRequest:
    """What one explainer needs from the engine's shared forward/backward; the engine merges the
    requests of every method of a batch into one pass (``merge_requests``).

    ``layer``: capture the activations of the explainer's ``config["layer"]``; ``layer_grad``: and
    their gradients (False: FEM, CAM, Score-CAM read activations only); ``input_grad``: the gradient
    of the target logits with respect to the inputs; ``relu_rule``: ``(name, rule)`` with
    ``rule(grad_output, relu_output) -> grad_input``, one more backward with that ReLU backward
    (guided backpropagation, deconvnet), read from ``GradientPass.rule_grads[name]``.
    """

    layer: bool = False
    layer_grad: bool = True
    input_grad: bool = False
    relu_rule: tuple[str, ReLURule] | None = None


@dataclass(frozen=True)
class MergedPass:
    """The arguments of ``run_gradient_pass`` that serve a set of requests at once."""

    layers: tuple[str, ...]
    input_grad: bool
    relu_rules: dict[str, ReLURule]
    layer_grads: bool

    def run(self, model: nn.Module, x: torch.Tensor, targets: torch.Tensor | None) -> GradientPass:
        """The one forward/backward on ``x`` that serves every merged request."""
        return run_gradient_pass(
            model,
            x,
            targets,
            self.layers,
            self.input_grad,
            relu_rules=self.relu_rules,
            layer_grads=self.layer_grads,
        )


def merge_requests(requests: list[tuple[PassRequest, Any]]) -> MergedPass:
    """One pass for several ``(request, layer)`` pairs (``layer``: the method's configured layer)."""
    layers = tuple(sorted({layer for r, layer in requests if r.layer and layer is not None}))
    return MergedPass(
        layers=layers,
        input_grad=any(r.input_grad for r, _ in requests),
        relu_rules=dict(r.relu_rule for r, _ in requests if r.relu_rule is not None),
        layer_grads=any(r.layer and r.layer_grad for r, _ in requests),
    )


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
    rule_grads: dict[str, torch.Tensor] = field(default_factory=dict)  # input grads per ReLU rule


def run_gradient_pass(
    model: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor | None,
    layers: list[str] | tuple[str, ...] = (),
    input_grad: bool = False,
    score_fn=None,
    relu_rules: dict[str, ReLURule] | None = None,
    layer_grads: bool = True,
) -> GradientPass:
    """Forward ``inputs``, backpropagate the sum of target logits once.

    ``targets`` None explains the predicted class (argmax of this very forward; the pass then
    holds the targets it used). ``score_fn(logits, targets) -> scalar`` overrides the objective
    (default: the sum over the batch of each sample's target logit, as Captum and
    pytorch-grad-cam use). ``relu_rules`` (name -> ``rule(grad_out, relu_out)``): the same
    forward also yields the input gradient under each modified ReLU backward, in ``rule_grads``.
    ``layer_grads`` False (with no input gradient and no rule): a forward only, without autograd,
    for methods that read activations alone (FEM, CAM, Score-CAM); ``gradients`` stays empty.
    """
    modules = dict(resolve_layer(model, name) for name in layers)
    rules = dict(relu_rules or {})
    backward = layer_grads or input_grad or bool(rules)
    x = inputs.detach().clone().requires_grad_(input_grad or bool(rules))
    # Without an input gradient nothing before the captured layers is backpropagated: on CPU that
    # part runs in channels-last memory format (oneDNN convolutions run about 1.2-1.3x faster on
    # it), and the captures hand a contiguous copy on, so every backward runs in the default layout
    # (channels-last input gradients can take another ReLU route at a near-tie: core.fastpath). Any failure
    # (a ``view`` on a channels-last tensor, ...) reruns the forward contiguous.
    channels_last = uses_channels_last(x, x.requires_grad)
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.enable_grad() if backward else torch.no_grad())
        caps = stack.enter_context(capture_layers(modules, contiguous=channels_last))
        switch = stack.enter_context(switchable_relu()) if rules else None
        logits = _forward(model, x, caps, channels_last)
        if targets is None:
            targets = logits.detach().argmax(1)
        chosen = select_targets(logits, targets)  # also checks the targets against the logits
        score = (score_fn(logits, targets) if score_fn else chosen.sum()) if backward else None
        wrt: list[torch.Tensor] = [x] if input_grad else []
        outputs: dict[str, torch.Tensor] = {}
        for name, cap in caps.items():
            if cap.output is None:
                raise RuntimeError(f"layer {name!r} was not called in the forward pass")
            outputs[name] = cap.output
        wrt += list(outputs.values())
        grads: tuple[torch.Tensor | None, ...] = ()
        if score is not None and wrt:
            grads = torch.autograd.grad(score, wrt, allow_unused=True, retain_graph=bool(rules))
        rule_grads: dict[str, torch.Tensor] = {}
        for i, (name, rule) in enumerate(rules.items()):
            assert switch is not None and score is not None  # rules imply a backward and the switch
            switch.rule = rule
            (g,) = torch.autograd.grad(score, x, allow_unused=True, retain_graph=i < len(rules) - 1)
            rule_grads[name] = g if g is not None else torch.zeros_like(x)
    result = GradientPass(model, inputs, targets, logits.detach(), rule_grads=rule_grads)
    offset = 0
    if input_grad:
        g0 = grads[0] if grads else None
        result.input_grad = g0 if g0 is not None else torch.zeros_like(x)
        offset = 1
    size = spatial_size(inputs)
    for i, (name, out) in enumerate(outputs.items()):
        # B x C x h x w whatever the layer's layout (channels last, tokens): activations and
        # gradients go through the same re-indexing
        act = out.detach()
        result.activations[name] = spatial_view(act, size, name)
        if backward:
            layer_grad = grads[offset + i]
            if layer_grad is None:
                layer_grad = torch.zeros_like(act)
            result.gradients[name] = spatial_view(layer_grad, size, name)
    return result


def _forward(model: nn.Module, x: torch.Tensor, caps: dict, channels_last: bool) -> torch.Tensor:
    if not channels_last:
        return model(x)
    try:
        return model(x.contiguous(memory_format=torch.channels_last))
    except Exception:  # noqa: BLE001 - rerun in the default layout; a real error raises there
        for cap in caps.values():
            cap.output, cap.outputs = None, []
        return model(x)
