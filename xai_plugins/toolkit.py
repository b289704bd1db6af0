"""Helpers for plugin authors: hooks that clean up, layer lookup, the shared gradient pass,
map normalization and upsampling, drawing maps as the reporters do, fitting trained explainers,
the plugin host, a faster stand-in for models run many times (``fast_forward``), and the run's
session (``derived``/``structural``: what a plugin derives from a model, kept for the run or a
``with session(model)`` block, never in a module-level cache).

Built-in plugins use exactly these: an import-linter contract in ``make test`` forbids the built-in
explainers, metrics, reporters and describers to import ``core`` themselves, so this module and
``xai_plugins`` are the one door for built-in and third-party plugins alike."""

from core.api import explain
from core.baselines import resolve_baseline
from core.datasets import make_shapes
from core.explainability_loss import cam_weighted_maps
from core.fastpath import fast_forward
from core.fitting import FitData, ensure_fitted
from core.hooks import (
    LayerCapture,
    ReLURule,
    capture_layers,
    deconvnet_relu_rule,
    guided_relu_rule,
    preserved_model,
    relu_override,
    switchable_relu,
)
from core.layers import (
    conv_layers,
    default_layer,
    require_channels_first,
    resolve_layer,
    spatial_view,
    token_grid,
)
from core.passes import GradientPass, merge_requests, run_gradient_pass
from core.plugins import explainer_flag, get_host, signed_relevance
from core.preprocess import Preprocess
from core.render import colorize, data_uri, display_scale, overlay, png_bytes, signed_overlay, to_numpy_image
from core.session import derived, session, structural
from core.tensors import batch_slices, normalize_maps, select_targets, upsample
from core.train import train_model

__all__ = [
    "LayerCapture",
    "capture_layers",
    "preserved_model",
    "relu_override",
    "switchable_relu",
    "ReLURule",
    "guided_relu_rule",
    "deconvnet_relu_rule",
    "conv_layers",
    "default_layer",
    "resolve_layer",
    "require_channels_first",
    "spatial_view",
    "token_grid",
    "GradientPass",
    "run_gradient_pass",
    "merge_requests",
    "batch_slices",
    "normalize_maps",
    "select_targets",
    "upsample",
    "fast_forward",
    "session",
    "derived",
    "structural",
    "colorize",
    "overlay",
    "signed_overlay",
    "to_numpy_image",
    "png_bytes",
    "data_uri",
    "display_scale",
    "signed_relevance",
    "explainer_flag",
    "get_host",
    "explain",
    "FitData",
    "ensure_fitted",
    "resolve_baseline",
    "cam_weighted_maps",
    "Preprocess",
    "train_model",
    "make_shapes",
]
