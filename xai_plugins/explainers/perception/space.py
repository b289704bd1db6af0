"""Between the model's input space and the [0, 1] image space the decoder works in.

The decoder ends in a sigmoid, so reconstructions are [0, 1] images; to compare them with an input
or feed them to the model they go through the model's normalization ``x = (image - mean) / std``.
``mean``/``std`` are PV parameters (the model's preprocessing, e.g. 0.5 / 0.25 for the shapes
models). When they are not given: inputs already in [0, 1] are taken as images (identity); other
inputs are mapped to [0, 1] by the per-channel range of the fit data (``image = (x - lo) /
(hi - lo)``), a contrast stretch of the true image that still maps back to the model's inputs
exactly. The resolved mean/std are stored with the decoder.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from xai_plugins import InputError


def _per_channel(value: float | Sequence[float] | torch.Tensor, channels: int, what: str) -> torch.Tensor:
    t = torch.as_tensor(value, dtype=torch.float32).flatten()
    if t.numel() == 1:
        t = t.expand(channels).clone()
    if t.numel() != channels:
        raise InputError(f"PV {what} needs one value per input channel ({channels}), got {t.numel()}")
    return t


class ImageSpace:
    """Per-channel affine map: ``to_input(image) = (image - mean) / std`` and its inverse."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor):
        if (std <= 0).any():
            raise InputError("PV std must be > 0")
        self.mean, self.std = mean.float().flatten(), std.float().flatten()

    @classmethod
    def resolve(cls, mean, std, inputs: torch.Tensor) -> ImageSpace:
        """From the ``mean``/``std`` parameters, or (both None) from the fit inputs (see module doc)."""
        c = inputs.shape[1]
        if mean is not None or std is not None:
            return cls(
                _per_channel(0.0 if mean is None else mean, c, "mean"),
                _per_channel(1.0 if std is None else std, c, "std"),
            )
        lo = inputs.transpose(0, 1).reshape(c, -1).amin(1).float().cpu()
        hi = inputs.transpose(0, 1).reshape(c, -1).amax(1).float().cpu()
        if lo.min() >= 0 and hi.max() <= 1:
            return cls(torch.zeros(c), torch.ones(c))
        span = (hi - lo).clamp_min(1e-6)
        return cls(-lo / span, 1.0 / span)

    def _view(self, t: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        return t.to(device=ref.device, dtype=ref.dtype).view(1, -1, 1, 1)

    def to_input(self, image: torch.Tensor) -> torch.Tensor:
        return (image - self._view(self.mean, image)) / self._view(self.std, image)

    def to_image(self, inputs: torch.Tensor) -> torch.Tensor:
        return (inputs * self._view(self.std, inputs) + self._view(self.mean, inputs)).clamp(0, 1)

    def state(self) -> dict[str, torch.Tensor]:
        return {"mean": self.mean.clone(), "std": self.std.clone()}
