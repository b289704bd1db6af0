"""The ``sanity`` metric: both randomization tests on the run's explanation, with their figures."""

from __future__ import annotations

import time
from typing import Any

import torch

from xai_plugins import Explanation, Metric, MetricContext, hookimpl
from xai_plugins.metrics.plots import line_plot, map_grid
from xai_plugins.metrics.sanity.label_randomization import label_randomization, training_data
from xai_plugins.metrics.sanity.model_randomization import (
    ORDERS,
    RandomizationCurve,
    _rows_of,
    parameter_randomization,
)
from xai_plugins.toolkit import explainer_flag


class Sanity(Metric):
    """Adebayo et al.'s sanity checks: cascading and independent model parameter randomization
    curves (``cascading.<similarity>`` per layer, ``cascading.<similarity>_full`` at full
    randomization, ``independent.<similarity>_max`` over layers) and label randomization
    (``label.<similarity>``). Lower similarity = the explanation depends on what the model learned.
    """

    name = "sanity"
    requires = ("explain",)
    higher_is_better = False
    params = {
        "cascading": True,
        "independent": True,
        "layers": None,
        "seed": 42,
        "similarities": ["spearman", "spearman_signed", "ssim", "hog"],
        "max_images": 32,
        "figures": True,
        "grid_images": 3,
        "label_randomization": True,
        "label_max_params": 1_000_000,
        "label_samples": 512,
        "label_epochs": 10,
        "label_lr": 3e-3,
        "stack_rows": 32,
    }

    def compute(self, context: MetricContext) -> dict[str, Any]:
        cfg = self.config
        n = min(int(cfg["max_images"]), context.inputs.shape[0])
        inputs, targets = context.inputs[:n], context.targets[:n]
        original = _subset(context.explanation, n)
        sims = list(cfg["similarities"])
        stack_rows = int(cfg["stack_rows"]) if explainer_flag(context.explanation.method, "rowwise") else 0
        out: dict[str, Any] = {}
        figures: dict[str, bytes] = {}
        images = context.results.images[:n] if context.results is not None else None
        for order in ORDERS:
            if not cfg[order]:
                continue
            curve = parameter_randomization(
                context.explain,
                context.model,
                inputs,
                targets,
                original,
                order,
                cfg["layers"],
                int(cfg["seed"]),
                sims,
                int(cfg["grid_images"]),
                stack_rows,
            )
            out.update(_curve_values(curve))
            if cfg["figures"]:
                figures.update(_curve_figures(curve, original, images, int(cfg["grid_images"])))
        if cfg["label_randomization"]:
            out.update(self._label(context, inputs, targets, original, sims, images, figures))
        if figures:
            out["_figures"] = figures
        return out

    def _label(self, context, inputs, targets, original, sims, images, figures) -> dict[str, Any]:
        cfg = self.config
        size = sum(p.numel() for p in context.model.parameters())
        if size > int(cfg["label_max_params"]):
            return {
                "label.skipped": f"model has {size} parameters (> label_max_params {cfg['label_max_params']})"
            }
        data = training_data(context, int(cfg["label_samples"]), int(cfg["seed"]))
        if isinstance(data, str):
            return {"label.skipped": data}
        start = time.perf_counter()
        scores, exp, acc = label_randomization(
            context.explain,
            context.model,
            data[0],
            data[1],
            inputs,
            targets,
            original,
            sims,
            int(cfg["label_epochs"]),
            float(cfg["label_lr"]),
            seed=int(cfg["seed"]),
        )
        out: dict[str, Any] = {f"label.{s}": float(v.mean()) for s, v in scores.items()}
        out["label.train_accuracy"] = acc
        out["label.seconds"] = time.perf_counter() - start
        if cfg["figures"]:
            k = int(cfg["grid_images"])
            figures["label_grid"] = map_grid(
                [("original", original.maps[:k]), ("random labels", exp.maps[:k])],
                images[:k] if images is not None else None,
                "explanations of a model trained on permuted labels",
            )
        return out


def _subset(exp: Explanation, n: int) -> Explanation:
    return _rows_of(exp, 0, n)


def _curve_values(curve: RandomizationCurve) -> dict[str, Any]:
    o = curve.order
    out: dict[str, Any] = {
        f"{o}.layers": list(curve.layers),
        f"{o}.seconds": curve.seconds,
        f"{o}.stacked_steps": curve.stacked_steps,
    }
    if curve.stack_mismatch:
        out[f"{o}.stack_mismatch"] = curve.stack_mismatch
    for s in curve.scores:
        values = curve.mean(s)
        out[f"{o}.{s}"] = values
        out[f"{o}.{s}_mean"] = sum(values) / len(values)
        if o == "cascading":
            out[f"{o}.{s}_full"] = values[-1]
        else:
            out[f"{o}.{s}_max"] = max(values)
    return out


def _curve_figures(
    curve: RandomizationCurve, original: Explanation, images: torch.Tensor | None, k: int
) -> dict[str, bytes]:
    x = ["original", *curve.layers]
    series = {s: [1.0, *curve.mean(s)] for s in curve.scores}
    what = "top down, cumulative" if curve.order == "cascading" else "one layer at a time"
    figs = {
        f"{curve.order}_curve": line_plot(
            x,
            series,
            f"{original.method}: {curve.order} randomization ({what})",
            "similarity to original",
            "randomized layer",
            (-0.5, 1.05),
        )
    }
    columns = [("original", original.maps[:k])] + list(zip(curve.layers, curve.maps))
    figs[f"{curve.order}_grid"] = map_grid(
        columns,
        images[:k] if images is not None else None,
        f"{original.method}: maps after {curve.order} randomization",
    )
    return figs


@hookimpl
def xai_metrics():
    return [Sanity]
