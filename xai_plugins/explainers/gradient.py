"""Gradient (linearization) explainers: the review's section 4 (Eq. 3-8) and class models.

Every method here explains the target logit S_c (no softmax), as Captum does.

- ``saliency`` (Simonyan et al., Eq. 4-6), ``deconvnet`` (Zeiler & Fergus, section 4.1 and
  appendix A), ``guided_backprop`` (Springenberg et al., section 4.3) share one skeleton: the input
  gradient under a ReLU backward rule. They are shared-pass methods: one forward serves all three
  (and the CAM family), each modified rule costing one extra backward.
- ``integrated_gradients`` (Sundararajan et al., Eq. 7) and ``smoothgrad`` (Smilkov et al., Eq. 8)
  batch their many passes in chunks of ``batch_size`` rows.
- ``activation_maximization``: class-model visualization (Simonyan et al. 2014, section 2),
  regularized gradient ascent on the input.

ReLUs are found wherever they are (``nn.ReLU`` reused or in place, ``F.relu`` / ``torch.relu`` in
``forward``) through ``switchable_relu``; every hook and patch is removed even when a method raises.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from xai_plugins import Explainer, InputError, PassRequest, hookimpl
from xai_plugins.toolkit import (
    GradientPass,
    batch_slices,
    deconvnet_relu_rule,
    fast_forward,
    guided_relu_rule,
    merge_requests,
    resolve_baseline,
    run_gradient_pass,
    select_targets,
)

DEFAULT_ROWS = 64  # rows per forward/backward when no batch_size is given


class InputGradientExplainer(Explainer):
    """Skeleton: the gradient dS_c/dx, backpropagated through every ReLU with ``relu_rule``
    (None: the true gradient). Shared pass inside the engine; ``explain`` runs one pass itself
    (used when wrapped by ``smoothgrad``)."""

    space = "input"
    pass_request = PassRequest()
    rowwise = True
    params = {"abs": False}

    def request(self) -> PassRequest:
        """What the gradient needs: the class's ``pass_request``, or (a subclass that turned the
        shared pass off) the nearest base's."""
        return next(r for c in type(self).__mro__ if (r := c.__dict__.get("pass_request")) is not None)

    def gradient(self, gradient_pass: GradientPass) -> torch.Tensor:
        rule = self.request().relu_rule
        if rule is None:
            return gradient_pass.input_grad
        return gradient_pass.rule_grads[rule[0]]

    def from_pass(self, gradient_pass: GradientPass) -> torch.Tensor:
        g = self.gradient(gradient_pass)
        return g.abs() if self.config["abs"] else g

    def explain(self, model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.from_pass(merge_requests([(self.request(), None)]).run(model, inputs, targets))


class Saliency(InputGradientExplainer):
    """Vanilla gradient saliency (Simonyan et al. 2014; review Eq. 4-6).

    Attributions are the raw gradient dS_c/dx of the target logit (Captum ``Saliency`` with
    ``abs=False``; ``abs=True`` gives Captum's default); the map is its absolute value maximized
    over channels (Eq. 6).
    """

    name = "saliency"
    pass_request = PassRequest(input_grad=True)


class Deconvnet(InputGradientExplainer):
    """DeconvNet (Zeiler & Fergus 2014; review section 4.1 and appendix A).

    Unpooling with the max-location switches and filtering with the flipped filters are exactly the
    backward of max-pooling and convolution (appendix A, Eq. 28-33), so they come from autograd; the
    rectification replaces each ReLU's backward by ReLU(backward signal), ignoring the forward
    activation (review Fig. 6c). Same definition as Captum's ``Deconvolution``, which hooks only
    ``nn.ReLU`` modules (a model calling ``F.relu`` gets plain gradients there); here every ReLU is
    rectified, functional or module, reused or in place.
    """

    name = "deconvnet"
    pass_request = PassRequest(relu_rule=("deconvnet", deconvnet_relu_rule))


class GuidedBackprop(InputGradientExplainer):
    """Guided backpropagation (Springenberg et al. 2015; review section 4.3, Fig. 6d).

    At each ReLU only positive gradients flow, and only through units active in the forward pass
    (the gradient mask and the DeconvNet rectification together). Same definition as Captum's
    ``GuidedBackprop`` on models whose ReLUs are ``nn.ReLU`` modules; also covers ``F.relu``.
    """

    name = "guided_backprop"
    pass_request = PassRequest(relu_rule=("guided", guided_relu_rule))


# -- Integrated gradients --------------------------------------------------------------------------
QUADRATURES = ("gausslegendre", "riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid")


def quadrature(steps: int, rule: str) -> tuple[list[float], list[float]]:
    """Points alpha in [0, 1] and weights for the path integral of Eq. 7 (Captum's rules)."""
    if steps < 1 or (rule == "riemann_trapezoid" and steps < 2):
        raise InputError(f"steps must be >= {2 if rule == 'riemann_trapezoid' else 1}, got {steps}")
    n = steps
    if rule == "gausslegendre":
        x, w = np.polynomial.legendre.leggauss(n)
        return list(0.5 * (x + 1)), list(0.5 * w)
    if rule == "riemann_left":
        return list(np.linspace(0, 1 - 1 / n, n)), [1 / n] * n
    if rule == "riemann_right":
        return list(np.linspace(1 / n, 1, n)), [1 / n] * n
    if rule == "riemann_middle":
        return list(np.linspace(1 / (2 * n), 1 - 1 / (2 * n), n)), [1 / n] * n
    if rule == "riemann_trapezoid":
        return list(np.linspace(0, 1, n)), [1 / (2 * (n - 1))] + [1 / (n - 1)] * (n - 2) + [1 / (2 * (n - 1))]
    raise InputError(f"unknown quadrature {rule!r}; known: {', '.join(QUADRATURES)}")


def rows_per_pass(batch_size: int | None) -> int:
    return int(batch_size) if batch_size else DEFAULT_ROWS


class IntegratedGradients(Explainer):
    """Integrated gradients (Sundararajan et al. 2017; review Eq. 7).

    R_i = (x_i - x'_i) * sum_s w_s dS_c/dx_i (x' + alpha_s (x - x')), the path integral of Eq. 7
    approximated by ``quadrature`` (Captum's rules and names: ``gausslegendre`` (Captum's default),
    ``riemann_left/right/middle/trapezoid``) with ``steps`` points. ``baseline``: "zeros" (default,
    as Captum), a number or a tensor. The steps x images rows go through the model in chunks of
    ``batch_size`` rows (Captum's ``internal_batch_size``), through ``fast_forward`` (BatchNorm
    folded into the convolutions). Equal to Captum's ``IntegratedGradients`` with the same
    quadrature and steps (up to float rounding), except ``riemann_trapezoid``: Captum weights its
    n points 1/n (halved at both ends), which sum to (n - 1)/n, so its attributions are (n - 1)/n
    times the trapezoid rule's used here (weights 1/(n - 1), halved at the ends; they sum to 1).
    """

    name = "integrated_gradients"
    space = "input"
    params = {"baseline": "zeros", "steps": 50, "quadrature": "gausslegendre", "batch_size": None}

    def explain(self, model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        alphas, weights = quadrature(int(self.config["steps"]), self.config["quadrature"])
        base = resolve_baseline(self.config["baseline"], inputs).expand_as(inputs)
        diff = inputs - base
        b = inputs.shape[0]
        model = fast_forward(model)
        per_chunk = max(1, rows_per_pass(self.config["batch_size"]) // b)
        total = torch.zeros_like(inputs)
        a_all = torch.tensor(alphas, dtype=inputs.dtype, device=inputs.device)
        w_all = torch.tensor(weights, dtype=inputs.dtype, device=inputs.device)
        for sl in batch_slices(len(alphas), per_chunk):
            a, w = a_all[sl].view(-1, 1, 1, 1, 1), w_all[sl].view(-1, 1, 1, 1, 1)
            points = (base.unsqueeze(0) + a * diff.unsqueeze(0)).flatten(0, 1)
            gp = run_gradient_pass(model, points, targets.repeat(a.shape[0]), input_grad=True)
            total += (gp.input_grad.view(a.shape[0], *inputs.shape) * w).sum(0)
        return diff * total


# -- SmoothGrad ------------------------------------------------------------------------------------
SMOOTHABLE: dict[str, type[Explainer]] = {
    c.name: c for c in (Saliency, GuidedBackprop, Deconvnet, IntegratedGradients)
}
_INNER_PARAMS = sorted({k for c in SMOOTHABLE.values() for k in c.params} - {"batch_size"})


class SmoothGrad(Explainer):
    """SmoothGrad (Smilkov et al. 2017; review Eq. 8): the mean of a gradient method's attributions
    over ``samples`` noisy copies x + N(0, sigma^2) of each input.

    ``inner`` names the wrapped method (saliency, guided_backprop, deconvnet,
    integrated_gradients); its parameters (``abs``, ``baseline``, ``steps``, ``quadrature``) pass
    through. ``noise`` is sigma as a fraction of each image's value range, sigma = noise *
    (x_max - x_min) (the paper's 10-20 %); Captum's ``NoiseTunnel`` takes an absolute ``stdevs``.
    ``aggregate``: "mean" (Eq. 8, Captum's ``smoothgrad``), "mean_square" (``smoothgrad_sq``) or
    "variance" (``vargrad``). Noise comes from a generator seeded with ``seed``, drawn in
    Captum's order (samples of image 0, then of image 1, ...): on CPU it equals Captum's
    ``NoiseTunnel(...).attribute(nt_samples_batch_size=None)`` after ``torch.manual_seed(seed)``
    whenever C*H*W is a multiple of 16 (PyTorch draws normals in blocks of 16). Noisy rows go
    through the model (``fast_forward``: BatchNorm folded into the convolutions) in chunks of
    ``batch_size``.
    """

    name = "smoothgrad"
    space = "input"
    params = {
        "inner": "saliency",
        "samples": 16,
        "noise": 0.15,
        "seed": 0,
        "aggregate": "mean",
        "batch_size": None,
        **dict.fromkeys(_INNER_PARAMS),
    }

    def inner(self) -> Explainer:
        method = self.config["inner"]
        if method not in SMOOTHABLE:
            raise InputError(f"smoothgrad cannot wrap {method!r}; known: {', '.join(sorted(SMOOTHABLE))}")
        cls = SMOOTHABLE[method]
        passed = {k: v for k, v in self.config.items() if k in _INNER_PARAMS and v is not None}
        unknown = sorted(set(passed) - set(cls.params))
        if unknown:
            raise InputError(
                f"{method} has no parameter {unknown[0]!r}; known: {', '.join(sorted(cls.params))}"
            )
        if "batch_size" in cls.params:
            passed["batch_size"] = self.config["batch_size"]
        return cls(**passed)

    def explain(self, model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        inner = self.inner()
        model = fast_forward(model)
        n, aggregate = int(self.config["samples"]), self.config["aggregate"]
        if aggregate not in ("mean", "mean_square", "variance"):
            raise InputError(f"unknown aggregate {aggregate!r}; known: mean, mean_square, variance")
        b = inputs.shape[0]
        flat = inputs.flatten(1)
        sigma = (float(self.config["noise"]) * (flat.amax(1) - flat.amin(1))).view(-1, 1, 1, 1)
        gen = torch.Generator(device=inputs.device).manual_seed(int(self.config["seed"]))
        total = torch.zeros_like(inputs)
        total_sq = torch.zeros_like(inputs) if aggregate != "mean" else None
        rows = rows_per_pass(self.config["batch_size"])
        if inner.name == "integrated_gradients":  # each noisy row is itself `steps` rows
            rows = max(1, rows // int(inner.config["steps"]))
        for sl in batch_slices(b * n, rows):
            idx = torch.arange(sl.start, sl.stop, device=inputs.device) // n
            noise = torch.randn(
                (sl.stop - sl.start, *inputs.shape[1:]),
                generator=gen,
                device=inputs.device,
                dtype=inputs.dtype,
            )
            attr = inner.explain(model, inputs[idx] + noise * sigma[idx], targets[idx])
            total.index_add_(0, idx, attr)
            if total_sq is not None:
                total_sq.index_add_(0, idx, attr * attr)
        mean = total / n
        if aggregate == "mean":
            return mean
        mean_sq = total_sq / n
        return mean_sq if aggregate == "mean_square" else mean_sq - mean * mean


# -- Activation maximization ----------------------------------------------------------------------
class ActivationMaximization(Explainer):
    """Class-model visualization (Simonyan et al. 2014, section 2, Eq. 1): the image
    I* = argmax_I S_c(I) - l2 * ||I||^2 found by gradient ascent on the input.

    Each step moves I along the gradient of the regularized objective, normalized by its RMS per
    image (so ``lr`` is in input units whatever the logit scale). ``init``: "zeros" (the paper:
    the zero image, i.e. the data mean for normalized inputs, plus ``jitter`` times seeded
    Gaussian noise so that ascent can leave the dead ReLUs of networks with zero biases; the result
    then depends only on the class, and each distinct target is optimized once) or "input" (start
    from the image to explain). Attributions are the class-model images (B x C x H x W); ``extras["scores"]`` holds
    S_c before and after, ``extras["images"]["class_model"]`` the image scaled to [0, 1].
    """

    name = "activation_maximization"
    space = "input"
    params = {
        "steps": 100,
        "lr": 0.1,
        "l2": 1e-4,
        "init": "zeros",
        "jitter": 1e-2,
        "seed": 0,
        "batch_size": None,
    }

    def explain(self, model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor):
        init = self.config["init"]
        if init not in ("zeros", "input"):
            raise InputError(f"unknown init {init!r}; known: zeros, input")
        if init == "zeros":  # the class model does not depend on the image: optimize each class once
            classes, inverse = torch.unique(targets, return_inverse=True)
            gen = torch.Generator(device=inputs.device).manual_seed(int(self.config["seed"]))
            start = float(self.config["jitter"]) * torch.randn(
                (classes.numel(), *inputs.shape[1:]), generator=gen, dtype=inputs.dtype, device=inputs.device
            )
        else:
            classes, inverse, start = targets, torch.arange(targets.numel(), device=targets.device), inputs
        images, before, after = [], [], []
        for sl in batch_slices(classes.numel(), rows_per_pass(self.config["batch_size"])):
            img, s0, s1 = self._ascend(model, start[sl], classes[sl])
            images.append(img)
            before.append(s0)
            after.append(s1)
        image = torch.cat(images)[inverse]
        lo = image.flatten(1).amin(1).view(-1, 1, 1, 1)
        hi = image.flatten(1).amax(1).view(-1, 1, 1, 1)
        shown = ((image - lo) / (hi - lo).clamp_min(1e-12)).clamp(0, 1)
        extras = {
            "scores": {"initial": torch.cat(before)[inverse].cpu(), "final": torch.cat(after)[inverse].cpu()},
            "images": {"class_model": shown.cpu()},
        }
        return image, extras

    def _ascend(self, model, start, classes):
        lr, l2 = float(self.config["lr"]), float(self.config["l2"])
        image = start.detach().clone()
        first = last = None
        with torch.enable_grad():
            for step in range(int(self.config["steps"]) + 1):
                x = image.requires_grad_()
                score = select_targets(model(x), classes)
                objective = score - l2 * x.pow(2).flatten(1).sum(1)
                if step == 0:
                    first = score.detach()
                last = score.detach()
                if step == int(self.config["steps"]):
                    break
                (g,) = torch.autograd.grad(objective.sum(), x)
                rms = g.pow(2).flatten(1).mean(1).sqrt().clamp_min(1e-12).view(-1, *[1] * (g.dim() - 1))
                image = x.detach() + lr * g / rms
        if not math.isfinite(float(last.sum())):
            raise FloatingPointError("activation maximization diverged; lower lr")
        return image.detach(), first, last


EXPLAINERS: tuple[type[Explainer], ...] = (
    Saliency,
    Deconvnet,
    GuidedBackprop,
    IntegratedGradients,
    SmoothGrad,
    ActivationMaximization,
)


@hookimpl
def xai_explainers():
    return list(EXPLAINERS)


__all__ = [
    "InputGradientExplainer",
    "Saliency",
    "Deconvnet",
    "GuidedBackprop",
    "IntegratedGradients",
    "SmoothGrad",
    "ActivationMaximization",
    "quadrature",
    "resolve_baseline",
]
