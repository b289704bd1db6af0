"""Helpers for plugin authors: hooks that clean up, layer lookup, the shared gradient pass,
map normalization and upsampling, a faster stand-in for models run many times (``fast_forward``).
Built-in plugins use exactly these."""

from core.fastpath import fast_forward
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
from core.passes import GradientPass, run_gradient_pass
from core.tensors import batch_slices, normalize_maps, select_targets, upsample

__all__ = ["LayerCapture", "capture_layers", "preserved_model", "relu_override", "switchable_relu",
           "ReLURule", "guided_relu_rule", "deconvnet_relu_rule", "conv_layers",
           "default_layer", "resolve_layer", "require_channels_first", "spatial_view", "token_grid", "GradientPass", "run_gradient_pass", "batch_slices",
           "normalize_maps", "select_targets", "upsample", "fast_forward"]
