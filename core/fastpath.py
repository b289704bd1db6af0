"""A faster stand-in for a model, for methods that run it many times on one batch (integrated
gradients, SmoothGrad, Score-CAM): same function, same gradients with respect to the input.

- eval-mode BatchNorm folded into the convolution before it (``torch.fx``; a private copy, the
  user's model is never touched), when the model has BatchNorm and can be traced;
- on CPU, for passes without gradients, inputs in channels-last memory format (oneDNN
  convolutions run faster on it), or better, the folded copy traced, frozen and optimized for
  inference (TorchScript: oneDNN fuses convolution + ReLU and keeps weights pre-packed; about 1.2x
  the channels-last folded copy on ResNet-18), only when the trace gives no warning (no
  data-dependent control flow for it to freeze) and matches the folded copy on batches of
  several sizes. Not with gradients: with PyTorch 2.14 on CPU, float32 input gradients on
  channels-last inputs came out up to 7 % off (max error; 1.7 % relative L2) on a batch where a
  pre-activation sits at a near-tie, so that float rounding sends the gradient down another ReLU
  route; other batches agree to 1e-6 (``tests/test_gradient_methods.py``). Gradient passes keep
  the contiguous layout, whose rounding is the reference.

Any failure of the fast path (a model that cannot be traced, a ``view`` that rejects
channels-last tensors, ...) falls back to the model itself for the rest of the session: results
never depend on it, up to float rounding. The copies live in the model's session
(``core.session``), never in a module-level cache.
"""

from __future__ import annotations

import copy
import os

import torch
from torch import nn

from core.session import derived

_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, _BN) for m in model.modules())


def _fold_batchnorm(model: nn.Module) -> nn.Module:
    """A copy with eval-mode BatchNorm folded into the preceding convolutions; the model itself
    when it cannot be copied and traced. Kept in the model's session (``core.session``)."""
    from torch.fx.experimental.optimization import fuse

    try:
        folded = fuse(copy.deepcopy(model).eval(), inplace=True)
    except Exception:  # noqa: BLE001 - untraceable or uncopyable model: no folding
        return model
    for p in folded.parameters():
        p.requires_grad_(False)
    return folded


# XAI_NO_FREEZE=1 turns the TorchScript inference path off (e.g. for a model whose forward has
# Python side effects, which a trace does not replay).
FREEZE_FOR_INFERENCE = os.environ.get("XAI_NO_FREEZE") != "1"


def _frozen_inference(folded: nn.Module, x: torch.Tensor) -> torch.jit.ScriptModule | None:
    """``folded`` traced on two rows of ``x``, frozen and optimized for CPU inference (for one image
    size and dtype, kept in the model's session); None when that fails, the trace warns, or its
    outputs differ from ``folded``'s on batches of other sizes and rows."""
    import warnings

    try:
        with warnings.catch_warnings(record=True) as caught, torch.no_grad():
            warnings.simplefilter("always")
            traced = torch.jit.trace(folded, x[:2], check_trace=False)
            candidate = torch.jit.optimize_for_inference(torch.jit.freeze(traced.eval()))
            agrees = all(_close(candidate(v), folded(v)) for v in (x[:2], x[:1], x[-3:]))
        if agrees and not any(issubclass(w.category, torch.jit.TracerWarning) for w in caught):
            return candidate
    except Exception:  # noqa: BLE001 - not traceable or not freezable: the folded copy it is
        pass
    return None


def _close(a: object, b: object) -> bool:
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)) or a.shape != b.shape:
        return False
    scale = float(b.abs().max()) if b.numel() else 0.0
    return bool(torch.allclose(a.float(), b.float(), rtol=1e-4, atol=1e-5 * max(scale, 1.0)))


def uses_channels_last(x: torch.Tensor, needs_grad: bool) -> bool:
    """Whether a forward of ``x`` runs channels-last: CPU image batches on passes without gradients
    (faster oneDNN convolutions; its gradients can take another ReLU route at a near-tie, see the module doc)."""
    return not needs_grad and x.device.type == "cpu" and x.dim() == 4


class _FastPath:
    """The session's stand-ins for one model: the folded copy (None once it failed), frozen copies."""

    def __init__(self, model: nn.Module):
        self.folded: nn.Module | None = _fold_batchnorm(model) if _has_batchnorm(model) else model
        self.checked = False
        self.frozen: dict[tuple, torch.jit.ScriptModule | None] = {}


class FastForward(nn.Module):
    """Call like the model: ``fast = FastForward(model); logits = fast(x)``.

    Only for forward passes on inputs (and gradients with respect to them): hooks or layer
    captures must go on the original model, whose modules the folded copy does not share. The
    copies are made once per session of the model (``core.session``; without one, once per
    stand-in).
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.original = model
        # a model in training mode uses batch statistics: folding eval-mode BatchNorm would change it
        self.path: _FastPath | None = (
            None if model.training else derived(model, "fastpath", lambda: _FastPath(model))
        )

    def _layout(self, x: torch.Tensor) -> torch.Tensor:
        if uses_channels_last(x, torch.is_grad_enabled()):
            return x.contiguous(memory_format=torch.channels_last)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        path = self.path
        if path is None or path.folded is None or self.original.training:
            return self.original(x)
        if FREEZE_FOR_INFERENCE and uses_channels_last(x, torch.is_grad_enabled()):
            size = (tuple(x.shape[1:]), x.dtype)
            if size not in path.frozen:
                path.frozen[size] = _frozen_inference(path.folded, x)
            frozen = path.frozen[size]
            if frozen is not None:
                return frozen(x)
        if path.checked:
            return path.folded(self._layout(x))
        try:
            out = path.folded(self._layout(x))
        except Exception:  # noqa: BLE001 - fall back to the model as it is, for the session
            path.folded = None
            return self.original(x)
        path.checked = True
        return out


def fast_forward(model: nn.Module) -> nn.Module:
    """The model itself, or a faster equivalent for repeated forward/backward passes on inputs."""
    return model if isinstance(model, FastForward) else FastForward(model)
