"""Shared pieces of the perturbation explainers: baselines, class scores, and batched evaluation of
many masked copies of each image (all windows / masks / coalitions go through ``masked_scores``)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from xai_plugins import InputError
from xai_plugins.toolkit import batch_slices, fast_forward

KeepMask = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
OUTPUTS = ("logit", "probability")


def class_scores(logits: torch.Tensor, targets: torch.Tensor, output: str = "logit") -> torch.Tensor:
    """The score of each row's target class: its logit or its softmax probability."""
    if output not in OUTPUTS:
        raise InputError(f"output must be one of {', '.join(OUTPUTS)}, not {output!r}")
    scores = logits.float().softmax(dim=1) if output == "probability" else logits.float()
    return scores.gather(1, targets.view(-1, 1).to(scores.device)).squeeze(1)


def model_scores(
    model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, output: str, batch_size: int | None = None
) -> torch.Tensor:
    """``class_scores`` of unperturbed inputs, in batches, without gradients."""
    out = []
    model = fast_forward(model)
    with torch.no_grad():
        for sl in batch_slices(inputs.shape[0], batch_size):
            out.append(class_scores(model(inputs[sl]), targets[sl], output))
    return torch.cat(out)


def masked_scores(
    model: nn.Module,
    inputs: torch.Tensor,
    baseline: torch.Tensor,
    targets: torch.Tensor,
    count: int,
    keep_mask: KeepMask,
    batch_size: int | None,
    output: str = "logit",
) -> torch.Tensor:
    """Scores of ``count`` perturbed copies of every image: B x count.

    Copy k of image b is ``x_b * m + baseline_b * (1 - m)`` with ``m = keep_mask(b, k)`` (n x 1|C x H x W,
    1 keeps the pixel). All B * count copies run in forward passes of ``batch_size`` copies.
    """
    n_img = inputs.shape[0]
    shared_base = baseline.shape[0] == 1
    out = torch.empty(n_img * count, device=inputs.device)
    model = fast_forward(model)
    with torch.no_grad():
        for sl in batch_slices(n_img * count, batch_size or n_img * count):
            flat = torch.arange(sl.start, sl.stop, device=inputs.device)
            b, k = flat // count, flat % count
            m = keep_mask(b, k).to(inputs.dtype)
            if sl.start // count == (sl.stop - 1) // count:  # one image: broadcast instead of copying
                image = sl.start // count
                x, r = inputs[image : image + 1], baseline[0 if shared_base else image].unsqueeze(0)
            else:
                x = inputs.index_select(0, b)
                r = baseline if shared_base else baseline.index_select(0, b)
            out[sl] = class_scores(model(torch.lerp(r, x, m)), targets[b], output)
    return out.view(n_img, count)


def as_pair(value: int | tuple[int, int] | list[int], name: str) -> tuple[int, int]:
    """An int or an (h, w) pair of positive ints."""
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or any(int(v) < 1 for v in pair):
        raise InputError(f"{name} must be a positive int or an (h, w) pair, not {value!r}")
    return int(pair[0]), int(pair[1])


def generator(seed: int | None, device: torch.device) -> torch.Generator:
    """A seeded random generator on ``device`` (seed None: nondeterministic)."""
    g = torch.Generator(device=device)
    if seed is None:
        g.seed()
    else:
        g.manual_seed(int(seed))
    return g
