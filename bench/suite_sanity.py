"""Cascading model parameter randomization (Adebayo et al.) with saliency: ours vs Quantus ``MPRT``.

Same layers (every module with ``reset_parameters``), same order (top down, cumulative), same
re-initialization seed, same similarity (Spearman); both explain the original batch first (Quantus
twice: its ``a_batch`` and its "original" entry). Quantus re-explains the batch with Captum's
``Saliency`` on a deep copy per randomized module and compares in NumPy; ours explains up to
``STACK_ROWS // images`` randomization steps in one batch of the engine's saliency
(``xai_plugins.metrics.sanity.stacking``): same maps, larger and so more efficient kernels.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from bench.harness import Case

MAX_IMAGES = 2  # keeps one Quantus run of ResNet-18 at 112 px well under 30 s on two CPU cores
STACK_ROWS = 32  # the Sanity metric default (saliency is rowwise: steps share batches)


def _ours(model: nn.Module, x: torch.Tensor, t: torch.Tensor) -> list[float]:
    from core.api import explain
    from xai_plugins.metrics.sanity import parameter_randomization

    def run(m: nn.Module, xx: torch.Tensor, tt: torch.Tensor):
        return explain(m, xx, tt, method="saliency", progress=False)

    curve = parameter_randomization(
        run, model, x, t, run(model, x, t), "cascading", similarities=("spearman",), stack_rows=STACK_ROWS
    )
    return curve.mean("spearman")


def _quantus(model: nn.Module, x: torch.Tensor, t: torch.Tensor) -> Any:
    import warnings

    import quantus

    metric = quantus.MPRT(layer_order="top_down", seed=42, disable_warnings=True, display_progressbar=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return metric(
            model=model,
            x_batch=x.cpu().numpy(),
            y_batch=t.cpu().numpy(),
            a_batch=None,
            explain_func=quantus.explain,
            explain_func_kwargs={"method": "Saliency"},
            device=str(x.device),
            batch_size=x.shape[0],
        )


def cases(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> list[Case]:
    x, t = inputs[:MAX_IMAGES], targets[:MAX_IMAGES]
    layers = sum(1 for n, m in model.named_modules() if n and callable(getattr(m, "reset_parameters", None)))
    return [
        Case(
            method="mprt_cascading_saliency",
            ours=lambda: _ours(model, x, t),
            peer_name="quantus",
            peer=lambda: _quantus(model, x, t),
            note=f"{layers} layers randomized top down, {x.shape[0]} images, Spearman",
            batch=x.shape[0],
        )
    ]
