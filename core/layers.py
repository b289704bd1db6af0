"""Finding layers by dotted name, and a sensible default layer for CAM-style methods."""

from __future__ import annotations

import weakref

import torch
from torch import nn

from core.errors import XAIError

_POOLS = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.AvgPool2d, nn.Flatten, nn.Dropout,
          nn.Dropout2d, nn.Identity)
_default_cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def resolve_layer(model: nn.Module, layer: str | nn.Module) -> tuple[str, nn.Module]:
    """Return ``(dotted_name, module)`` for a module or its dotted name (e.g. ``"layer4"``)."""
    if isinstance(layer, nn.Module):
        for name, module in model.named_modules():
            if module is layer:
                return name, module
        raise XAIError("the given layer is not a submodule of the model")
    modules = dict(model.named_modules())
    if layer in modules:
        return layer, modules[layer]
    candidates = [n for n in modules if n and "." not in n]
    raise XAIError(f"model has no layer {layer!r}; top-level layers: {', '.join(candidates)}")


def default_layer(model: nn.Module, example: torch.Tensor) -> str:
    """The deepest spatial feature layer: the output of the last convolutional stage.

    Runs one sample through the model, finds the last 4-D output with spatial size > 1 produced
    by a module that is not a pooling/identity layer, and names the outermost module that returns
    that very tensor (``layer4`` for a ResNet, ``features`` for a VGG, the last ReLU or conv of a
    plain CNN). Cached per model and input shape.
    """
    key = (tuple(example.shape[1:]),)
    cached = _default_cache.get(model)
    if cached and key in cached:
        return cached[key]
    order: list[tuple[str, torch.Tensor]] = []
    handles = []
    for name, module in model.named_modules():
        if not name:
            continue

        def hook(mod, args, output, name=name):
            if isinstance(output, torch.Tensor) and output.dim() == 4 and min(output.shape[-2:]) > 1 \
                    and not isinstance(mod, _POOLS):
                order.append((name, output))

        handles.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(example[:1])
    finally:
        for h in handles:
            h.remove()
    if not order:
        raise XAIError("could not find a convolutional layer with a spatial output; pass layer=")
    last = order[-1][1]
    names = [n for n, t in order if t is last]
    best = min(names, key=lambda n: (n.count("."), len(n)))
    _default_cache.setdefault(model, {})[key] = best
    return best


def conv_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """All Conv2d layers in registration order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]


def share_default_layer(model: nn.Module, copy: nn.Module) -> None:
    """A structural copy of ``model`` has the same default layers: let it reuse those already found
    (so that explaining the copy needs no probing forward of its own)."""
    cached = _default_cache.get(model)
    if cached:
        _default_cache.setdefault(copy, {}).update(cached)
