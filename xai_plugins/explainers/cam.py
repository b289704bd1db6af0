"""Class activation map explainers sharing one skeleton (in the spirit of pytorch-grad-cam's BaseCAM).

A CAM method reads the activations A (B x K x h x w) of one ``layer`` (default: the last
convolutional stage), and usually the gradients dS_c/dA from the shared pass, computes one weight
per channel, and returns ReLU(sum_k w_k A_k) at the layer's resolution; the engine upsamples it
bilinearly to the input. Subclasses define ``weights`` (like BaseCAM.get_cam_weights) or, when the
map is not a weighted sum of activations, ``cam_image`` (like BaseCAM.get_cam_image).

- ``grad_cam`` (Selvaraju et al.; review Eq. 9-10), ``grad_cam_pp`` (Chattopadhay et al.), ``cam``
  (Zhou et al.), ``fem`` (Fuad et al.; review Eq. 26) come from the shared forward/backward.
- ``guided_grad_cam`` (review section 4.6.1) also shares it: the guided input gradient is one more
  backward of the same forward.
- ``score_cam`` (Wang et al.) takes its activations from the shared pass, then needs one
  forward per channel mask: it packs them in batches, runs each distinct mask once, and replaces
  every all-zero mask by one forward of the zero image.

Reference implementations differ in how maps are resized and scaled: pytorch-grad-cam scales each
map to [0, 1] before resizing with OpenCV; Captum resizes with nearest neighbours. Here
attributions are resized bilinearly and not scaled (``maps`` are scaled by the engine): the
values before resizing are identical, the resized maps correlate above 0.99.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from xai_plugins import Explainer, InputError, PassRequest, hookimpl
from xai_plugins.toolkit import (
    GradientPass,
    fast_forward,
    guided_relu_rule,
    resolve_layer,
    upsample,
)

DEFAULT_ROWS = 64  # masked images per forward when no batch_size is given


class CAMExplainer(Explainer):
    """Skeleton: activations (and gradients) of ``layer`` -> channel weights -> ReLU of the
    weighted sum. Subclasses define ``weights(activations, gradients, gradient_pass)`` or override
    ``cam_image``; ``relu`` False keeps the signed map."""

    space = "map"
    pass_request = PassRequest(layer=True)
    rowwise = True
    params = {"layer": None, "relu": True}

    def weights(
        self, activations: torch.Tensor, gradients: torch.Tensor | None, gradient_pass: GradientPass | None
    ) -> torch.Tensor:
        """B x K channel weights."""
        raise NotImplementedError

    def cam_image(
        self, activations: torch.Tensor, gradients: torch.Tensor | None, gradient_pass: GradientPass | None
    ) -> torch.Tensor:
        """B x 1 x h x w map before the final ReLU: sum_k w_k A_k (review Eq. 10)."""
        w = self.weights(activations, gradients, gradient_pass)
        return torch.einsum("bk,bkhw->bhw", w.to(activations.dtype), activations).unsqueeze(1)

    def finish(self, cam: torch.Tensor) -> torch.Tensor:
        return cam.clamp(min=0) if self.config["relu"] else cam

    def from_pass(self, gradient_pass: GradientPass) -> torch.Tensor:
        layer = self.config["layer"]
        a, g = gradient_pass.activations[layer], gradient_pass.gradients.get(layer)
        return self.finish(self.cam_image(a, g, gradient_pass))


class GradCAM(CAMExplainer):
    """Grad-CAM (Selvaraju et al. 2017; review Eq. 9-10): alpha_k = mean over positions of
    dS_c/dA_k (Eq. 9), map = ReLU(sum_k alpha_k A_k) (Eq. 10).

    Same definition as Captum's ``LayerGradCam`` (relu_attributions=True) and pytorch-grad-cam's
    ``GradCAM``: identical at the layer's resolution; upsampled bilinearly here (Captum's
    ``interpolate`` default is nearest; pytorch-grad-cam scales to [0, 1] then resizes).
    """

    name = "grad_cam"

    def weights(self, activations, gradients, gradient_pass):
        return gradients.mean(dim=(2, 3))


class GradCAMPlusPlus(CAMExplainer):
    """Grad-CAM++ (Chattopadhay et al. 2018, Eq. 19): w_k = sum_ij relu(g_ij) a_ij with
    a_ij = g^2 / (2 g^2 + sum_ab A_ab g^3), g = dS_c/dA_k (a_ij = 0 where g = 0).

    As pytorch-grad-cam's ``GradCAMPlusPlus`` (identical at the layer's resolution, eps = 1e-6):
    the powers of g stand for the higher derivatives of exp(S_c) in the paper, computed from the
    gradient of the logit S_c itself.
    """

    name = "grad_cam_pp"

    def weights(self, activations, gradients, gradient_pass):
        g2 = gradients.pow(2)
        g3 = g2 * gradients
        sum_a = activations.sum(dim=(2, 3), keepdim=True)
        alpha = g2 / (2 * g2 + sum_a * g3 + 1e-6)
        alpha = torch.where(gradients != 0, alpha, torch.zeros_like(alpha))
        return (gradients.clamp(min=0) * alpha).sum(dim=(2, 3))


class CAM(CAMExplainer):
    """CAM (Zhou et al. 2016): M_c = sum_k w_{c,k} A_k with w_c the row of the final linear layer
    for class c, for models ending in global average pooling + linear (ResNets, the DeConvolve CNN).

    ``fc``: that linear layer (module or dotted name; default: the last ``nn.Linear``), whose
    ``in_features`` must equal the channels of ``layer``. Zhou et al. keep the signed map, so
    ``relu`` defaults to False. On such models Grad-CAM equals ReLU(CAM) / (h*w) (the gradient of
    S_c through average pooling is w_c / (h*w) everywhere); no gradient is needed here.
    """

    name = "cam"
    rowwise = False  # reads the linear layer's weights itself, not through the model's calls
    pass_request = PassRequest(layer=True, layer_grad=False)
    params = {"layer": None, "fc": None, "relu": False}

    def weights(self, activations, gradients, gradient_pass):
        fc = self.linear(gradient_pass.model)
        if fc.in_features != activations.shape[1]:
            raise InputError(
                f"cam needs a model ending in global average pooling + linear: the linear layer "
                f"takes {fc.in_features} features but layer {self.config['layer']!r} has "
                f"{activations.shape[1]} channels; pass layer= (the layer before the pooling), "
                "fc=, or use grad_cam"
            )
        self.check_gap_head(fc, activations, gradient_pass.logits)
        return fc.weight[gradient_pass.targets.to(fc.weight.device)]

    def check_gap_head(self, fc: torch.nn.Linear, activations: torch.Tensor, logits: torch.Tensor) -> None:
        """Refuse unless the logits are fc(mean over positions of the layer), checked on these inputs
        (a ViT's head reads the class token, a ConvNeXt's a normalized pool: not CAM models)."""
        with torch.no_grad():
            pooled = F.linear(activations.mean(dim=(2, 3)).to(fc.weight.dtype), fc.weight, fc.bias).float()
        ref = logits.float().to(pooled.device)
        scale = float(ref.abs().max()) + 1e-6
        if pooled.shape != ref.shape or float((pooled - ref).abs().max()) > 1e-3 * scale:
            raise InputError(
                f"cam needs a model ending in global average pooling + linear: the logits are not "
                f"the linear layer applied to the spatial mean of layer {self.config['layer']!r} "
                "(checked on these inputs); pass layer= (the layer before the pooling), fc=, "
                "or use grad_cam"
            )

    def linear(self, model: torch.nn.Module) -> torch.nn.Linear:
        fc = self.config["fc"]
        if fc is not None:
            module = resolve_layer(model, fc)[1]
        else:
            linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
            if not linears:
                raise InputError(
                    "cam needs a model ending in global average pooling + linear: no nn.Linear found"
                )
            module = linears[-1]
        if not isinstance(module, torch.nn.Linear):
            raise InputError(f"fc must be an nn.Linear, got {type(module).__name__}")
        return module


class FEM(CAMExplainer):
    """FEM, the feature explanation method (Fuad et al. 2020; review Eq. 26). No gradient.

    K-sigma rule per channel: B_k = [A_k >= mu_k + K sigma_k] (Eq. 26, mu_k, sigma_k: mean and
    standard deviation of A_k over positions; ``k`` = K = 1 as the authors).
    ``weighting="channel_mean"`` (default, the paper): R = sum_k mu_k B_k.
    ``weighting="mask_fraction"``: pytorch-grad-cam's ``FEM`` (default k=2 there), which differs in
    definition: R = sum_k mean(B_k) A_k with a strict ``>``; identical to it with these settings.
    """

    name = "fem"
    pass_request = PassRequest(layer=True, layer_grad=False)
    params = {"layer": None, "k": 1.0, "weighting": "channel_mean", "relu": True}

    def cam_image(self, activations, gradients, gradient_pass):
        mu = activations.mean(dim=(2, 3), keepdim=True)
        sigma = activations.std(dim=(2, 3), keepdim=True, unbiased=False)
        threshold = mu + float(self.config["k"]) * sigma
        weighting = self.config["weighting"]
        if weighting == "channel_mean":
            binary = (activations >= threshold).to(activations.dtype)
            return (mu * binary).sum(dim=1, keepdim=True)
        if weighting == "mask_fraction":
            fraction = (activations > threshold).to(activations.dtype).mean(dim=(2, 3), keepdim=True)
            return (fraction * activations).sum(dim=1, keepdim=True)
        raise InputError(f"unknown weighting {weighting!r}; known: channel_mean, mask_fraction")


class GuidedGradCAM(GradCAM):
    """Guided Grad-CAM (Selvaraju et al. 2017; review section 4.6.1): the Grad-CAM map (Eq. 10)
    resized to the input with ``interpolation`` times the guided-backpropagation gradient.

    Both come from one forward: the plain backward to ``layer`` and the guided backward to the
    input. Captum's ``GuidedGradCam`` is the same product with ``interpolate_mode="nearest"``
    (identical with ``interpolation="nearest"``); the default here is bilinear, as the other maps.
    """

    name = "guided_grad_cam"
    space = "input"
    pass_request = PassRequest(layer=True, relu_rule=("guided", guided_relu_rule))
    params = {"layer": None, "relu": True, "interpolation": "bilinear"}

    def from_pass(self, gradient_pass: GradientPass) -> torch.Tensor:
        cam = super().from_pass(gradient_pass)
        size = tuple(gradient_pass.inputs.shape[-2:])
        return upsample(cam, size, mode=self.config["interpolation"]) * gradient_pass.rule_grads["guided"]


class ScoreCAM(CAMExplainer):
    """Score-CAM (Wang et al. 2020): w_k = softmax_k S_c(x * M_k), M_k the activation A_k upsampled
    to the input (bilinear, corners aligned) and min-max scaled to [0, 1]; map = ReLU(sum_k w_k A_k).

    Identical to pytorch-grad-cam's ``ScoreCAM`` (up to float rounding); faster:
    - the activations come from the shared pass (no forward of its own);
    - each distinct mask of an image is run once, and no all-zero mask (a constant channel) is run:
      x * 0 is the zero image, whose logits are computed once per batch;
    - masked images of all the batch's images are packed into forwards of ``batch_size`` rows,
      without gradients, through ``fast_forward`` (BatchNorm folded into the convolutions,
      channels-last on CPU).
    """

    name = "score_cam"
    rowwise = False  # batches of masked images of its own
    pass_request = PassRequest(layer=True, layer_grad=False)
    params = {"layer": None, "relu": True, "batch_size": None}

    def weights(self, activations, gradients, gradient_pass):
        gp = gradient_pass
        with torch.no_grad():
            scores = self.mask_scores(fast_forward(gp.model), gp.inputs, gp.targets, activations)
        return torch.softmax(scores, dim=1)

    def masks(self, activations: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """N x 1 x H x W masks from N x h x w activations, as pytorch-grad-cam computes them."""
        up = F.interpolate(activations.unsqueeze(1), size=size, mode="bilinear", align_corners=True)
        flat = up.flatten(1)
        lo, hi = flat.amin(1).view(-1, 1, 1, 1), flat.amax(1).view(-1, 1, 1, 1)
        return (up - lo) / (hi - lo + 1e-8)

    def mask_scores(self, model, inputs, targets, activations) -> torch.Tensor:
        """B x K target logits of the masked images."""
        b, k, h, w = activations.shape
        size = tuple(inputs.shape[-2:])
        rows = int(self.config["batch_size"] or DEFAULT_ROWS)
        plans = []  # per image: constant channels, live channels, distinct live activations, inverse
        for i in range(b):
            flat = activations[i].flatten(1)
            constant = flat.amax(1) == flat.amin(1)  # (a - min) / (max - min + eps) = 0 everywhere
            live = (~constant).nonzero().flatten()
            unique, inverse = torch.unique(flat[live], dim=0, return_inverse=True)
            plans.append((constant, live, unique, inverse))
        zero_row = any(bool(p[0].any()) for p in plans)

        def batches():
            """Rows: [the zero image], then the distinct masks of image 0, of image 1, ..."""
            pending, n = ([torch.zeros_like(inputs[:1])], 1) if zero_row else ([], 0)
            for i, (_, _, part, _) in enumerate(plans):
                while part.shape[0]:
                    take = min(rows - n, part.shape[0])
                    pending.append(inputs[i : i + 1] * self.masks(part[:take].view(-1, h, w), size))
                    part, n = part[take:], n + take
                    if n == rows:
                        yield torch.cat(pending)
                        pending, n = [], 0
            if n:
                yield torch.cat(pending)

        logits = torch.cat([model(batch).float() for batch in batches()])
        scores = torch.empty((b, k), dtype=torch.float32, device=inputs.device)
        offset = 1 if zero_row else 0
        for i, (constant, live, unique, inverse) in enumerate(plans):
            t = int(targets[i])
            scores[i, constant] = logits[0, t] if zero_row else 0.0
            scores[i, live] = logits[offset : offset + unique.shape[0], t][inverse]
            offset += unique.shape[0]
        return scores


EXPLAINERS: tuple[type[Explainer], ...] = (GradCAM, GradCAMPlusPlus, CAM, FEM, GuidedGradCAM, ScoreCAM)


@hookimpl
def xai_explainers():
    return list(EXPLAINERS)
