"""A model's own preprocessing: the size, channel count and normalization its inputs need.

It is stored with the model (checkpoint or MLflow model version) or given by the user; the project
never applies a hidden default (DESIGN.md).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from core.errors import InputError

MAX_SIDE = 4096  # pixels: a larger stored or given size is refused (a 30000 px resize eats the memory)
MAX_CHANNELS = 16


@dataclass
class Preprocess:
    size: int | tuple[int, int] | None  # resize files to this (square int or (H, W)); None: keep
    mean: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])
    std: list[float] = field(default_factory=lambda: [1.0, 1.0, 1.0])
    channels: int = 3

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """[0, 1] images (B x C x H x W) -> model inputs."""
        mean = torch.tensor(self.mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
        return (images - mean) / std

    def denormalize(self, inputs: torch.Tensor) -> torch.Tensor:
        """Model inputs -> [0, 1] images for display."""
        mean = torch.tensor(self.mean, dtype=inputs.dtype, device=inputs.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=inputs.dtype, device=inputs.device).view(1, -1, 1, 1)
        return (inputs * std + mean).clamp(0, 1)

    @property
    def hw(self) -> tuple[int, int] | None:
        if self.size is None:
            return None
        return (self.size, self.size) if isinstance(self.size, int) else tuple(self.size)  # type: ignore[return-value]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Preprocess:
        try:
            size = data.get("size")
            if isinstance(size, list):
                size = tuple(size)
            pre = cls(
                size=size,
                mean=[float(v) for v in data.get("mean", [0, 0, 0])],
                std=[float(v) for v in data.get("std", [1, 1, 1])],
                channels=int(data.get("channels", 3)),
            )
        except (TypeError, ValueError, AttributeError) as exc:
            raise InputError(f"invalid preprocessing description: {exc}") from exc
        if not 1 <= pre.channels <= MAX_CHANNELS:
            raise InputError(f"preprocessing: channels must be 1-{MAX_CHANNELS}, not {pre.channels}")
        if (
            len(pre.mean) != pre.channels
            or len(pre.std) != pre.channels
            or not all(s > 0 for s in pre.std)
            or not all(math.isfinite(v) for v in pre.mean + pre.std)
        ):
            raise InputError("preprocessing: mean and std need one finite value per channel, std > 0")
        sides = [] if pre.size is None else [pre.size] if not isinstance(pre.size, tuple) else list(pre.size)
        if pre.size is not None and (
            len(sides) not in (1, 2)
            or not all(isinstance(s, int) and not isinstance(s, bool) and 1 <= s <= MAX_SIDE for s in sides)
        ):
            raise InputError(
                f"preprocessing: size must be a whole number of pixels 1-{MAX_SIDE} (or [H, W]), "
                f"not {str(data.get('size'))[:40]}"
            )
        return pre

    @classmethod
    def load(cls, spec: str | Path) -> Preprocess:
        """From a JSON file path or an inline JSON string."""
        text = str(spec)
        try:
            data = json.loads(Path(text).read_text() if Path(text).is_file() else text)
        except (OSError, json.JSONDecodeError) as exc:
            raise InputError(f"cannot read preprocessing {text!r}: {exc}") from exc
        return cls.from_dict(data)
