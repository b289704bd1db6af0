"""Filter activation maps (DeConvolve, section 3.3): image-agnostic, per filter, by gradient ascent.

"Performing gradient ascent on the inputs to the filter, using the corresponding class activation as
the objective": for filter k of the layer, starting from seeded noise, projected Adam ascends

    mean over positions of A_k(x)   subject to   RMS(x) = ``rms``

(every pattern has the same energy, so patterns of different filters are comparable and none wins
by sheer contrast), blurring the input every ``blur_every`` steps (Yosinski et al.'s blur
regularization, which keeps the pattern legible instead of high-frequency noise), where A_k is the filter's channel of the layer's activation (its share of the class activation map;
the class enters through the filter's score, which says whether the pattern speaks for or against
it). Optimizing in the model's input space lets the result be drawn next to, and compared with, the
image. All filters ascend together (one input per filter, batched); the forward stops at the layer.
``ascent="class"`` (``ascend_class``) is the paper's objective read literally: the class activation,
i.e. the logit of the filter's class (the class it scores highest for, Algorithm 1) when the layer
passes on that filter's channel alone (the others zeroed), so the pattern is what makes the filter
speak for its class through the rest of the network; ``ascent="filter"`` (``ascend_filters``, the
default before) ascends the filter's own mean activation, the forward stopping at the layer.
The result is stored with the fitted state (``core.fitting``: once per model version), downsampled
to at most ``max_side`` pixels to keep the artifact small.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from xai_plugins.explainers.deconvolve.scoring import layer_calls
from xai_plugins.toolkit import batch_slices, resolve_layer


@dataclass(frozen=True)
class Ascent:
    """The schedule of a gradient ascent: Adam steps and rate, the RMS of the projection, the noise
    seed, the batch size, and a blur every ``blur_every`` steps (0: never)."""

    steps: int = 50
    lr: float = 0.05
    rms: float = 1.0
    seed: int = 0
    batch_size: int = 128
    blur_every: int = 4


class _StopForward(Exception):
    pass


class _UpTo:
    """Run a model only up to a layer's ``call``-th call (its last for a reused module): a forward hook
    stores the output and stops the pass."""

    def __init__(self, module: nn.Module, call: int = 1):
        self.module, self.output, self.handle, self.call, self.calls = module, None, None, int(call), 0

    def hook(self, module: nn.Module, args: Any, output: Any) -> None:
        self.calls += 1
        if self.calls == self.call:
            self.output = output
            raise _StopForward

    def __call__(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        self.output, self.calls = None, 0
        try:
            model(x)
        except _StopForward:
            pass
        if self.output is None:
            raise RuntimeError("the layer was not called in the forward pass")
        return self.output

    def __enter__(self) -> _UpTo:
        self.handle = self.module.register_forward_hook(self.hook)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.handle.remove()


def _ascend(
    model: nn.Module, input_shape: tuple[int, ...], n: int, objective: Any, schedule: Ascent
) -> torch.Tensor:
    """Projected Adam ascent of ``objective(x, batch slice) -> per-sample values`` from seeded noise,
    ``n`` inputs in batches, with the RMS projection and periodic blur of the module docstring.
    Each sample's best iterate is returned (never worse than its start)."""
    steps, lr, rms = schedule.steps, schedule.lr, schedule.rms
    p = next(iter(model.parameters()), None)
    device = p.device if p is not None else torch.device("cpu")
    dtype = p.dtype if p is not None and p.is_floating_point() else torch.float32
    gen = torch.Generator().manual_seed(int(schedule.seed))
    out = []
    with torch.enable_grad():
        for sl in batch_slices(n, schedule.batch_size):
            count = sl.stop - sl.start
            x = _project(
                torch.randn(count, *input_shape, generator=gen).to(device, dtype), rms
            ).requires_grad_()
            best, best_value = (
                x.detach().clone(),
                torch.full((count,), -torch.inf, device=device, dtype=dtype),
            )
            opt = torch.optim.Adam([x], lr=lr)
            for step in range(int(steps) + 1):
                value = objective(x, sl)
                better = value.detach() > best_value  # keep each sample's best iterate: the blur and the
                best[better], best_value[better] = x.detach()[better], value.detach()[better]  # projection
                if step == int(steps):  # are not monotone steps
                    break
                (grad,) = torch.autograd.grad(-value.sum(), x)  # the input's only: no parameter grads
                x.grad = grad
                opt.step()
                with torch.no_grad():
                    every = schedule.blur_every
                    y = _blur(x) if every and (step + 1) % every == 0 else x
                    x.copy_(_project(y, rms))
            out.append(best)
    return torch.cat(out) if out else torch.zeros(0, *input_shape)


def _layer_call_count(model: nn.Module, layer: str, input_shape: tuple[int, ...]) -> int:
    p = next(iter(model.parameters()), None)
    device = p.device if p is not None else torch.device("cpu")
    dtype = p.dtype if p is not None and p.is_floating_point() else torch.float32
    return len(layer_calls(model, layer, input_shape, device, dtype))


def ascend_filters(
    model: nn.Module,
    layer: str,
    input_shape: tuple[int, ...],
    filters: list[int],
    **schedule: Any,
) -> torch.Tensor:
    """The input (F x C x H x W, model input space) that maximizes each filter's mean activation.
    ``schedule``: the fields of ``Ascent`` (steps, lr, rms, seed, batch_size, blur_every)."""
    module = resolve_layer(model, layer)[1]
    with _UpTo(module, _layer_call_count(model, layer, input_shape)) as upto:

        def objective(x: torch.Tensor, sl: slice) -> torch.Tensor:
            idx = torch.tensor(filters[sl], device=x.device)
            return upto(model, x)[torch.arange(len(idx), device=x.device), idx].mean(dim=(1, 2))

        return _ascend(model, input_shape, len(filters), objective, Ascent(**schedule))


class _OnlyChannel:
    """Forward hook: the layer's ``call``-th output with every channel but ``self.keep[i]`` zeroed for
    sample i (a reused module: its last call, as elsewhere)."""

    def __init__(self, module: nn.Module, call: int):
        self.module, self.call, self.calls, self.keep, self.handle = module, int(call), 0, None, None

    def hook(self, module: nn.Module, args: Any, output: torch.Tensor) -> Any:
        self.calls += 1
        if self.calls != self.call:
            return None
        mask = torch.zeros(output.shape[:2], dtype=output.dtype, device=output.device)
        mask[torch.arange(output.shape[0], device=output.device), self.keep] = 1
        return output * mask[:, :, None, None]

    def __enter__(self) -> _OnlyChannel:
        self.handle = self.module.register_forward_hook(self.hook)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.handle.remove()


def ascend_class(
    model: nn.Module,
    layer: str,
    input_shape: tuple[int, ...],
    filters: list[int],
    classes: list[int],
    **schedule: Any,
) -> torch.Tensor:
    """The input (F x C x H x W) that maximizes the logit of ``classes[i]`` when ``layer`` passes on
    only filter ``filters[i]`` (section 3.3: the class activation as the objective)."""
    module = resolve_layer(model, layer)[1]
    with _OnlyChannel(module, _layer_call_count(model, layer, input_shape)) as only:

        def objective(x: torch.Tensor, sl: slice) -> torch.Tensor:
            only.keep, only.calls = torch.tensor(filters[sl], device=x.device), 0
            logits = model(x)
            return logits[
                torch.arange(x.shape[0], device=x.device), torch.tensor(classes[sl], device=x.device)
            ]

        return _ascend(model, input_shape, len(filters), objective, Ascent(**schedule))


def _blur(x: torch.Tensor) -> torch.Tensor:
    """A 3 x 3 binomial blur of every channel (replicate padding)."""
    k = torch.tensor([1.0, 2.0, 1.0], dtype=x.dtype, device=x.device)
    k = (k[:, None] * k[None, :]) / 16
    c = x.shape[1]
    return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), k.expand(c, 1, 3, 3), groups=c)


def _project(x: torch.Tensor, rms: float) -> torch.Tensor:
    """Scale each sample to root-mean-square ``rms``."""
    norm = x.pow(2).mean(dim=tuple(range(1, x.dim())), keepdim=True).sqrt().clamp_min(1e-12)
    return x * (rms / norm)


def shrink(patterns: torch.Tensor, max_side: int = 64) -> torch.Tensor:
    """Downsample stored patterns so their longer side is at most ``max_side`` (float16)."""
    h, w = patterns.shape[-2:]
    if max(h, w) > max_side:
        scale = max_side / max(h, w)
        patterns = F.interpolate(
            patterns.float(),
            size=(max(1, round(h * scale)), max(1, round(w * scale))),
            mode="bilinear",
            align_corners=False,
            antialias=True,
        )
    return patterns.to(torch.float16).cpu()


def display(patterns: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Stored patterns as N x 3 x H x W images in [0, 1] (per-pattern min-max, resized to ``size``)."""
    p = patterns.float()
    if p.shape[1] == 1:
        p = p.expand(-1, 3, -1, -1)
    p = p[:, :3]
    lo = p.amin(dim=(1, 2, 3), keepdim=True)
    hi = p.amax(dim=(1, 2, 3), keepdim=True)
    p = (p - lo) / (hi - lo).clamp_min(1e-12)
    if tuple(p.shape[-2:]) != tuple(size):
        p = F.interpolate(p, size=size, mode="bilinear", align_corners=False)
    return p.clamp(0, 1)
