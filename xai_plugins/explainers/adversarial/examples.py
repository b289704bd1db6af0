"""Explanations from adversarial examples (the review's section 6): the difference between an input
and its FGSM / DeepFool counterpart shows what the model is most sensitive to."""

from __future__ import annotations

import torch
from torch import nn

from xai_plugins import Explainer, InputError
from xai_plugins.attacks import deepfool, fgsm, one_pixel

ATTACKS = ("fgsm", "deepfool", "one_pixel")


def display(inputs: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """``inputs`` scaled to [0, 1] with each reference image's own min-max (for the report)."""
    lo = reference.flatten(1).amin(1).view(-1, 1, 1, 1)
    hi = reference.flatten(1).amax(1).view(-1, 1, 1, 1)
    return ((inputs - lo) / (hi - lo).clamp_min(1e-12)).clamp(0, 1)


def iterative_fgsm(
    model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, epsilon: torch.Tensor, steps: int
) -> torch.Tensor:
    """``steps`` FGSM steps of size epsilon / steps (Kurakin et al. 2017's basic iterative method with a
    step that never leaves the epsilon ball); ``steps=1`` is FGSM (Goodfellow et al. 2015).
    ``epsilon``: B x 1 x 1 x 1 per-image budgets in input units."""
    x = inputs.detach()
    for _ in range(steps):
        direction = fgsm(model, x, targets, epsilon=1.0) - x  # sign of the loss gradient
        x = x + direction * (epsilon / steps)
    return x


class AdversarialExplainer(Explainer):
    """Adversarial-example explanation (review section 6): attributions are x_adv - x, where x_adv is
    an FGSM (Goodfellow et al. 2015, x + eps sign(grad_x CE)) or DeepFool (Moosavi-Dezfooli et al. 2016,
    the minimal step to the nearest linearized decision boundary) counterpart of x that moves away
    from the explained class; the map is |x_adv - x| maximized over channels.

    ``epsilon`` is a fraction of each image's input range (as ``noise``). One-shot FGSM moves every pixel
    by exactly +-epsilon, so its magnitude map is flat: with ``steps`` > 1 (default 10) the sign steps
    of size epsilon / steps accumulate only where the gradient sign is stable (basic iterative method),
    which is what the map shows; ``steps=1`` is plain FGSM. DeepFool uses ``max_iter``, ``overshoot``
    and ``num_classes`` (candidate classes, the reference code's 10). ``attack="one_pixel"`` is Su et
    al. 2019's differential-evolution attack (``xai_plugins.attacks.one_pixel``) on ``pixels`` pixels
    with ``popsize`` candidates for ``maxiter`` generations (default budget 80 x 30, the paper's
    400 x 100 is larger); its map is nonzero only at the changed pixels, and ``extras["pixels"]`` names
    them (B x pixels x (row, col)). ``extras``: the adversarial prediction, whether it changed (for the
    one-pixel attack honestly False where the budget found nothing), and the adversarial images.
    """

    name = "adversarial"
    space = "input"
    params = {
        "attack": "deepfool",
        "epsilon": 0.03,
        "steps": 10,
        "max_iter": 50,
        "overshoot": 0.02,
        "num_classes": 10,
        "pixels": 1,
        "popsize": 80,
        "maxiter": 30,
        "seed": 0,
    }

    def attack(self, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        if cfg["attack"] == "fgsm":
            if cfg["steps"] < 1 or cfg["epsilon"] <= 0:
                raise InputError("the fgsm attack needs steps >= 1 and epsilon > 0")
            span = inputs.flatten(1).amax(1) - inputs.flatten(1).amin(1)
            return iterative_fgsm(
                model, inputs, targets, (cfg["epsilon"] * span).view(-1, 1, 1, 1), cfg["steps"]
            )
        if cfg["attack"] == "deepfool":
            return deepfool(
                model,
                inputs,
                targets,
                max_iter=cfg["max_iter"],
                overshoot=cfg["overshoot"],
                num_classes=cfg["num_classes"],
            )
        if cfg["attack"] == "one_pixel":
            if cfg["pixels"] < 1 or cfg["popsize"] < 1 or cfg["maxiter"] < 1:
                raise InputError("the one_pixel attack needs pixels, popsize and maxiter >= 1")
            self.found = one_pixel(
                model,
                inputs,
                targets,
                pixels=cfg["pixels"],
                popsize=cfg["popsize"],
                maxiter=cfg["maxiter"],
                seed=cfg["seed"],
            )
            return self.found.adversarial
        raise InputError(f"attack must be one of {', '.join(ATTACKS)}, not {cfg['attack']!r}")

    def explain(
        self, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor
    ) -> tuple[torch.Tensor, dict]:
        adversarial = self.attack(model, inputs, targets)
        with torch.no_grad():
            prediction = model(adversarial).argmax(1)
        extras = {
            "adversarial_prediction": prediction.cpu(),
            "fooled": (prediction != targets).cpu(),
            "images": {"adversarial": display(adversarial, inputs).cpu()},
        }
        if self.config["attack"] == "one_pixel":
            extras["pixels"] = self.found.positions.cpu()
        return adversarial - inputs, extras
