"""Sanity checks for saliency maps (Adebayo et al. 2018; the review's section 7.1).

- Model parameter randomization: re-initialize the layers (modules with ``reset_parameters``,
  Quantus's granularity) from the top down, cumulatively ("cascading") or one at a time
  ("independent"), re-explain the same inputs with the same explainer after each layer, and
  measure the similarity of each randomized explanation to the original: one curve per
  similarity. An explainer that depends on the model gives dissimilar maps once the model is
  randomized; one that does not (an edge detector) stays similar.
- Data (label) randomization: train the same architecture from scratch on randomly permuted labels
  and compare its explanations with the original model's (small models only; can be switched off).

Similarities (``xai_plugins.similarity``): ``spearman`` (rank correlation of the maps, which are
absolute relevance for input-space methods: Adebayo's "with absolute value", Quantus's default
``abs=True``), ``spearman_signed`` (of the signed attributions summed over channels: "without
absolute value"), ``ssim``, ``pearson``, ``hog`` (Pearson correlation of HOG features).

Definitional notes versus Quantus ``MPRT``: same layer list and order, same re-initialization
(each layer's ``reset_parameters()`` right after ``torch.manual_seed(seed + 1)``), so the same
randomized models; the original explanation is the one already computed (Quantus explains the
batch twice more). The user's model is never touched: randomization happens on copies (stacked steps:
re-initialized copies of the layers beside a structural copy; one step at a time: a private copy).

Modules: ``randomize`` (re-initializing layers, the copies), ``model_randomization`` (the cascading
and independent curves), ``stacking`` (several steps in one batch: the one speed-up),
``label_randomization``, ``metric`` (the ``sanity`` metric).
"""

from __future__ import annotations

from xai_plugins.metrics.sanity.label_randomization import (
    infer_normalization,
    label_randomization,
    train_on_permuted_labels,
    training_data,
)
from xai_plugins.metrics.sanity.metric import Sanity, xai_metrics
from xai_plugins.metrics.sanity.model_randomization import (
    ORDERS,
    ExplainFn,
    RandomizationCurve,
    parameter_randomization,
    scorer,
    similarity,
)
from xai_plugins.metrics.sanity.randomize import randomizable_layers

__all__ = [
    "ORDERS",
    "ExplainFn",
    "RandomizationCurve",
    "Sanity",
    "infer_normalization",
    "label_randomization",
    "parameter_randomization",
    "randomizable_layers",
    "scorer",
    "similarity",
    "train_on_permuted_labels",
    "training_data",
    "xai_metrics",
]
