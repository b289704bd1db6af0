"""Grad-CAM and the attention methods on ViTs (issue 17): ours against pytorch-grad-cam.

Run on a ViT-B/16-shaped model: ``python -m bench --models vit_b_16 --size 224 --batch 8 --suites
transformers``. pytorch-grad-cam's ``GradCAM`` gets the same layer (the last block's first norm, our
default) and its documented ViT ``reshape_transform`` (prefix tokens dropped, tokens laid on the
patch grid). ``attention_rollout`` and ``transformer_attribution`` have no peer package to time
against (jacobgil's vit-explain and Chefer et al.'s code are scripts, not libraries): their rows are
against the limit only. Models other than torchvision/timm ViTs give no rows.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from bench.harness import Case, quiet
from core.api import explain
from core.layers import default_layer, resolve_layer, token_grid


def _is_vit(model: nn.Module) -> bool:
    return type(model).__name__ == "VisionTransformer"


def reshape_transform(size: tuple[int, int]):
    """pytorch-grad-cam's ViT transform: B x N x D tokens -> B x D x h x w, prefix tokens dropped."""

    def transform(t: torch.Tensor) -> torch.Tensor:
        prefix, h, w = token_grid(t.shape[1], size)
        return t[:, prefix:].reshape(t.shape[0], h, w, t.shape[2]).permute(0, 3, 1, 2)

    return transform


def cases(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> list[Case]:
    if not _is_vit(model):
        return []
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    layer = resolve_layer(model, default_layer(model, inputs[:1]))[1]
    pgc_targets = [ClassifierOutputTarget(int(t)) for t in targets]
    transform = reshape_transform(tuple(inputs.shape[-2:]))

    def ours(method: str) -> Any:
        return lambda: explain(model, inputs, targets, method=method, progress=False)

    def pgc() -> Any:
        with GradCAM(model, [layer], reshape_transform=transform) as cam:
            return cam(inputs, pgc_targets)

    return [
        Case("grad_cam", ours("grad_cam"), "pytorch_grad_cam.GradCAM", quiet(pgc), note="reshape_transform"),
        Case("attention_rollout", ours("attention_rollout")),
        Case("transformer_attribution", ours("transformer_attribution")),
    ]
