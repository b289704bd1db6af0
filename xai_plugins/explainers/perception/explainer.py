"""Perception Visualization (Giulivi, Carman & Boracchi): where the model looks and what it sees.

PV for class c (Eq. 2): ``p_c = (1 - m_c) + m_c * y``, with ``m_c`` in [0, 1] a saliency map for c
(Grad-CAM by default; any registered map explainer via ``saliency``) and ``y = D(E(x))`` (Eq. 5) the
reconstruction of the input from the model's latent at ``layer`` (Eq. 3; default the deepest
convolutional block) by a decoder trained with the model frozen (Eq. 6-9; see ``training``).
Where the mask is 0 the PV is white, where it is 1 it is the reconstruction.

Output: ``attributions`` = the mask m_c (B x 1 x H x W), so ``maps`` are the saliency map;
``extras["images"]`` = reconstruction y, PV p_c and mask m_c (all in [0, 1]) for the report; the
same raw tensors under ``extras["reconstruction"|"pv"|"mask"|"input_image"]``; the model's
logits/predictions on the input and on the reconstruction; per-image ``extras["scores"]``
(reconstruction MSE, SSIM, DSIM, and the MSE/SSIM of the fit data's mean image as a baseline).

Images: the decoder works in [0, 1] image space; ``mean``/``std`` (the model's preprocessing)
map images to model inputs. Left at None, inputs in [0, 1] are used as they are and other inputs
are mapped to [0, 1] by the fit data's per-channel range (see ``space``).

Differences from the paper: the decoder is sized automatically for any latent/input shape
(``decoder``); the loss terms are means instead of sums, MSE
and DSIM divided by constants of the fit data so that the alphas balance them (``training``); the
paper's Grad-CAM layer is the inverted layer, so the saliency method receives PV's ``layer``
unless ``saliency_params`` names one.

Parameters: ``layer``; ``saliency`` (a map explainer's name) and ``saliency_params``; ``mean``,
``std``; the loss weights ``alpha1..3`` and ``normalize_terms``; training: ``epochs``,
``patience`` (early stopping on the held-out ``val_fraction`` of the fit data), ``lr``,
``fit_batch_size``, ``seed``; decoder size: ``width``, ``min_width``, ``depth``. The decoder is
fitted once per model version and set of these (``fit_params``) by ``core.fitting``, on the
engine's ``fit_data`` (without it, on the explained inputs), and stored under ``XAI_FIT_DIR``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from xai_plugins import Explainer, InputError, XAIError
from xai_plugins.explainers.perception.decoder import Decoder
from xai_plugins.explainers.perception.encoder import LatentEncoder
from xai_plugins.explainers.perception.space import ImageSpace
from xai_plugins.explainers.perception.ssim import ssim
from xai_plugins.explainers.perception.training import EpochHook, TrainConfig, latent_distance, train_decoder
from xai_plugins.toolkit import FitData, batch_slices, default_layer, preserved_model

STATE_FORMAT = "pv-decoder/1"


def perception_visualization(mask: torch.Tensor, reconstruction: torch.Tensor) -> torch.Tensor:
    """Eq. 2: ``p_c(i, j, k) = (1 - m_c(i, j)) + m_c(i, j) * y(i, j, k)`` (mask B x [1 x] H x W)."""
    m = mask.unsqueeze(1) if mask.dim() == 3 else mask
    return (1 - m) + m * reconstruction


def _device(model: nn.Module) -> torch.device:
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


class PerceptionVisualization(Explainer):
    """Perception Visualization (Eq. 2): a saliency mask over the decoder's reconstruction of the
    model's latent (Eq. 3-5), decoder trained once per model with the model frozen (Eq. 6-9)."""

    name = "perception_visualization"
    space = "map"
    trainable = True
    params = {
        "layer": None,
        "saliency": "grad_cam",
        "saliency_params": None,
        "mean": None,
        "std": None,
        "alpha1": 0.2,
        "alpha2": 0.4,
        "alpha3": 0.4,
        "normalize_terms": True,
        "epochs": 20,
        "patience": 3,
        "lr": 1e-3,
        "fit_batch_size": 32,
        "val_fraction": 0.1,
        "width": None,
        "min_width": 16,
        "depth": 1,
        "seed": 0,
    }
    # everything that changes the decoder (saliency and saliency_params do not)
    fit_params = (
        "layer",
        "mean",
        "std",
        "alpha1",
        "alpha2",
        "alpha3",
        "normalize_terms",
        "epochs",
        "patience",
        "lr",
        "fit_batch_size",
        "val_fraction",
        "width",
        "min_width",
        "depth",
        "seed",
    )

    def __init__(self, **params: Any):
        super().__init__(**params)
        if self.config["saliency"] == self.name:
            raise InputError("perception_visualization cannot use itself as its saliency method")
        self.alphas()  # validate early
        self.checkpoint_path: Any = None
        self.on_epoch_end: EpochHook | None = None  # called after each training epoch (tests, UIs)
        self.decoder: Decoder | None = None
        self.image_space: ImageSpace | None = None
        self.state: dict[str, Any] = {}

    # -- configuration ---------------------------------------------------------------------------
    def alphas(self) -> tuple[float, float, float]:
        """(alpha1, alpha2, alpha3) of Eq. 6, scaled to sum to one as the paper requires."""
        a = [float(self.config[k]) for k in ("alpha1", "alpha2", "alpha3")]
        if min(a) < 0 or sum(a) <= 0:
            raise InputError(f"PV loss weights alpha1..3 must be >= 0 and not all zero, got {a}")
        return tuple(v / sum(a) for v in a)  # type: ignore[return-value]

    def train_config(self, mse_scale: float, latent_scale: float) -> TrainConfig:
        c = self.config
        norm = bool(c["normalize_terms"])
        return TrainConfig(
            alphas=self.alphas(),
            epochs=int(c["epochs"]),
            patience=int(c["patience"]),
            lr=float(c["lr"]),
            batch_size=int(c["fit_batch_size"]),
            val_fraction=float(c["val_fraction"]),
            seed=int(c["seed"]),
            mse_scale=mse_scale if norm else 1.0,
            latent_scale=latent_scale if norm else 1.0,
        )

    # -- fitting (core/fitting.py) ---------------------------------------------------------------
    def fit(self, model: nn.Module, data: Any) -> dict[str, Any]:
        """Train the decoder on ``data`` (model inputs); the model is frozen and left unchanged."""
        inputs = FitData.coerce(data).inputs.detach()
        if inputs.dim() != 4 or inputs.shape[0] < 1:
            raise InputError(f"PV needs N x C x H x W fit inputs, got {tuple(inputs.shape)}")
        with preserved_model(model):
            device = _device(model)
            layer = self.config["layer"] or default_layer(model, inputs[:1].to(device))
            encoder = LatentEncoder(model, layer)
            space = ImageSpace.resolve(self.config["mean"], self.config["std"], inputs)
            stats = self._data_statistics(encoder, space, inputs, device)
            z = stats["latent"]
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(self.config["seed"]))
                decoder = Decoder(
                    z.shape[1],
                    tuple(z.shape[-2:]),
                    inputs.shape[1],
                    tuple(inputs.shape[-2:]),
                    self.config["width"],
                    int(self.config["min_width"]),
                    int(self.config["depth"]),
                )
                decoder.calibrate(stats["latent_scale"] ** 0.5, stats["mean_image"].mean(dim=(1, 2)))
            cfg = self.train_config(stats["mse_scale"], stats["latent_scale"])
            with torch.enable_grad():
                outcome = train_decoder(
                    decoder, encoder, space, inputs, cfg, self.checkpoint_path, self.on_epoch_end, device
                )
        return {
            "format": STATE_FORMAT,
            "layer": encoder.layer_name,
            "arch": decoder.arch,
            "decoder": outcome.best_state,
            **space.state(),
            "mean_image": stats["mean_image"],
            "mse_scale": stats["mse_scale"],
            "latent_scale": stats["latent_scale"],
            "dsim_scale": cfg.latent_scale,
            "history": outcome.history,
            "stopped_early": outcome.stopped_early,
            "resumed_from": outcome.resumed_from,
            "fit_samples": int(inputs.shape[0]),
        }

    @staticmethod
    def _data_statistics(
        encoder: LatentEncoder,
        space: ImageSpace,
        inputs: torch.Tensor,
        device: torch.device,
        limit: int = 2048,
    ) -> dict[str, Any]:
        """From (up to ``limit``) fit inputs: the mean image (the baseline), the pixel variance
        around it (MSE scale), the mean squared latent (DSIM scale) and one latent (its shape)."""
        sq, s1, s2, n, z = 0.0, 0.0, 0.0, 0, None
        with torch.no_grad():
            for sl in batch_slices(min(limit, inputs.shape[0]), 128):
                xb = inputs[sl].to(device)
                z = encoder(xb)
                sq += float(z.float().pow(2).flatten(1).mean(1).sum())
                img = space.to_image(xb).double()
                s1, s2 = s1 + img.sum(0), s2 + img.pow(2).sum(0)
                n += xb.shape[0]
        mean_image = s1 / n
        variance = float((s2 / n - mean_image**2).clamp_min(0).mean())
        return {
            "mean_image": mean_image.float().cpu(),
            "mse_scale": variance,
            "latent_scale": sq / n,
            "latent": z,
        }

    def load_state(self, state: dict[str, Any]) -> None:
        if state.get("format") != STATE_FORMAT:
            raise XAIError("not a stored PV decoder (format mismatch): refit it")
        decoder = Decoder.from_arch(state["arch"])
        decoder.load_state_dict(state["decoder"])
        self.decoder = decoder.eval()
        self.image_space = ImageSpace(state["mean"], state["std"])
        self.state = state

    # -- explaining ------------------------------------------------------------------------------
    def reconstruct(self, model: nn.Module, inputs: torch.Tensor) -> dict[str, Any]:
        """Eq. 5 for a batch of model inputs, with what the metrics read: the [0, 1] input image,
        the model's logits on the input and on the reconstruction, and per-image scores."""
        if self.decoder is None or self.image_space is None:
            raise XAIError("the PV decoder is not fitted: use core.fitting.ensure_fitted or explain()")
        space, x = self.image_space, inputs.detach()
        with preserved_model(model), torch.no_grad():
            decoder = self.decoder.to(x.device).eval()
            encoder = LatentEncoder(model, self.state["layer"])
            z = encoder(x)
            y = decoder(z)
            y_in = space.to_input(y)
            image = space.to_image(x)
            logits, logits_y = model(x).float(), model(y_in).float()
            dsim = latent_distance(encoder(y_in), z, self.state["dsim_scale"])
            mean_image = self.state["mean_image"].to(x.device, x.dtype).expand_as(image)
            scores = {
                "mse": (y - image).pow(2).flatten(1).mean(1),
                "ssim": ssim(y, image),
                "dsim": dsim,
                "baseline_mse": (mean_image - image).pow(2).flatten(1).mean(1),
                "baseline_ssim": ssim(mean_image.contiguous(), image),
            }
        return {
            "reconstruction": y,
            "input_image": image,
            "logits": logits,
            "reconstruction_logits": logits_y,
            "predictions": logits.argmax(1),
            "reconstruction_predictions": logits_y.argmax(1),
            "scores": scores,
        }

    def saliency_mask(self, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """m_c (B x H x W in [0, 1]) from the ``saliency`` explainer, run through the public API."""
        from xai_plugins.toolkit import explain, get_host

        method = self.config["saliency"]
        params = dict(self.config["saliency_params"] or {})
        if "layer" not in params and "layer" in get_host().get("explainer", method).params:
            params["layer"] = self.state["layer"]
        exp = explain(model, inputs, targets, method=method, batch_size=None, progress=False, **params)
        return exp.maps.to(inputs.device, inputs.dtype)

    def explain(self, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> Any:
        out = self.reconstruct(model, inputs)
        mask = self.saliency_mask(model, inputs, targets)
        y = out["reconstruction"]
        pv = perception_visualization(mask, y)
        masked_input = perception_visualization(mask, out["input_image"])
        with preserved_model(model), torch.no_grad():  # what the model makes of each picture (Table 1 proxy)
            pv_pred = model(self.image_space.to_input(pv)).argmax(1)
            masked_pred = model(self.image_space.to_input(masked_input)).argmax(1)
        extras = {
            **out,
            "mask": mask,
            "pv": pv,
            "pv_predictions": pv_pred,
            "masked_input_predictions": masked_pred,
            "images": {"reconstruction": y, "pv": pv, "mask": mask},
        }
        return mask.unsqueeze(1), extras
