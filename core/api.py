"""The public Python API: ``explain(model, inputs, targets=None, method="grad_cam", **params)``."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from core.engine import Engine, MethodRequest
from core.session import session
from core.types import Explanation

__all__ = ["explain", "session", "Explanation"]


def explain(
    model: nn.Module,
    inputs: torch.Tensor,
    targets: Any = None,
    method: str = "grad_cam",
    *,
    batch_size: int | None = 32,
    device: str | torch.device | None = None,
    timeout: float | None = None,
    progress: bool = True,
    fit_data: Any = None,
    **params: Any,
) -> Explanation:
    """Explain ``inputs`` (B x C x H x W, already normalized for ``model``) with one method.

    ``targets``: class indices (int, sequence or tensor); ``None`` explains the predicted class.
    ``params``: the method's parameters (unknown ones are an error listing the known ones);
    ``batch_size`` also reaches methods that take one. ``fit_data`` (a tensor of inputs, an
    ``(inputs, labels)`` pair or a ``core.fitting.FitData``) trains trainable explainers (PV decoder,
    adversarial generators, soft tree, DeConvolve filter maps) once per model; by default they fit
    on ``inputs``, or reuse what is stored for this model. The model runs in eval mode and is left
    exactly as found (training flag, hooks, parameters, requires_grad), even on error.

    Each call derives what it needs from the model afresh (a BatchNorm-folded copy, the default
    layer, LRP's prepared rules); in a loop over batches, ``with session(model):`` keeps those for
    every call inside it, the caller promising not to change the model's weights there.
    """
    if "batch_size" in params:
        batch_size = params["batch_size"]
    request = MethodRequest(method, dict(params, batch_size=batch_size) if batch_size else params)
    engine = Engine(
        device=device, batch_size=batch_size, timeout=timeout, progress=progress, fit_data=fit_data
    )
    out = engine.run(model, inputs, [request], targets=targets, isolate=False, logits=False)
    return out.explanations[request.label]
