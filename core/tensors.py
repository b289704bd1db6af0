"""Shared tensor helpers: map normalization, upsampling, batching, channel reductions."""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F


def normalize_maps(maps: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Scale each B x H x W map into [0, 1].

    Non-negative maps are divided by their maximum (zero keeps its meaning: no relevance); maps
    with negative values are min-max scaled. An all-constant map becomes all zeros.
    """
    flat = torch.nan_to_num(maps.reshape(maps.shape[0], -1).float(), nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = torch.aminmax(flat, dim=1, keepdim=True)
    shift = lo.clamp(max=0)
    span = hi - shift
    out = torch.where(span > eps, (flat - shift) / span.clamp_min(eps), 0.0)
    return out.clamp_(0, 1).reshape(maps.shape)


def spatial_size(t: torch.Tensor) -> tuple[int, int]:
    """(H, W) of a ... x H x W tensor, as the ``size`` that ``upsample`` takes."""
    return int(t.shape[-2]), int(t.shape[-1])


def upsample(maps: torch.Tensor, size: tuple[int, int], mode: str = "bilinear") -> torch.Tensor:
    """Resize B x h x w or B x 1 x h x w maps to ``size`` (bilinear, align_corners=False)."""
    squeeze = maps.dim() == 3
    x = maps.unsqueeze(1) if squeeze else maps
    if tuple(x.shape[-2:]) != tuple(size):
        kwargs = {"align_corners": False} if mode in ("bilinear", "bicubic") else {}
        x = F.interpolate(x.float(), size=size, mode=mode, **kwargs)
    return x.squeeze(1) if squeeze else x


def batch_slices(n: int, batch_size: int | None) -> Iterator[slice]:
    """Consecutive slices of ``range(n)`` with at most ``batch_size`` items each."""
    step = n if not batch_size or batch_size <= 0 else batch_size
    for start in range(0, n, step):
        yield slice(start, min(n, start + step))


def select_targets(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The logit of each sample's target class (B,)."""
    return logits.gather(1, targets.view(-1, 1).to(logits.device)).squeeze(1)


def as_target_tensor(targets: object, batch: int, num_classes: int | None = None) -> torch.Tensor:
    """Turn an int, a sequence or a tensor of class indices into a B long tensor, checking range."""
    from core.errors import InputError

    if isinstance(targets, int):
        t = torch.full((batch,), targets, dtype=torch.long)
    else:
        t = torch.as_tensor(targets).long().flatten().cpu()
        if t.numel() == 1 and batch != 1:
            t = t.expand(batch).clone()
    if t.numel() != batch:
        raise InputError(f"got {t.numel()} targets for {batch} inputs")
    if num_classes is not None and ((t < 0).any() or (t >= num_classes).any()):
        bad = int(t[(t < 0) | (t >= num_classes)][0])
        raise InputError(
            f"target {bad} is out of range: the model has {num_classes} classes (0..{num_classes - 1})"
        )
    return t
