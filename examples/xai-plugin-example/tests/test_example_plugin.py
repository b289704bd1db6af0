"""The example plugin's own tests: its explainer is exact on a linear model, its metric is bounded."""

import torch

from core.api import explain


class Linear(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(3 * 8 * 8, 2)

    def forward(self, x):
        return self.fc(x.flatten(1))


def test_input_x_gradient_is_exact_on_a_linear_model():
    torch.manual_seed(0)
    model = Linear().eval()
    x = torch.randn(2, 3, 8, 8)
    exp = explain(model, x, targets=[1, 0], method="input_x_gradient")
    w = model.fc.weight.view(2, 3, 8, 8)
    torch.testing.assert_close(exp.attributions, x * w[[1, 0]])
    # completeness for a linear model without bias: attributions sum to the logit
    logits = model(x) - model.fc.bias
    torch.testing.assert_close(exp.attributions.sum(dim=(1, 2, 3)), logits[[0, 1], [1, 0]].detach())


def test_map_entropy_is_bounded():
    from xai_plugin_example import MapEntropy

    from xai_plugins import MetricContext

    model = Linear().eval()
    x = torch.randn(2, 3, 8, 8)
    exp = explain(model, x, method="input_x_gradient")
    out = MapEntropy().compute(MetricContext(model, x, exp.targets, exp))
    assert 0 < out["entropy"] <= out["max_entropy"]
