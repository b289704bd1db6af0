"""A small differentiable SSIM (Wang et al. 2004) for the PV decoder's loss (Eq. 8) and metrics.

Gaussian window (11 taps, sigma 1.5), constants K1 = 0.01, K2 = 0.03, population statistics and
only the positions where the whole window fits ("valid"), as scikit-image's
``structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False)``, with
which it agrees to float precision. Images smaller than the window use a window shrunk to fit.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def gaussian_kernel(size: int, sigma: float, device=None, dtype=None) -> torch.Tensor:
    """A normalized 1-D Gaussian of ``size`` taps (the window is its outer product: separable)."""
    coords = torch.arange(size, device=device, dtype=dtype or torch.float32) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    return g / g.sum()


def ssim_map(
    a: torch.Tensor,
    b: torch.Tensor,
    win_size: int = 11,
    sigma: float = 1.5,
    data_range: float = 1.0,
    k1: float = 0.01,
    k2: float = 0.03,
) -> torch.Tensor:
    """The local SSIM index of two B x C x H x W batches: B x C x h x w (valid positions only)."""
    if a.shape != b.shape or a.dim() != 4:
        raise ValueError(
            f"ssim needs two B x C x H x W tensors of one shape, got {tuple(a.shape)}, {tuple(b.shape)}"
        )
    size = min(win_size, a.shape[-2], a.shape[-1])
    size -= 1 - size % 2  # keep it odd
    c = a.shape[1]
    g = gaussian_kernel(size, sigma, a.device, a.dtype)
    # the five local statistics in one separable depthwise filtering (two 1-D convolutions)
    stack = torch.cat([a, b, a * a, b * b, a * b], dim=1)
    stack = F.conv2d(stack, g.view(1, 1, size, 1).expand(5 * c, 1, size, 1), groups=5 * c)
    stack = F.conv2d(stack, g.view(1, 1, 1, size).expand(5 * c, 1, 1, size), groups=5 * c)
    mu_a, mu_b, e_aa, e_bb, e_ab = stack.split(c, dim=1)
    var_a, var_b, cov = e_aa - mu_a**2, e_bb - mu_b**2, e_ab - mu_a * mu_b
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    return ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))


def ssim_per_channel(a: torch.Tensor, b: torch.Tensor, **kwargs) -> torch.Tensor:
    """SSIM of each image and channel (B x C): the SSIM_c(x_i, y_i) of the paper's Eq. 8."""
    return ssim_map(a, b, **kwargs).mean(dim=(2, 3))


def ssim(a: torch.Tensor, b: torch.Tensor, **kwargs) -> torch.Tensor:
    """Per-image SSIM (B,): the mean over channels of ``ssim_per_channel``. Differentiable."""
    return ssim_per_channel(a, b, **kwargs).mean(dim=1)
