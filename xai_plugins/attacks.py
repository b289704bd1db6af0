"""Adversarial attacks shared by the ``adversarial`` explainer and the robustness metrics.

Both attacks are batched, take gradients with respect to the input only (parameters are frozen
for the duration) and leave the model exactly as found (training flags, hooks, ``requires_grad``),
through ``preserved_model``. Inputs are in the model's (normalized) input space.

- ``fgsm``: Goodfellow et al. 2015, x' = x + epsilon * sign(grad_x CE(f(x), y)).
- ``deepfool``: Moosavi-Dezfooli et al. 2016, Algorithm 2 (multi-class): at each step move to the
  closest linearized decision boundary, r_i = |f'_l| / ||w'_l||^2 * w'_l with
  l = argmin_{k != y} |f_k - f_y| / ||grad f_k - grad f_y||, and return
  x + (1 + overshoot) * sum_i r_i once the prediction left class ``y``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from xai_plugins.toolkit import preserved_model

__all__ = ["fgsm", "deepfool"]


def fgsm(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, epsilon: float = 0.03,
         clamp: tuple[float, float] | None = None) -> torch.Tensor:
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


def _deepfool_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                   cand: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One linearization: the minimal step r_i (Eq. in Algorithm 2) and the current predictions."""
    x = x.detach().clone().requires_grad_(True)
    logits = model(x)
    f_y = logits.gather(1, y.view(-1, 1)).squeeze(1)
    (g_y,) = torch.autograd.grad(f_y.sum(), x, retain_graph=True)
    best_dist = torch.full((x.shape[0],), float("inf"), device=x.device)
    best_step = torch.zeros_like(x)
    for j in range(cand.shape[1]):
        f_k = logits.gather(1, cand[:, j:j + 1]).squeeze(1)
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


def deepfool(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, max_iter: int = 50,
             overshoot: float = 0.02, num_classes: int | None = None) -> torch.Tensor:
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
