"""Filter scores (DeConvolve, section 3.2 and Algorithm 1), batched: all filters of a layer at once.

Algorithm 1: for a layer, the sub-model from that layer to the output is fed an all-zero tensor of
the layer's output shape (``baseline_prob``), then the same tensor with one filter's map set to a
constant (``activated_prob``); Score[layer][filter] = activated_prob - baseline_prob, the change in
the class probability (softmax of the logits). Section 3.2 sweeps the constant from 0 to 1 and
assigns the increase in probability as the score: we record the whole sweep (``steps`` values,
``curve``) and the score is its value at 1, exactly Algorithm 1. Section 3.2 describes the score as
"the correlation between the mean of pixels in the feature map and the output probability of the
predicted class": ``sweep_correlation`` computes that Pearson correlation over the sweep, per filter
and class (in [-1, 1]; 0 for a flat curve), reported beside the scores.

Any model, without slicing it: the layer's output is replaced through a forward hook while the
model runs on an all-zero input, so "the model sliced from the layer" is everything downstream of
the layer. In a network with skip connections around the layer (ResNets), the paths that bypass
the layer carry what an all-zero input produces there; for sequential models this is exactly the
sliced sub-model (``reference_scores`` is the literal loop, used by the tests). A module called
several times in one forward has its first call replaced.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from xai_plugins.toolkit import batch_slices, require_channels_first, resolve_layer


@dataclass
class FilterScores:
    """Scores of one layer: ``scores`` K x classes (at constant 1), ``curve`` steps x K x classes
    (probability change at each swept constant, ``values``), ``baseline`` the all-zero probabilities."""

    layer: str
    scores: torch.Tensor
    curve: torch.Tensor
    values: torch.Tensor
    baseline: torch.Tensor


class _Replace:
    """Forward hook: the ``call``-th call of the module (1-based; the last one of a module reused in
    the forward, the call every other method reads) returns ``self.value`` instead of its output."""

    def __init__(self, module: nn.Module, call: int = 1):
        self.module, self.value, self.calls, self.call = module, None, 0, int(call)
        self.handle: Any = None

    def hook(self, module: nn.Module, args: Any, output: Any) -> Any:
        self.calls += 1
        return self.value if self.calls == self.call else None

    def run(self, model: nn.Module, inputs: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        self.value, self.calls = value, 0
        return model(inputs)

    def __enter__(self) -> _Replace:
        self.handle = self.module.register_forward_hook(self.hook)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.handle.remove()


def layer_calls(
    model: nn.Module,
    layer: str,
    input_shape: tuple[int, ...],
    device: torch.device,
    dtype: torch.dtype = torch.float32,
) -> list[tuple[int, ...]]:
    """The output shape (without the batch) of every call of ``layer`` in one forward of one input
    of ``input_shape``: more than one for a module reused in the forward (one ``nn.ReLU``)."""
    module = resolve_layer(model, layer)[1]
    seen: list[tuple[int, ...]] = []
    handle = module.register_forward_hook(
        lambda m, a, out: seen.append(tuple(out.shape[1:]) if isinstance(out, torch.Tensor) else ())
    )
    try:
        with torch.no_grad():
            model(torch.zeros(1, *input_shape, device=device, dtype=dtype))
    finally:
        handle.remove()
    if not seen:
        raise RuntimeError(f"layer {layer!r} was not called in the forward pass")
    return seen


def filter_scores(
    model: nn.Module, layer: str, input_shape: tuple[int, ...], steps: int = 5, batch_size: int = 256
) -> FilterScores:
    """Algorithm 1 for every filter of ``layer`` in batched passes (model in eval mode, no grad)."""
    p = next(iter(model.parameters()), None)
    device = p.device if p is not None else torch.device("cpu")
    dtype = p.dtype if p is not None and p.is_floating_point() else torch.float32
    shapes = layer_calls(model, layer, input_shape, device, dtype)
    # the last call (the one a reused module's consumers read) is replaced by constants: channels first only
    require_channels_first(torch.empty(1, *shapes[-1]), tuple(input_shape[-2:]), layer, "deconvolve")
    k, h, w = shapes[-1]
    values = torch.linspace(0, 1, max(2, int(steps)), dtype=dtype)
    module = resolve_layer(model, layer)[1]
    with torch.no_grad(), _Replace(module, len(shapes)) as replace:
        zero_in = torch.zeros(1, *input_shape, device=device, dtype=dtype)
        baseline = torch.softmax(
            replace.run(model, zero_in, torch.zeros(1, k, h, w, device=device, dtype=dtype)), 1
        )[0]
        pairs = [(float(v), f) for v in values[1:] for f in range(k)]  # (constant, filter), v > 0
        probs = []
        for sl in batch_slices(len(pairs), batch_size):
            chunk = pairs[sl]
            z = torch.zeros(len(chunk), k, h, w, device=device, dtype=dtype)
            for i, (v, f) in enumerate(chunk):
                z[i, f] = v
            x = zero_in.expand(len(chunk), *input_shape)
            probs.append(torch.softmax(replace.run(model, x, z), 1))
    change = torch.cat(probs).view(len(values) - 1, k, -1) - baseline
    curve = torch.cat([torch.zeros(1, k, change.shape[-1], device=device, dtype=dtype), change])
    return FilterScores(layer, curve[-1].cpu(), curve.cpu(), values, baseline.cpu())


def sweep_correlation(curve: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Pearson correlation between the swept constant (the feature map's mean, ``values``: steps) and
    the class probability (``curve``: steps x K x classes, the change from the baseline, which has
    the same correlation), per filter and class: K x classes; 0 where the probability does not move."""
    v = values.to(curve.dtype).view(-1, 1, 1)
    dv, dc = v - v.mean(), curve - curve.mean(0, keepdim=True)
    den = (dv.pow(2).sum(0) * dc.pow(2).sum(0)).sqrt()
    corr = (dv * dc).sum(0) / den.clamp_min(1e-30)
    return torch.where(den > 1e-12, corr, torch.zeros_like(corr)).clamp(-1, 1)


def reference_scores(
    sub_model: Callable[[torch.Tensor], torch.Tensor],
    layer_shape: tuple[int, ...],
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Algorithm 1 as written, one filter at a time: ``sub_model`` is the model sliced from the layer
    to the output, ``layer_shape`` its input shape (K x h x w). Returns K x classes."""
    rows = []
    with torch.no_grad():
        for f in range(layer_shape[0]):
            one_hot_input = torch.zeros(1, *layer_shape, dtype=dtype)
            baseline_prob = torch.softmax(sub_model(one_hot_input), 1)[0]
            one_hot_input[0, f] = 1.0
            activated_prob = torch.softmax(sub_model(one_hot_input), 1)[0]
            rows.append(activated_prob - baseline_prob)
    return torch.stack(rows)
