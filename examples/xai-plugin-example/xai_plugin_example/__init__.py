"""A minimal xai plugin: one explainer and one metric, using only the public plugin API."""

from __future__ import annotations

import torch

from xai_plugins import Explainer, Metric, MetricContext, hookimpl


class InputXGradient(Explainer):
    """Input times gradient (Shrikumar et al. 2016): x * dS_c/dx, signed, in input space."""

    name = "input_x_gradient"
    space = "input"
    params = {"absolute": False}

    def explain(self, model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        x = inputs.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            score = model(x).gather(1, targets.view(-1, 1)).sum()
            (grad,) = torch.autograd.grad(score, x)
        out = x.detach() * grad
        return out.abs() if self.config["absolute"] else out


class MapEntropy(Metric):
    """Shannon entropy of each map seen as a distribution (nats); lower is more focused."""

    name = "map_entropy"
    higher_is_better = False

    def compute(self, context: MetricContext) -> dict[str, float]:
        p = context.explanation.maps.flatten(1).double()
        p = p / p.sum(1, keepdim=True).clamp_min(1e-12)
        entropy = -(p * (p + 1e-12).log()).sum(1)
        return {
            "entropy": float(entropy.mean()),
            "max_entropy": float(torch.log(torch.tensor(p.shape[1] * 1.0))),
        }


@hookimpl
def xai_explainers():
    return [InputXGradient]


@hookimpl
def xai_metrics():
    return [MapEntropy]
