"""The PV encoder E (Eq. 3): the model itself, truncated at a layer, with no retraining.

The latent z = E(x) is captured with a forward hook during an ordinary forward pass of the model,
so it is exactly the tensor inference computes at that layer (read as B x C x h x w by
``spatial_view``: token and channels-last outputs are re-indexed, nothing else), for any architecture (residual
adds, functional ReLUs, reused modules): nothing is rebuilt as a ``Sequential``. The forward stops
as soon as the layer has produced its last output (a module called several times per forward is
read at its last call, as ``LayerCapture`` does), so layers after it cost nothing.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from xai_plugins import XAIError
from xai_plugins.toolkit import resolve_layer, spatial_view


class _Reached(Exception):
    """Raised from the hook to end the forward once the latent is known."""


class LatentEncoder:
    """``E(x)``: the output of ``layer`` of ``model`` for model inputs ``x`` (gradients flow)."""

    def __init__(self, model: nn.Module, layer: str | nn.Module):
        self.model = model
        self.layer_name, self.module = resolve_layer(model, layer)
        self.calls: int | None = None  # how many times one forward calls the layer

    def _count_calls(self, x: torch.Tensor) -> int:
        count = 0

        def hook(mod: nn.Module, args: Any, out: Any) -> None:
            nonlocal count
            count += 1

        handle = self.module.register_forward_hook(hook)
        try:
            with torch.no_grad():
                self.model(x[:1])
        finally:
            handle.remove()
        if count == 0:
            raise XAIError(f"layer {self.layer_name!r} is not called by the model's forward")
        return count

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.calls is None:
            self.calls = self._count_calls(x)
        seen = 0
        box: dict[str, torch.Tensor] = {}

        def hook(mod: nn.Module, args: Any, out: Any) -> None:
            nonlocal seen
            seen += 1
            if not isinstance(out, torch.Tensor):
                raise XAIError(f"layer {self.layer_name!r} returns {type(out).__name__}, not a tensor")
            box["z"] = out
            if seen == self.calls:
                raise _Reached

        handle = self.module.register_forward_hook(hook)
        try:
            self.model(x)
        except _Reached:
            pass
        finally:
            handle.remove()
        if "z" not in box:
            raise XAIError(f"layer {self.layer_name!r} was not called in the forward pass")
        return spatial_view(
            box["z"], tuple(x.shape[-2:]), self.layer_name
        )  # tokens / channels last: re-indexed
