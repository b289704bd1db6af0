"""Explanation drift between model versions: the same probe images explained by version N and by
version N-1, method by method. A retrained model that reaches the same accuracy for different
reasons shows up here even when its metrics do not.

``explanation_drift(maps_a, maps_b)`` compares two sets of maps (method -> B x H x W, e.g. the
``maps.npz`` the json reporter writes); the ``drift`` metric compares this run's maps with the
``maps.npz`` of the previous version (param ``previous``: the file or its run directory).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from xai_plugins import Metric, MetricContext, XAIError, hookimpl
from xai_plugins.similarity import dice_at_quantile, spearman, ssim

DRIFT_MEASURES = ("spearman", "ssim", "dice90", "l1")


def map_drift(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    """Similarity of two B x H x W map batches (means over images): spearman, ssim, dice90 (higher
    = less drift) and l1, the mean absolute difference of the [0, 1] maps (lower = less drift)."""
    a, b = torch.as_tensor(a).float(), torch.as_tensor(b).float()
    if a.shape != b.shape:
        raise XAIError(
            f"maps of shape {tuple(a.shape)} and {tuple(b.shape)} cannot be compared: "
            "drift needs the same probe images"
        )
    return {
        "spearman": float(spearman(a, b).mean()),
        "ssim": float(ssim(a, b).mean()),
        "dice90": float(dice_at_quantile(a, b).mean()),
        "l1": float((a - b).abs().mean()),
    }


def explanation_drift(maps_a: dict[str, torch.Tensor], maps_b: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Per method present in both: ``map_drift``; plus the methods found in only one of them."""
    common = sorted(set(maps_a) & set(maps_b))
    return {
        "methods": {m: map_drift(maps_a[m], maps_b[m]) for m in common},
        "only_in_a": sorted(set(maps_a) - set(maps_b)),
        "only_in_b": sorted(set(maps_b) - set(maps_a)),
    }


def load_maps(path: str | Path) -> tuple[dict[str, torch.Tensor], list[str] | None]:
    """Maps of a previous run (maps.npz, or the directory holding it) and, when its results.json is
    next to it, the names of its probe images."""
    path = Path(path)
    npz = path / "maps.npz" if path.is_dir() else path
    if not npz.is_file():
        raise XAIError(f"no maps of a previous version at {str(npz)!r}")
    with np.load(npz) as data:
        maps = {k: torch.from_numpy(data[k]) for k in data.files}
    names = None
    results = npz.parent / "results.json"
    if results.is_file():
        names = [row.get("name") for row in json.loads(results.read_text()).get("images", [])]
    return maps, names


def _label(context: MetricContext) -> str:
    results = context.results
    if results is not None:
        for label, exp in results.explanations.items():
            if exp is context.explanation:
                return label
    return context.explanation.method


class Drift(Metric):
    """Drift of this method's maps from the previous model version's (``previous``: its maps.npz or
    run directory): ``drift.spearman``, ``drift.ssim``, ``drift.dice90`` (higher = less drift),
    ``drift.l1``; ``drift.compared`` is 0 when there is no previous version to compare with."""

    name = "drift"
    higher_is_better = None
    params = {"previous": None}

    def compute(self, context: MetricContext) -> dict[str, Any]:
        previous = self.config["previous"]
        if not previous:
            return {"compared": 0.0}
        maps, names = load_maps(previous)
        key = _label(context).replace("/", "_")
        if key not in maps:
            raise XAIError(
                f"the previous version has no maps for {key!r} (it has: {', '.join(sorted(maps))})"
            )
        results = context.results
        if names is not None and results is not None and results.image_names and names != results.image_names:
            raise XAIError(
                "the previous version was explained on other probe images: drift needs the same ones"
            )
        return {"compared": 1.0, **map_drift(context.explanation.maps.float().cpu(), maps[key])}


@hookimpl
def xai_metrics():
    return [Drift]
