"""Turning maps into pictures: colormaps, overlays, PNG bytes and data URIs (shared by reporters)."""

from __future__ import annotations

import base64
import io

import numpy as np
import torch
from PIL import Image

from core.tensors import upsample

_LUT_CACHE: dict[str, np.ndarray] = {}


def _lut(name: str) -> np.ndarray:
    if name not in _LUT_CACHE:
        from matplotlib import colormaps

        _LUT_CACHE[name] = (colormaps[name](np.linspace(0, 1, 256))[:, :3]).astype(np.float32)
    return _LUT_CACHE[name]


def to_numpy_image(image: torch.Tensor | np.ndarray) -> np.ndarray:
    """C x H x W or H x W (x C) in [0, 1] -> H x W x 3 float32."""
    arr = (
        image.detach().cpu().float().numpy()
        if isinstance(image, torch.Tensor)
        else np.asarray(image, np.float32)
    )
    if arr.ndim == 3 and arr.shape[0] in (1, 3, 4) and arr.shape[-1] not in (1, 3, 4):
        arr = arr.transpose(1, 2, 0)
    elif arr.ndim == 3 and arr.shape[0] in (1, 3) and arr.shape[-1] > 4:
        arr = arr.transpose(1, 2, 0)
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    return np.clip(arr[..., :3], 0, 1)


def colorize(heatmap: torch.Tensor | np.ndarray, cmap: str = "jet") -> np.ndarray:
    """H x W map in [0, 1] -> H x W x 3 colors."""
    m = heatmap.detach().cpu().float().numpy() if isinstance(heatmap, torch.Tensor) else np.asarray(heatmap)
    idx = (np.clip(np.nan_to_num(m), 0, 1) * 255).astype(np.int64)
    return _lut(cmap)[idx]


def overlay(
    image: torch.Tensor | np.ndarray,
    heatmap: torch.Tensor | np.ndarray,
    alpha: float = 0.5,
    cmap: str = "jet",
) -> np.ndarray:
    """Blend a colorized heat map over an image (both in [0, 1]) -> H x W x 3."""
    img = to_numpy_image(image)
    heat = colorize(heatmap, cmap)
    if heat.shape[:2] != img.shape[:2]:
        heat = (
            np.asarray(
                Image.fromarray((heat * 255).astype(np.uint8)).resize(
                    img.shape[1::-1], Image.Resampling.BILINEAR
                )
            )
            / 255.0
        )
    return np.clip((1 - alpha) * img + alpha * heat, 0, 1)


def signed_overlay(
    image: torch.Tensor | np.ndarray,
    relevance: torch.Tensor | np.ndarray,
    alpha: float = 0.7,
    cmap: str = "bwr",
) -> np.ndarray:
    """Signed relevance (H x W, any scale) over an image: red for the class, blue against it.

    Each pixel's opacity grows with sqrt(|relevance| / s), s the 99th percentile of |relevance|
    (clipped at 1: relevance is sparse, a few peaks would hide the rest), so zero relevance leaves
    the image untinted (a min-max scaled map would tint every pixel of no relevance)."""
    img = to_numpy_image(image)
    rel = torch.as_tensor(relevance).detach().cpu().float().nan_to_num()
    r = upsample(rel[None], img.shape[:2])[0].numpy()
    peak = float(np.percentile(np.abs(r), 99)) or float(np.abs(r).max())
    v = np.clip(r / peak, -1, 1) if peak > 0 else np.zeros_like(r)
    heat = _lut(cmap)[np.clip(((v + 1) / 2 * 255).round(), 0, 255).astype(np.int64)]
    w = (alpha * np.sqrt(np.abs(v)))[..., None]
    return np.clip((1 - w) * img + w * heat, 0, 1)


def png_bytes(image: np.ndarray | torch.Tensor, scale: int = 1) -> bytes:
    """An image in [0, 1] (H x W, H x W x 3 or C x H x W) as PNG bytes, optionally upscaled."""
    arr = to_numpy_image(image)
    pil = Image.fromarray((arr * 255).round().astype(np.uint8))
    if scale > 1:
        pil = pil.resize((pil.width * scale, pil.height * scale), Image.Resampling.NEAREST)
    buf = io.BytesIO()
    pil.save(buf, format="PNG")
    return buf.getvalue()


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def display_scale(height: int, target: int = 128) -> int:
    """Integer upscale so small images are visible in reports."""
    return max(1, target // max(1, height))
