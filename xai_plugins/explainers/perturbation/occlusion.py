"""Occlusion (Zeiler & Fergus 2014, section 4.2; the review's Fig. 2): slide a window of baseline
values over the image and record how much the target score drops."""

from __future__ import annotations

import torch
from torch import nn

from xai_plugins import Explainer, InputError
from xai_plugins.toolkit import resolve_baseline

from .common import as_pair, masked_scores, model_scores


def window_indicators(size: int, window: int, stride: int, device: torch.device) -> torch.Tensor:
    """Positions x pixels 0/1 matrix of the windows along one axis, placed as Captum places them:
    starts at k * stride for k = 0 .. ceil((size - window) / stride), the last one cut at the border."""
    if window > size:
        raise InputError(f"window {window} is larger than the input side {size}")
    if stride > window and size > window:
        raise InputError(f"stride {stride} is larger than the window {window}: pixels would be skipped")
    count = -(-(size - window) // stride) + 1
    starts = torch.arange(count, device=device).view(-1, 1) * stride
    pixels = torch.arange(size, device=device).view(1, -1)
    return ((pixels >= starts) & (pixels < starts + window)).float()


class Occlusion(Explainer):
    """Occlusion sensitivity (Zeiler & Fergus 2014): for every window position p,
    d_p = S_c(x) - S_c(x with window p set to the baseline), and each pixel's attribution is the mean of
    d_p over the windows covering it. The window covers all channels.

    Same definition and window placement as Captum's ``Occlusion`` with
    ``sliding_window_shapes=(C, *window)``, ``strides=(C, *stride)`` and the same baseline (allclose).
    ``window`` defaults to 1/8 of the shorter side, ``stride`` to half the window. ``output``: the
    target "logit" (Captum: the model's output) or "probability" (Zeiler & Fergus). ``batch_size``
    occluded copies go through the model at once. The map is the positive part (occluding there lowers
    the score); ``attributions`` keep the sign.
    """

    name = "occlusion"
    params = {"window": None, "stride": None, "baseline": "zeros", "output": "logit", "batch_size": 64}

    def geometry(self, height: int, width: int) -> tuple[tuple[int, int], tuple[int, int]]:
        window = self.config["window"] or max(1, min(height, width) // 8)
        wh, ww = as_pair(window, "window")
        stride = self.config["stride"] or (max(1, wh // 2), max(1, ww // 2))
        return (wh, ww), as_pair(stride, "stride")

    def explain(self, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        height, width = inputs.shape[-2:]
        (wh, ww), (sh, sw) = self.geometry(height, width)
        rows = window_indicators(height, wh, sh, inputs.device)
        cols = window_indicators(width, ww, sw, inputs.device)
        n_cols = cols.shape[0]

        def keep(b: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
            window = rows[k // n_cols].unsqueeze(2) * cols[k % n_cols].unsqueeze(1)
            return (1.0 - window).unsqueeze(1)

        baseline = resolve_baseline(self.config["baseline"], inputs)
        full = model_scores(model, inputs, targets, self.config["output"], self.config["batch_size"])
        occluded = masked_scores(
            model,
            inputs,
            baseline,
            targets,
            rows.shape[0] * n_cols,
            keep,
            self.config["batch_size"],
            self.config["output"],
        )
        drop = (full.unsqueeze(1) - occluded).view(-1, rows.shape[0], n_cols)
        total = torch.einsum("bij,ih,jw->bhw", drop, rows, cols)
        counts = torch.einsum("ih,jw->hw", rows, cols)
        return (total / counts).unsqueeze(1).expand_as(inputs).contiguous()

    def to_map(self, attributions: torch.Tensor) -> torch.Tensor:
        """The map shows where occlusion lowers the score: the positive part (same on all channels)."""
        return attributions.mean(dim=1).clamp(min=0)
