"""Adversarial attacks shared by the ``adversarial`` explainer and the robustness metrics.

Both attacks are batched, take gradients with respect to the input only (parameters are frozen
for the duration) and leave the model exactly as found (training flags, hooks, ``requires_grad``),
through ``preserved_model``. Inputs are in the model's (normalized) input space.

- ``fgsm``: Goodfellow et al. 2015, x' = x + epsilon * sign(grad_x CE(f(x), y)).
- ``deepfool``: Moosavi-Dezfooli et al. 2016, Algorithm 2 (multi-class): at each step move to the
  closest linearized decision boundary, r_i = |f'_l| / ||w'_l||^2 * w'_l with
  l = argmin_{k != y} |f_k - f_y| / ||grad f_k - grad f_y||, and return
  x + (1 + overshoot) * sum_i r_i once the prediction left class ``y``.
- ``one_pixel``: Su et al. 2019 (IEEE TEVC 23(5)), the untargeted attack: differential evolution
  (``scipy.optimize.differential_evolution``) over candidates (row, column, one value per channel)
  of ``pixels`` pixels, minimizing the probability of class ``y``; no gradient is used.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from xai_plugins.toolkit import preserved_model

__all__ = ["fgsm", "deepfool", "one_pixel", "OnePixelResult"]


def fgsm(
    model: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    epsilon: float = 0.03,
    clamp: tuple[float, float] | None = None,
) -> torch.Tensor:
    """Fast gradient sign method (Goodfellow et al. 2015, Eq. 3): one signed gradient step of size
    ``epsilon`` that increases the cross-entropy of ``targets``; optionally clamped to ``clamp``.
    Returns the adversarial inputs (detached, same shape and device as ``inputs``)."""
    targets = torch.as_tensor(targets, device=inputs.device).long().view(-1)
    with preserved_model(model, restore_values=False), torch.enable_grad():
        x = inputs.detach().clone().requires_grad_(True)
        loss = F.cross_entropy(model(x), targets, reduction="sum")
        (grad,) = torch.autograd.grad(loss, x)
    adv = inputs.detach() + epsilon * grad.sign()
    if clamp is not None:
        adv = adv.clamp(*clamp)
    return adv.detach()


def _candidates(logits: torch.Tensor, targets: torch.Tensor, num_classes: int | None) -> torch.Tensor:
    """Per sample, the classes to consider (as the reference code: the ``num_classes`` highest
    logits of the clean input), without the original class: B x K."""
    n = logits.shape[1]
    k = n if num_classes is None else max(2, min(int(num_classes), n))
    masked = logits.detach().clone()
    masked.scatter_(1, targets.view(-1, 1), float("-inf"))
    return masked.topk(k - 1, dim=1).indices


def _deepfool_step(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, cand: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One linearization: the minimal step r_i (Eq. in Algorithm 2) and the current predictions."""
    x = x.detach().clone().requires_grad_(True)
    logits = model(x)
    f_y = logits.gather(1, y.view(-1, 1)).squeeze(1)
    (g_y,) = torch.autograd.grad(f_y.sum(), x, retain_graph=True)
    best_dist = torch.full((x.shape[0],), float("inf"), device=x.device)
    best_step = torch.zeros_like(x)
    for j in range(cand.shape[1]):
        f_k = logits.gather(1, cand[:, j : j + 1]).squeeze(1)
        (g_k,) = torch.autograd.grad(f_k.sum(), x, retain_graph=j < cand.shape[1] - 1)
        w = (g_k - g_y).flatten(1)
        f = (f_k - f_y).detach()
        norm = w.norm(dim=1).clamp_min(1e-12)
        dist = f.abs() / norm
        better = dist < best_dist
        step = ((f.abs() + 1e-4) / norm.pow(2)).view(-1, 1) * w
        best_step[better] = step.view_as(x)[better]
        best_dist = torch.where(better, dist, best_dist)
    return best_step.detach(), logits.detach().argmax(1)


def deepfool(
    model: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    max_iter: int = 50,
    overshoot: float = 0.02,
    num_classes: int | None = None,
) -> torch.Tensor:
    """DeepFool (Moosavi-Dezfooli et al. 2016, Algorithm 2), batched.

    ``targets`` are the classes to move away from (usually the predictions). ``num_classes``
    limits the candidate classes to that many highest-scoring ones (the reference code uses 10;
    ``None``: all). Samples already misclassified, or fooled, stop; the others run up to
    ``max_iter`` steps. Returns x + (1 + overshoot) * r_total (detached).
    """
    x0 = inputs.detach()
    y = torch.as_tensor(targets, device=x0.device).long().view(-1)
    r_total = torch.zeros_like(x0)
    with preserved_model(model, restore_values=False), torch.enable_grad():
        with torch.no_grad():
            logits = model(x0)
        cand = _candidates(logits, y, num_classes)
        active = logits.argmax(1) == y
        for _ in range(max_iter):
            idx = active.nonzero().flatten()
            if idx.numel() == 0:
                break
            adv = x0[idx] + (1 + overshoot) * r_total[idx]
            step, pred = _deepfool_step(model, adv, y[idx], cand[idx])
            still = pred == y[idx]
            r_total[idx[still]] += step[still]
            active[idx[~still]] = False
    return (x0 + (1 + overshoot) * r_total).detach()


@dataclass
class OnePixelResult:
    """The one-pixel attack's adversarial inputs (B x C x H x W), the changed pixels (B x pixels x 2,
    row and column) and whether each image's prediction left its class (B, bool)."""

    adversarial: torch.Tensor
    positions: torch.Tensor
    fooled: torch.Tensor


def _apply_pixels(image: torch.Tensor, candidates: np.ndarray, pixels: int) -> torch.Tensor:
    """N copies of ``image`` (C x H x W), copy i with the pixels of candidate i (rows of
    (row, col, v_1..v_C) per pixel, positions rounded down) set."""
    c, h, w = image.shape
    cand = torch.as_tensor(candidates, dtype=image.dtype, device=image.device).view(-1, pixels, 2 + c)
    out = image.unsqueeze(0).repeat(cand.shape[0], 1, 1, 1)
    rows = cand[..., 0].long().clamp(0, h - 1)
    cols = cand[..., 1].long().clamp(0, w - 1)
    n = torch.arange(cand.shape[0], device=image.device).view(-1, 1).expand(-1, pixels)
    out.permute(0, 2, 3, 1)[n, rows, cols] = cand[..., 2:]
    return out


def one_pixel(
    model: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    pixels: int = 1,
    popsize: int = 80,
    maxiter: int = 30,
    seed: int = 0,
) -> OnePixelResult:
    """One-pixel attack (Su et al. 2019, untargeted): per image, differential evolution (DE/rand/1/bin
    as scipy implements it, the paper's F = 0.5 mutation, no crossover: recombination 1) over
    ``popsize`` candidates of ``pixels`` pixels each, every channel value within the image's own range
    for that channel (the paper's 0-255 in our normalized units), for up to ``maxiter`` generations,
    minimizing the model's probability of class ``y``; it stops as soon as the best candidate changes
    the prediction (the paper's early stop). The paper uses 400 candidates and 100 generations; the
    default budget here is smaller. Each generation is one batched forward. ``fooled`` says honestly
    whether the prediction changed; failed images keep the best candidate found."""
    from scipy.optimize import differential_evolution

    x0 = inputs.detach()
    y = torch.as_tensor(targets, device=x0.device).long().view(-1)
    b, c, h, w = x0.shape
    advs, positions, fooled = [], [], []
    with preserved_model(model, restore_values=False), torch.no_grad():
        for i in range(b):
            image, label = x0[i], int(y[i])
            lo, hi = image.flatten(1).amin(1).tolist(), image.flatten(1).amax(1).tolist()
            bounds = [(0, h - 1e-3), (0, w - 1e-3), *zip(lo, hi)] * int(pixels)
            probe: dict = {"x": None}

            def prob(xs: np.ndarray, image=image, label=label, probe=probe) -> np.ndarray:
                logits = model(_apply_pixels(image, xs.T, int(pixels)))
                hit = (logits.argmax(1) != label).nonzero().flatten()
                if probe["x"] is None and hit.numel():
                    probe["x"] = xs.T[int(hit[0])].copy()  # the first candidate that fools the model
                return torch.softmax(logits.float(), 1)[:, label].cpu().double().numpy()

            n_par = len(bounds)
            result = differential_evolution(
                prob,
                bounds,
                popsize=max(1, -(-int(popsize) // n_par)),
                maxiter=int(maxiter),
                mutation=0.5,
                recombination=1.0,
                seed=int(seed) + i,
                polish=False,
                tol=0,
                atol=0,
                init="random",
                vectorized=True,
                updating="deferred",
                callback=lambda *args, probe=probe, **kw: probe["x"] is not None,
            )
            best = result.x if probe["x"] is None else probe["x"]
            adv = _apply_pixels(image, best[None], int(pixels))
            advs.append(adv[0])
            cand = torch.as_tensor(best).view(int(pixels), 2 + c)
            positions.append(
                torch.stack([cand[:, 0].long().clamp(0, h - 1), cand[:, 1].long().clamp(0, w - 1)], 1)
            )
            fooled.append(bool(model(adv).argmax(1)[0] != label))
    return OnePixelResult(torch.stack(advs).detach(), torch.stack(positions), torch.tensor(fooled))
