"""Re-initializing layers for the randomization tests, and the copies they run on (the user's model
is never modified): Quantus's granularity (modules with ``reset_parameters``) and its seeding."""

from __future__ import annotations

import contextlib
import copy
import itertools
from collections.abc import Iterator

import torch
from torch import nn

_RESETS_EVERY_PARAMETER = (
    nn.modules.conv._ConvNd,
    nn.Linear,
    nn.modules.batchnorm._NormBase,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.Embedding,
)


def randomizable_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Modules that can be re-initialized (they have ``reset_parameters``), in registration order:
    exactly the layers Quantus's ``get_random_layer_generator`` walks."""
    return [(n, m) for n, m in model.named_modules() if n and callable(getattr(m, "reset_parameters", None))]


def reinitialize(module: nn.Module, seed: int) -> None:
    """Re-draw ``module``'s parameters from its own initializer, seeded as Quantus does
    (``torch.manual_seed(seed + 1)``), without disturbing the caller's random state."""
    devices = sorted({p.device.index or 0 for p in module.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        torch.manual_seed(seed + 1)
        module.reset_parameters()


@contextlib.contextmanager
def restored(modules: list[nn.Module]) -> Iterator[None]:
    """Give the parameters and buffers of ``modules`` back their exact values on exit."""
    saved = [(t, t.detach().clone()) for m in modules for t in list(m.parameters()) + list(m.buffers())]
    try:
        yield
    finally:
        with torch.no_grad():
            for t, value in saved:
                t.copy_(value)


def reinitialized_copy(module: nn.Module, seed: int) -> nn.Module:
    """A re-initialized copy of ``module`` (``reinitialize``), leaving ``module`` as it is. Layers
    whose ``reset_parameters`` redraws every parameter get fresh storage instead of a copy of
    values about to be overwritten (a VGG classifier holds hundreds of MB)."""
    fresh = isinstance(module, _RESETS_EVERY_PARAMETER)
    memo = {
        id(p): nn.Parameter(torch.empty_like(p) if fresh else p.detach().clone(), requires_grad=False)
        for p in module.parameters()
    }
    clone = copy.deepcopy(module, memo)
    reinitialize(clone, seed)
    return clone.eval()


def structural_copy(model: nn.Module) -> nn.Module:
    """New module objects over the very same parameter and buffer tensors: something to wrap and
    patch without touching the user's modules, at no memory cost. Never change its tensors."""
    memo = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    return copy.deepcopy(model, memo)


def private_copy(model: nn.Module) -> nn.Module:
    """A frozen deep copy to randomize: the user's model object is never modified."""
    net = copy.deepcopy(model)
    for p in net.parameters():
        p.requires_grad_(False)
    return net.eval()
