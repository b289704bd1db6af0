"""Relevance explainers: the review's section 5 (methods based on network structure).

lrp: layer-wise relevance propagation (Bach et al. 2015; review Eq. 11-15) with the deep Taylor
rules z+ and z^B (Montavon et al. 2017; Eq. 16-18), flat and w^2 for the input layer, and Zennit-
style composites; canonization (BatchNorm folding, residual additions) on the fly.
deeplift: DeepLIFT with the rescale and reveal-cancel rules (Shrikumar et al. 2017; Eq. 19-25).

Modules: ``rules`` (the LRP rules), ``composites`` (rule assignment), ``canonizers`` (canonical
form of BatchNorm/additions/pooling/activations), ``lrp`` and ``deeplift`` (the passes), ``ops``.
"""

from __future__ import annotations

from typing import Any

import torch

from xai_plugins import Explainer, InputError, hookimpl

from .composites import COMPOSITES, Composite, DepthComposite, LayerInfo, LayerMapComposite
from .deeplift import deeplift as deeplift_attributions
from .lrp import check_config, composite_for
from .lrp import lrp as lrp_relevance
from .rules import RULES, Rule, make_rule


class _SignedExplainer(Explainer):
    space = "input"
    signed = True
    python_modules = True  # per-layer rules on the model's own modules and functions

    def to_map(self, attributions: torch.Tensor) -> torch.Tensor:
        """Signed relevance summed over channels (positive = evidence for the class); the engine
        then min-max scales it, keeping the ranking of the signed values."""
        return attributions.sum(dim=1)


class LRP(_SignedExplainer):
    """Layer-wise relevance propagation (Bach et al. 2015; review Eq. 11-15, deep Taylor Eq. 16-18).

    ``rule``: one rule on every convolution and dense layer -- ``zero`` (LRP-0, Eq. 12), ``epsilon``
    (Eq. 13), ``gamma`` (Eq. 14), ``alpha_beta`` (Eq. 15, alpha = beta + 1), ``z_plus`` (deep Taylor,
    = alpha1-beta0); the input-layer rules ``z_box`` (bounded input, ``low``/``high``; default each
    image's per-channel min/max), ``flat`` and ``w_square`` take the first layer, epsilon the rest.
    ``composite``: rules by layer type and depth, by name (see ``composites.py``); default
    ``epsilon_gamma_box`` when neither is given. ``zero_bias`` leaves biases out of every rule
    (conservation, Eq. 11, then holds layer by layer: see ``extras["layer_relevance"]``; it is
    checked, and a model where it fails by more than 5 % is refused in one line).
    ``canonize``: fold BatchNorm into the preceding layer and split residual additions (as Zennit's
    ResNet canonizer); without it batch norms pass relevance proportionally, and a residual
    addition is refused in one line (its gradient hands the whole relevance to both branches: on a
    random ResNet-18 the input relevance came out 260x the logit).

    The output relevance is the target logit S_c (Eq. 11). Definitions are Zennit's: with the same
    rules, composite and canonizer, results agree with Zennit to float precision (tested: VGG-11
    in float32, ResNet-18 with ``ResNetCanonizer`` in float64 to 1e-7). Known differences: Zennit's
    merged batch norm still divides by sqrt(1 + eps) in its forward pass (here the forward is the
    model's own), a relative change of about 5e-6 per batch norm, which the epsilon rule can
    amplify to ~1e-4 on a deep random float32 ResNet; LRP-0 is Zennit's ``Epsilon(0)`` except
    where z = 0, which passes no relevance here (Zennit divides by zero); z^B's default bounds are
    each image's per-channel min/max (Zennit needs them given); the "first layer" is the first
    one executed (Zennit: first registered; the same layer in torchvision models); an unfolded
    batch norm passes relevance (as Zennit). ``stabilizer`` also stabilizes the proportional
    splits of average pooling and residual additions (Zennit ``Norm``).
    """

    name = "lrp"
    params = {
        "rule": None,
        "composite": None,
        "epsilon": 1e-6,
        "gamma": 0.25,
        "alpha": 2.0,
        "beta": 1.0,
        "stabilizer": 1e-6,
        "low": None,
        "high": None,
        "zero_bias": False,
        "canonize": True,
    }

    def __init__(self, **params: Any):
        super().__init__(**params)
        check_config(self.config)
        self._composite: Composite = composite_for(self.config)

    def explain(self, model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> Any:
        relevance, extras = lrp_relevance(
            model,
            inputs,
            targets,
            self._composite,
            bool(self.config["canonize"]),
            float(self.config["stabilizer"]),
            bool(self.config["zero_bias"]),
        )
        if self.config["zero_bias"]:
            check_conservation(relevance, extras, type(model).__name__)
        return relevance, extras


CONSERVATION_TOLERANCE = 0.05  # relative to the logit, as the tests of conservation


def check_conservation(relevance: torch.Tensor, extras: dict[str, Any], model_name: str) -> None:
    """With ``zero_bias`` LRP promises input relevance + what the rules report absorbed = the logit
    (Eq. 11). Where an activation comes from the forward's biases alone (e.g. a depthwise
    convolution over an all-zero patch) the rules have nothing to pass its relevance to, and on
    MobileNetV3 and RegNet the sum drifts far off: a one-line refusal, not a map breaking the promise."""
    logit = extras["layer_relevance"]["output"]
    absorbed = sum(extras.get("absorbed_relevance", {}).values(), torch.zeros_like(logit))
    total = relevance.flatten(1).sum(1).to(logit) + absorbed
    error = ((total - logit).abs() / logit.abs().clamp_min(1e-12)).max()
    if float(error) > CONSERVATION_TOLERANCE:
        raise InputError(
            f"lrp cannot explain {model_name} with zero_bias: relevance is not conserved (input "
            f"relevance + absorbed off the logit by {float(error):.0%}); use zero_bias=False (biases "
            f"then take their share) or integrated_gradients"
        )


class DeepLift(_SignedExplainer):
    """DeepLIFT (Shrikumar et al. 2017; review Eq. 19-25), rules ``rescale`` and ``reveal_cancel``.

    ``baseline``: the reference x0 ("zeros", a black image, by default, as in the review; a number;
    a tensor like one input or the batch; or a list of them, averaged over as Captum's
    ``DeepLiftShap``). ``samples`` > 1 draws that many references from the baseline(s) with
    ``noise`` x (input range) Gaussian noise, seeded by ``seed`` (gradient-SHAP style averaging).
    ``eps``: below this |y - y0| a nonlinearity uses its gradient (Captum's 1e-10).

    Rescale agrees with Captum's ``DeepLift`` / ``DeepLiftShap`` on models whose modules are each
    used once (Captum needs that; here reused and functional ReLUs work too). Differences: max-pool
    multipliers add up over overlapping windows (Captum's unpooling overwrites), so summation to
    delta (Eq. 19) holds on ResNets as well; and where a max-pool's reference activations are not
    zero and a ReLU module precedes it, Captum 0.9 breaks its own summation to delta (e.g. a
    single 2x2 pool: convergence delta 3 on a delta of -1), while the rule here keeps it.
    ``extras["delta"]`` = f_c(x) - f_c(x0), which the attributions sum to.
    """

    name = "deeplift"
    params = {"rule": "rescale", "baseline": "zeros", "samples": 1, "noise": 0.0, "seed": 0, "eps": 1e-10}

    def __init__(self, **params: Any):
        super().__init__(**params)
        if self.config["rule"] not in ("rescale", "reveal_cancel"):
            raise InputError(f"unknown DeepLIFT rule {self.config['rule']!r}; known: rescale, reveal_cancel")

    def explain(self, model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> Any:
        c = self.config
        return deeplift_attributions(
            model,
            inputs,
            targets,
            c["rule"],
            c["baseline"],
            int(c["samples"] or 1),
            float(c["noise"] or 0.0),
            c["seed"],
            float(c["eps"]),
        )


@hookimpl
def xai_explainers():
    return [LRP, DeepLift]


__all__ = [
    "LRP",
    "DeepLift",
    "lrp_relevance",
    "deeplift_attributions",
    "Rule",
    "make_rule",
    "RULES",
    "COMPOSITES",
    "Composite",
    "LayerMapComposite",
    "DepthComposite",
    "LayerInfo",
]
