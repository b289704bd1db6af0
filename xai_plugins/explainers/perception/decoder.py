"""The PV decoder D (Eq. 4-5): latent z -> reconstruction y = D(E(x)) in [0, 1].

As in the paper (section 3, "Reconstruction"): 3 x 3 kernels everywhere; convolutions with leaky
ReLU (slope 0.2); transposed convolutions (stride 2) with a linear activation, each followed by
batch normalization; a sigmoid output; no skip connections, so D sees nothing but z. The number of
upsampling blocks is derived from the latent and input sizes (ceil(log2(H / h))); when the ratio
is not a power of two the last feature map is resized bilinearly to the input size before the
output convolution. Channels start at ``width`` (default: the latent depth clamped to [32, 256])
and halve at each upsampling, down to ``min_width``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def upsampling_steps(latent_size: tuple[int, int], out_size: tuple[int, int]) -> int:
    """Number of x2 upsamplings that bring ``latent_size`` to at least ``out_size``."""
    ratios = [o / max(1, i) for i, o in zip(latent_size, out_size)]
    return max(0, max(math.ceil(math.log2(r) - 1e-9) for r in ratios))


class Decoder(nn.Module):
    """Conv (+LeakyReLU) -> [ConvTranspose (linear) -> BN -> depth x (Conv + LeakyReLU)] x steps
    -> (resize) -> Conv -> sigmoid."""

    def __init__(
        self,
        latent_channels: int,
        latent_size: tuple[int, int],
        out_channels: int,
        out_size: tuple[int, int],
        width: int | None = None,
        min_width: int = 16,
        depth: int = 1,
    ):
        super().__init__()
        self.arch: dict[str, Any] = {
            "latent_channels": int(latent_channels),
            "latent_size": [int(v) for v in latent_size],
            "out_channels": int(out_channels),
            "out_size": [int(v) for v in out_size],
            "width": int(width) if width else None,
            "min_width": int(min_width),
            "depth": int(depth),
        }
        c = int(width) if width else min(256, max(32, int(latent_channels)))
        layers: list[nn.Module] = [nn.Conv2d(latent_channels, c, 3, padding=1), nn.LeakyReLU(0.2)]
        for _ in range(upsampling_steps(tuple(latent_size), tuple(out_size))):
            c_out = max(int(min_width), c // 2)
            layers += [
                nn.ConvTranspose2d(c, c_out, 3, stride=2, padding=1, output_padding=1),
                nn.BatchNorm2d(c_out),
            ]
            for _ in range(max(1, int(depth))):
                layers += [nn.Conv2d(c_out, c_out, 3, padding=1), nn.LeakyReLU(0.2)]
            c = c_out
        self.body = nn.Sequential(*layers)
        self.head = nn.Conv2d(c, out_channels, 3, padding=1)
        self.out_size = tuple(int(v) for v in out_size)
        # a fixed (not trained) scale bringing the latent to unit RMS: conditioning only
        self.register_buffer("latent_scale", torch.ones(()))

    def calibrate(self, latent_rms: float, mean_color: torch.Tensor) -> None:
        """Start training well: unit-RMS latents in, and the output bias at the fit data's mean
        color (the untrained decoder draws that color rather than grey)."""
        self.latent_scale.fill_(1.0 / max(float(latent_rms), 1e-6))
        with torch.no_grad():
            p = mean_color.float().clamp(0.02, 0.98).to(self.head.bias.device)
            self.head.bias.copy_(torch.log(p / (1 - p)))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.body(z * self.latent_scale)
        if tuple(h.shape[-2:]) != self.out_size:
            h = F.interpolate(h, size=self.out_size, mode="bilinear", align_corners=False)
        return torch.sigmoid(self.head(h))

    @classmethod
    def from_arch(cls, arch: dict[str, Any]) -> Decoder:
        return cls(
            arch["latent_channels"],
            tuple(arch["latent_size"]),
            arch["out_channels"],
            tuple(arch["out_size"]),
            arch.get("width"),
            arch.get("min_width", 16),
            arch.get("depth", 1),
        )
