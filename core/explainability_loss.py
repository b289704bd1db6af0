"""DeConvolve's explainability loss (section 3.1, Eq. 1), usable from any training loop.

    Loss = task loss + alpha * Area(nonblack) / Image_size + beta * sigma_nonblack          (Eq. 1)

``ExplainabilityLoss`` is the term added to the task loss (``core.train.train_model``'s
``extra_loss``): it re-runs the model on the batch with a forward hook on the chosen layer, registered
only for that call, and builds the CAM-weighted feature maps of the labelled class:

    M_k = |w_k| * ReLU(A_k),   w_k = mean over positions of d logit_y / d A_k   (Grad-CAM weights;
                                 for a GAP + linear network these are the CAM weights up to scale)

scaled per image by their largest value over all filters and positions (the heat map of the image,
so "extremely low focus as measured by the heat map obtained from CAM" is relative to that image).

- Area: the share of non-black positions, i.e. M_k > ``threshold`` after scaling, averaged over
  filters and images (each filter's map is one "image" of ``h x w`` positions).
- Dispersion: the spatial standard deviation of each filter's non-black region (positions in
  [0, 1] x [0, 1], divided by the value for a uniform map, sqrt(1/6), so 0 is one spot and 1 is a
  map spread over the whole image), averaged over filters weighted by their non-black area.

Definitional notes: the paper thresholds with a hard step, which has no gradient; training uses a
sigmoid of width ``temperature`` around the threshold (a smooth surrogate of the step), while
``focus_stats`` reports the hard figures. The per-image scale and the CAM weights are constants of
the step (detached), so the loss cannot lower the area by inflating one peak or by changing the
weights. The paper's task loss is written as MSE; ``core.train`` uses cross-entropy (its section 4.1
trains with sparse categorical cross-entropy). During the extra forward, normalization layers in
training mode use the batch statistics as usual but do not update their running statistics, so the
regularizer does not count a batch twice.
"""

from __future__ import annotations

import contextlib
import math
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase

from core.hooks import capture_layers
from core.layers import default_layer, resolve_layer

_UNIFORM_SIGMA = math.sqrt(1.0 / 6.0)  # std of a uniform distribution over the unit square (2-D)


@dataclass
class FocusTerms:
    """The two terms of Eq. 1 (batch means) for one or more layers."""

    area: torch.Tensor
    dispersion: torch.Tensor


def cam_weighted_maps(activations: torch.Tensor, gradients: torch.Tensor | None) -> torch.Tensor:
    """M = |w| * ReLU(A) scaled per image into [0, 1] (the scale and the weights are detached)."""
    a = activations.clamp(min=0)
    if gradients is not None:
        a = gradients.detach().mean(dim=(2, 3), keepdim=True).abs() * a
    scale = a.detach().amax(dim=(1, 2, 3), keepdim=True).clamp_min(1e-12)
    return a / scale


def nonblack(maps: torch.Tensor, threshold: float, temperature: float | None) -> torch.Tensor:
    """The non-black indicator: a hard step, or its sigmoid surrogate when ``temperature`` is set."""
    if temperature:
        return torch.sigmoid((maps - threshold) / temperature)
    return (maps > threshold).to(maps.dtype)


def dispersion(mask: torch.Tensor) -> torch.Tensor:
    """Per image: the spatial std of each filter's non-black region, averaged over filters weighted
    by their non-black area, divided by the std of a uniform map (B)."""
    b, k, h, w = mask.shape
    ys = (torch.arange(h, device=mask.device, dtype=mask.dtype) + 0.5) / h
    xs = (torch.arange(w, device=mask.device, dtype=mask.dtype) + 0.5) / w
    mass = mask.sum(dim=(2, 3))  # B x K
    p = mask / mass.clamp_min(1e-12)[..., None, None]
    py, px = p.sum(dim=3), p.sum(dim=2)  # marginals, B x K x h / B x K x w
    var = (py * (ys - (py * ys).sum(-1, keepdim=True)) ** 2).sum(-1) + (
        px * (xs - (px * xs).sum(-1, keepdim=True)) ** 2
    ).sum(-1)
    sigma = torch.sqrt(var + 1e-12) / _UNIFORM_SIGMA
    weight = mass.detach()
    return (sigma * weight).sum(1) / weight.sum(1).clamp_min(1e-12)


def focus_terms(
    activations: torch.Tensor, gradients: torch.Tensor | None, threshold: float, temperature: float | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(area, dispersion) per image (B each) of one layer's feature maps."""
    mask = nonblack(cam_weighted_maps(activations, gradients), threshold, temperature)
    return mask.mean(dim=(1, 2, 3)), dispersion(mask)


@contextlib.contextmanager
def _running_stats_frozen(model: nn.Module) -> Iterator[None]:
    """Normalization layers in training mode use the batch statistics without updating their
    running statistics (the extra forward must not count the batch twice, and restoring buffers in
    place would invalidate the autograd graph of the task loss)."""
    flipped = [
        m for m in model.modules() if isinstance(m, _NormBase) and m.training and m.track_running_stats
    ]
    for m in flipped:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in flipped:
            m.track_running_stats = True


class ExplainabilityLoss:
    """alpha * Area(nonblack) / Image_size + beta * sigma_nonblack (Eq. 1), for ``train_model``.

    ``layer``: a module, a dotted name, or a sequence of them (terms averaged over layers); ``None``
    picks the deepest spatial layer (``core.layers.default_layer``). ``threshold``: the "low
    threshold" of the black cut, relative to the image's CAM heat map maximum. ``cam_weighted``:
    weight each filter's map by its Grad-CAM weight for the label (False: raw feature maps).
    """

    def __init__(
        self,
        alpha: float = 0.1,
        beta: float = 0.05,
        layer: str | nn.Module | Sequence | None = None,
        threshold: float = 0.1,
        temperature: float = 0.02,
        cam_weighted: bool = True,
    ):
        if alpha < 0 or beta < 0:
            raise ValueError("alpha and beta must be >= 0")
        self.alpha, self.beta, self.layer = float(alpha), float(beta), layer
        self.threshold, self.temperature, self.cam_weighted = (
            float(threshold),
            float(temperature),
            cam_weighted,
        )
        self._names: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def layer_names(self, model: nn.Module, example: torch.Tensor) -> list[str]:
        """The dotted names of the regularized layers (the default resolved once per model)."""
        names = self._names.get(model)
        if names is None:
            specs: list[Any] = list(self.layer) if isinstance(self.layer, (list, tuple)) else [self.layer]
            names = []
            for spec in specs:
                if spec is None:
                    with _running_stats_frozen(model):
                        names.append(default_layer(model, example[:1].detach()))
                else:
                    names.append(resolve_layer(model, spec)[0])
            self._names[model] = names
        return names

    def terms(
        self, model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, hard: bool = False
    ) -> FocusTerms:
        """Area and dispersion (batch means, averaged over layers) of the CAM-weighted feature maps
        of the ``labels`` class. ``hard``: the exact step (for measuring), else the surrogate."""
        names = self.layer_names(model, inputs)
        modules = dict(resolve_layer(model, n) for n in names)
        with torch.enable_grad(), _running_stats_frozen(model), capture_layers(modules) as caps:
            logits = model(inputs)
            acts: list[torch.Tensor] = []
            for name in names:
                out = caps[name].output
                if out is None:
                    raise RuntimeError(f"layer {name!r} was not called in the forward pass")
                acts.append(out)
            grads: Sequence[torch.Tensor | None] = [None] * len(acts)
            if self.cam_weighted:
                score = logits.gather(1, labels.view(-1, 1).to(logits.device)).sum()
                grads = torch.autograd.grad(score, acts, retain_graph=True, allow_unused=True)
        areas, disps = [], []
        temperature = None if hard else self.temperature
        for a, g in zip(acts, grads):
            if a.dim() != 4:
                raise ValueError(
                    f"the explainability loss needs a layer with B x C x H x W output, got {tuple(a.shape)}"
                )
            if self.cam_weighted and g is None:
                g = torch.zeros_like(a)
            area, disp = focus_terms(a, g, self.threshold, temperature)
            areas.append(area.mean())
            disps.append(disp.mean())
        return FocusTerms(torch.stack(areas).mean(), torch.stack(disps).mean())

    def __call__(
        self, model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, logits: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The term added to the task loss (``logits`` is accepted for the ``extra_loss`` contract;
        the feature maps come from a hooked re-run of the same batch)."""
        t = self.terms(model, inputs, labels)
        return self.alpha * t.area + self.beta * t.dispersion


def focus_stats(
    model: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor | None = None,
    layer: str | nn.Module | Sequence | None = None,
    threshold: float = 0.1,
    cam_weighted: bool = True,
    batch_size: int = 256,
) -> dict[str, float]:
    """The hard (step) area and dispersion of Eq. 1 on ``inputs`` (targets: default predicted class),
    with the model in eval mode and left as found."""
    from core.hooks import preserved_model

    loss = ExplainabilityLoss(layer=layer, threshold=threshold, cam_weighted=cam_weighted)
    area = disp = 0.0
    with preserved_model(model):
        for start in range(0, inputs.shape[0], batch_size):
            x = inputs[start : start + batch_size]
            if targets is None:
                with torch.no_grad():
                    t = model(x).argmax(1)
            else:
                t = targets[start : start + batch_size]
            terms = loss.terms(model, x, t, hard=True)
            area += float(terms.area) * x.shape[0]
            disp += float(terms.dispersion) * x.shape[0]
    n = max(1, inputs.shape[0])
    return {"area": area / n, "dispersion": disp / n}
