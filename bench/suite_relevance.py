"""Relevance explainers against their peers: LRP against Zennit, DeepLIFT against Captum.

Zennit is measured at its best: its canonizer (``ResNetCanonizer`` / ``VGGCanonizer`` /
``SequentialMergeBatchNorm``) is applied once and its attributor context stays open across calls,
so each timed call is one attribution only. It runs on a copy of the model (same weights), since
an open context leaves merged batch norms and hooks on the model it holds; ours and the limit run
on the untouched model. Captum's ``DeepLift`` runs on the model itself (it cleans up after each call);
it refuses models that reuse a ReLU module (torchvision ResNets), which the row then reports.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bench.harness import Case, quiet
from core.api import explain

ROWS = 64


def _canonizers(model: nn.Module) -> list:
    from torchvision.models import VGG, ResNet
    from zennit.canonizers import SequentialMergeBatchNorm
    from zennit.torchvision import ResNetCanonizer, VGGCanonizer

    if isinstance(model, ResNet):
        return [ResNetCanonizer()]
    if isinstance(model, VGG):
        return [VGGCanonizer()]
    return [SequentialMergeBatchNorm()]


def _zennit_peer(
    model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, composite: str
) -> Callable[[], Any]:
    """A call of Zennit's ``Gradient`` attributor, its context opened once on a copy of the model."""
    from zennit import composites as zc
    from zennit.attribution import Gradient

    twin = copy.deepcopy(model).eval()
    low = inputs.amin((2, 3), keepdim=True).expand_as(inputs)  # our z^B default: per image and channel
    high = inputs.amax((2, 3), keepdim=True).expand_as(inputs)
    made = {
        "epsilon_gamma_box": lambda c: zc.EpsilonGammaBox(low, high, canonizers=c),
        "epsilon_plus": lambda c: zc.EpsilonPlus(canonizers=c),
    }[composite](_canonizers(twin))
    attributor = Gradient(twin, made)
    attributor.__enter__()  # kept open: canonized and hooked once, for every timed call
    one_hot = F.one_hot(targets, num_classes=int(model(inputs[:1]).shape[1])).to(inputs)

    def run() -> torch.Tensor:
        return attributor(inputs, lambda out: one_hot * out)[1]

    return quiet(run)


def cases(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> list[Case]:
    from captum.attr import DeepLift

    def ours(method: str, **params: Any) -> Callable[[], Any]:
        return lambda: explain(
            model, inputs, targets, method=method, progress=False, batch_size=ROWS, **params
        )

    zeros = torch.zeros_like(inputs)
    out = [
        Case(
            "lrp(epsilon_gamma_box)",
            ours("lrp", composite="epsilon_gamma_box"),
            "zennit.EpsilonGammaBox",
            _zennit_peer(model, inputs, targets, "epsilon_gamma_box"),
            note="canonizer once, context open",
        ),
        Case(
            "lrp(epsilon_plus)",
            ours("lrp", composite="epsilon_plus"),
            "zennit.EpsilonPlus",
            _zennit_peer(model, inputs, targets, "epsilon_plus"),
            note="canonizer once, context open",
        ),
        Case(
            "deeplift(rescale)",
            ours("deeplift"),
            "captum.DeepLift",
            quiet(lambda: DeepLift(model).attribute(inputs, baselines=zeros, target=targets)),
            note="black reference",
        ),
        Case("deeplift(reveal_cancel)", ours("deeplift", rule="reveal_cancel"), note="no peer"),
    ]
    return out
