"""Robustness of explanations to small input changes (the review's section 7.1).

- Adversarial (Galli et al. 2021): explain x and an adversarial x' (FGSM, Goodfellow et al. 2015;
  DeepFool, Moosavi-Dezfooli et al. 2016; ``xai_plugins.attacks``) for the same class and compare
  the maps by Dice, both ways of binarizing, named: ``<attack>.dice_threshold``, the [0, 1] maps cut at
  the value ``threshold`` = 0.9 (the review's reading of Galli et al.: "thresholding of importance map
  with 0.9 as the threshold value"), and ``<attack>.dice_quantile``, each map cut at its own
  ``quantile`` = 0.9 (its top 10 %, however peaked). ``<attack>.dice90`` repeats the one ``dice``
  names (default ``"threshold"``, the review's). Plus Spearman and SSIM. ``<attack>.fooling_rate`` is the share of predictions the attack changed and
  ``<attack>.perturbation`` the mean relative L2 size ||x' - x|| / ||x||. Galli et al. find that
  gradient maps change a lot although x' looks the same: lower similarity = less robust.
- Max-sensitivity (Yeh et al. 2019): max over ``samples`` uniform perturbations of radius
  ``noise`` (a fraction of the input range, the shared parameter) of
  ||m(x + d) - m(x)||_F / ||m(x)||_F on the [0, 1] maps, per image; lower is better. Quantus's
  ``MaxSensitivity`` uses the same ratio; its radius is absolute (``lower_bound``), ours relative.

FGSM's ``epsilon`` is also a fraction of the input range (the attack function takes absolute
units), so the settings mean the same for any input normalization.
"""

from __future__ import annotations

from typing import Any

import torch

from xai_plugins import Metric, MetricContext, hookimpl
from xai_plugins.attacks import deepfool, fgsm
from xai_plugins.similarity import dice_at_quantile, dice_at_threshold, spearman, ssim
from xai_plugins.toolkit import preserved_model

ATTACKS = ("fgsm", "deepfool")


def input_range(inputs: torch.Tensor) -> float:
    return float(inputs.max() - inputs.min()) or 1.0


def adversarial(
    name: str,
    model: torch.nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    epsilon: float,
    max_iter: int,
    overshoot: float,
) -> torch.Tensor:
    """The adversarial version of ``inputs`` moving away from ``targets``."""
    if name == "fgsm":
        return fgsm(model, inputs, targets, epsilon=epsilon * input_range(inputs))
    if name == "deepfool":
        return deepfool(model, inputs, targets, max_iter=max_iter, overshoot=overshoot)
    raise ValueError(f"unknown attack {name!r}; known: {', '.join(ATTACKS)}")


DICE = ("threshold", "quantile")


def compare_maps(
    a: torch.Tensor, b: torch.Tensor, quantile: float = 0.9, threshold: float = 0.9, dice: str = "threshold"
) -> dict[str, torch.Tensor]:
    """Per-image similarities of two batches of maps: dice_threshold (cut at the value ``threshold``),
    dice_quantile (cut at each map's ``quantile``), dice90 (the one ``dice`` names), spearman, ssim."""
    if dice not in DICE:
        raise ValueError(f"dice must be one of {', '.join(DICE)}, not {dice!r}")
    out = {
        "dice_threshold": dice_at_threshold(a, b, threshold),
        "dice_quantile": dice_at_quantile(a, b, quantile),
    }
    return {**out, "dice90": out[f"dice_{dice}"], "spearman": spearman(a, b), "ssim": ssim(a, b)}


def max_sensitivity(
    explain,
    model: torch.nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    maps: torch.Tensor,
    noise: float,
    samples: int,
    seed: int = 0,
) -> torch.Tensor:
    """Per image: max_j ||m(x + d_j) - m(x)|| / ||m(x)|| with d_j ~ U(-r, r)^n, r = noise * range
    (Yeh et al. 2019, Def. 3.1). All noisy copies are explained in one batched call."""
    b = inputs.shape[0]
    r = noise * input_range(inputs)
    g = torch.Generator().manual_seed(seed)
    delta = (torch.rand((samples, *inputs.shape), generator=g) * 2 - 1) * r
    noisy = (inputs.unsqueeze(0) + delta.to(inputs.device, inputs.dtype)).reshape(
        samples * b, *inputs.shape[1:]
    )
    exp = explain(model, noisy, targets.repeat(samples))
    m = exp.maps.float().cpu().reshape(samples, b, -1)
    ref = maps.float().cpu().reshape(1, b, -1)
    ratio = (m - ref).norm(dim=2) / ref.norm(dim=2).clamp_min(1e-12)
    return ratio.amax(dim=0)


class Robustness(Metric):
    """Similarity of the explanation of x and of adversarial x (FGSM, DeepFool; Galli et al.'s Dice,
    at the value 0.9 and at the 0.9 quantile, see the module docstring), and max-sensitivity under
    uniform noise (Yeh et al.)."""

    name = "robustness"
    requires = ("explain",)
    higher_is_better = None  # similarities: higher is better; max_sensitivity: lower is better
    params = {
        "attacks": list(ATTACKS),
        "epsilon": 0.03,
        "max_iter": 50,
        "overshoot": 0.02,
        "quantile": 0.9,
        "threshold": 0.9,
        "dice": "threshold",
        "noise": 0.02,
        "samples": 8,
        "seed": 0,
        "max_images": 16,
    }

    def compute(self, context: MetricContext) -> dict[str, Any]:
        cfg = self.config
        n = min(int(cfg["max_images"]), context.inputs.shape[0])
        x, t = context.inputs[:n], context.targets[:n]
        maps = context.explanation.maps[:n].float().cpu()
        out: dict[str, Any] = {}
        for name in cfg["attacks"]:
            x_adv = adversarial(
                name,
                context.model,
                x,
                t,
                float(cfg["epsilon"]),
                int(cfg["max_iter"]),
                float(cfg["overshoot"]),
            )
            with preserved_model(context.model), torch.no_grad():
                pred = context.model(x).argmax(1)
                pred_adv = context.model(x_adv).argmax(1)
            exp = context.explain(context.model, x_adv, t)
            for key, value in compare_maps(
                maps, exp.maps.float(), float(cfg["quantile"]), float(cfg["threshold"]), str(cfg["dice"])
            ).items():
                out[f"{name}.{key}"] = float(value.mean())
            out[f"{name}.fooling_rate"] = float((pred != pred_adv).float().mean())
            size = (x_adv - x).flatten(1).norm(dim=1) / x.flatten(1).norm(dim=1).clamp_min(1e-12)
            out[f"{name}.perturbation"] = float(size.mean())
        if int(cfg["samples"]) > 0:
            sens = max_sensitivity(
                context.explain,
                context.model,
                x,
                t,
                maps,
                float(cfg["noise"]),
                int(cfg["samples"]),
                int(cfg["seed"]),
            )
            out["max_sensitivity"] = float(sens.mean())
            out["max_sensitivity_max"] = float(sens.max())
        return out


@hookimpl
def xai_metrics():
    return [Robustness]
