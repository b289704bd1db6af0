"""Perception Visualization (PV): Giulivi, Carman & Boracchi, Eq. 2-9.

Modules, one job each: ``encoder`` (E, the model truncated at a layer, Eq. 3), ``decoder`` (D,
Eq. 4-5), ``training`` (the loss of Eq. 6-9, checkpoints, early stopping), ``ssim`` (a
differentiable SSIM), ``space`` (model inputs <-> [0, 1] images), ``explainer`` (PV itself, Eq. 2).
"""

from xai_plugins import hookimpl
from xai_plugins.explainers.perception.explainer import PerceptionVisualization, perception_visualization
from xai_plugins.explainers.perception.ssim import ssim

__all__ = ["PerceptionVisualization", "perception_visualization", "ssim"]


@hookimpl
def xai_explainers():
    return [PerceptionVisualization]
