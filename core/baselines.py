"""One baseline resolver for every method that compares an input with a reference (integrated
gradients, DeepLIFT, gradient SHAP, occlusion and the other perturbation methods, the faithfulness
curves). One vocabulary, zeros by default everywhere (DESIGN.md; Captum's default): in a normalized
input space zeros is the data mean, a gray image."""

from __future__ import annotations

from typing import Any

import torch

from core.errors import InputError

NAMED = ("zeros", "mean")


def resolve_baseline(baseline: Any, inputs: torch.Tensor) -> torch.Tensor:
    """The reference for ``inputs`` (B x C x H x W) as 1 x C x H x W (shared by every image) or
    B x C x H x W (one per image), broadcastable to the inputs; ``.expand_as(inputs)`` for a full batch.

    ``None``/"zeros": zeros; a number: that constant; "mean": each image's per-channel mean; a tensor:
    C x H x W, 1 x C x H x W or B x C x H x W. Anything else is a one-line :class:`InputError`.
    """
    if baseline is None or (isinstance(baseline, str) and baseline == "zeros"):
        return torch.zeros_like(inputs[:1])
    if isinstance(baseline, (int, float)) and not isinstance(baseline, bool):
        return torch.full_like(inputs[:1], float(baseline))
    if isinstance(baseline, str) and baseline == "mean":
        dims = tuple(range(2, inputs.dim()))
        return inputs.mean(dim=dims, keepdim=True).expand_as(inputs)
    if isinstance(baseline, torch.Tensor) and baseline.dim() == 0:
        return torch.full_like(inputs[:1], float(baseline))
    if isinstance(baseline, torch.Tensor):
        b = baseline.to(device=inputs.device, dtype=inputs.dtype)
        b = b.unsqueeze(0) if b.dim() == inputs.dim() - 1 else b
        if b.dim() == inputs.dim() and b.shape[0] in (1, inputs.shape[0]):
            try:
                return torch.broadcast_to(b, (b.shape[0], *inputs.shape[1:]))
            except RuntimeError:
                pass
        raise InputError(
            f"baseline of shape {tuple(baseline.shape)} does not match inputs {tuple(inputs.shape)}"
        )
    shown = repr(baseline) if isinstance(baseline, (str, int, float, bool)) else type(baseline).__name__
    raise InputError(f"baseline must be 'zeros', 'mean', a number or a tensor, not {shown[:60]}")
