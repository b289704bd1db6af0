"""Superpixels for the surrogate explainers (LIME, Kernel SHAP): SLIC segmentation of each image,
or a segmentation given by the user, relabelled 0 .. M_b - 1 per image."""

from __future__ import annotations

import numpy as np
import torch

from xai_plugins import InputError


def _relabel(segments: np.ndarray) -> tuple[np.ndarray, int]:
    _, inverse = np.unique(segments, return_inverse=True)
    return inverse.reshape(segments.shape), int(inverse.max()) + 1


def slic_segments(
    inputs: torch.Tensor, n_segments: int, compactness: float = 10.0, sigma: float = 1.0
) -> tuple[torch.Tensor, list[int]]:
    """SLIC superpixels (Achanta et al. 2012, scikit-image) of every image: B x H x W ids and the
    count per image. Each (normalized) input is min-max scaled to [0, 1] first, as SLIC expects."""
    from skimage.segmentation import slic

    out, counts = [], []
    for image in inputs.detach().float().cpu():
        lo, hi = image.amin(), image.amax()
        arr = ((image - lo) / (hi - lo).clamp_min(1e-12)).permute(1, 2, 0).numpy()
        multichannel = arr.shape[2] > 1
        seg = slic(
            arr if multichannel else arr[..., 0],
            n_segments=int(n_segments),
            compactness=compactness,
            sigma=sigma,
            start_label=0,
            channel_axis=-1 if multichannel else None,
        )
        seg, count = _relabel(seg)
        out.append(torch.from_numpy(seg))
        counts.append(count)
    return torch.stack(out).long().to(inputs.device), counts


def given_segments(feature_mask: torch.Tensor, inputs: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """A user segmentation (H x W, 1 x H x W or B x H x W integer ids) for every image of ``inputs``."""
    mask = torch.as_tensor(feature_mask)
    if mask.dim() == 2:
        mask = mask.unsqueeze(0)
    if mask.dim() == 4 and mask.shape[1] == 1:
        mask = mask[:, 0]
    if (
        mask.dim() != 3
        or tuple(mask.shape[-2:]) != tuple(inputs.shape[-2:])
        or mask.shape[0] not in (1, inputs.shape[0])
    ):
        raise InputError(
            f"feature_mask of shape {tuple(mask.shape)} does not match inputs {tuple(inputs.shape)}"
        )
    mask = mask.expand(inputs.shape[0], -1, -1)
    out, counts = [], []
    for m in mask.cpu().numpy():
        seg, count = _relabel(m)
        out.append(torch.from_numpy(seg))
        counts.append(count)
    return torch.stack(out).long().to(inputs.device), counts


def paint(values: torch.Tensor, segments: torch.Tensor) -> torch.Tensor:
    """Per-segment values (B x M_max) painted on their pixels: B x 1 x H x W."""
    flat = segments.flatten(1)
    return values.gather(1, flat).view(segments.shape[0], 1, *segments.shape[1:])
