"""Metrics for Perception Visualization (Giulivi, Carman & Boracchi).

- ``pv_reconstruction``: how well the decoder inverts the latent on the explained images (held out
  when the decoder was fit on other data): MSE, SSIM and DSIM (Eq. 7-9), next to the same figures
  for the fit data's mean image, the baseline a decoder that ignored the latent would reach.
- ``pv_simulatability``: a proxy for the paper's user study (Table 1): how often the model, shown
  an explanation image, predicts the class it predicted for the input - for the reconstruction
  y, the PV image p_c, and (the Grad-CAM survey's counterpart) the input masked by the saliency
  map, ``(1 - m_c) + m_c * x``; each overall and split into correctly / incorrectly classified
  inputs. On misclassified inputs it also reports how often the reconstruction is classified as
  the true label: low values mean the decoder shows what the model saw, not just the input.
- ``pv_invariance``: the paper's Fig. 7 experiment as a number: a second decoder trained with
  another seed (and on the run's ``data`` when given, which may be a different image set)
  reconstructs the same inputs; SSIM between the two reconstructions, next to the SSIM between
  reconstructions of different images (what unrelated pictures score).
"""

from __future__ import annotations

from typing import Any

import torch

from xai_plugins import Metric, MetricContext, hookimpl
from xai_plugins.explainers.perception import PerceptionVisualization, ssim
from xai_plugins.toolkit import FitData, ensure_fitted


def pv_extras(context: MetricContext) -> dict[str, Any] | None:
    """The PV outputs of this context's explanation, or None for other methods."""
    exp = context.explanation
    extras = getattr(exp, "extras", None) or {}
    return extras if "reconstruction" in extras and "scores" in extras else None


def _mean(t: torch.Tensor) -> float:
    return float(t.float().mean())


class PVReconstruction(Metric):
    """Reconstruction MSE / SSIM / DSIM (Eq. 7-9) of the PV decoder, with the mean-image baseline."""

    name = "pv_reconstruction"
    params: dict[str, Any] = {}

    def compute(self, context: MetricContext) -> dict[str, float]:
        extras = pv_extras(context)
        if extras is None:
            return {}
        s = extras["scores"]
        out = {k: _mean(s[k]) for k in ("mse", "ssim", "dsim", "baseline_mse", "baseline_ssim")}
        out["ssim_gain"] = out["ssim"] - out["baseline_ssim"]
        return out


def agreement_split(agree: torch.Tensor, correct: torch.Tensor | None, prefix: str) -> dict[str, float]:
    """Mean agreement overall and on correctly / incorrectly classified inputs (when any)."""
    out = {f"{prefix}_agreement": _mean(agree)}
    if correct is not None:
        for split, sel in (("correct", correct), ("incorrect", ~correct)):
            if bool(sel.any()):
                out[f"{prefix}_agreement_{split}"] = _mean(agree[sel])
    return out


class PVSimulatability(Metric):
    """Table 1 proxy: the model's prediction on the explanation image vs. on the input, split by
    whether the input was classified correctly (needs labels for the split)."""

    name = "pv_simulatability"
    higher_is_better = True
    params: dict[str, Any] = {}

    def compute(self, context: MetricContext) -> dict[str, float]:
        extras = pv_extras(context)
        if extras is None:
            return {}
        pred = extras["predictions"].cpu()
        labels = context.labels.cpu() if context.labels is not None else None
        correct = pred == labels if labels is not None else None
        out: dict[str, float] = {"chance": 1.0 / extras["logits"].shape[1]}
        for source in ("reconstruction", "pv", "masked_input"):
            out.update(agreement_split(extras[f"{source}_predictions"].cpu() == pred, correct, source))
        if correct is not None:
            out["n_correct"], out["n_incorrect"] = int(correct.sum()), int((~correct).sum())
            if bool((~correct).any()):
                rec = extras["reconstruction_predictions"].cpu()
                out["reconstruction_is_label_incorrect"] = _mean((rec == labels)[~correct])
        return out


class PVInvariance(Metric):
    """SSIM between the reconstructions of two PV decoders trained with different seeds (and,
    through ``data``, possibly on different images): the paper's Fig. 7 as a number."""

    name = "pv_invariance"
    higher_is_better = True
    params = {"seed_offset": 1, "epochs": None}

    def compute(self, context: MetricContext) -> dict[str, float]:
        extras = pv_extras(context)
        if extras is None:
            return {}
        params = {k: v for k, v in context.explanation.params.items() if k in PerceptionVisualization.params}
        params["seed"] = int(params.get("seed", 0)) + int(self.config["seed_offset"])
        if self.config["epochs"] is not None:
            params["epochs"] = int(self.config["epochs"])
        other = PerceptionVisualization(**params)
        data = FitData.coerce(context.data) if context.data is not None else FitData(context.inputs)
        with torch.enable_grad():
            ensure_fitted(other, context.model, data)
        y_b = other.reconstruct(context.model, context.inputs)["reconstruction"].float().cpu()
        y_a = extras["reconstruction"].float().cpu()
        image = extras["input_image"].float().cpu()
        out = {
            "ssim": _mean(ssim(y_a, y_b)),
            "input_ssim_a": _mean(ssim(y_a, image)),
            "input_ssim_b": _mean(ssim(y_b, image)),
        }
        if y_a.shape[0] > 1:
            out["unpaired_ssim"] = _mean(ssim(y_a, y_b.roll(1, dims=0)))
        return out


@hookimpl
def xai_metrics():
    return [PVReconstruction, PVSimulatability, PVInvariance]
