"""Finding layers by dotted name, reading their outputs as maps, and a sensible default layer.

A layer's output is read as B x C x h x w whatever its layout (``spatial_view``): channels first
(CNNs), channels last (B x h x w x C: Swin, timm ConvNeXt's inner blocks) or tokens (B x N x D:
ViT/DeiT; class, distillation or register tokens first are dropped and the rest laid back on the
patch grid found from the input size). Every method that reads a layer goes through it, so the
activations and their gradients are reshaped the same way.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from core.errors import XAIError
from core.session import structural
from core.tensors import spatial_size

_POOLS = (
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d,
    nn.AvgPool2d,
    nn.Flatten,
    nn.Dropout,
    nn.Dropout2d,
    nn.Identity,
)
MAX_PREFIX_TOKENS = 16  # class + distillation + register tokens before the patch tokens


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


def _fits(grid: tuple[int, int], size: tuple[int, int]) -> bool:
    """Whether an h x w grid tiles an H x W input with one stride (rounding up or down)."""
    h, w = grid
    if h < 1 or w < 1:
        return False
    stride = size[0] / h
    return abs(size[1] / stride - w) < 1.0 and stride >= 1.0


def token_grid(tokens: int, size: tuple[int, int]) -> tuple[int, int, int] | None:
    """``(prefix, h, w)``: the patch grid of ``tokens`` tokens for an H x W input, with the fewest
    prefix tokens (class, distillation, registers) in front; None when no grid fits."""
    best = None
    for patch in range(1, max(size) + 1):
        for rounding in (math.floor, math.ceil):
            h, w = int(rounding(size[0] / patch)), int(rounding(size[1] / patch))
            prefix = tokens - h * w
            if h >= 1 and w >= 1 and 0 <= prefix <= MAX_PREFIX_TOKENS and (best is None or prefix < best[0]):
                best = (prefix, h, w)
        if best is not None and best[0] == 0:
            break
    return best


def layout_of(output: torch.Tensor, size: tuple[int, int]) -> str | None:
    """ "nchw", "nhwc", "tokens" or None (not readable as a map) for a layer output and input size."""
    if output.dim() == 4:
        b, d1, d2, d3 = output.shape
        if _fits((d1, d2), size) and not _fits((d2, d3), size):
            return "nhwc"
        return "nchw"
    if output.dim() == 3 and token_grid(output.shape[1], size) is not None:
        return "tokens"
    return None


def spatial_view(output: torch.Tensor, size: tuple[int, int], name: str = "layer") -> torch.Tensor:
    """``output`` of layer ``name`` as B x C x h x w for an input of spatial size ``size``.

    Channels-last outputs are permuted; token outputs lose their prefix tokens and are laid on the
    patch grid. A pure re-indexing: applied to the gradient of the output it gives the gradient of
    the view. Anything else is a one-line error naming the layer and its output shape.
    """
    layout = layout_of(output, size)
    if layout == "nchw":
        return output
    if layout == "nhwc":
        return output.permute(0, 3, 1, 2)
    if layout == "tokens":
        prefix, h, w = token_grid(output.shape[1], size)  # type: ignore[misc]
        return output[:, prefix:].transpose(1, 2).reshape(output.shape[0], output.shape[2], h, w)
    raise XAIError(
        f"layer {name!r} outputs shape {tuple(output.shape)}, which cannot be read as a map of "
        f"the {size[0]}x{size[1]} input (expected B x C x H x W, B x H x W x C or B x N x D tokens)"
    )


def require_channels_first(output: torch.Tensor, size: tuple[int, int], name: str, method: str) -> None:
    """For methods that write a layer's output back (replacing it with constants): a one-line
    refusal unless ``output`` is B x C x H x W (channels last and tokens would need the inverse view)."""
    if layout_of(output, size) != "nchw":
        raise XAIError(
            f"{method} needs a layer with B x C x H x W feature maps; layer {name!r} outputs shape "
            f"{tuple(output.shape)} (channels last or tokens): pass layer= a convolutional layer"
        )


def _is_attention(module: nn.Module) -> bool:
    return isinstance(module, nn.MultiheadAttention) or (
        hasattr(module, "qkv") and hasattr(module, "num_heads") and "Attention" in type(module).__name__
    )


def _first_norm(block: nn.Module) -> str | None:
    for name, child in block.named_children():
        if isinstance(child, (nn.LayerNorm, nn.GroupNorm)) or "norm" in type(child).__name__.lower():
            return name
    return None


def default_layer(model: nn.Module, example: torch.Tensor) -> str:
    """The layer CAM-style methods read by default.

    - A token transformer (ViT, DeiT: blocks with global attention on B x N x D tokens): the last
      block's first norm (``encoder.layers.encoder_layer_11.ln_1``, ``blocks.11.norm1``), where
      pytorch-grad-cam's documentation puts it: the final norm feeds only the class token to the
      head, so gradients of the patch tokens there are zero.
    - Otherwise the deepest spatial feature layer: the last 4-D output with spatial size > 1 of a
      module that is not a pooling, identity or LayerNorm layer, named by the outermost module that
      returns that very tensor (``layer4`` for a ResNet, ``features`` for a VGG or torchvision
      Swin, ``layers`` for a timm Swin: the last stage's output).

    Runs one sample through the model, once per input shape in a session of the model
    (``core.session``).
    """
    return structural(
        model, ("default_layer", tuple(example.shape[1:])), lambda: _find_default_layer(model, example)
    )


def _find_default_layer(model: nn.Module, example: torch.Tensor) -> str:
    size = spatial_size(example)
    order: list[tuple[str, torch.Tensor]] = []
    blocks: list[tuple[str, nn.Module, torch.Tensor]] = []
    handles = []
    attention_parents = {
        n.rsplit(".", 1)[0] for n, m in model.named_modules() if "." in n and _is_attention(m)
    }
    for name, module in model.named_modules():
        if not name:
            continue

        def hook(mod, args, output, name=name):
            if not isinstance(output, torch.Tensor):
                return
            if name in attention_parents:
                blocks.append((name, mod, output))
            if (
                output.dim() == 4
                and not isinstance(mod, _POOLS)
                and not isinstance(mod, nn.LayerNorm)
                and type(mod).__name__ != "Permute"
            ):
                spatial = spatial_view(output, size, name)
                if min(spatial.shape[-2:]) > 1:
                    order.append((name, output))

        handles.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(example[:1])
    finally:
        for h in handles:
            h.remove()
    best = None
    if blocks and layout_of(blocks[-1][2], size) == "tokens":
        block_name, block, _ = blocks[-1]
        norm = _first_norm(block)
        best = f"{block_name}.{norm}" if norm else block_name
    elif order:
        last = order[-1][1]
        names = [n for n, t in order if t is last]
        best = min(names, key=lambda n: (n.count("."), len(n)))
    if best is None:
        raise XAIError("could not find a convolutional or token layer with a spatial output; pass layer=")
    return best


def conv_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """All Conv2d layers in registration order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
