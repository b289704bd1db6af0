"""Composites: which LRP rule each linear layer gets, by layer type, position and depth (as Zennit's
composites; Montavon et al. 2019, "Layer-wise relevance propagation: an overview", sec. 10.3).

A layer is described by ``LayerInfo`` (its dotted module name, kind "conv" or "linear", its index
among the linear layers in execution order, and its relative depth). "First layer" means the first
layer executed, i.e. the one reading the input (Zennit: the first matching module in registration
order, the same layer for torchvision models).

Built-in composites (``composite=`` name):

==========================  ===========  ==============  =================  ======================
name                        input layer  convolutions    dense layers       as Zennit's
==========================  ===========  ==============  =================  ======================
epsilon_gamma_box           z^B          gamma           epsilon            ``EpsilonGammaBox``
epsilon_plus                z+           z+              epsilon            ``EpsilonPlus``
epsilon_alpha2_beta1        a2b1         alpha2-beta1    epsilon            ``EpsilonAlpha2Beta1``
epsilon_plus_flat           flat         z+              epsilon            ``EpsilonPlusFlat``
epsilon_alpha2_beta1_flat   flat         alpha2-beta1    epsilon            ``EpsilonAlpha2Beta1Flat``
epsilon_plus_box            z^B          z+              epsilon
deep_taylor                 z^B          z+              z+                 (Montavon et al. 2017)
gamma_epsilon_zero          z^B          gamma in the lower third, epsilon in the middle third,
                                         LRP-0 in the upper third (by depth, any layer type)
attn_lrp                    epsilon      epsilon         epsilon            LXT's AttnLRP (ICML 2024)
==========================  ===========  ==============  =================  ======================

Every composite takes the same rules for the non-linear operations of transformers and modern CNNs
(``nonlinear.py``: AttnLRP's identity rule for normalizations and activations, its softmax rule, the
uniform rule for products of activations, squeeze-excitation gates as constants); ``attn_lrp`` is
AttnLRP as the paper and LXT run it on ViTs: epsilon on every linear layer; with epsilon and the
stabilizer at most 1e-6 and the biases kept (the defaults) it runs as LXT does, gradient x input
with AttnLRP's modified gradients (``gradient_domain.py``): epsilon's limit, LRP-0 with the bias,
on the linear layers; otherwise (``zero_bias``, a larger epsilon) relevance is carried explicitly.

``*_flat`` apply flat to the first layer of either kind, the others to the first convolution.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from .rules import Rule, alpha_beta, epsilon, flat, gamma, make_rule, z_box, z_plus, zero


@dataclass
class LayerInfo:
    """A linear layer (one call of a conv/linear function) as composites see it."""

    name: str
    kind: str  # "conv" | "linear"
    index: int  # among all linear-layer calls, in execution order
    kind_index: int  # among the calls of this kind
    depth: float | None = None  # index / number of linear layers (composites with needs_depth)
    module: nn.Module | None = None


class Composite:
    """Assigns a rule to each linear layer; ``None`` leaves a layer's gradient unchanged."""

    name = ""
    needs_depth = False
    # run as gradient x input with modified gradients where every rule allows it (``lrp.py``'s
    # ``gradient_domain_applies``): epsilon <= 1e-6 then means its limit, LRP-0 with the bias
    gradient_domain = False

    def rule_for(self, layer: LayerInfo) -> Rule | None:
        raise NotImplementedError

    def rules(self) -> list[Rule]:
        """Every rule this composite can assign, read where it sets ``gradient_domain`` (``lrp`` runs
        in the gradient domain when all of them are gradient x input); empty, as here, when unknown."""
        return []


class LayerMapComposite(Composite):
    """Rules by layer name, then for the first layer, then by kind (Zennit ``LayerMapComposite`` /
    ``SpecialFirstLayerMapComposite`` / ``NameLayerMapComposite``)."""

    def __init__(
        self,
        conv: Rule | None = None,
        linear: Rule | None = None,
        first: Rule | None = None,
        first_kinds: tuple[str, ...] = ("conv",),
        names: dict[str, Rule] | None = None,
        name: str = "",
        gradient_domain: bool = False,
    ):
        self.conv, self.linear, self.first, self.first_kinds = conv, linear, first, first_kinds
        self.names, self.name, self.gradient_domain = dict(names or {}), name, gradient_domain

    def rules(self) -> list[Rule]:
        return [r for r in (self.conv, self.linear, self.first, *self.names.values()) if r is not None]

    def rule_for(self, layer: LayerInfo) -> Rule | None:
        if layer.name in self.names:
            return self.names[layer.name]
        if self.first is not None:
            is_first = (
                layer.index == 0
                if len(self.first_kinds) > 1
                else (layer.kind in self.first_kinds and layer.kind_index == 0)
            )
            if is_first:
                return self.first
        return self.conv if layer.kind == "conv" else self.linear


class DepthComposite(Composite):
    """Rules by relative depth: ``bands`` is a list of (upper depth bound, rule), checked in order;
    ``first`` (if given) takes the input layer."""

    needs_depth = True

    def __init__(self, bands: list[tuple[float, Rule]], first: Rule | None = None, name: str = ""):
        self.bands, self.first, self.name = bands, first, name

    def rule_for(self, layer: LayerInfo) -> Rule | None:
        if self.first is not None and layer.index == 0:
            return self.first
        depth = layer.depth if layer.depth is not None else 0.0
        for upper, rule in self.bands:
            if depth < upper:
                return rule
        return self.bands[-1][1] if self.bands else None


def _cfg(config: dict[str, Any]) -> tuple:
    return (bool(config.get("zero_bias", False)), config.get("stabilizer", 1e-6), config.get("epsilon", 1e-6))


def _box(config):
    zb, stab, _ = _cfg(config)
    return z_box(config.get("low"), config.get("high"), stab, zb)


def _eps(config):
    zb, _, eps = _cfg(config)
    return epsilon(eps, zb)


def _plus(config):
    zb, stab, _ = _cfg(config)
    return z_plus(stab, zb)


def _a2b1(config):
    zb, stab, _ = _cfg(config)
    return alpha_beta(2.0, 1.0, stab, zb)


def _gamma(config):
    zb, stab, _ = _cfg(config)
    return gamma(config.get("gamma", 0.25), stab, zb)


def _flat(config):
    return flat(config.get("stabilizer", 1e-6))


COMPOSITES: dict[str, Callable[[dict[str, Any]], Composite]] = {
    "epsilon_gamma_box": lambda c: LayerMapComposite(_gamma(c), _eps(c), _box(c), name="epsilon_gamma_box"),
    "epsilon_plus": lambda c: LayerMapComposite(_plus(c), _eps(c), name="epsilon_plus"),
    "epsilon_alpha2_beta1": lambda c: LayerMapComposite(_a2b1(c), _eps(c), name="epsilon_alpha2_beta1"),
    "epsilon_plus_flat": lambda c: LayerMapComposite(
        _plus(c), _eps(c), _flat(c), ("conv", "linear"), name="epsilon_plus_flat"
    ),
    "epsilon_alpha2_beta1_flat": lambda c: LayerMapComposite(
        _a2b1(c), _eps(c), _flat(c), ("conv", "linear"), name="epsilon_alpha2_beta1_flat"
    ),
    "epsilon_plus_box": lambda c: LayerMapComposite(_plus(c), _eps(c), _box(c), name="epsilon_plus_box"),
    "deep_taylor": lambda c: LayerMapComposite(
        _plus(c), _plus(c), _box(c), ("conv", "linear"), name="deep_taylor"
    ),
    "attn_lrp": lambda c: LayerMapComposite(_eps(c), _eps(c), name="attn_lrp", gradient_domain=True),
    "gamma_epsilon_zero": lambda c: DepthComposite(
        [(1 / 3, _gamma(c)), (2 / 3, _eps(c)), (float("inf"), zero(_cfg(c)[0]))],
        _box(c),
        name="gamma_epsilon_zero",
    ),
}


class UniformComposite(Composite):
    """One rule everywhere (``rule=``). Input-layer rules (z_box, flat, w_square) take the first
    layer and leave LRP-epsilon on the others."""

    def __init__(self, rule: Rule, rest: Rule):
        self.rule, self.rest, self.name = rule, rest, rule.name

    def rule_for(self, layer: LayerInfo) -> Rule | None:
        if self.rule.input_layer_only:
            return self.rule if layer.index == 0 else self.rest
        return self.rule


def make_composite(
    rule: str | Rule | None, composite: str | Composite | None, config: dict[str, Any]
) -> Composite:
    """The composite for an explainer configuration (``rule`` xor ``composite``)."""
    if isinstance(composite, Composite):
        return composite
    if rule is not None:
        r = rule if isinstance(rule, Rule) else make_rule(str(rule), config)
        return UniformComposite(r, _eps(config))
    return COMPOSITES[str(composite)](config)
